"""1x1 convolutions as GEMMs with BatchNorm in their prologue and epilogue.

In channels_last a 1x1 convolution (groups 1, no padding) is a plain matrix product:
the input is A[M, C_in] with one row per output pixel, M = N * H_out * W_out (stride 2
picks every other pixel by index arithmetic, no copy), the weight is W[C_out, C_in], and
the output Y[M, C_out] = A x W^T (+ bias) is the channels_last output itself. At ResNet
shapes these GEMMs are memory-bound, so extra elementwise work on their tiles is almost
free, while every pass it replaces is a full read or write of an activation.

Kernels, read top to bottom (the tiling follows Triton's matrix-multiplication tutorial):

1. ``conv1x1_forward_kernel``: Y = A x W^T (+ bias), with optionally
   - PROLOGUE: A is relu(bn(x)) of the previous BatchNorm, computed on each tile as it
     is loaded (fp32, rounded to the input dtype where eager PyTorch stores a), so a is
     never written;
   - STATS: per (M tile, channel) mean and M2 of the stored output, for the BatchNorm
     that follows; ``conv1x1_stats_merge_kernel`` merges them in a fixed order with
     Chan's formula, and ``bn_stats``' finalize derives invstd and updates the running
     statistics exactly as for any other BatchNorm;
   - EVAL_BN: the following BatchNorm folded from its running statistics, an optional
     residual add and a ReLU (eval: conv + bn + add + relu is this one kernel).
2. ``conv1x1_dgrad_kernel``: dA = dY x W. With a prologue, its epilogue applies the
   ReLU's backward (the mask recomputed from the saved x, bitwise the forward's) and
   writes g with the per-(M tile, channel) partial sums of g and g * (x - mean) that
   the BatchNorm backward needs; ``bn_add_relu``'s finalize and dx kernels then finish
   it in one elementwise pass. Optionally adds another gradient into dA, or reduces over
   a second convolution of the same input too (a block's conv1 and stride-1
   downsample), so x's gradient is written once and never summed in a pass of its own.
3. ``conv1x1_wgrad_kernel``: dW = dY^T x A with A recomputed from x in its prologue,
   split over M into fp32 partials that ``split_sum_kernel`` adds in a fixed order
   (plus the bias gradient, sum dY over M). No atomics anywhere: the same input gives
   the same bits on every run.

Tiles come from ``gemm_tiles``, a deterministic rule of the shape, dtype and target.
``kernels/aot.py``'s ``conv1x1_launches`` records the launches a FusedConvBottleneck makes.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from .bn_add_relu import (
    RESIDUAL_NONE,
    ChannelNorm,
    bn_add_relu_backward_dx,
    bn_add_relu_backward_finalize_kernel,
    channel_affine,
    normalize,
    relu_grad,
)
from .bn_stats import finalize_stats
from .layout import FINALIZE_BLOCK_C, FINALIZE_BLOCK_P, FINALIZE_WARPS, PLAN_PROGRAMS, SMALL_PASS_BYTES, layout_of

# ------------------------------------------------------------------------------ helpers


@triton.jit
def pixel_offsets(m, HWo, Wo, row_stride, stride_n, stride_h, stride_w, SAMPLED: tl.constexpr):
    """64-bit offset of the first channel of output pixel m's input pixel (row m of A).

    Dense NHWC: rows are contiguous (m * C). SAMPLED (stride > 1): m = (n, ho, wo)
    reads pixel (n, ho * s, wo * s); the strides passed already include s.
    """
    if SAMPLED:
        n = m // HWo
        r = m - n * HWo
        ho = r // Wo
        wo = r - ho * Wo
        return n.to(tl.int64) * stride_n + ho.to(tl.int64) * stride_h + wo.to(tl.int64) * stride_w
    return m.to(tl.int64) * row_stride


@triton.jit
def rounded(x, DTYPE: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    """fp32 x rounded to DTYPE, to nearest (ties to even) as a GPU's conversion rounds.

    INTERPRETER_BF16: Triton's interpreter truncates fp32 -> bf16 casts (and its explicit
    "rtne" drops the carry into the exponent), so the rounding is done on the bits first.
    """
    if INTERPRETER_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(DTYPE)


@triton.jit
def bn_relu_operand(x, mask, mean, scale, shift, DTYPE: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    """a = relu(bn(x)) as eager PyTorch materialises it (fp32 math, rounded to DTYPE), and
    exactly 0 outside the tile's mask (a tail of K must add nothing to the dot)."""
    pre = normalize(x.to(tl.float32), mean[None, :], scale[None, :], shift[None, :])
    a = rounded(tl.where(pre < 0.0, 0.0, pre), DTYPE, INTERPRETER_BF16)  # NaN kept, as relu_stored
    return tl.where(mask, a, 0.0).to(DTYPE)


@triton.jit
def mma(a, b, acc, INPUT_PRECISION: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    """acc + a x b with fp32 accumulation.

    INTERPRETER_BF16: Triton's interpreter multiplies bf16 operands as their uint16
    storage, so they go in as fp32 (exact for bf16 products).
    """
    if INTERPRETER_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, GROUP_M row tiles sharing each column sweep so the
    weight and input tiles they share stay in L2 (the tutorial's grouped ordering)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


# ------------------------------------------------------------------------------ forward


# M (N * H_out * W_out) changes with the batch and bounds only row masks, across the vector
# dimension (channels): specialising it on divisibility would compile a ragged last batch anew.
@triton.jit(do_not_specialize=["M"])
def conv1x1_forward_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, r_ptr, partial_ptr,
    p_mean_ptr, p_invstd_ptr, p_w_ptr, p_b_ptr,
    e_mean_ptr, e_var_ptr, e_w_ptr, e_b_ptr,
    M, N, K, HWo, Wo, row_stride, stride_xn, stride_xh, stride_xw, stride_wn, stride_wk, e_eps,
    SAMPLED: tl.constexpr, HAS_BIAS: tl.constexpr,
    PROLOGUE: tl.constexpr, P_HAS_WEIGHT: tl.constexpr, P_HAS_BIAS: tl.constexpr,
    STATS: tl.constexpr, EVAL_BN: tl.constexpr, E_HAS_WEIGHT: tl.constexpr, E_HAS_BIAS: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m < M
    n_mask = n < N
    rows = pixel_offsets(m, HWo, Wo, row_stride, stride_xn, stride_xh, stride_xw, SAMPLED)
    w_cols = n.to(tl.int64) * stride_wn

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        a_mask = m_mask[:, None] & k_mask[None, :]
        a = tl.load(x_ptr + rows[:, None] + k[None, :], mask=a_mask, other=0.0)
        if PROLOGUE:
            mean, scale, shift = channel_affine(k, k_mask, p_mean_ptr, p_invstd_ptr, p_w_ptr, p_b_ptr, 0.0,
                                                False, P_HAS_WEIGHT, P_HAS_BIAS)
            a = bn_relu_operand(a, a_mask, mean, scale, shift, x_ptr.dtype.element_ty, INTERPRETER_BF16)
        b = tl.load(w_ptr + k.to(tl.int64)[:, None] * stride_wk + w_cols[None, :],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = mma(a, b, acc, INPUT_PRECISION, INTERPRETER_BF16)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_offsets = m.to(tl.int64)[:, None] * N + n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if EVAL_BN:
        e_mean, e_scale, e_shift = channel_affine(n, n_mask, e_mean_ptr, e_var_ptr, e_w_ptr, e_b_ptr, e_eps,
                                                  True, E_HAS_WEIGHT, E_HAS_BIAS)
        acc = normalize(acc, e_mean[None, :], e_scale[None, :], e_shift[None, :])
    if ADD_RESIDUAL:
        acc += tl.load(r_ptr + out_offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN kept, as torch.relu
    y = rounded(acc, y_ptr.dtype.element_ty, INTERPRETER_BF16)
    tl.store(y_ptr + out_offsets, y, mask=mask)

    if STATS:
        # The statistics of y as stored (what eager's BatchNorm reads), two passes over the
        # tile in registers: the tile's mean, then M2 about it (no E[y^2] - E[y]^2).
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        v = tl.where(m_mask[:, None], y.to(tl.float32), 0.0)
        tile_mean = tl.sum(v, axis=0) / count
        d = tl.where(m_mask[:, None], v - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(d * d, axis=0)
        # Partials are laid out [num_m_tiles, 2, N]: mean, M2 (the count follows from pid_m).
        out = partial_ptr + pid_m.to(tl.int64) * 2 * N + n
        tl.store(out, tile_mean, mask=n_mask)
        tl.store(out + N, tile_m2, mask=n_mask)


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


# ----------------------------------------------------------------------------- backward


@triton.jit
def dgrad_store(acc, x, offsets, mask, k, k_mask, partial_row_ptr, out_ptr, add_ptr,
                p_mean_ptr, p_invstd_ptr, p_w_ptr, p_b_ptr, K,
                PROLOGUE: tl.constexpr, P_HAS_WEIGHT: tl.constexpr, P_HAS_BIAS: tl.constexpr, ADD: tl.constexpr,
                INTERPRETER_BF16: tl.constexpr, X_DTYPE: tl.constexpr):
    """The dgrad epilogue of one [rows, K] tile of dA = acc (fp32): + add, or with a
    PROLOGUE (x: the tile of the prologue's input) g = dA past relu(bn(x)) and this tile's
    row of partials (sum g, sum g * (x - mean)) at ``partial_row_ptr``; then stored."""
    if ADD:
        acc += tl.load(add_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if PROLOGUE:
        x = x.to(tl.float32)
        mean, scale, shift = channel_affine(k, k_mask, p_mean_ptr, p_invstd_ptr, p_w_ptr, p_b_ptr, 0.0,
                                            False, P_HAS_WEIGHT, P_HAS_BIAS)
        # dA as eager stores it (rounded), then its ReLU backward with the forward's own mask.
        da = rounded(acc, out_ptr.dtype.element_ty, INTERPRETER_BF16).to(tl.float32)
        g = relu_grad(da, 0.0, x, 0.0, mean[None, :], scale[None, :], shift[None, :],
                      mean[None, :], scale[None, :], shift[None, :], True, False, X_DTYPE)
        g = tl.where(mask, g, 0.0)
        tl.store(out_ptr + offsets, g.to(out_ptr.dtype.element_ty), mask=mask)
        # Partials in bn_add_relu's [num_partials, 3, K] layout (the third row is unused here).
        tl.store(partial_row_ptr + k, tl.sum(g, axis=0), mask=k_mask)
        tl.store(partial_row_ptr + K + k, tl.sum(tl.where(mask, g * (x - mean[None, :]), 0.0), axis=0), mask=k_mask)
    else:
        tl.store(out_ptr + offsets, rounded(acc, out_ptr.dtype.element_ty, INTERPRETER_BF16), mask=mask)


@triton.jit(do_not_specialize=["M"])  # as conv1x1_forward_kernel's
def conv1x1_dgrad_kernel(
    dy_ptr, w_ptr, out_ptr, add_ptr, x_ptr, partial_ptr, dy2_ptr, w2_ptr,
    p_mean_ptr, p_invstd_ptr, p_w_ptr, p_b_ptr,
    M, N, K, N2, HWo, Wo, row_stride, stride_xn, stride_xh, stride_xw, stride_wn, stride_wk,
    stride_w2n, stride_w2k,
    SAMPLED: tl.constexpr, PROLOGUE: tl.constexpr, P_HAS_WEIGHT: tl.constexpr, P_HAS_BIAS: tl.constexpr,
    ADD: tl.constexpr, SECOND: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M rows of x, K] = dY[M, N] x W[N, K] (+ add): here N is C_out (the reduction)
    and K is C_in (the output columns). SECOND: + dY2[M, N2] x W2[N2, K], a second
    stride-1 convolution of the same x (a block's conv1 and its downsample), one
    reduction over both: x's gradient is written once, never summed afterwards.
    PROLOGUE: out is g, the gradient past the ReLU, and partials[pid_m, 0:2, :] get
    sum g and sum g * (x - mean) of the tile."""
    pid_m, pid_k = grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = m < M
    k_mask = k < K
    dy_rows = m.to(tl.int64) * N
    w_cols = k.to(tl.int64) * stride_wk

    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < N
        dy = tl.load(dy_ptr + dy_rows[:, None] + n[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        w = tl.load(w_ptr + n.to(tl.int64)[:, None] * stride_wn + w_cols[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = mma(dy, w, acc, INPUT_PRECISION, INTERPRETER_BF16)
    if SECOND:
        dy2_rows = m.to(tl.int64) * N2
        w2_cols = k.to(tl.int64) * stride_w2k
        for n0 in range(0, N2, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < N2
            dy = tl.load(dy2_ptr + dy2_rows[:, None] + n[None, :], mask=m_mask[:, None] & n_mask[None, :],
                         other=0.0)
            w = tl.load(w2_ptr + n.to(tl.int64)[:, None] * stride_w2n + w2_cols[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc = mma(dy, w, acc, INPUT_PRECISION, INTERPRETER_BF16)

    offsets = pixel_offsets(m, HWo, Wo, row_stride, stride_xn, stride_xh, stride_xw, SAMPLED)[:, None] + k[None, :]
    mask = m_mask[:, None] & k_mask[None, :]
    x = 0.0
    if PROLOGUE:
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    dgrad_store(acc, x, offsets, mask, k, k_mask, partial_ptr + pid_m.to(tl.int64) * 3 * K, out_ptr, add_ptr,
                p_mean_ptr, p_invstd_ptr, p_w_ptr, p_b_ptr, K,
                PROLOGUE, P_HAS_WEIGHT, P_HAS_BIAS, ADD, INTERPRETER_BF16, x_ptr.dtype.element_ty)


@triton.jit(do_not_specialize=["M", "rows_per_split"])  # as conv1x1_forward_kernel's
def conv1x1_wgrad_kernel(
    dy_ptr, x_ptr, partial_ptr, bias_partial_ptr,
    p_mean_ptr, p_invstd_ptr, p_w_ptr, p_b_ptr,
    M, N, K, HWo, Wo, row_stride, stride_xn, stride_xh, stride_xw, rows_per_split,
    SAMPLED: tl.constexpr, PROLOGUE: tl.constexpr, P_HAS_WEIGHT: tl.constexpr, P_HAS_BIAS: tl.constexpr,
    BIAS_GRAD: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """partials[split, N, K] = dY[rows of the split, N]^T x A[rows, K] in fp32, A =
    relu(bn(x)) recomputed with the forward's expression when PROLOGUE. BIAS_GRAD: the
    programs of the first K tile also write bias_partials[split, N] = sum of dY."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = n < N
    k_mask = k < K
    if PROLOGUE:
        mean, scale, shift = channel_affine(k, k_mask, p_mean_ptr, p_invstd_ptr, p_w_ptr, p_b_ptr, 0.0,
                                            False, P_HAS_WEIGHT, P_HAS_BIAS)

    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_mask = m < m_end
        dy = tl.load(dy_ptr + m.to(tl.int64)[:, None] * N + n[None, :], mask=m_mask[:, None] & n_mask[None, :],
                     other=0.0)
        rows = pixel_offsets(m, HWo, Wo, row_stride, stride_xn, stride_xh, stride_xw, SAMPLED)
        a_mask = m_mask[:, None] & k_mask[None, :]
        a = tl.load(x_ptr + rows[:, None] + k[None, :], mask=a_mask, other=0.0)
        if PROLOGUE:
            a = bn_relu_operand(a, a_mask, mean, scale, shift, x_ptr.dtype.element_ty, INTERPRETER_BF16)
        acc = mma(tl.trans(dy), a, acc, INPUT_PRECISION, INTERPRETER_BF16)
        if BIAS_GRAD:
            acc_b += tl.sum(dy.to(tl.float32), axis=0)

    out = partial_ptr + pid_s.to(tl.int64) * N * K + n.to(tl.int64)[:, None] * K + k[None, :]
    tl.store(out, acc, mask=n_mask[:, None] & k_mask[None, :])
    if BIAS_GRAD:
        if pid_k == 0:
            tl.store(bias_partial_ptr + pid_s.to(tl.int64) * N + n, acc_b, mask=n_mask)


@triton.jit(do_not_specialize=["M", "rows_per_split"])  # as conv1x1_forward_kernel's
def conv1x1_dgrad_wgrad_kernel(
    dy_ptr, w_ptr, x_ptr, out_ptr, partial_ptr, w_partial_ptr, b_partial_ptr,
    dy2_ptr, w2_ptr, w2_partial_ptr, b2_partial_ptr,
    p_mean_ptr, p_invstd_ptr, p_w_ptr, p_b_ptr,
    M, N, K, N2, HWo, Wo, row_stride, stride_xn, stride_xh, stride_xw, stride_wn, stride_wk,
    stride_w2n, stride_w2k, rows_per_split,
    SAMPLED: tl.constexpr, PROLOGUE: tl.constexpr, P_HAS_WEIGHT: tl.constexpr, P_HAS_BIAS: tl.constexpr,
    SECOND: tl.constexpr, BIAS_GRAD: tl.constexpr, BIAS_GRAD2: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Both gradients in one pass over dY, for a weight that fits one program (N <=
    BLOCK_N, K <= BLOCK_K): each program takes rows_per_split rows and, for each BLOCK_M
    of them, writes dA = dY x W with ``conv1x1_dgrad_kernel``'s epilogue and adds dY^T x A
    (A = relu(bn(x)) with PROLOGUE, as in ``conv1x1_wgrad_kernel``) to its split's fp32
    weight-gradient partials. SECOND: as in ``conv1x1_dgrad_kernel``, with the second
    weight's gradient too. dY, x and dY2 are read once, where two passes read them twice."""
    pid_s = tl.program_id(0)
    n = tl.arange(0, BLOCK_N)
    n_mask = n < N
    n2 = tl.arange(0, BLOCK_N2)
    n2_mask = n2 < N2
    k = tl.arange(0, BLOCK_K)
    k_mask = k < K
    if PROLOGUE:
        mean, scale, shift = channel_affine(k, k_mask, p_mean_ptr, p_invstd_ptr, p_w_ptr, p_b_ptr, 0.0,
                                            False, P_HAS_WEIGHT, P_HAS_BIAS)
    w_offsets = n.to(tl.int64)[:, None] * stride_wn + k[None, :] * stride_wk
    w_mask = n_mask[:, None] & k_mask[None, :]
    w2_offsets = n2.to(tl.int64)[:, None] * stride_w2n + k[None, :] * stride_w2k
    w2_mask = n2_mask[:, None] & k_mask[None, :]

    acc_w = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_w2 = tl.zeros([BLOCK_N2, BLOCK_K], dtype=tl.float32)
    acc_b2 = tl.zeros([BLOCK_N2], dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    # Splits start on a BLOCK_M boundary: the row blocks are the dgrad kernel's tiles, and so are their partials.
    partial_row_ptr = partial_ptr + pid_s.to(tl.int64) * (rows_per_split // BLOCK_M) * 3 * K
    for m0 in range(m_start, m_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_mask = m < m_end
        dy = tl.load(dy_ptr + m.to(tl.int64)[:, None] * N + n[None, :], mask=m_mask[:, None] & n_mask[None, :],
                     other=0.0)
        offsets = pixel_offsets(m, HWo, Wo, row_stride, stride_xn, stride_xh, stride_xw, SAMPLED)[:, None] + k[None, :]
        mask = m_mask[:, None] & k_mask[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        a = x
        if PROLOGUE:
            a = bn_relu_operand(x, mask, mean, scale, shift, x_ptr.dtype.element_ty, INTERPRETER_BF16)
        # The weight is re-read for every row block: it stays in L1 / L2, and registers are short.
        w = tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0)
        acc = mma(dy, w, tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32), INPUT_PRECISION, INTERPRETER_BF16)
        acc_w = mma(tl.trans(dy), a, acc_w, INPUT_PRECISION, INTERPRETER_BF16)
        if BIAS_GRAD:
            acc_b += tl.sum(dy.to(tl.float32), axis=0)
        if SECOND:
            dy2 = tl.load(dy2_ptr + m.to(tl.int64)[:, None] * N2 + n2[None, :],
                          mask=m_mask[:, None] & n2_mask[None, :], other=0.0)
            w2 = tl.load(w2_ptr + w2_offsets, mask=w2_mask, other=0.0)
            acc = mma(dy2, w2, acc, INPUT_PRECISION, INTERPRETER_BF16)
            acc_w2 = mma(tl.trans(dy2), a, acc_w2, INPUT_PRECISION, INTERPRETER_BF16)
            if BIAS_GRAD2:
                acc_b2 += tl.sum(dy2.to(tl.float32), axis=0)
        dgrad_store(acc, x, offsets, mask, k, k_mask, partial_row_ptr, out_ptr, out_ptr,
                    p_mean_ptr, p_invstd_ptr, p_w_ptr, p_b_ptr, K,
                    PROLOGUE, P_HAS_WEIGHT, P_HAS_BIAS, False, INTERPRETER_BF16, x_ptr.dtype.element_ty)
        partial_row_ptr += 3 * K

    out = w_partial_ptr + pid_s.to(tl.int64) * N * K + n.to(tl.int64)[:, None] * K + k[None, :]
    tl.store(out, acc_w, mask=w_mask)
    if BIAS_GRAD:
        tl.store(b_partial_ptr + pid_s.to(tl.int64) * N + n, acc_b, mask=n_mask)
    if SECOND:
        out2 = w2_partial_ptr + pid_s.to(tl.int64) * N2 * K + n2.to(tl.int64)[:, None] * K + k[None, :]
        tl.store(out2, acc_w2, mask=w2_mask)
        if BIAS_GRAD2:
            tl.store(b2_partial_ptr + pid_s.to(tl.int64) * N2 + n2, acc_b2, mask=n2_mask)


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


# ---------------------------------------------------------------------------- tile rule


@dataclass(frozen=True)
class GemmTiles:
    """One GEMM's tiles: rows (BLOCK_M), output columns (BLOCK_N), reduction (BLOCK_K)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


# The interpreter runs tl.dot as a numpy matmul per program: small tiles keep it quick.
INTERPRETER_TILES = GemmTiles(16, 16, 16, group_m=4, num_warps=1, num_stages=1)
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
        rows = triton.cdiv(rows, group)
    return levels + [max(rows, 1)]


def _pow2_between(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(n, 1))))


# The most output rows a forward / dgrad tile takes (the audit's projection needs each tile full).
GEMM_MAX_BLOCK_M = 128


def gemm_tiles(M: int, N: int, K: int, dtype: torch.dtype, target, precision: str = "ieee",
               heavy_epilogue: bool = False, b_prologue: bool = False, fill: bool = True) -> GemmTiles:
    """The tiles of an [M, K] x [K, N] GEMM on ``target``, a deterministic rule.

    ``target``: a ``triton.backends.compiler.GPUTarget`` (backend "cuda" / "hip"), or
    None for the interpreter. Tensor-core GEMMs: 128x128 output tiles (smaller for small
    M / N, never below 16, tl.dot's minimum), 64 output columns under a heavy epilogue
    (a residual and a folded BatchNorm next to the accumulator, which would spill at
    128); the reduction tile is 128 bytes of a row (64 x 16-bit, 32 x fp32) on NVIDIA,
    half that on AMD, whose 64 KiB of LDS must hold the stages: (BLOCK_M + BLOCK_N) *
    BLOCK_K * bytes <= 32 KiB a stage. Eight warps from 128x128 up, and for a BatchNorm
    prologue on the second operand (the weight gradient's recomputed activation, which
    spills on sm_80 with four). ``fill``: where the output tiles are fewer than
    PLAN_PROGRAMS, smaller ones (down to 64) and on NVIDIA a deeper BLOCK_K for a long K
    (the weight gradient passes False: its splits of M fill the GPU instead). Two stages
    where K fits one BLOCK_K (sm_90). fp32 without TF32 on NVIDIA runs on the FMA units:
    64x64x16 tiles on eight warps, two stages (software pipelining of a prologue on the
    FMA path beyond two stages, 32-deep tiles, or one stage on sm_90a spill).
    """
    if target is None:
        return INTERPRETER_TILES
    size = torch.empty((), dtype=dtype).element_size()
    cuda = target.backend == "cuda"
    if cuda and dtype == torch.float32 and precision == "ieee":
        return GemmTiles(_pow2_between(M, 16, 64), _pow2_between(N, 16, 64), 16, 8, 8, 2)
    block_m = _pow2_between(M, 16, GEMM_MAX_BLOCK_M)
    block_n = _pow2_between(N, 16, 64 if heavy_epilogue else 128)
    block_k = _pow2_between(K, 16, (128 if cuda else 64) // size)
    deep = False
    # A short grid (batch 32, layers 3-4) takes 64-wide tiles before it leaves SMs idle, and
    # then (NVIDIA) a reduction tile twice as deep where K is long: half the dependent steps.
    while (fill and triton.cdiv(M, block_m) * triton.cdiv(N, block_n) < PLAN_PROGRAMS
           and max(block_m, block_n) > 64):
        if block_m >= block_n:
            block_m //= 2
        else:
            block_n //= 2
        if cuda and max(block_m, block_n) <= 64 and K >= 8 * block_k and not deep:
            block_k, deep = 2 * block_k, True
    warps = 8 if (block_m * block_n >= 128 * 128 or b_prologue) else 4
    if cuda:
        # K in one BLOCK_K (layer1's 64 channels) on sm_90: one iteration, nothing to
        # pipeline; two stages, not four, keep the shared memory for a second program on the
        # SM (sm_80 keeps three: triton 3.6 spills 16 bytes of the dgrad with two there).
        # The deep tile: three stages, so that two programs share an SM (64x64x128 x 2 bytes x 4 would be 128 KiB).
        stages = 2 if (K <= block_k and target.arch != 80) else (3 if (target.arch == 80 or deep) else 4)
        return GemmTiles(block_m, block_n, block_k, 8, warps, stages)
    return GemmTiles(block_m, block_n, block_k, 8, warps, 2)


def wgrad_splits(M: int, N: int, K: int, tiles: GemmTiles, size: int, target,
                 programs: int = PLAN_PROGRAMS, partial_share: int = 2) -> tuple[int, int]:
    """(num_splits, rows_per_split) of the weight gradient's reduction over M.

    About ``programs`` programs in all (two per H100 SM: more only adds partials), each
    split a whole number of BLOCK_M rows, and on a GPU the fp32 partials (written and read
    once) at most 1/``partial_share`` of the operands' bytes (a half: at batch 32 an eighth
    left 56 programs for 132 SMs; PLAN_PROGRAMS bounds them at batch 256). The interpreter
    splits by rows alone, so small tests combine several splits.
    """
    out_tiles = triton.cdiv(N, tiles.block_n) * triton.cdiv(K, tiles.block_k)
    by_programs = max(1, programs // out_tiles)
    by_traffic = (max(1, (M * (N + K) * size) // (8 * partial_share * N * K)) if target is not None
                  else by_programs)
    by_rows = max(1, triton.cdiv(M, tiles.block_m))
    splits = min(by_programs, by_traffic, by_rows)
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), tiles.block_m) * tiles.block_m
    return triton.cdiv(M, rows_per_split) if M > 0 else 1, rows_per_split


_TRITON_BEFORE_3_7 = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7)

# Programs of the one-pass backward: about two per SM of an A100 / H100; more would add
# weight-gradient partials (each program's are the whole weight) for no more bandwidth.
DGRAD_WGRAD_PROGRAMS = 256
# The most weight-gradient accumulator elements (fp32) one of its programs holds: 80 a thread on eight warps.
DGRAD_WGRAD_MAX_ACCUMULATORS = 320 * 64


def dgrad_wgrad_tiles(N: int, K: int, N2: int, dtype: torch.dtype, target, precision: str = "ieee",
                      prologue: bool = False) -> Optional[GemmTiles]:
    """Tiles of ``conv1x1_dgrad_wgrad_kernel`` for C_out = N, C_in = K (and a second
    convolution's C_out = N2, 0 for none), or None where one pass does not fit and the
    backward takes two (``conv1x1_dgrad``, then ``conv1x1_wgrad``). A deterministic rule.

    Every weight gradient sits whole in one program's accumulators: C_in <= 64, C_out
    (each) <= 256, at most DGRAD_WGRAD_MAX_ACCUMULATORS in all (ResNet-50's layer1: conv3
    64 -> 256; conv1 64 -> 64 with its downsample 64 -> 256). block_n is N's block
    (N2's: ``dgrad_wgrad_block_n2``). Only on NVIDIA sm_90 and newer, with tensor cores
    and 16-bit inputs: ptxas spills these programs on sm_80 (up to 352 bytes) and they
    spill and overflow the 64 KiB of LDS on gfx942, and fp32 (TF32) tiles small enough not
    to spill compile to mma.sync (AOT-compiled at ResNet-50's shapes). Rows: 64 a block on
    eight warps, two stages.
    """
    if K > 64 or N > 256 or N2 > 256:
        return None
    block_n, block_k = _pow2_between(N, 16, 256), _pow2_between(K, 16, 64)
    if (block_n + (dgrad_wgrad_block_n2(N2) if N2 else 0)) * block_k > DGRAD_WGRAD_MAX_ACCUMULATORS:
        return None
    if target is None:
        return GemmTiles(INTERPRETER_TILES.block_m, block_n, block_k, 1, 1, 1)
    if target.backend != "cuda" or target.arch < 90 or dtype == torch.float32:
        # fp32: without TF32 no tensor cores; with TF32 the 16- and 32-row tiles that fit
        # beside a whole-row dY tile lower to mma.sync, not wgmma, on Triton 3.6 and 3.8
        # alike (AOT, sm_90a): the two kernels instead, whose dots are wgmma.
        return None
    # Triton 3.6 gives the 256-wide prologue case (layer1's conv3) 255 registers and 8
    # bytes of spill with two stages; one stage compiles to 248 and none (AOT, sm_90a).
    stages = 1 if (prologue and block_n >= 256 and _TRITON_BEFORE_3_7) else 2
    return GemmTiles(64, block_n, block_k, 1, 8, stages)


def dgrad_wgrad_block_n2(N2: int) -> int:
    return _pow2_between(N2, 16, 256)


def wgrad_plan(M: int, N: int, K: int, dtype: torch.dtype, target, precision: str = "ieee",
               prologue: bool = False) -> tuple[GemmTiles, int, int]:
    """(tiles, num_splits, rows_per_split) of ``conv1x1_wgrad`` for C_out = N, C_in = K
    over M rows: output tile [BLOCK_N, BLOCK_K] = (C_out, C_in), reduction over M in
    BLOCK_M rows."""
    size = torch.empty((), dtype=dtype).element_size()
    # Whole tiles split over M where that fills the GPU (compute-bound layers 3-4 at batch
    # 256), else the short grid's smaller tiles too (batch 32).
    for fill in (False, True):
        t = gemm_tiles(N, K, M, dtype, target, precision, b_prologue=prologue, fill=fill)
        tiles = GemmTiles(t.block_k, t.block_m, t.block_n, t.group_m, t.num_warps, t.num_stages)
        splits, rows_per_split = wgrad_splits(M, N, K, tiles, size, target)
        if triton.cdiv(N, tiles.block_n) * triton.cdiv(K, tiles.block_k) * splits >= PLAN_PROGRAMS // 2:
            break
    return tiles, splits, rows_per_split


def dgrad_wgrad_plan(M: int, N: int, K: int, N2: int, dtype: torch.dtype, target, precision: str = "ieee",
                     prologue: bool = False) -> Optional[tuple[GemmTiles, int, int]]:
    """(tiles, num_splits, rows_per_split) of ``conv1x1_dgrad_wgrad_kernel``, or None
    where the backward takes two passes (``dgrad_wgrad_tiles``; or nothing to compute).
    One program per split, its output tile both whole weights."""
    tiles = dgrad_wgrad_tiles(N, K, N2, dtype, target, precision, prologue)
    if tiles is None or M == 0 or K == 0:
        return None
    size = torch.empty((), dtype=dtype).element_size()
    return (tiles, *wgrad_splits(M, N + N2, K, GemmTiles(tiles.block_m, N + N2, K), size, target,
                                 programs=DGRAD_WGRAD_PROGRAMS))


_INTERPRETER_PLAN_TARGET = None


@contextlib.contextmanager
def interpreter_plans_as(target) -> Iterator[None]:
    """Within the block, launches on CPU tensors (the interpreter) take the tiles and
    weight-gradient splits ``target`` (a ``GPUTarget``) would choose, at its default fp32
    precision (TF32 where cuDNN's default allows it); the interpreter's numerics stay its
    own. For counting the traffic of a GPU's plan (``fused-resnet audit``)."""
    global _INTERPRETER_PLAN_TARGET
    saved, _INTERPRETER_PLAN_TARGET = _INTERPRETER_PLAN_TARGET, target
    try:
        yield
    finally:
        _INTERPRETER_PLAN_TARGET = saved


def _plan(dtype: torch.dtype, allow_tf32: bool, target) -> tuple:
    """(target, precision) that choose a launch's tiles: ``target``'s own, or on the
    interpreter those of ``interpreter_plans_as``."""
    if target is None and _INTERPRETER_PLAN_TARGET is not None:
        target = _INTERPRETER_PLAN_TARGET
    return target, input_precision(dtype, allow_tf32, target)


def target_of(device: torch.device):
    """The GPUTarget of ``device`` (its own capability, not the current device's), or None
    on a CPU (the interpreter).

    The launchers take ``target=None`` as "the target of the input's device"; ahead-of-time
    compilation passes a GPUTarget instead."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return triton.runtime.driver.active.get_current_target()
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_target(index)


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int):
    """What Triton's driver reports for the current device, for device ``index``."""
    if torch.version.hip:
        arch = torch.cuda.get_device_properties(index).gcnArchName.split(":")[0]
        return GPUTarget("hip", arch, 64)
    major, minor = torch.cuda.get_device_capability(index)
    return GPUTarget("cuda", major * 10 + minor, 32)


def input_precision(dtype: torch.dtype, allow_tf32: bool, target) -> str:
    """tl.dot's input_precision: TF32 for fp32 exactly when the convolution it replaces
    would use it (``torch.backends.cudnn.allow_tf32``) and the target has it."""
    if dtype != torch.float32 or not allow_tf32 or target is None:
        return "ieee"
    if target.backend == "cuda" or target.arch == "gfx942":
        return "tf32"
    return "ieee"


# ---------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class ConvGeometry:
    """A 1x1 convolution's GEMM: M output pixels of an NHWC input, C_in -> C_out."""

    N: int
    C_in: int
    H: int
    W: int
    C_out: int
    stride: int

    @property
    def H_out(self) -> int:
        return (self.H - 1) // self.stride + 1 if self.H > 0 else 0

    @property
    def W_out(self) -> int:
        return (self.W - 1) // self.stride + 1 if self.W > 0 else 0

    @property
    def M(self) -> int:
        return self.N * self.H_out * self.W_out

    def row_args(self) -> tuple:
        """(HWo, Wo, row_stride, stride_n, stride_h, stride_w) of ``pixel_offsets`` on a
        dense NHWC input (strides from the shape: size-1 dims may have any stride)."""
        s, C = self.stride, self.C_in
        return (self.H_out * self.W_out, self.W_out, C, self.H * self.W * C, s * self.W * C, s * C)

    @property
    def sampled(self) -> bool:
        return self.stride > 1


def geometry_of(x: torch.Tensor, weight: torch.Tensor, stride: int) -> ConvGeometry:
    N, C_in, H, W = x.shape
    return ConvGeometry(N, C_in, H, W, weight.shape[0], stride)


def _nhwc_empty(shape, like: torch.Tensor, zeros: bool = False) -> torch.Tensor:
    make = torch.zeros if zeros else torch.empty
    return make(shape, device=like.device, dtype=like.dtype).contiguous(memory_format=torch.channels_last)


def _or(t: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    # Triton needs a pointer for every argument; the flags keep the dummy unread.
    return fallback if t is None else t


def _norm_args(norm: Optional[ChannelNorm], fallback: torch.Tensor) -> tuple:
    if norm is None:
        return fallback, fallback, fallback, fallback
    return norm.mean, norm.invstd, _or(norm.weight, norm.mean), _or(norm.bias, norm.mean)


def _norm_flags(norm: Optional[ChannelNorm]) -> tuple[bool, bool]:
    return norm is not None and norm.weight is not None, norm is not None and norm.bias is not None


def _check_nhwc(name: str, t: torch.Tensor) -> None:
    # The kernels address NHWC from the shape; anything else would be read wrongly.
    if not t.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"{name} must be a dense channels_last tensor")


def _interpreter_bf16(dtype: torch.dtype, target) -> bool:
    return target is None and dtype == torch.bfloat16


def conv1x1_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: int,
    prologue: Optional[ChannelNorm] = None,
    stats: bool = False,
    eval_norm: Optional[ChannelNorm] = None,
    eval_eps: float = 0.0,
    residual: Optional[torch.Tensor] = None,
    relu: bool = False,
    allow_tf32: bool = False,
    target=None,
    tiles: Optional[GemmTiles] = None,
):
    """y = conv1x1(x) in x's dtype, channels_last, and the statistics partials.

    ``tiles``: override the rule's tiles (only :func:`autotune_conv1x1` passes it).

    ``prologue``: the GEMM reads relu(bn(x)) with this (mean, invstd, weight, bias).
    ``stats``: also returns the [num_m_tiles, 2, C_out] partials and the tile height,
    for ``conv1x1_stats_finalize``. ``eval_norm`` (its invstd slot holds the running
    variance), ``residual``, ``relu``: y = relu(bn(conv(x)) + residual). x (and
    residual) must be dense channels_last. Returns ``(y, partials or None, block_m)``.
    """
    _check_nhwc("x", x)
    target = target_of(x.device) if target is None else target
    geo = geometry_of(x, weight, stride)
    y = _nhwc_empty((geo.N, geo.C_out, geo.H_out, geo.W_out), x)
    if residual is not None:
        _check_nhwc("residual", residual)
    precision = input_precision(x.dtype, allow_tf32, target)
    if tiles is None:
        tiles = gemm_tiles(geo.M, geo.C_out, geo.C_in, x.dtype, *_plan(x.dtype, allow_tf32, target),
                           heavy_epilogue=eval_norm is not None and residual is not None)
    num_m_tiles = triton.cdiv(geo.M, tiles.block_m)
    partials = torch.empty((num_m_tiles, 2, geo.C_out), device=x.device, dtype=torch.float32) if stats else None
    if geo.M == 0 or geo.C_out == 0:
        return y, partials, tiles.block_m
    p_w, p_b = _norm_flags(prologue)
    e_w, e_b = _norm_flags(eval_norm)
    grid = (num_m_tiles * triton.cdiv(geo.C_out, tiles.block_n),)
    conv1x1_forward_kernel[grid](
        x, weight, _or(bias, weight), y, _or(residual, y), _or(partials, y),
        *_norm_args(prologue, weight), *_norm_args(eval_norm, weight),
        geo.M, geo.C_out, geo.C_in, *geo.row_args(), weight.stride(0), weight.stride(1), float(eval_eps),
        SAMPLED=geo.sampled, HAS_BIAS=bias is not None,
        PROLOGUE=prologue is not None, P_HAS_WEIGHT=p_w, P_HAS_BIAS=p_b,
        STATS=stats, EVAL_BN=eval_norm is not None, E_HAS_WEIGHT=e_w, E_HAS_BIAS=e_b,
        ADD_RESIDUAL=residual is not None, RELU=relu,
        INPUT_PRECISION=precision, INTERPRETER_BF16=_interpreter_bf16(x.dtype, target),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return y, partials, tiles.block_m


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
    channel_blocks = triton.cdiv(C, STATS_MERGE_BLOCK_C)
    levels = combining_levels(num_tiles, 2 * C * 4, channel_blocks)
    for tiles_per_group in levels[:-1]:
        groups = triton.cdiv(num_tiles, tiles_per_group)
        merged = torch.empty((groups, 2, C), device=partials.device, dtype=torch.float32)
        conv1x1_stats_merge_kernel[(channel_blocks, groups)](
            partials, merged, C, num_tiles, M, tile_rows, tiles_per_group,
            FINAL=False, BLOCK_P=STATS_MERGE_BLOCK_P, BLOCK_C=STATS_MERGE_BLOCK_C)
        partials, num_tiles, tile_rows = merged, groups, tile_rows * tiles_per_group
    merged = torch.empty((3, C), device=partials.device, dtype=torch.float32)
    conv1x1_stats_merge_kernel[(channel_blocks, 1)](
        partials, merged, C, num_tiles, M, tile_rows, max(num_tiles, 1),
        FINAL=True, BLOCK_P=STATS_MERGE_BLOCK_P, BLOCK_C=STATS_MERGE_BLOCK_C)
    # The merged statistics are bn_stats finalize's single partial (see conv1x1_stats_merge_kernel).
    mean, invstd, _ = finalize_stats(merged, merged[2], 1, 1, C, M, running_mean, running_var,
                                     num_batches_tracked, momentum, eps)
    return mean, invstd


def _second_operands(geo: ConvGeometry, dy: torch.Tensor, weight: torch.Tensor, second) -> tuple:
    """(dy2, weight2) of ``second``, checked to be a stride-1 convolution of the same x
    (or (dy, weight), never read, without one)."""
    if second is None:
        return dy, weight
    dy2, w2 = second
    _check_nhwc("dy2", dy2)
    if w2.shape[1] != geo.C_in or dy2.shape[:1] + dy2.shape[2:] != dy.shape[:1] + dy.shape[2:]:
        raise ValueError("second must be (dy2, weight2) of a stride-1 convolution of the same x")
    return dy2, w2


def conv1x1_dgrad(
    dy: torch.Tensor,
    weight: torch.Tensor,
    x: torch.Tensor,
    stride: int,
    prologue: Optional[ChannelNorm] = None,
    add: Optional[torch.Tensor] = None,
    second: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    allow_tf32: bool = False,
    target=None,
):
    """dA = dY x W in x's shape (zeros at the pixels a stride skips) (+ ``add``)
    (+ dY2 x W2 for ``second`` = (dy2, weight2), another stride-1 convolution of x).

    ``prologue``: returns g = dA where relu(bn(x)) > 0 and the [num_m_tiles, 3, C_in]
    partial sums for ``conv1x1_prologue_backward``; else ``(dx, None)``. dy and x must
    be dense channels_last; x is only read with a prologue.
    """
    _check_nhwc("dy", dy)
    _check_nhwc("x", x)
    target = target_of(x.device) if target is None else target
    geo = geometry_of(x, weight, stride)
    if (add is not None or second is not None) and geo.sampled:
        raise ValueError("add and second are not supported with stride > 1")
    if add is not None:
        _check_nhwc("add", add)
    dy2, w2 = _second_operands(geo, dy, weight, second)
    out = _nhwc_empty(x.shape, x, zeros=geo.sampled)
    precision = input_precision(x.dtype, allow_tf32, target)
    tiles = gemm_tiles(geo.M, geo.C_in, geo.C_out, x.dtype, *_plan(x.dtype, allow_tf32, target),
                       heavy_epilogue=prologue is not None)
    # Here the GEMM's output columns are C_in (BLOCK_K) and its reduction C_out (BLOCK_N).
    # Two reductions (second) on sm_80: eight warps (four: 168 registers and 8 bytes of
    # spill under triton 3.6 at layer1's TF32 conv1 + downsample; eight: 104, none).
    warps = 8 if (second is not None and target is not None and target.backend == "cuda" and target.arch == 80) \
        else tiles.num_warps
    tiles = GemmTiles(tiles.block_m, tiles.block_k, tiles.block_n, tiles.group_m, warps, tiles.num_stages)
    num_m_tiles = triton.cdiv(geo.M, tiles.block_m)
    partials = (torch.empty((num_m_tiles, 3, geo.C_in), device=x.device, dtype=torch.float32)
                if prologue is not None else None)
    if geo.M == 0 or geo.C_in == 0:
        return out, partials
    p_w, p_b = _norm_flags(prologue)
    grid = (num_m_tiles * triton.cdiv(geo.C_in, tiles.block_k),)
    conv1x1_dgrad_kernel[grid](
        dy, weight, out, _or(add, out), x, _or(partials, out), dy2, w2, *_norm_args(prologue, weight),
        geo.M, geo.C_out, geo.C_in, w2.shape[0], *geo.row_args(), weight.stride(0), weight.stride(1),
        w2.stride(0), w2.stride(1),
        SAMPLED=geo.sampled, PROLOGUE=prologue is not None, P_HAS_WEIGHT=p_w, P_HAS_BIAS=p_b,
        ADD=add is not None, SECOND=second is not None,
        INPUT_PRECISION=precision, INTERPRETER_BF16=_interpreter_bf16(x.dtype, target),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out, partials


def conv1x1_wgrad(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int,
    prologue: Optional[ChannelNorm] = None,
    bias_grad: bool = False,
    allow_tf32: bool = False,
    target=None,
):
    """(dW in weight's dtype and strides, d_bias or None) = dY^T x A over all M rows,
    A = relu(bn(x)) with a prologue. dy and x must be dense channels_last."""
    _check_nhwc("dy", dy)
    _check_nhwc("x", x)
    target = target_of(x.device) if target is None else target
    geo = geometry_of(x, weight, stride)
    N, K = geo.C_out, geo.C_in
    precision = input_precision(x.dtype, allow_tf32, target)
    tiles, splits, rows_per_split = wgrad_plan(geo.M, N, K, x.dtype, *_plan(x.dtype, allow_tf32, target),
                                               prologue=prologue is not None)
    partials = torch.empty((splits, N, K), device=x.device, dtype=torch.float32)
    bias_partials = torch.empty((splits, N), device=x.device, dtype=torch.float32) if bias_grad else None
    p_w, p_b = _norm_flags(prologue)
    if N * K > 0:
        conv1x1_wgrad_kernel[(triton.cdiv(N, tiles.block_n), triton.cdiv(K, tiles.block_k), splits)](
            dy, x, partials, _or(bias_partials, partials), *_norm_args(prologue, weight),
            geo.M, N, K, *geo.row_args(), rows_per_split,
            SAMPLED=geo.sampled, PROLOGUE=prologue is not None, P_HAS_WEIGHT=p_w, P_HAS_BIAS=p_b,
            BIAS_GRAD=bias_grad,
            INPUT_PRECISION=precision, INTERPRETER_BF16=_interpreter_bf16(x.dtype, target),
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )
    return _summed_splits(partials, bias_partials, weight, target)


def conv1x1_dgrad_wgrad(
    dy: torch.Tensor,
    weight: torch.Tensor,
    x: torch.Tensor,
    stride: int,
    prologue: Optional[ChannelNorm] = None,
    second: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    bias_grad: bool = False,
    bias_grad2: bool = False,
    allow_tf32: bool = False,
    target=None,
):
    """Both gradients of a 1x1 convolution: ``conv1x1_dgrad``'s (dA, or g and partials
    with a prologue) and ``conv1x1_wgrad``'s (dW, d_bias), and with ``second`` = (dy2,
    weight2) (a stride-1 convolution of the same x) dA over both and the second's (dW2,
    d_bias2). In one pass over dY and x where ``dgrad_wgrad_tiles`` fits, else in two.
    Returns ``(out, partials or None, (dw, db), (dw2, db2) or None)``."""
    _check_nhwc("dy", dy)
    _check_nhwc("x", x)
    target = target_of(x.device) if target is None else target
    geo = geometry_of(x, weight, stride)
    if second is not None and geo.sampled:
        raise ValueError("second is not supported with stride > 1")
    dy2, w2 = _second_operands(geo, dy, weight, second)
    N, K, N2 = geo.C_out, geo.C_in, (w2.shape[0] if second is not None else 0)
    bias_grad2 = bias_grad2 and second is not None
    plan = dgrad_wgrad_plan(geo.M, N, K, N2, x.dtype, *_plan(x.dtype, allow_tf32, target),
                            prologue=prologue is not None)
    if plan is None:
        out, partials = conv1x1_dgrad(dy, weight, x, stride, prologue, second=second, allow_tf32=allow_tf32,
                                      target=target)
        grads = conv1x1_wgrad(dy, x, weight, stride, prologue, bias_grad, allow_tf32, target)
        grads2 = conv1x1_wgrad(dy2, x, w2, 1, None, bias_grad2, allow_tf32, target) if second is not None else None
        return out, partials, grads, grads2

    tiles, splits, rows_per_split = plan
    out = _nhwc_empty(x.shape, x, zeros=geo.sampled)
    partials = (torch.empty((triton.cdiv(geo.M, tiles.block_m), 3, K), device=x.device, dtype=torch.float32)
                if prologue is not None else None)

    def fp32(*shape):
        return torch.empty((splits, *shape), device=x.device, dtype=torch.float32)

    w_partials, b_partials = fp32(N, K), (fp32(N) if bias_grad else None)
    w2_partials, b2_partials = (fp32(N2, K) if second is not None else None), (fp32(N2) if bias_grad2 else None)
    p_w, p_b = _norm_flags(prologue)
    conv1x1_dgrad_wgrad_kernel[(splits,)](
        dy, weight, x, out, _or(partials, out), w_partials, _or(b_partials, w_partials),
        dy2, w2, _or(w2_partials, w_partials), _or(b2_partials, w_partials), *_norm_args(prologue, weight),
        geo.M, N, K, N2, *geo.row_args(), weight.stride(0), weight.stride(1), w2.stride(0), w2.stride(1),
        rows_per_split,
        SAMPLED=geo.sampled, PROLOGUE=prologue is not None, P_HAS_WEIGHT=p_w, P_HAS_BIAS=p_b,
        SECOND=second is not None, BIAS_GRAD=bias_grad, BIAS_GRAD2=bias_grad2,
        INPUT_PRECISION=input_precision(x.dtype, allow_tf32, target),
        INTERPRETER_BF16=_interpreter_bf16(x.dtype, target),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_N2=dgrad_wgrad_block_n2(N2), BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    grads = _summed_splits(w_partials, b_partials, weight, target)
    grads2 = _summed_splits(w2_partials, b2_partials, w2, target) if second is not None else None
    return out, partials, grads, grads2


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
    col_blocks = triton.cdiv(numel, block)
    levels = combining_levels(splits, numel * 4, col_blocks)
    for rows_per_group in levels:
        groups = triton.cdiv(splits, rows_per_group)
        dest = out if groups == 1 else torch.empty((groups, numel), device=partials.device, dtype=torch.float32)
        split_sum_kernel[(col_blocks, groups)](
            partials, dest, numel, splits, rows_per_group, INTERPRETER_BF16=_interpreter_bf16(dest.dtype, target),
            BLOCK_R=max(1, SPLIT_SUM_TILE // block), BLOCK=block, num_warps=8)
        partials, splits = dest, groups


def conv1x1_prologue_backward(
    g: torch.Tensor,
    partials: torch.Tensor,
    x: torch.Tensor,
    norm: ChannelNorm,
    training: bool,
    need_weight: bool,
    need_bias: bool,
    need_input: bool = True,
):
    """dx, d_weight, d_bias of the prologue's relu(bn(x)) from the dgrad's g and
    partials: ``bn_add_relu``'s fixed-order finalize, then its elementwise dx pass
    (skipped without ``need_input``: dx is None). ``training``: the mean / invstd are
    x's batch statistics (their terms enter dx)."""
    C = x.shape[1]
    sums = torch.empty((3, C), device=x.device, dtype=torch.float32)
    dw = torch.empty_like(norm.weight) if (need_weight and norm.weight is not None) else None
    db = torch.empty_like(norm.bias) if (need_bias and norm.bias is not None) else None
    if C > 0:
        if partials.shape[0] > 1:
            # One partial row per GEMM row tile (thousands): summed by a combining pass that fills the GPU first.
            total = torch.empty((1, 3, C), device=x.device, dtype=torch.float32)
            _split_sum(partials, total, partials.shape[0], 3 * C, None)
            partials = total
        bn_add_relu_backward_finalize_kernel[(triton.cdiv(C, FINALIZE_BLOCK_C),)](
            partials, sums, norm.invstd, _or(dw, sums), _or(db, sums), norm.invstd, sums, sums,
            C, partials.shape[0],
            WRITE_DW=dw is not None, WRITE_DB=db is not None, RESIDUAL_IS_BN=False,
            R_WRITE_DW=False, R_WRITE_DB=False,
            BLOCK_P=FINALIZE_BLOCK_P, BLOCK_C=FINALIZE_BLOCK_C, num_warps=FINALIZE_WARPS,
        )
    if not need_input:
        return None, dw, db
    layout = layout_of(x)
    dx, _ = bn_add_relu_backward_dx(g, g, x, layout, norm, training, RESIDUAL_NONE, sums,
                                    layout.N * layout.HW, d_res=g)
    return dx, dw, db


# ------------------------------------------------------------------ ahead-of-time launches

# ResNet-50's 1x1 convolutions (torchvision, 224x224 input) as (C_in, H, W, C_out, stride):
# conv1 and conv3 of each stage's first and later blocks, and the downsample convolutions.
RESNET50_CONV1X1 = (
    (64, 56, 56, 64, 1), (64, 56, 56, 256, 1), (256, 56, 56, 64, 1),  # layer1: conv1, conv3 / downsample, conv1
    (256, 56, 56, 128, 1), (128, 28, 28, 512, 1), (256, 56, 56, 512, 2), (512, 28, 28, 128, 1),  # layer2
    (512, 28, 28, 256, 1), (256, 14, 14, 1024, 1), (512, 28, 28, 1024, 2), (1024, 14, 14, 256, 1),  # layer3
    (1024, 14, 14, 512, 1), (512, 7, 7, 2048, 1), (1024, 14, 14, 2048, 2), (2048, 7, 7, 512, 1),  # layer4
)


# ---------------------------------------------------------------------------- autotune, opt-in only


def autotune_candidates(M: int, N: int, K: int, dtype: torch.dtype, target) -> list[GemmTiles]:
    """The rule's tiles and its neighbours (each block size halved or doubled within 16..128), in a fixed order."""
    rule = gemm_tiles(M, N, K, dtype, target)
    out = [rule]
    for bm in (rule.block_m // 2, rule.block_m, rule.block_m * 2):
        for bn in (rule.block_n // 2, rule.block_n, rule.block_n * 2):
            if 16 <= bm <= 128 and 16 <= bn <= 128 and bm * bn <= 128 * 128:
                warps = 8 if bm * bn >= 128 * 128 else rule.num_warps
                tiles = GemmTiles(bm, bn, rule.block_k, rule.group_m, warps, rule.num_stages)
                if tiles not in out:
                    out.append(tiles)
    return out


def autotune_conv1x1(shapes, dtype: torch.dtype = torch.float32, device="cuda", repeats: int = 10,
                     candidates=None, print_table: bool = True) -> list[dict]:
    """Time the forward GEMM's candidate tiles for each (N, C_in, H, W, C_out) in ``shapes`` and
    print the rule's choice against the fastest: an explicit opt-in, never called by the library
    (the kernels always use :func:`gemm_tiles`). On a CPU device the interpreter runs it (times
    are the interpreter's, only the table's shape means anything there).
    """
    import time

    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    shapes = list(shapes)
    if not shapes or any(not (isinstance(s, (tuple, list)) and len(s) == 5 and all(isinstance(v, int) and v > 0
                                                                                 for v in s)) for s in shapes):
        raise ValueError(f"shapes must be a non-empty list of (N, C_in, H, W, C_out) positive ints, got {shapes!r}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    rows = []
    for N, C_in, H, W, C_out in shapes:
        x = torch.randn(N, C_in, H, W, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(C_out, C_in, 1, 1, device=device, dtype=dtype)
        target = target_of(device)
        M = N * H * W
        rule = gemm_tiles(M, C_out, C_in, dtype, target)
        timed = []
        for tiles in (candidates or autotune_candidates(M, C_out, C_in, dtype, target)):
            conv1x1_forward(x, weight, None, 1, stats=True, target=target, tiles=tiles)  # compile, warm up
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                conv1x1_forward(x, weight, None, 1, stats=True, target=target, tiles=tiles)
            if cuda:
                torch.cuda.synchronize(device)
            timed.append(((time.perf_counter() - start) / repeats * 1e6, tiles))
        rule_us = next((us for us, t in timed if t == rule), float("nan"))
        best_us, best = min(timed, key=lambda pair: pair[0])
        rows.append(dict(shape=(N, C_in, H, W, C_out), rule=rule, rule_us=rule_us, best=best, best_us=best_us,
                         all=timed))
    if print_table:
        def name(t):
            return f"{t.block_m}x{t.block_n}x{t.block_k}/w{t.num_warps}/s{t.num_stages}"

        print(f"{'N,C_in,H,W,C_out':<24}{'rule tiles':<22}{'rule us':>10}  {'best tiles':<22}{'best us':>10}"
              f"{'rule/best':>10}   ({device.type}{', interpreter times' if not cuda else ''})")
        for r in rows:
            print(f"{','.join(map(str, r['shape'])):<24}{name(r['rule']):<22}{r['rule_us']:>10.1f}  "
                  f"{name(r['best']):<22}{r['best_us']:>10.1f}{r['rule_us'] / r['best_us']:>10.2f}")
    return rows
