"""Parity of the 1x1-convolution GEMMs with BatchNorm fused (``conv1x1_bn_relu``,
``bn_relu_conv1x1``) against float64, next to eager PyTorch in the same dtype.

The bar: fp32 within 4x eager fp32's own error against float64 with TF32 off (both sides
IEEE fp32 products), within a TF32-sized bound with TF32 on (``TF32_FLOOR``); fp16 / bf16 no
worse than eager in the same dtype (both measured here, per output and gradient, as the
largest absolute error). The fp32 tests set cuDNN's convolution precision, which the fused
GEMMs follow too, so they hold on a GPU whatever its default. Marked ``both``: on the
PyTorch CPU path the functions are the eager sequence itself; in the TRITON_INTERPRET=1
process they run the kernels (tl.dot included) on channels_last CPU tensors. Shapes fit no tile: C_in = 20, C_out = 23,
M = 40 (stride 1: three 16-row tiles, the statistics merged across them) or 12 (stride 2).
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from fused_resnet import backend
from fused_resnet.conv1x1_bn import bn_relu_conv1x1, conv1x1_bn_relu
from reference import DEVICE, TRITON_PATH, assert_close

OPS = ["conv1x1_bn_relu", "bn_relu_conv1x1"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
N, C_IN, H, W, C_OUT = 2, 20, 4, 5, 23
EPS = 1e-5
# Errors below this fraction of the largest reference value are not told apart: the
# bound is max(factor * eager's error, FLOOR * scale).
FLOOR = {torch.float32: 2.0 ** -22, torch.float16: 2.0 ** -13, torch.bfloat16: 2.0 ** -10}
FACTOR = {torch.float32: 4.0, torch.float16: 1.0, torch.bfloat16: 1.0}
# In fp16 / bf16 the final rounding dominates and both sides usually round to the same
# value, so their largest errors tie; an element rounded the other way moves the largest
# error by a fraction of an ulp step. The slack covers that, not a worse computation.
SLACK = {torch.float32: 0.0, torch.float16: 0.1, torch.bfloat16: 0.1}
# TF32 keeps 10 of fp32's 23 mantissa bits: each GEMM operand is rounded with unit roundoff
# 2^-11, two per product, so a length-K dot product's error is about 2 * 2^-11 * sqrt(K)
# (independent roundings, fp32 accumulation) of its operands' scale. K: the longest
# reduction of the three GEMMs (the weight gradient's N*H*W rows); a factor 2 for the
# BatchNorm around the GEMM. Relative to the largest reference value, as FLOOR.
TF32_FLOOR = 2 * 2 * 2.0 ** -11 * math.sqrt(max(C_IN, C_OUT, N * H * W))


@contextlib.contextmanager
def conv_precision(tf32: bool):
    """cuDNN's fp32 convolution precision (TF32 or IEEE) within the block, through the API this
    torch has; F.conv2d and the fused GEMMs (``fused_resnet.conv1x1_bn.allow_tf32``) follow it."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None:
        saved = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = tf32
    else:
        saved = conv.fp32_precision
        conv.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        yield
    finally:
        if conv is None:
            torch.backends.cudnn.allow_tf32 = saved
        else:
            conv.fp32_precision = saved


@contextlib.contextmanager
def bf16_casts_round_to_nearest():
    """Triton's interpreter truncates fp32 -> bf16 casts (``cast_impl`` passes no rounding
    mode), where a GPU's conversion rounds to nearest even; truncation biases every bf16
    result toward zero by up to 1 ulp, and that bias grows through a GEMM. Within the
    block, casts round as on a GPU, so the bf16 bars measure what a GPU would compute.
    (This family's kernels round on the bits themselves; bn_add_relu's do not.)"""
    if not backend.INTERPRET:
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.asarray(src.data, dtype=np.float32)
            bits = data.view(np.uint32)
            out = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
            out = np.where(np.isnan(data), ((bits >> 16) | np.uint32(0x40)).astype(np.uint16), out)
            return interpreter.TensorHandle(out, dst_type.scalar)
        return original(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.cast_impl = original


@pytest.fixture(autouse=True)
def _bf16_rounding():
    with bf16_casts_round_to_nearest():
        yield


def generator(seed):
    return torch.Generator().manual_seed(seed)


def bn_state(C, seed):
    """(running_mean, running_var, weight, bias, num_batches_tracked) in fp32, as nn.BatchNorm2d holds them."""
    g = generator(seed)
    return [torch.randn(C, generator=g) * 0.1, torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g),
            torch.randn(C, generator=g), torch.tensor(0, dtype=torch.long)]


def conv_params(seed, bias):
    g = generator(seed)
    w = torch.randn(C_OUT, C_IN, 1, 1, generator=g, dtype=torch.float64) / C_IN ** 0.5
    b = torch.randn(C_OUT, generator=g, dtype=torch.float64) if bias else None
    return w, b


def channels_last_input(shape, dtype, seed, mean=0.5, std=2.0):
    x = torch.randn(shape, generator=generator(seed), dtype=torch.float64) * std + mean
    return x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)


class Run:
    """One side of the comparison: its own leaves and BatchNorm state, in one dtype."""

    def __init__(self, dtype, op, bias, seed=1, values=None):
        """``values``: the dtype the convolution's parameters are rounded to first (a
        float64 reference of a 16-bit run starts from the same rounded values)."""
        C_bn = C_OUT if op == "conv1x1_bn_relu" else C_IN
        self.dtype, self.op = dtype, op
        w, b = conv_params(seed, bias)
        values = values or dtype
        w, b = w.to(values), (b.to(values) if b is not None else None)
        param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.conv_w = w.to(DEVICE, dtype).requires_grad_()
        self.conv_b = None if b is None else b.to(DEVICE, dtype).requires_grad_()
        rm, rv, bw, bb, self.nbt = bn_state(C_bn, seed + 1)
        self.rm, self.rv = rm.to(DEVICE, param_dtype), rv.to(DEVICE, param_dtype)
        self.bn_w = bw.to(DEVICE, param_dtype).requires_grad_()
        self.bn_b = bb.to(DEVICE, param_dtype).requires_grad_()

    def leaves(self):
        return {"conv_weight": self.conv_w, "conv_bias": self.conv_b, "bn_weight": self.bn_w, "bn_bias": self.bn_b}

    def fused(self, x, training, stride, momentum, residual=None):
        if self.op == "conv1x1_bn_relu":
            return conv1x1_bn_relu(x, self.conv_w, self.conv_b, self.rm, self.rv, self.bn_w, self.bn_b, training,
                                   momentum, EPS, stride=stride, residual=residual, num_batches_tracked=self.nbt)
        return bn_relu_conv1x1(x, self.rm, self.rv, self.bn_w, self.bn_b, training, momentum, EPS, self.conv_w,
                               self.conv_b, stride=stride, num_batches_tracked=self.nbt)

    def eager(self, x, training, stride, momentum, residual=None):
        """eager PyTorch, with nn.BatchNorm2d's bookkeeping; returns the tensor fed to the
        op's final ReLU for conv1x1_bn_relu (the caller applies it) and y otherwise."""
        factor = momentum
        if training:
            self.nbt.add_(1)
            if momentum is None:
                factor = 1.0 / float(self.nbt)
        if self.op == "conv1x1_bn_relu":
            pre = F.batch_norm(F.conv2d(x, self.conv_w, self.conv_b, stride), self.rm, self.rv, self.bn_w,
                               self.bn_b, training, factor, EPS)
            return pre + residual if residual is not None else pre
        a = torch.relu(F.batch_norm(x, self.rm, self.rv, self.bn_w, self.bn_b, training, factor, EPS))
        return F.conv2d(a, self.conv_w, self.conv_b, stride)


def max_err(t, ref):
    return (t.double() - ref.double()).abs().max().item()


def check(name, fused, eager, ref, dtype, eager_ref=None, tf32=False):
    """fused's largest error against ``ref`` within the dtype's bar set by eager's error
    (against ``eager_ref``, its own float64 reference, when the two differ); ``tf32``: fp32
    GEMMs with TF32 products, held to TF32's bound."""
    scale = max(ref.abs().max().item(), 1e-30)
    e_fused, e_eager = max_err(fused, ref), max_err(eager, ref if eager_ref is None else eager_ref)
    floor = TF32_FLOOR if (tf32 and dtype == torch.float32) else FLOOR[dtype]
    bound = max(FACTOR[dtype] * e_eager * (1 + SLACK[dtype]), floor * scale)
    assert e_fused <= bound, f"{name} ({dtype}): fused error {e_fused:.3g} > {bound:.3g} (eager {e_eager:.3g})"


def step_of(run, ref, x_src, r_src, dy, training, stride, momentum, fused):
    """One forward + backward of ``run`` (fused or eager) and of its float64 twin ``ref``,
    whose gradient takes the final ReLU's mask from ``run``'s output (within rounding of
    0 either side is right; the mask must not decide the test). Returns
    (output, grads, float64 output, float64 grads)."""
    outs = []
    for side, is_fused in ((run, fused), (ref, False)):
        x = x_src.detach().to(side.dtype).requires_grad_()
        r = r_src.detach().to(side.dtype).requires_grad_() if r_src is not None else None
        out = side.fused(x, training, stride, momentum, r) if is_fused else side.eager(x, training, stride, momentum, r)
        outs.append((x, r, out))
    (x, r, out), (x64, r64, pre64) = outs
    if not fused and run.op == "conv1x1_bn_relu":
        out = torch.relu(out)
    out.backward(dy.to(run.dtype))
    g = torch.where(out > 0, dy, 0.0) if run.op == "conv1x1_bn_relu" else dy
    pre64.backward(g.double())
    y64 = torch.relu(pre64) if run.op == "conv1x1_bn_relu" else pre64

    def grads(side, x, r):
        found = {"dx": x.grad, **{k: v.grad for k, v in side.leaves().items() if v is not None}}
        if r is not None:
            found["d_residual"] = r.grad
        for v in side.leaves().values():
            if v is not None:
                v.grad = None
        return found

    return out, grads(run, x, r), y64.detach(), grads(ref, x64, r64)


def check_steps(op, dtype, stride, training=True, bias=True, steps=2, momentum=0.1, residual=False,
                mean=0.5, std=2.0, tf32=False):
    """``steps`` forward + backward steps of the fused op and of eager in ``dtype``, each
    against float64: outputs, every gradient and the running statistics after each step.
    ``tf32``: fp32 convolutions with TF32 products (both sides), else IEEE fp32."""
    with conv_precision(tf32):
        _check_steps(op, dtype, stride, training, bias, steps, momentum, residual, mean, std, tf32)


def _check_steps(op, dtype, stride, training, bias, steps, momentum, residual, mean, std, tf32):
    fused, fused64 = Run(dtype, op, bias), Run(torch.float64, op, bias, values=dtype)
    eager, eager64 = Run(dtype, op, bias), Run(torch.float64, op, bias, values=dtype)
    out_shape = (N, C_OUT, (H - 1) // stride + 1, (W - 1) // stride + 1)
    for step in range(steps):
        # Inputs exactly representable in dtype: the errors measured are the computation's.
        x_src = channels_last_input((N, C_IN, H, W), dtype, 10 + step, mean, std).double()
        r_src = channels_last_input(out_shape, dtype, 20 + step).double() if residual else None
        dy = channels_last_input(out_shape, dtype, 30 + step, 0.0, 1.0).double()
        y, g, y64, g64 = step_of(fused, fused64, x_src, r_src, dy, training, stride, momentum, True)
        ye, ge, ye64, ge64 = step_of(eager, eager64, x_src, r_src, dy, training, stride, momentum, False)
        assert y.dtype == dtype and y.shape == out_shape
        tag = f"{op} stride {stride} step {step}"
        check(f"{tag} y", y, ye, y64, dtype, tf32=tf32)
        for key in g:
            check(f"{tag} {key}", g[key], ge[key], g64[key], dtype, eager_ref=ge64[key], tf32=tf32)
        for stat in ("rm", "rv"):
            if op == "conv1x1_bn_relu":
                check(f"{tag} running {stat}", getattr(fused, stat), getattr(eager, stat), getattr(fused64, stat),
                      dtype, tf32=tf32)
            else:
                # The input's statistics come from bn_stats (kernels/bn_stats.py), held to
                # the project's statistics tolerance: its shift by one sample of each channel
                # costs a few fp32 ulps more than eager where that sample is far from the mean.
                assert_close(getattr(fused, stat), getattr(fused64, stat), dtype, f"{tag} running {stat}",
                             params=True)
        assert int(fused.nbt) == int(fused64.nbt)


@pytest.mark.both
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_training_parity(op, dtype, stride):
    """fp32: two steps (running statistics after both); conv1x1_bn_relu at stride 1 adds a
    residual, without the convolution's bias in fp16."""
    if backend.INTERPRET and dtype != torch.float32 and stride == 2:
        pytest.skip("interpreter time: the 16-bit dtypes run at stride 1")
    residual = op == "conv1x1_bn_relu" and stride == 1
    check_steps(op, dtype, stride, steps=2 if dtype == torch.float32 else 1, residual=residual,
                bias=dtype != torch.float16)


@pytest.mark.both
@pytest.mark.parametrize("op", OPS)
def test_training_parity_with_tf32(op):
    """fp32 with TF32 products (cuDNN's default on a GPU), one step at stride 1, against
    TF32's bound (on a CPU the products stay IEEE: the bound holds a fortiori)."""
    check_steps(op, torch.float32, 1, steps=1, residual=op == "conv1x1_bn_relu", tf32=True)


@pytest.mark.both
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("stride", [1, 2])
def test_eval_parity_with_gradients(op, stride):
    check_steps(op, torch.float32, stride, training=False, bias=stride == 1, steps=1, residual=op == "conv1x1_bn_relu")


@pytest.mark.both
def test_cumulative_average_with_momentum_none():
    check_steps("conv1x1_bn_relu", torch.float32, 1, steps=2, momentum=None)


@pytest.mark.both
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@conv_precision(tf32=False)
def test_eval_inference_is_one_kernel_and_right(op, dtype):
    """Without gradients in eval, conv + bn (+ residual) + relu (or bn + relu + conv) is
    one GEMM kernel: the output against float64, no worse than eager."""
    fused, eager, ref = Run(dtype, op, True), Run(dtype, op, True), Run(torch.float64, op, True, values=dtype)
    x64 = channels_last_input((N, C_IN, H, W), dtype, 3).double()
    r64 = channels_last_input((N, C_OUT, H, W), dtype, 4).double() if op == "conv1x1_bn_relu" else None
    with torch.no_grad():
        r = r64.to(dtype) if r64 is not None else None
        y = fused.fused(x64.to(dtype), False, 1, 0.1, r)
        y_eager = eager.eager(x64.to(dtype), False, 1, 0.1, r)
        y_ref = ref.eager(x64, False, 1, 0.1, r64)
        if op == "conv1x1_bn_relu":
            y_eager, y_ref = torch.relu(y_eager), torch.relu(y_ref)
    assert y.is_contiguous(memory_format=torch.channels_last)
    check(f"{op} eval y", y, y_eager, y_ref, dtype)


@pytest.mark.both
@conv_precision(tf32=False)
def test_large_mean_statistics():
    """|mean| / std = 1e4 in the convolution's output: the epilogue's per-tile mean / M2
    merged with Chan's formula keeps the variance where E[y^2] - E[y]^2 in fp32 would
    lose it entirely (ulp(1e8) = 8)."""
    run = Run(torch.float32, "conv1x1_bn_relu", True)
    with torch.no_grad():
        run.conv_b.fill_(1e4)
    ref = Run(torch.float64, "conv1x1_bn_relu", True)
    with torch.no_grad():
        ref.conv_b.fill_(1e4)
    x64 = channels_last_input((N, C_IN, H, W), torch.float64, 5, 0.0, 1.0)
    y = run.fused(x64.float(), True, 1, 1.0)
    y64 = torch.relu(ref.eager(x64, True, 1, 1.0))
    torch.testing.assert_close(run.rv.double(), ref.rv, rtol=1e-3, atol=0)
    torch.testing.assert_close(run.rm.double(), ref.rm, rtol=2.5e-7, atol=0)  # 2 ulp of 1e4
    # y itself is only known to ulp(1e4) ~ 1e-3 in fp32 before its mean is taken out.
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=5e-3)


@pytest.mark.both
@pytest.mark.parametrize("op", OPS)
def test_bitwise_reproducible(op):
    outs = []
    for _ in range(2):
        run = Run(torch.float32, op, True)
        x = channels_last_input((N, C_IN, H, W), torch.float32, 6).requires_grad_()
        y = run.fused(x, True, 1, 0.1)
        y.backward(torch.ones_like(y))
        outs.append([y, x.grad, run.rm, run.rv] + [v.grad for v in run.leaves().values()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.both
def test_nchw_input_takes_the_eager_path():
    """The kernels need channels_last; an NCHW input gets eager's sequence (and layout)."""
    run, ref = Run(torch.float32, "conv1x1_bn_relu", True), Run(torch.float64, "conv1x1_bn_relu", True)
    x = channels_last_input((N, C_IN, H, W), torch.float64, 7)
    y = run.fused(x.float().contiguous(), True, 1, 0.1)
    assert y.is_contiguous()
    torch.testing.assert_close(y.double(), torch.relu(ref.eager(x, True, 1, 0.1)), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(backend.INTERPRET or DEVICE != "cpu", reason="the CPU PyTorch path only")
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cpu_path_is_bitwise_eager(op, training):
    fused, eager = Run(torch.float32, op, True), Run(torch.float32, op, True)
    x_src = channels_last_input((N, C_IN, H, W), torch.float32, 8)
    x1, x2 = x_src.clone().requires_grad_(), x_src.clone().requires_grad_()
    y1 = fused.fused(x1, training, 2, 0.1)
    y2 = eager.eager(x2, training, 2, 0.1)
    if op == "conv1x1_bn_relu":
        y2 = torch.relu(y2)
    y1.sum().backward()
    y2.sum().backward()
    pairs = [(y1, y2), (x1.grad, x2.grad), (fused.rm, eager.rm), (fused.rv, eager.rv)]
    pairs += [(a.grad, b.grad) for a, b in zip(fused.leaves().values(), eager.leaves().values()) if a is not None]
    for a, b in pairs:
        assert torch.equal(a, b)


# ------------------------------------------------------------------------ bad input


def _args(**change):
    run = Run(torch.float32, "conv1x1_bn_relu", True)
    args = dict(x=channels_last_input((N, C_IN, H, W), torch.float32, 9), conv_weight=run.conv_w.detach(),
                conv_bias=run.conv_b.detach(), running_mean=run.rm, running_var=run.rv, weight=run.bn_w.detach(),
                bias=run.bn_b.detach(), training=True)
    args.update(change)
    return args


def _call(**change):
    args = _args(**change)
    stride = args.pop("stride", 1)
    return conv1x1_bn_relu(**args, stride=stride)


BAD_CALLS = [
    ("3-D input", dict(x=torch.randn(N, C_IN, H)), ValueError, "4D"),
    ("integer input", dict(x=torch.ones(N, C_IN, H, W, dtype=torch.long)), NotImplementedError, "input"),
    ("3x3 kernel", dict(conv_weight=torch.randn(C_OUT, C_IN, 3, 3)), ValueError, "conv_weight"),
    ("input channels", dict(conv_weight=torch.randn(C_OUT, C_IN + 1, 1, 1)), RuntimeError, "conv_weight"),
    ("weight dtype", dict(conv_weight=torch.randn(C_OUT, C_IN, 1, 1, dtype=torch.float16)), RuntimeError,
     "conv_weight"),
    ("bias size", dict(conv_bias=torch.randn(C_OUT + 1)), RuntimeError, "conv_bias"),
    ("bn channels", dict(running_mean=torch.zeros(C_IN)), RuntimeError, "running_mean"),
    ("stride 0", dict(stride=0), RuntimeError, "stride"),
    ("float stride", dict(stride=1.0), TypeError, "stride"),
    ("residual shape", dict(residual=torch.randn(N, C_OUT, H, W + 1)), RuntimeError, "residual"),
]


@pytest.mark.both
@pytest.mark.parametrize("change,exc,match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_naming_the_argument(change, exc, match):
    change = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in change.items()}
    with pytest.raises(exc, match=match):
        _call(**change)


@pytest.mark.both
def test_bn_relu_conv1x1_checks_its_batchnorm():
    run = Run(torch.float32, "bn_relu_conv1x1", True)
    x = channels_last_input((N, C_IN, H, W), torch.float32, 9)
    with pytest.raises(RuntimeError, match="weight"):
        bn_relu_conv1x1(x, run.rm, run.rv, torch.ones(C_IN + 1), None, True, 0.1, EPS, run.conv_w)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        bn_relu_conv1x1(x, run.rm, run.rv, None, None, True, None, EPS, run.conv_w)


# ------------------------------------------------------------------------ the ops


@pytest.mark.interpreter
@pytest.mark.skipif(not TRITON_PATH, reason="the custom ops run on the Triton path")
def test_custom_ops_pass_opcheck():
    """Schema, fake implementations and the autograd wiring of the registered ops
    (aot_dispatch_dynamic, the slow one, is left to torch.compile's own tests)."""
    run = Run(torch.float32, "bn_relu_conv1x1", True)
    x = channels_last_input((N, C_IN, 3, 3), torch.float32, 11)
    w, b = run.conv_w.detach(), run.conv_b.detach()
    mean, invstd = torch.zeros(C_IN), torch.ones(C_IN) * 0.5
    rm, rv, nbt = torch.zeros(C_OUT), torch.ones(C_OUT), torch.tensor(0)
    ops = torch.ops.fused_resnet

    def opcheck(op, args):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    opcheck(ops.conv1x1_forward.default,
                          (x, w, b, 2, mean, invstd, run.bn_w.detach(), None, True, rm, rv, nbt, 0.1, EPS))
    y, m, s = ops.conv1x1_forward(x, w, b, 1, None, None, None, None, True, None, None, None, 0.1, EPS)
    opcheck(ops.conv1x1_backward.default,
                          (torch.ones_like(y), x, w, 1, True, mean, invstd, run.bn_w.detach(), run.bn_b.detach(),
                           True, [True, True, True, True, True]))
    opcheck(ops.conv1x1_bn_eval.default,
                          (x, w, b, 1, mean, invstd, None, None, rm, rv, None, None, EPS, torch.ones_like(y), True))
    opcheck(ops.conv1x1_pair_backward.default,
            (torch.ones_like(y), torch.ones_like(y), x, w, w.clone(), 1, True, False, [True] * 5))
    opcheck(ops.batch_stats.default, (x, mean.clone(), invstd.clone(), None, 0.1, EPS))
    opcheck(ops.bn_add_relu_with_stats.default, (y, m, s, None, None, 2, y.clone(), m, s, None, None))
