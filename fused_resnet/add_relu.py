"""Shortcut add + ReLU, ``relu(a + b)``, as an autograd op (``fused_resnet::add_relu``).

Used where a block's BatchNorms were folded into its convolutions (``fold_bn``): the
forward is one pass, the backward one pass from the saved output.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backend
from .bn_add_relu import _dense, empty_dense_like
from .kernels import add_relu_backward, add_relu_forward, as_layout, layout_of
from .validation import check_like


def _add_relu(a: Tensor, b: Tensor) -> Tensor:
    if not backend.use_triton(a):
        # Into a's dense layout, which the fake claims (TensorIterator would follow a and b's strides).
        return torch.add(a, b, out=empty_dense_like(a)).relu_()
    if a.numel() == 0:
        return empty_dense_like(a)
    a = _dense(a) if a.dim() == 4 else a.contiguous()
    return add_relu_forward(a, _in_layout_of(b, a))


add_relu_op = torch.library.custom_op("fused_resnet::add_relu", mutates_args=())(
    backend.op_implementation(_add_relu))


@add_relu_op.register_fake
def _(a, b):
    return empty_dense_like(a)


@torch.library.custom_op("fused_resnet::add_relu_backward", mutates_args=())
@backend.op_implementation
def add_relu_backward_op(dy: Tensor, y: Tensor) -> Tensor:
    if not backend.use_triton(y):
        return torch.ops.aten.threshold_backward(dy, y, 0)
    if y.numel() == 0:
        return torch.empty_like(y)
    return add_relu_backward(_in_layout_of(dy, y), y)


def _in_layout_of(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` (ref's shape) dense in ``ref``'s layout (``ref``: a dense 4-D tensor, or any contiguous one)."""
    if t.stride() == ref.stride():
        return t
    return as_layout(t, layout_of(ref)) if ref.dim() == 4 else t.contiguous()


@add_relu_backward_op.register_fake
def _(dy, y):
    return torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    g = torch.ops.fused_resnet.add_relu_backward(dy, y)
    return g, g


torch.library.register_autograd("fused_resnet::add_relu", _backward, setup_context=_setup_context)


def add_relu(a: Tensor, b: Tensor) -> Tensor:
    """``relu(a + b)`` for two tensors of the same shape, dtype and device."""
    if not isinstance(a, Tensor):
        raise TypeError(f"a must be a Tensor, got {type(a).__name__}")
    if not a.dtype.is_floating_point:
        raise RuntimeError(f"a must be a floating-point tensor, got {a.dtype}")
    check_like("b", b, a, x_name="a")
    if not backend.use_triton(a):
        # Eager's own ops, differentiated by autograd: no custom-op dispatch cost on the CPU.
        return torch.add(a, b).relu_()
    if not backend.needs_autograd(a, b):
        # No gradient wanted: the implementation itself in an eager call (no dispatcher, no autograd).
        return backend.call_op(torch.ops.fused_resnet.add_relu, _add_relu, (a, b))
    return torch.ops.fused_resnet.add_relu(a, b)
