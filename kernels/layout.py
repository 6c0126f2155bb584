"""Memory layouts and work partitions shared by every kernel family.

Reductions see a 4-D activation (N, C, H, W) as (N, C, HW) with three strides:
``stride_n``, ``stride_c`` and ``stride_hw``. That covers contiguous NCHW
(C*HW, HW, 1) and channels_last / NHWC (HW*C, 1, C) without a copy.

Elementwise kernels see the dense buffer as rows of contiguous elements: NCHW rows are
the N*C planes of HW pixels (a row's channel is ``row % C``), NHWC rows are the N*HW
pixels of C channels (a column *is* the channel). Either way no element needs a 64-bit
division to find its channel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

# Reductions are split into a fixed number of partial sums per channel that depends
# only on the shape, so the combination order (and so every bit of the result) is the
# same on every run and every GPU.
TARGET_PROGRAMS = 1024
ELEMENTWISE_BLOCK = 1024


@dataclass(frozen=True)
class Layout:
    """How a dense 4-D tensor is laid out in memory."""

    N: int
    C: int
    HW: int
    channels_last: bool

    @property
    def strides(self) -> tuple[int, int, int]:
        """(stride_n, stride_c, stride_hw) in elements."""
        if self.channels_last:
            return self.HW * self.C, 1, self.C
        return self.C * self.HW, self.HW, 1

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def numel(self) -> int:
        return self.N * self.C * self.HW


def layout_of(x: torch.Tensor) -> Layout:
    """Layout of a 4-D tensor that is dense NCHW or dense channels_last.

    Callers make anything else dense first (``torch.Tensor.contiguous``); a tensor that
    is both (C == 1 or H*W == 1) has one physical order, so NCHW addressing serves it.
    """
    N, C, H, W = x.shape
    if x.is_contiguous():
        return Layout(N, C, H * W, channels_last=False)
    if x.is_contiguous(memory_format=torch.channels_last):
        return Layout(N, C, H * W, channels_last=True)
    raise ValueError("kernels need a dense NCHW or channels_last tensor")


def as_layout(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``t`` in ``layout``'s memory format; copies only when it is not already."""
    return t.contiguous(memory_format=layout.memory_format)


@dataclass(frozen=True)
class ElementwisePlan:
    """Rows x columns tiling of a dense activation for the elementwise kernels."""

    num_rows: int
    row_len: int
    channel_is_col: bool
    block_rows: int
    block_cols: int

    @property
    def grid(self) -> tuple[int, int]:
        return (triton.cdiv(self.num_rows, self.block_rows), triton.cdiv(self.row_len, self.block_cols))


def elementwise_plan(layout: Layout) -> ElementwisePlan:
    """Tiles of about ELEMENTWISE_BLOCK elements, as wide as a row allows."""
    if layout.channels_last:
        num_rows, row_len = layout.N * layout.HW, layout.C
    else:
        num_rows, row_len = layout.N * layout.C, layout.HW
    block_cols = min(triton.next_power_of_2(max(row_len, 1)), ELEMENTWISE_BLOCK)
    block_rows = min(max(ELEMENTWISE_BLOCK // block_cols, 1), triton.next_power_of_2(max(num_rows, 1)))
    return ElementwisePlan(num_rows, row_len, layout.channels_last, block_rows, block_cols)


@dataclass(frozen=True)
class ReductionPlan:
    """How a per-channel reduction over (N, HW) is split into programs.

    The (N, HW) extent is cut into rows: each row is one image n and one span of
    ``span`` pixels. Program (pid_c, pid_p) reduces ``rows_per_program`` consecutive
    rows for ``block_c`` channels and writes one partial sum per channel.
    """

    block_c: int
    block_hw: int
    spans_per_image: int
    blocks_per_span: int
    rows_per_program: int
    num_partials: int
    channel_blocks: int

    @property
    def grid(self) -> tuple[int, int]:
        return (self.channel_blocks, self.num_partials)


def reduction_plan(layout: Layout) -> ReductionPlan:
    """Tile and partition for the per-channel reductions (statistics, backward sums)."""
    if layout.channels_last:
        # Channels are contiguous: a wide channel tile gives coalesced rows.
        block_c = min(triton.next_power_of_2(layout.C), 64)
        block_hw = max(1024 // block_c, 1)
    else:
        # Pixels are contiguous: a long pixel tile for a couple of channels.
        block_c = 2
        block_hw = min(triton.next_power_of_2(max(layout.HW, 1)), 512)
    blocks_per_span = max(min(triton.cdiv(layout.HW, block_hw), 8), 1)  # >= 1: an empty image has a span too
    span = block_hw * blocks_per_span
    spans_per_image = triton.cdiv(layout.HW, span)
    rows = layout.N * spans_per_image
    channel_blocks = triton.cdiv(layout.C, block_c)
    rows_per_program = max(1, triton.cdiv(rows * channel_blocks, TARGET_PROGRAMS))
    num_partials = max(1, triton.cdiv(rows, rows_per_program))
    return ReductionPlan(
        block_c=block_c,
        block_hw=block_hw,
        spans_per_image=spans_per_image,
        blocks_per_span=blocks_per_span,
        rows_per_program=rows_per_program,
        num_partials=num_partials,
        channel_blocks=channel_blocks,
    )
