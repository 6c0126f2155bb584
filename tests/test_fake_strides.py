"""Fake and real outputs of the custom ops agree on strides for non-dense inputs (issue 18, item 5).

The fakes give torch.compile / torch.export the outputs' layout; the real ops copy a
non-dense input to a dense NCHW tensor and write their outputs in that layout. If the
fake claimed another layout (``empty_like`` of a permuted input keeps its permutation),
Inductor would address the op's output with the wrong strides.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode

import fused_resnet
from fused_resnet.kernels import RESIDUAL_ADD, RESIDUAL_BN
from reference import DEVICE, TRITON_PATH, assert_close

C = 3
ops = torch.ops.fused_resnet


def non_dense_inputs():
    """Sliced, permuted (dense, but neither NCHW nor channels_last) and as_strided with gaps."""
    base = torch.randn(2, 6, 8, 10, device=DEVICE)
    return {"sliced": base[:, 1::2, :, ::2],
            "permuted": base[:, :C].permute(0, 1, 3, 2),
            "as_strided": base.as_strided((2, C, 4, 5), (480, 80, 20, 3)),
            "channels_last": base[:, :C].contiguous(memory_format=torch.channels_last)}


def strides_of(outputs):
    return [t.stride() for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]


def fake_strides(op, args):
    with FakeTensorMode() as mode:
        fake_args = pytree.tree_map_only(torch.Tensor, mode.from_tensor, args)
        return strides_of(op(*fake_args))


def bn_state():
    return [torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE), torch.zeros((), dtype=torch.long,
                                                                                    device=DEVICE)]


def forward_args(x, r, mode, training):
    rm, rv, nbt = bn_state()
    rrm, rrv, rnbt = bn_state()
    w, b = torch.rand(C, device=DEVICE) + 0.5, torch.randn(C, device=DEVICE)

    def slots(m, v, n, train):
        return (m, v, n, None, None) if train else (None, None, None, m, v)

    return (x, *slots(rm, rv, nbt, training), w, b, training, 0.1, 1e-5, mode, r if mode else None,
            *slots(rrm, rrv, rnbt, training), w, b, training, 0.1, 1e-5)


@pytest.mark.both
@pytest.mark.parametrize("kind", list(non_dense_inputs()))
@pytest.mark.parametrize("mode", [0, RESIDUAL_ADD, RESIDUAL_BN], ids=["bn_relu", "add", "add_bn"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fake_and_real_forward_and_backward_strides_agree(kind, mode, training):
    x = non_dense_inputs()[kind]
    r = torch.randn(x.shape, device=DEVICE).permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    args = forward_args(x, r, mode, training)
    expected = fake_strides(ops.bn_add_relu_forward.default, args)
    y, mean, invstd, r_mean, r_invstd = ops.bn_add_relu_forward(*args)
    assert strides_of((y, mean, invstd, r_mean, r_invstd)) == expected
    dy = torch.randn(x.shape[:1] + x.shape[1:][::-1], device=DEVICE).permute(0, 3, 2, 1)  # another layout
    w = args[6]
    back = (dy, y, x, mean, invstd, *([None, None] if training else [args[4], args[5]]), w, args[7], training, 1e-5,
            mode, r if mode else None, r_mean, r_invstd, *([None, None] if training else [args[4], args[5]]),
            w, args[7], training, 1e-5, [True, True, mode == RESIDUAL_BN, mode == RESIDUAL_BN])
    expected = fake_strides(ops.bn_add_relu_backward.default, back)
    assert strides_of(ops.bn_add_relu_backward(*back)) == expected


@pytest.mark.both
@pytest.mark.parametrize("kind", list(non_dense_inputs()) + ["transposed_2d"])
def test_add_relu_fake_and_real_strides_agree(kind):
    a = torch.randn(4, 6, device=DEVICE).t() if kind == "transposed_2d" else non_dense_inputs()[kind]
    b = torch.randn(a.shape, device=DEVICE)
    y = ops.add_relu(a, b)
    assert strides_of(y) == fake_strides(ops.add_relu.default, (a, b))
    assert strides_of(ops.add_relu_backward(torch.randn(a.shape, device=DEVICE), y)) == \
        fake_strides(ops.add_relu_backward.default, (torch.randn(a.shape, device=DEVICE), y))


def tail(x, r, rm, rv, w, b):
    y = fused_resnet.bn_add_relu(x, r, rm, rv, w, b, training=True)
    return fused_resnet.add_relu(y[:, :, ::2], r[:, :, ::2]) * 2


VIEWS = {"sliced": lambda base: base[:, 1::2, :, ::2],
         "permuted": lambda base: base[:, :C].permute(0, 1, 3, 2),
         "as_strided": lambda base: base.as_strided((2, C, 4, 5), (480, 80, 20, 3))}


@pytest.mark.both
@pytest.mark.skipif(not TRITON_PATH, reason="on the CPU path the functions are ATen's sequence, not the ops")
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_ops_on_non_dense_inputs_match_eager(compiler):
    """Sliced and as_strided inputs through torch.compile(fullgraph=True): the numbers and the
    output's strides of the uncompiled call, the gradients and running statistics too."""
    compiled = torch.compile(tail, backend=compiler, fullgraph=True)
    base = torch.randn(2, 6, 8, 10, device=DEVICE)
    r = torch.randn(2, C, 10, 10, device=DEVICE)
    for kind, view in VIEWS.items():
        results = []
        for fn in (tail, compiled):
            leaf = base.clone().requires_grad_()
            rm, rv = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
            w, b = torch.ones(C, device=DEVICE, requires_grad=True), torch.zeros(C, device=DEVICE, requires_grad=True)
            x = view(leaf)
            y = fn(x, r[:, :, :x.shape[2], :x.shape[3]].contiguous(), rm, rv, w, b)
            y.backward(torch.ones_like(y))
            results.append((y, leaf.grad, w.grad, rm))
        (y, gx, gw, rm), (yc, gxc, gwc, rmc) = results
        assert yc.stride() == y.stride(), kind
        for name, a, e in (("y", yc, y), ("dx", gxc, gx), ("dweight", gwc, gw), ("running_mean", rmc, rm)):
            assert_close(a, e.double(), torch.float32, f"{compiler} {kind} {name}", params=name != "y")
