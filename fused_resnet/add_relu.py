"""Shortcut add + ReLU, ``relu(a + b)``, as an autograd op (``fused_resnet::add_relu``).

Used where a block's BatchNorms were folded into its convolutions (``fold_bn``): the
forward is one pass, the backward one pass from the saved output.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backend
from .kernels import add_relu_backward, add_relu_forward, as_layout, layout_of
from .validation import check_like


@torch.library.custom_op("fused_resnet::add_relu", mutates_args=())
def add_relu_op(a: Tensor, b: Tensor) -> Tensor:
    if not backend.use_triton(a):
        return torch.add(a, b).relu_()
    if a.dim() == 4:
        a = a if a.is_contiguous(memory_format=torch.channels_last) else a.contiguous()
        b = as_layout(b, layout_of(a))
    else:
        a, b = a.contiguous(), b.contiguous()
    return add_relu_forward(a, b)


@add_relu_op.register_fake
def _(a, b):
    return torch.empty_like(a)


@torch.library.custom_op("fused_resnet::add_relu_backward", mutates_args=())
def add_relu_backward_op(dy: Tensor, y: Tensor) -> Tensor:
    if not backend.use_triton(y):
        return torch.ops.aten.threshold_backward(dy, y, 0)
    return add_relu_backward(dy.contiguous(memory_format=_format_of(y)), y)


def _format_of(t: Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


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
    if not a.is_floating_point():
        raise RuntimeError(f"a must be a floating-point tensor, got {a.dtype}")
    check_like("b", b, a, x_name="a")
    return torch.ops.fused_resnet.add_relu(a, b)
