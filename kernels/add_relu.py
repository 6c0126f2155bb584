"""Shortcut add + ReLU, y = relu(a + b): the tail of a block whose BatchNorm was folded
into its convolution (inference), forward and backward.

The backward needs only the saved output: d(a) = d(b) = dy where y > 0 else 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import ELEMENTWISE_BLOCK, cdiv


@triton.jit
def add_relu_forward_kernel(a_ptr, b_ptr, y_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = a + b
    # Not tl.maximum: relu must keep NaN as NaN, as torch.relu does.
    y = tl.where(y < 0.0, 0.0, y)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def add_relu_backward_kernel(dy_ptr, y_ptr, g_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0)
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0)
    g = tl.where(y <= 0.0, 0.0, dy)  # as threshold_backward: NaN passes dy
    tl.store(g_ptr + offsets, g, mask=mask)


def add_relu_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """relu(a + b); a and b dense in the same layout and of the same dtype."""
    y = torch.empty_like(a)
    numel = a.numel()
    if numel:
        add_relu_forward_kernel[(cdiv(numel, ELEMENTWISE_BLOCK),)](a, b, y, numel, BLOCK=ELEMENTWISE_BLOCK)
    return y


def add_relu_backward(dy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient of both inputs; dy and y dense in the same layout."""
    g = torch.empty_like(y)
    numel = y.numel()
    if numel:
        add_relu_backward_kernel[(cdiv(numel, ELEMENTWISE_BLOCK),)](dy, y, g, numel, BLOCK=ELEMENTWISE_BLOCK)
    return g
