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

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

# Reductions are split into a fixed number of partial sums per channel that depends
# only on the shape, so the combination order (and so every bit of the result) is the
# same on every run and every GPU. About 2.5 programs per SM of an H100 (132 SMs), each
# with a REDUCTION_TILE-element tile in flight (16-32 KB a tensor: with 320 programs more
# than the ~2.7 MB that 3.35 TB/s x ~0.8 us of DRAM latency needs), and few enough
# partials that the finalize reads under 256 KB ([programs / channel blocks, 3, C] fp32
# at 64 channels a block: 240 KB).
TARGET_PROGRAMS = 320
REDUCTION_TILE = 8192
REDUCTION_WARPS = 16
# Pixel blocks a span holds at most: short spans give enough rows for TARGET_PROGRAMS at batch 32.
MAX_BLOCKS_PER_SPAN = 2
ELEMENTWISE_BLOCK = 1024
# Programs a combining pass aims for: two per SM of an H100 (132 SMs). A fixed number, not
# the device's, so that the plan (and so every bit of the result) never depends on the GPU.
PLAN_PROGRAMS = 264
# Below this many bytes a pass is bound by its launch and one DRAM round trip, whatever its grid.
SMALL_PASS_BYTES = 256 * 1024
# The finalize kernels that add the partials of each channel in a fixed order: [BLOCK_P
# partials, BLOCK_C channels] tiles, one program per BLOCK_C channels (16 at C = 64, 512
# at C = 2048), a handful of dependent iterations over TARGET_PROGRAMS partials.
FINALIZE_BLOCK_C = 4
FINALIZE_BLOCK_P = 1024
FINALIZE_WARPS = 8


# Plans are pure functions of a layout, cached: a network has a few dozen distinct shapes,
# and computing a plan costs more host time than launching its kernel.
PLAN_CACHE_SIZE = 1024


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host integers (``triton.cdiv`` is a constexpr function: microseconds a call on the host)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1), for host integers."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


class Layout(NamedTuple):
    """How a dense 4-D tensor is laid out in memory (a named tuple: built on every op call)."""

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
        return Layout(N, C, H * W, False)
    if x.is_contiguous(memory_format=torch.channels_last):
        return Layout(N, C, H * W, True)
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

    @functools.cached_property  # plans are cached: computed once
    def grid(self) -> tuple[int, int]:
        return (cdiv(self.num_rows, self.block_rows), cdiv(self.row_len, self.block_cols))


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def elementwise_plan(layout: Layout) -> ElementwisePlan:
    """Tiles of about ELEMENTWISE_BLOCK elements, as wide as a row allows."""
    if layout.channels_last:
        num_rows, row_len = layout.N * layout.HW, layout.C
    else:
        num_rows, row_len = layout.N * layout.C, layout.HW
    block_cols = min(next_power_of_2(row_len), ELEMENTWISE_BLOCK)
    block_rows = min(max(ELEMENTWISE_BLOCK // block_cols, 1), next_power_of_2(num_rows))
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
    num_warps: int

    @property
    def grid(self) -> tuple[int, int]:
        return (self.channel_blocks, self.num_partials)


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def reduction_plan(layout: Layout, sums: int = 3) -> ReductionPlan:
    """Tile and partition for the per-channel reductions that write ``sums`` partial sums
    per channel (statistics: 2, backward: 3): programs in inverse proportion, so that the
    partials stay as small (TARGET_PROGRAMS is the backward's)."""
    target_programs = max(1, TARGET_PROGRAMS * 3 // sums)
    # The backward reads two to four tensors a tile, and holds three sums: half the tile, eight warps (16 spill).
    tile, warps = (REDUCTION_TILE, REDUCTION_WARPS) if sums <= 2 else (REDUCTION_TILE // 2, REDUCTION_WARPS // 2)
    if layout.channels_last:
        # Channels are contiguous: a wide channel tile gives coalesced rows.
        block_c = min(next_power_of_2(layout.C), 64)
        block_hw = min(max(tile // block_c, 1), next_power_of_2(layout.HW))
    else:
        # Pixels are contiguous: a pixel tile as long as the plane (at most 1024), and as many
        # channels as fill REDUCTION_TILE (7x7 planes: 64 channels of 64 pixels, not one element a thread).
        block_hw = min(next_power_of_2(layout.HW), 1024)
        block_c = min(max(tile // block_hw, 1), next_power_of_2(layout.C), 64)
    channel_blocks = cdiv(layout.C, block_c)
    # Two pixel blocks a span where that leaves rows for TARGET_PROGRAMS programs, else one;
    # >= 1: an empty image has a span too.
    blocks_per_span = max(min(cdiv(layout.HW, block_hw), MAX_BLOCKS_PER_SPAN), 1)
    if layout.N * cdiv(layout.HW, block_hw * blocks_per_span) * channel_blocks < target_programs:
        blocks_per_span = 1
    span = block_hw * blocks_per_span
    spans_per_image = cdiv(layout.HW, span)
    rows = layout.N * spans_per_image
    rows_per_program = max(1, cdiv(rows * channel_blocks, target_programs))
    num_partials = max(1, cdiv(rows, rows_per_program))
    return ReductionPlan(
        block_c=block_c,
        block_hw=block_hw,
        spans_per_image=spans_per_image,
        blocks_per_span=blocks_per_span,
        rows_per_program=rows_per_program,
        num_partials=num_partials,
        channel_blocks=channel_blocks,
        num_warps=warps,
    )
