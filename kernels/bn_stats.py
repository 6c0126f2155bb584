"""Per-channel batch statistics of a 4-D activation, and the running-stats update.

Two kernels, read top to bottom:

1. ``bn_stats_partial_kernel`` reads x once. Each program reduces a strip of rows for a
   block of channels and writes shifted sums ``sum(x - k)`` and ``sum((x - k)^2)``,
   where the shift ``k`` is the channel's first element. Shifting by a sample of the
   channel keeps the sums small when |mean| >> std, where the naive E[x^2] - E[x]^2
   in fp32 would cancel to noise.
2. ``bn_stats_finalize_kernel`` adds the partials of each channel in a fixed order,
   derives mean and 1/sqrt(var + eps), and updates running_mean / running_var the way
   ``torch.nn.functional.batch_norm`` does (unbiased variance in the running average).

The launcher ``bn_stats`` partitions the work by shape only (``layout.reduction_plan``)
so the result is bitwise the same on every run.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .layout import FINALIZE_BLOCK_C, FINALIZE_BLOCK_P, FINALIZE_WARPS, Layout, cdiv, reduction_plan


@triton.jit
def row_tile_offsets(row, hw_start, hw, c, HW, stride_n, stride_c, stride_hw, spans_per_image, span):
    """Offsets and mask of one [BLOCK_HW, BLOCK_C] tile of row ``row``.

    ``hw`` is ``tl.arange(0, BLOCK_HW)`` and ``c`` the (already masked later) channels.
    """
    n = (row // spans_per_image).to(tl.int64)
    pix = (row % spans_per_image) * span + hw_start + hw
    offsets = n * stride_n + pix.to(tl.int64)[:, None] * stride_hw + c.to(tl.int64)[None, :] * stride_c
    return offsets, pix < HW


# Loop counts and the batch only bound loops and a scalar row mask: specialising them
# (== 1, divisible by 16) would multiply the binaries a model JIT-compiles for nothing.
@triton.jit(do_not_specialize=["N", "rows_per_program", "spans_per_image"])
def bn_stats_partial_kernel(
    x_ptr, partial_ptr,
    N, C, HW, stride_n, stride_c, stride_hw,
    rows_per_program, blocks_per_span, spans_per_image,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_p = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    hw = tl.arange(0, BLOCK_HW)
    # The shift: each channel's first element, x[0, c, 0, 0].
    shift = tl.load(x_ptr + c.to(tl.int64) * stride_c, mask=c_mask, other=0.0).to(tl.float32)

    acc = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    num_rows = N * spans_per_image
    for i in range(rows_per_program):
        row = pid_p * rows_per_program + i
        for b in range(blocks_per_span):
            offsets, pix_mask = row_tile_offsets(row, b * BLOCK_HW, hw, c, HW, stride_n, stride_c,
                                                 stride_hw, spans_per_image, BLOCK_HW * blocks_per_span)
            mask = pix_mask[:, None] & c_mask[None, :] & (row < num_rows)
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x - shift[None, :], 0.0)
            acc += d
            acc_sq += d * d

    # Partials are laid out [num_partials, 2, C].
    out = partial_ptr + pid_p.to(tl.int64) * 2 * C + c
    tl.store(out, tl.sum(acc, axis=0), mask=c_mask)
    tl.store(out + C, tl.sum(acc_sq, axis=0), mask=c_mask)


@triton.jit(do_not_specialize=["num_partials"])  # a loop bound: nothing to gain from specialising it
def bn_stats_finalize_kernel(
    partial_ptr, x_ptr, mean_ptr, invstd_ptr, var_ptr,
    running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,
    C, stride_c, num_partials, count, momentum, eps,
    STORE_VAR: tl.constexpr, UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr,
    COUNT_BATCH: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    p = tl.arange(0, BLOCK_P)
    s1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    # Fixed-order combination: the same partials always add up the same way.
    for p0 in range(0, num_partials, BLOCK_P):
        rows = (p0 + p).to(tl.int64)
        mask = (rows < num_partials)[:, None] & c_mask[None, :]
        base = partial_ptr + rows[:, None] * 2 * C + c[None, :]
        s1 += tl.load(base, mask=mask, other=0.0)
        s2 += tl.load(base + C, mask=mask, other=0.0)
    sum_d = tl.sum(s1, axis=0)
    sum_d2 = tl.sum(s2, axis=0)

    shift = tl.load(x_ptr + c.to(tl.int64) * stride_c, mask=c_mask, other=0.0).to(tl.float32)
    mean_d = sum_d / count
    var = sum_d2 / count - mean_d * mean_d
    # Clamp rounding below zero, but keep NaN (an Inf in x makes the variance NaN, as in PyTorch).
    var = tl.where(var < 0.0, 0.0, var)
    mean = shift + mean_d
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(invstd_ptr + c, 1.0 / tl.sqrt(var + eps), mask=c_mask)
    if STORE_VAR:
        tl.store(var_ptr + c, var, mask=c_mask)

    if COUNT_BATCH:
        # num_batches_tracked += 1, by one program. Only with a fixed momentum: nothing
        # here reads the counter then (momentum=None counts before this launch instead).
        if tl.program_id(0) == 0:
            tl.store(num_batches_tracked_ptr, tl.load(num_batches_tracked_ptr) + 1)

    if UPDATE_RUNNING:
        if CUMULATIVE:
            # momentum=None: a cumulative average over the batches seen so far; the
            # counter was already incremented for this batch, as in nn.BatchNorm2d.
            factor = 1.0 / tl.load(num_batches_tracked_ptr).to(tl.float32)
        else:
            factor = momentum
        rm = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0)
        rv = tl.load(running_var_ptr + c, mask=c_mask, other=0.0)
        unbiased = var * (count / (count - 1.0))
        new_rm = (1.0 - factor) * rm.to(tl.float32) + factor * mean
        new_rv = (1.0 - factor) * rv.to(tl.float32) + factor * unbiased
        tl.store(running_mean_ptr + c, new_rm.to(rm.dtype), mask=c_mask)
        tl.store(running_var_ptr + c, new_rv.to(rv.dtype), mask=c_mask)


def bn_stats(
    x: torch.Tensor,
    layout: Layout,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    momentum: Optional[float],
    eps: float,
    return_var: bool = False,
):
    """Batch mean and 1/sqrt(var + eps) per channel (fp32), updating running stats.

    ``x`` must be dense in ``layout``. ``momentum=None`` means the cumulative average,
    which needs ``num_batches_tracked`` (incremented here, before the update).
    ``return_var`` also returns the biased batch variance (for merging statistics
    across processes): ``(mean, invstd, var)``.
    """
    plan = reduction_plan(layout, 2)
    stride_n, stride_c, stride_hw = layout.strides
    partials = torch.empty(plan.num_partials, 2, layout.C, device=x.device, dtype=torch.float32)
    bn_stats_partial_kernel[plan.grid](
        x, partials,
        layout.N, layout.C, layout.HW, stride_n, stride_c, stride_hw,
        plan.rows_per_program, plan.blocks_per_span, plan.spans_per_image,
        BLOCK_HW=plan.block_hw, BLOCK_C=plan.block_c, num_warps=plan.num_warps,
    )
    mean, invstd, var = finalize_stats(partials, x, stride_c, plan.num_partials, layout.C, layout.N * layout.HW,
                                       running_mean, running_var, num_batches_tracked, momentum, eps, return_var)
    return (mean, invstd, var) if return_var else (mean, invstd)


def finalize_stats(
    partials: torch.Tensor,
    shift: torch.Tensor,
    stride_shift: int,
    num_partials: int,
    C: int,
    count: int,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    momentum: Optional[float],
    eps: float,
    return_var: bool = False,
):
    """(mean, invstd, var or mean) per channel from ``partials`` ([num_partials, 2, C] shifted
    sums; channel c's shift is ``shift[c * stride_shift]``) over ``count`` values each,
    updating the running statistics as ``nn.BatchNorm2d`` does. One launch of
    ``bn_stats_finalize_kernel``; shared by every producer of such partials."""
    # fp32 like the partials; new_empty with an int size is the cheapest allocation on the host.
    mean = partials.new_empty(C)
    invstd = partials.new_empty(C)
    var = partials.new_empty(C) if return_var else mean
    update = running_mean is not None
    counts = update and num_batches_tracked is not None
    cumulative = update and momentum is None
    if counts and cumulative:
        # The factor 1 / num_batches_tracked needs the new count in every program.
        num_batches_tracked.add_(1)
    bn_stats_finalize_kernel[(cdiv(C, FINALIZE_BLOCK_C),)](
        partials, shift, mean, invstd, var,
        running_mean if update else mean, running_var if update else invstd,
        num_batches_tracked if counts else mean,
        C, stride_shift, num_partials, float(count),
        0.0 if momentum is None else float(momentum), float(eps),
        STORE_VAR=return_var, UPDATE_RUNNING=update, CUMULATIVE=cumulative,
        COUNT_BATCH=counts and not cumulative,
        BLOCK_P=FINALIZE_BLOCK_P, BLOCK_C=FINALIZE_BLOCK_C, num_warps=FINALIZE_WARPS,
    )
    return mean, invstd, var
