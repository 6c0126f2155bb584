"""Parity of bn_relu / bn_add_relu / bn_add_bn_relu against F.batch_norm in float64.

Marked ``both``: these run once on the PyTorch CPU path and once with the Triton kernels
through the interpreter (TRITON_INTERPRET=1, a separate pytest process).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_resnet
from fused_resnet import backend
from fused_resnet.bn_add_relu import stat_slots
from reference import DEVICE, assert_close, f64, reference_bn

OPS = ["bn_relu", "bn_add_relu", "bn_add_bn_relu"]
# Shapes that fit no block size; C=70 spans two finalize blocks and many channel tiles.
SHAPES = [(2, 3, 7, 7), (1, 4, 5, 5), (3, 70, 3, 3)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


def make_bn_state(C, seed):
    """(running_mean, running_var, weight, bias, num_batches_tracked), fp32 like nn.BatchNorm2d."""
    g = torch.Generator().manual_seed(seed)
    state = (torch.randn(C, generator=g) * 0.1, torch.rand(C, generator=g) + 0.5,
             torch.randn(C, generator=g), torch.randn(C, generator=g), torch.tensor(0, dtype=torch.long))
    return tuple(t.to(DEVICE) for t in state)


def make_input(shape, dtype, channels_last, seed, mean=0.5, std=2.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(DEVICE, dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def fused_call(op, x, r, bn, rbn, training, momentum):
    rm, rv, w, b, nbt = bn
    if op == "bn_relu":
        return fused_resnet.bn_relu(x, rm, rv, w, b, training, momentum, EPS, num_batches_tracked=nbt)
    if op == "bn_add_relu":
        return fused_resnet.bn_add_relu(x, r, rm, rv, w, b, training, momentum, EPS, num_batches_tracked=nbt)
    r_rm, r_rv, r_w, r_b, r_nbt = rbn
    return fused_resnet.bn_add_bn_relu(x, r, rm, rv, w, b, r_rm, r_rv, r_w, r_b, training, momentum, EPS,
                                       r_momentum=momentum, num_batches_tracked=nbt, r_num_batches_tracked=r_nbt)


def reference_pre_relu(op, x, r, bn, rbn, training, momentum):
    """What the fused op feeds its final ReLU, in float64."""
    rm, rv, w, b, nbt = bn
    y = reference_bn(x, rm, rv, w, b, training, momentum, EPS, nbt)
    if op == "bn_add_relu":
        y = y + r
    elif op == "bn_add_bn_relu":
        r_rm, r_rv, r_w, r_b, r_nbt = rbn
        y = y + reference_bn(r, r_rm, r_rv, r_w, r_b, training, momentum, EPS, r_nbt)
    return y


def as_f64_state(bn, grad):
    rm, rv, w, b, nbt = bn
    return (f64(rm), f64(rv), f64(w, grad), f64(b, grad), nbt.clone())


def leaf(t):
    return t.detach().clone().requires_grad_()


def check_steps(op, shape, dtype, channels_last, training, momentum=0.1, steps=3, mean=0.5, std=2.0):
    """Run ``steps`` forward+backward steps of the fused op and of the float64 reference,
    comparing outputs, every gradient and the running statistics after each step."""
    C = shape[1]
    bn, rbn = make_bn_state(C, 1), make_bn_state(C, 2)
    bn = (bn[0], bn[1], leaf(bn[2]), leaf(bn[3]), bn[4])
    rbn = (rbn[0], rbn[1], leaf(rbn[2]), leaf(rbn[3]), rbn[4])
    bn64, rbn64 = as_f64_state(bn, True), as_f64_state(rbn, True)
    for step in range(steps):
        x = make_input(shape, dtype, channels_last, 10 + step, mean, std).requires_grad_()
        r = make_input(shape, dtype, channels_last, 20 + step).requires_grad_()
        # The gradient arrives NCHW even for a channels_last output: the op must cope.
        dy = make_input(shape, dtype, False, 30 + step, 0.0, 1.0)
        uses_r = op != "bn_relu"

        y = fused_call(op, x, r if uses_r else None, bn, rbn, training, momentum)
        assert y.dtype == dtype and y.shape == x.shape
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        y.backward(dy)

        x64, r64 = f64(x, True), f64(r, True)
        pre64 = reference_pre_relu(op, x64, r64 if uses_r else None, bn64, rbn64, training, momentum)
        y64 = torch.relu(pre64)
        # The ReLU's mask is taken from the fused output: where the exact pre-activation is
        # within rounding of 0 either side is right, and the mask must not decide the test.
        pre64.backward(torch.where(y > 0, dy, 0).double())

        tag = f"{op} step {step}"
        assert_close(y, y64, dtype, f"{tag} y")
        assert_close(x.grad, x64.grad, dtype, f"{tag} dx")
        if uses_r:
            assert_close(r.grad, r64.grad, dtype, f"{tag} d_residual")
        pairs = [("weight", bn[2], bn64[2]), ("bias", bn[3], bn64[3])]
        if op == "bn_add_bn_relu":
            pairs += [("r_weight", rbn[2], rbn64[2]), ("r_bias", rbn[3], rbn64[3])]
        for name, p, p64 in pairs:
            assert_close(p.grad, p64.grad, dtype, f"{tag} d{name}", params=True)
            p.grad = None
            p64.grad = None
        states = [("", bn, bn64)] + ([("r_", rbn, rbn64)] if op == "bn_add_bn_relu" else [])
        for prefix, s, s64 in states:
            assert_close(s[0], s64[0], dtype, f"{tag} {prefix}running_mean", params=True)
            assert_close(s[1], s64[1], dtype, f"{tag} {prefix}running_var", params=True)
            assert int(s[4]) == int(s64[4])


@pytest.mark.both
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_parity_with_float64_reference(op, shape, dtype, channels_last, training):
    if backend.INTERPRET and shape != SHAPES[0] and dtype != torch.float32:
        pytest.skip("interpreter time: the low-precision dtypes run on the first shape only")
    if backend.INTERPRET and shape == SHAPES[2] and not channels_last:
        # NCHW gives it 35 two-channel tiles (a minute in the interpreter); channels_last covers
        # the two finalize blocks, 2x3x7x7 NCHW the masked channel tiles and several partials.
        pytest.skip("interpreter time: C=70 runs in channels_last")
    check_steps(op, shape, dtype, channels_last, training)


@pytest.mark.both
@pytest.mark.parametrize("op", OPS)
def test_cumulative_average_with_momentum_none(op):
    check_steps(op, (2, 3, 4, 4), torch.float32, False, True, momentum=None, steps=3)


def assert_within(got: torch.Tensor, want: torch.Tensor, tolerance: torch.Tensor, name: str) -> None:
    """|got - want| <= tolerance elementwise (float64), naming the worst ratio when not."""
    error = (got.detach().double() - want.detach()).abs()
    ratio = torch.where(error == 0, 0.0, error / tolerance).max().item()  # a channel the ReLU zeroes: 0 within 0
    assert ratio <= 1.0, f"{name}: error up to {ratio:.3g}x its tolerance"


@pytest.mark.both
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_large_mean_statistics(channels_last):
    """mean 1e4, std 1: the naive E[x^2] - E[x]^2 in fp32 would lose the variance entirely
    (ulp(1e8) = 8), so the running variance is the sharp check here.

    Tolerances from fp32 error growth (u = 2^-24) against float64 on the same fp32 input.
    The batch mean is a sum of n values, whose rounding depends on the order: on the
    PyTorch path ATen's channels_last kernel sums each thread's rows in fp32, off float64
    by 2.6 u at 1 thread and 1.4 u at 2 (NCHW and the Triton kernel: 0.3 u, either count),
    so the mean gets the bound of any order. Everything after it carries the op's own mean
    error delta (momentum 1 makes running_mean that mean): the variance about a mean delta
    off is var + delta^2, and x - mean is off by delta, each plus the roundings of its sums.
    Measured, largest error / tolerance: 0.49 (weight.grad, ATen channels_last, 1 thread);
    the Triton kernel 0.35, the same at 1 and 2 threads.
    """
    x = make_input((2, 3, 7, 7), torch.float32, channels_last, 7, mean=1e4, std=1.0).requires_grad_()
    rm, rv, w, b, _ = make_bn_state(3, 1)
    w, b = leaf(w), leaf(b)
    rm64, rv64 = f64(rm), f64(rv)
    y = fused_resnet.bn_relu(x, rm, rv, w, b, training=True, momentum=1.0)
    x64, w64, b64 = f64(x, True), f64(w, True), f64(b, True)
    pre64 = F.batch_norm(x64, rm64, rv64, w64, b64, training=True, momentum=1.0)
    dy = make_input(x.shape, torch.float32, False, 8, 0.0, 1.0)
    y.backward(dy)
    dy64 = torch.where(y > 0, dy, 0).double()  # the op's ReLU mask on both sides
    pre64.backward(dy64)

    u, n = 2.0 ** -24, x.numel() // x.shape[1]

    def per_c(t):  # a per-channel figure against the activation's elements
        return t.view(1, -1, 1, 1)

    mean, var = rm64, x64.detach().var((0, 2, 3), unbiased=False)
    sigma = (var + EPS).sqrt()
    xhat = (x64.detach() - per_c(mean)) / per_c(sigma)
    # A sum of n values in any order is within (n - 1) u sum|x| of its value (Higham, eq. 4.4); / n adds u.
    delta = (rm.double() - rm64).abs()
    assert_within(rm, rm64, n * u * rm64.abs(), "running_mean")
    # The variance about the op's mean: var + delta^2; its sum of n squares rounds within (n + 1) u, x2 for a
    # shifted formula's cancellation ((mean - shift)^2 <= 0.64 var here). 1/sigma: half of that, plus 2 roundings.
    rv_rtol = delta ** 2 / var + 2 * (n + 1) * u
    assert_within(rv, rv64, rv_rtol * rv64, "running_var")
    s, sigma_rtol = per_c(delta / sigma), per_c(rv_rtol / 2 + 2 * u)
    # y may be formed as x * (w / sigma) + (b - mean * w / sigma), as ATen's CPU kernel does: two roundings of
    # terms of size |w| (|x| + |mean|) / sigma ~ 1e4, where x - mean is exact. Every tolerance below is x2
    # for the second-order terms and the last roundings of each formula.
    affine = per_c(w64.detach().abs() / sigma) * (x64.detach().abs() + per_c(mean.abs()))
    y_tol = 2 * (per_c(w64.detach().abs()) * (s + xhat.abs() * sigma_rtol) + 2 * u * affine)
    assert_within(y, torch.relu(pre64), y_tol, "y")
    # dx = w / sigma * (dy - mean(dy) - xhat * mean(dy * xhat)), with xhat off by s and 1/sigma by sigma_rtol.
    dy_mean, dy_xhat_mean = per_c(dy64.mean((0, 2, 3))).abs(), per_c((dy64 * xhat).mean((0, 2, 3))).abs()
    sums = n * u * (per_c(dy64.abs().mean((0, 2, 3))) + xhat.abs() * per_c((dy64 * xhat).abs().mean((0, 2, 3))))
    x_grad_tol = 2 * (per_c(w64.detach().abs() / sigma) * (s * (dy_xhat_mean + xhat.abs() * dy_mean) + sums
                                                           + 2 * xhat.abs() * dy_xhat_mean * sigma_rtol)
                      + x64.grad.abs() * sigma_rtol + 2 * u * affine * dy_xhat_mean / per_c(sigma))
    assert_within(x.grad, x64.grad, x_grad_tol, "x.grad")
    # dw = sum(dy * xhat): off by s * |sum(dy)|, sigma_rtol of itself, and its sum's rounding.
    w_grad_tol = 2 * ((delta / sigma) * dy64.sum((0, 2, 3)).abs() + w64.grad.abs() * sigma_rtol.flatten()
                      + n * u * (dy64 * xhat).abs().sum((0, 2, 3)))
    assert_within(w.grad, w64.grad, w_grad_tol, "weight.grad")


@pytest.mark.both
@pytest.mark.parametrize("op", OPS)
def test_bitwise_reproducible(op):
    outs = []
    for _ in range(2):
        bn, rbn = make_bn_state(5, 1), make_bn_state(5, 2)
        bn = (bn[0], bn[1], leaf(bn[2]), leaf(bn[3]), bn[4])
        x = make_input((3, 5, 6, 6), torch.float32, False, 3).requires_grad_()
        r = make_input((3, 5, 6, 6), torch.float32, False, 4).requires_grad_()
        y = fused_call(op, x, r if op != "bn_relu" else None, bn, rbn, True, 0.1)
        y.backward(torch.ones_like(y))
        outs.append([y, x.grad, bn[2].grad, bn[3].grad, bn[0], bn[1]] + ([r.grad] if op != "bn_relu" else []))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.both
def test_non_dense_input_is_read_through_a_copy():
    base = make_input((2, 6, 8, 8), torch.float32, False, 5)
    x = base[:, ::2, 1:7, ::2]  # neither NCHW- nor NHWC-contiguous
    rm, rv, w, b, _ = make_bn_state(3, 1)
    y = fused_resnet.bn_relu(x, rm.clone(), rv.clone(), w, b, training=True)
    y64 = F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), training=True).relu()
    assert_close(y, y64, torch.float32, "y")


@pytest.mark.skipif(backend.INTERPRET or DEVICE != "cpu", reason="the CPU PyTorch path only")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cpu_path_is_bitwise_eager(training):
    """Without Triton, the ops run ATen's own kernels: the same bits as the eager sequence."""
    x = make_input((2, 3, 5, 5), torch.float32, False, 1).requires_grad_()
    r = make_input((2, 3, 5, 5), torch.float32, False, 2).requires_grad_()
    rm, rv, w, b, _ = make_bn_state(3, 1)
    rm2, rv2 = rm.clone(), rv.clone()
    w1, b1, w2, b2 = leaf(w), leaf(b), leaf(w), leaf(b)
    y = fused_resnet.bn_add_relu(x, r, rm, rv, w1, b1, training)
    x2, r2 = leaf(x), leaf(r)
    y2 = torch.relu(F.batch_norm(x2, rm2, rv2, w2, b2, training) + r2)
    y.sum().backward()
    y2.sum().backward()
    for a, b_ in [(y, y2), (x.grad, x2.grad), (r.grad, r2.grad), (w1.grad, w2.grad), (b1.grad, b2.grad),
                  (rm, rm2), (rv, rv2)]:
        assert torch.equal(a, b_)


@pytest.mark.both
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["none", "add", "bn"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_custom_ops_directly(mode, training):
    """The registered ops themselves (reached by torch.compile / torch.export on the Triton
    path; on the CPU the functions call ATen directly): schema, fake implementation and
    autograd registration pass torch.library.opcheck, and the numbers are F.batch_norm's."""
    x = make_input((2, 3, 4, 4), torch.float32, False, 1)
    r = make_input((2, 3, 4, 4), torch.float32, False, 2)
    rm, rv, w, b, nbt = make_bn_state(3, 1)
    r_rm, r_rv, r_w, r_b, r_nbt = make_bn_state(3, 2)
    r_state = (r_rm, r_rv, r_nbt, r_w, r_b) if mode == 2 else (None,) * 5
    args = (x, *stat_slots(training, rm, rv, nbt), w, b, training, 0.1, EPS, mode, r if mode else None,
            *stat_slots(training, *r_state[:3]), *r_state[3:], training, 0.1, EPS)
    fwd = torch.ops.fused_resnet.bn_add_relu_forward.default
    torch.library.opcheck(fwd, tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
    y, mean, invstd, r_mean, r_invstd = fwd(*args)
    pre = F.batch_norm(x.double(), f64(make_bn_state(3, 1)[0]), f64(make_bn_state(3, 1)[1]), f64(w), f64(b),
                       training)
    if mode == 1:
        pre = pre + r.double()
    elif mode == 2:
        pre = pre + F.batch_norm(r.double(), f64(make_bn_state(3, 2)[0]), f64(make_bn_state(3, 2)[1]), f64(r_w),
                                 f64(r_b), training)
    assert_close(y, torch.relu(pre), torch.float32, "y")
    bwd_args = (torch.ones_like(y), y, x, mean, invstd, rm, rv, w, b, training, EPS, mode, r if mode else None,
                r_mean, r_invstd, r_state[0], r_state[1], r_state[3], r_state[4], training, EPS,
                [True, True, mode == 2, mode == 2])
    torch.library.opcheck(torch.ops.fused_resnet.bn_add_relu_backward.default, bwd_args)
    torch.library.opcheck(torch.ops.fused_resnet.add_relu.default, (x, r))
