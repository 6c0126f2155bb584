"""The 1x1-convolution GEMM's forward: ``conv1x1_forward_kernel`` (prologue relu(bn(x)) on
the A tiles, the output's statistics partials or the folded eval BatchNorm + residual +
ReLU in the epilogue) and its launcher ``conv1x1_forward``."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..bn_add_relu import ChannelNorm, _or, channel_affine, normalize
from ..layout import cdiv
from . import plans
from .common import (
    _check_nhwc,
    _interpreter_bf16,
    _norm_args,
    _norm_flags,
    _nhwc_empty,
    bn_relu_operand,
    geometry_of,
    grouped_tile,
    mma,
    pixel_offsets,
    rounded,
)
from .plans import GemmTiles, _plan, gemm_tiles, input_precision


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
    target = plans.target_of(x.device) if target is None else target
    geo = geometry_of(x, weight, stride)
    y = _nhwc_empty((geo.N, geo.C_out, geo.H_out, geo.W_out), x)
    if residual is not None:
        _check_nhwc("residual", residual)
    precision = input_precision(x.dtype, allow_tf32, target)
    if tiles is None:
        tiles = gemm_tiles(geo.M, geo.C_out, geo.C_in, x.dtype, *_plan(x.dtype, allow_tf32, target),
                           heavy_epilogue=eval_norm is not None and residual is not None)
    num_m_tiles = cdiv(geo.M, tiles.block_m)
    partials = torch.empty(num_m_tiles, 2, geo.C_out, device=x.device, dtype=torch.float32) if stats else None
    if geo.M == 0 or geo.C_out == 0:
        return y, partials, tiles.block_m
    p_w, p_b = _norm_flags(prologue)
    e_w, e_b = _norm_flags(eval_norm)
    grid = (num_m_tiles * cdiv(geo.C_out, tiles.block_n),)
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
