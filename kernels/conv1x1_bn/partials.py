"""Fixed-order combination of per-tile partials (no atomics: the same input gives the same
bits): the forward's per-(M tile, channel) (mean, M2) merged with Chan's formula into
the batch statistics (``conv1x1_stats_finalize``), and the weight gradients' fp32 split
partials summed in split order (``_summed_splits``), each over ``combining_levels``."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..bn_stats import finalize_stats
from ..layout import PLAN_PROGRAMS, SMALL_PASS_BYTES, cdiv
from .common import _interpreter_bf16, rounded

# split_sum_kernel's tiles hold SPLIT_SUM_TILE elements: BLOCK columns (64 to 1024, enough
# column blocks for PLAN_PROGRAMS programs where numel allows) by SPLIT_SUM_TILE / BLOCK rows.
SPLIT_SUM_TILE = 4096
# conv1x1_stats_merge_kernel: channels a program merges, and tiles of a group per loop iteration.
STATS_MERGE_BLOCK_C = 32
STATS_MERGE_BLOCK_P = 64


def combining_levels(rows: int, row_bytes: int, col_blocks: int) -> list[int]:
    """Rows per group of each level of a fixed-order combination of ``rows`` partial rows
    (``row_bytes`` each) split into ``col_blocks`` column blocks: intermediate levels of
    groups that leave about PLAN_PROGRAMS programs, until one program per column block reads
    under SMALL_PASS_BYTES (or the column blocks alone fill the GPU); the last level is one
    group. A rule of the shape only."""
    levels = []
    while rows > 1 and col_blocks < PLAN_PROGRAMS and rows * row_bytes > SMALL_PASS_BYTES:
        group = max(2, rows * col_blocks // PLAN_PROGRAMS)
        levels.append(group)
        rows = cdiv(rows, group)
    return levels + [max(rows, 1)]


@triton.jit(do_not_specialize=["num_tiles", "M", "tile_rows", "tiles_per_group"])
def conv1x1_stats_merge_kernel(
    partial_ptr, merged_ptr, C, num_tiles, M, tile_rows, tiles_per_group,
    FINAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merges the per-tile (mean, M2) of each channel of group ``program_id(1)`` (tiles
    ``tiles_per_group`` of them, ``tile_rows`` rows each but the last) in a fixed order.
    FINAL (one group): writes merged[3, C] = (0, M2, mean), the [1, 2, C] shifted-sums
    partial of ``bn_stats``' finalize (shift = mean, so the sum of deviations is 0) followed
    by the shift; else merged[group, 2, C] = (mean, M2), the tiles of the next level."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    first = tl.program_id(1) * tiles_per_group
    last = tl.minimum(first + tiles_per_group, num_tiles)
    p = tl.arange(0, BLOCK_P)
    # Block means are taken relative to the group's first tile mean, which keeps their sums
    # small when |mean| >> std.
    shift = tl.load(partial_ptr + first.to(tl.int64) * 2 * C + c, mask=c_mask & (first < last), other=0.0)
    n_a = 0.0
    mean_a = shift
    m2_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(first, last, BLOCK_P):
        t = p0 + p
        t_mask = t < last
        cnt = tl.where(t_mask, tl.minimum(M - t * tile_rows, tile_rows), 0).to(tl.float32)
        mask = t_mask[:, None] & c_mask[None, :]
        base = partial_ptr + t.to(tl.int64)[:, None] * 2 * C + c[None, :]
        tile_mean = tl.load(base, mask=mask, other=0.0)
        tile_m2 = tl.load(base + C, mask=mask, other=0.0)
        # The block of tiles (parallel formula), then Chan's update into the running merge.
        n_b = tl.sum(cnt, axis=0)
        mean_b = shift + tl.sum(cnt[:, None] * (tile_mean - shift[None, :]), axis=0) / n_b
        dev = tl.where(mask, tile_mean - mean_b[None, :], 0.0)
        m2_b = tl.sum(tile_m2 + cnt[:, None] * dev * dev, axis=0)
        n_ab = n_a + n_b
        delta = mean_b - mean_a
        mean_a = mean_a + delta * (n_b / n_ab)
        m2_a = m2_a + m2_b + delta * delta * (n_a * n_b / n_ab)
        n_a = n_ab
    if FINAL:
        tl.store(merged_ptr + c, tl.zeros([BLOCK_C], dtype=tl.float32), mask=c_mask)
        tl.store(merged_ptr + C + c, m2_a, mask=c_mask)
        tl.store(merged_ptr + 2 * C + c, mean_a, mask=c_mask)
    else:
        out = merged_ptr + tl.program_id(1).to(tl.int64) * 2 * C + c
        tl.store(out, mean_a, mask=c_mask)
        tl.store(out + C, m2_a, mask=c_mask)


@triton.jit(do_not_specialize=["num_rows", "rows_per_group"])
def split_sum_kernel(partial_ptr, out_ptr, numel, num_rows, rows_per_group,
                     INTERPRETER_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """out[g, i] = sum of partials[r, i] over the rows r of group g = ``program_id(1)``
    (``rows_per_group`` of them), as [BLOCK_R, BLOCK] tiles added in row order and then
    summed over the tile's rows: a fixed order (bitwise reproducible)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    group = tl.program_id(1)
    first = group * rows_per_group
    last = tl.minimum(first + rows_per_group, num_rows)
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
    for r0 in range(first, last, BLOCK_R):
        rows = r0 + r
        tile_mask = (rows < last)[:, None] & mask[None, :]
        acc += tl.load(partial_ptr + rows.to(tl.int64)[:, None] * numel + i[None, :], mask=tile_mask, other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr + group.to(tl.int64) * numel + i, rounded(total, out_ptr.dtype.element_ty, INTERPRETER_BF16),
             mask=mask)


# ---------------------------------------------------------------------------- launchers


def conv1x1_stats_finalize(
    partials: torch.Tensor,
    M: int,
    tile_rows: int,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    momentum: Optional[float],
    eps: float,
):
    """Batch mean and 1/sqrt(var + eps) (fp32) from the forward's partials, updating the
    running statistics as ``bn_stats`` does (its finalize kernel, the same semantics:
    unbiased running variance, momentum=None through num_batches_tracked)."""
    num_tiles, _, C = partials.shape
    channel_blocks = cdiv(C, STATS_MERGE_BLOCK_C)
    levels = combining_levels(num_tiles, 2 * C * 4, channel_blocks)
    for tiles_per_group in levels[:-1]:
        groups = cdiv(num_tiles, tiles_per_group)
        merged = torch.empty(groups, 2, C, device=partials.device, dtype=torch.float32)
        conv1x1_stats_merge_kernel[(channel_blocks, groups)](
            partials, merged, C, num_tiles, M, tile_rows, tiles_per_group,
            FINAL=False, BLOCK_P=STATS_MERGE_BLOCK_P, BLOCK_C=STATS_MERGE_BLOCK_C)
        partials, num_tiles, tile_rows = merged, groups, tile_rows * tiles_per_group
    merged = torch.empty(3, C, device=partials.device, dtype=torch.float32)
    conv1x1_stats_merge_kernel[(channel_blocks, 1)](
        partials, merged, C, num_tiles, M, tile_rows, max(num_tiles, 1),
        FINAL=True, BLOCK_P=STATS_MERGE_BLOCK_P, BLOCK_C=STATS_MERGE_BLOCK_C)
    # The merged statistics are bn_stats finalize's single partial (see conv1x1_stats_merge_kernel).
    mean, invstd, _ = finalize_stats(merged, merged[2], 1, 1, C, M, running_mean, running_var,
                                     num_batches_tracked, momentum, eps)
    return mean, invstd


def _summed_splits(w_partials: torch.Tensor, b_partials: Optional[torch.Tensor], weight: torch.Tensor,
                   target) -> tuple:
    """(dW in weight's dtype and strides, d_bias or None) from [splits, C_out, C_in] and
    [splits, C_out] fp32 partials, summed in split order."""
    splits, N, K = w_partials.shape
    dw = torch.empty_like(weight)
    _split_sum(w_partials, dw, splits, N * K, target)
    db = None
    if b_partials is not None:
        db = torch.empty(N, device=weight.device, dtype=weight.dtype)
        _split_sum(b_partials, db, splits, N, target)
    return dw, db


def _split_sum(partials: torch.Tensor, out: torch.Tensor, splits: int, numel: int, target) -> None:
    """out[numel] = the sum of the ``splits`` rows of ``partials`` ([splits, numel] fp32) in
    a fixed order: ``combining_levels`` of ``split_sum_kernel``, fp32 between levels."""
    if numel == 0:
        return
    block = max(64, min(1024, 1 << max(numel // PLAN_PROGRAMS, 1).bit_length() - 1))
    col_blocks = cdiv(numel, block)
    levels = combining_levels(splits, numel * 4, col_blocks)
    for rows_per_group in levels:
        groups = cdiv(splits, rows_per_group)
        dest = out if groups == 1 else torch.empty(groups, numel, device=partials.device, dtype=torch.float32)
        split_sum_kernel[(col_blocks, groups)](
            partials, dest, numel, splits, rows_per_group, INTERPRETER_BF16=_interpreter_bf16(dest.dtype, target),
            BLOCK_R=max(1, SPLIT_SUM_TILE // block), BLOCK=block, num_warps=8)
        partials, splits = dest, groups
