"""The 1x1-convolution GEMM's backward in two kernels: ``conv1x1_dgrad_kernel`` (dA = dY x W,
with a prologue the ReLU's backward and the BatchNorm-backward partial sums in its
epilogue) and ``conv1x1_wgrad_kernel`` (dW = dY^T x A, A recomputed, split over M), their
launchers, and ``conv1x1_prologue_backward``, which finishes the prologue's BatchNorm
backward from the dgrad's partials."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..bn_add_relu import (
    RESIDUAL_NONE,
    ChannelNorm,
    _or,
    bn_add_relu_backward_dx,
    bn_add_relu_backward_finalize_kernel,
    channel_affine,
    relu_grad,
)
from ..layout import FINALIZE_BLOCK_C, FINALIZE_BLOCK_P, FINALIZE_WARPS, cdiv, layout_of
from . import plans
from .common import (
    ConvGeometry,
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
from .partials import _split_sum, _summed_splits
from .plans import GemmTiles, _plan, gemm_tiles, input_precision, wgrad_plan


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
    target = plans.target_of(x.device) if target is None else target
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
    num_m_tiles = cdiv(geo.M, tiles.block_m)
    partials = (torch.empty(num_m_tiles, 3, geo.C_in, device=x.device, dtype=torch.float32)
                if prologue is not None else None)
    if geo.M == 0 or geo.C_in == 0:
        return out, partials
    p_w, p_b = _norm_flags(prologue)
    grid = (num_m_tiles * cdiv(geo.C_in, tiles.block_k),)
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
    target = plans.target_of(x.device) if target is None else target
    geo = geometry_of(x, weight, stride)
    N, K = geo.C_out, geo.C_in
    precision = input_precision(x.dtype, allow_tf32, target)
    tiles, splits, rows_per_split = wgrad_plan(geo.M, N, K, x.dtype, *_plan(x.dtype, allow_tf32, target),
                                               prologue=prologue is not None)
    partials = torch.empty(splits, N, K, device=x.device, dtype=torch.float32)
    bias_partials = torch.empty(splits, N, device=x.device, dtype=torch.float32) if bias_grad else None
    p_w, p_b = _norm_flags(prologue)
    if N * K > 0:
        conv1x1_wgrad_kernel[(cdiv(N, tiles.block_n), cdiv(K, tiles.block_k), splits)](
            dy, x, partials, _or(bias_partials, partials), *_norm_args(prologue, weight),
            geo.M, N, K, *geo.row_args(), rows_per_split,
            SAMPLED=geo.sampled, PROLOGUE=prologue is not None, P_HAS_WEIGHT=p_w, P_HAS_BIAS=p_b,
            BIAS_GRAD=bias_grad,
            INPUT_PRECISION=precision, INTERPRETER_BF16=_interpreter_bf16(x.dtype, target),
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )
    return _summed_splits(partials, bias_partials, weight, target)


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
    sums = torch.empty(3, C, device=x.device, dtype=torch.float32)
    dw = torch.empty_like(norm.weight) if (need_weight and norm.weight is not None) else None
    db = torch.empty_like(norm.bias) if (need_bias and norm.bias is not None) else None
    if C > 0:
        if partials.shape[0] > 1:
            # One partial row per GEMM row tile (thousands): summed by a combining pass that fills the GPU first.
            total = torch.empty(1, 3, C, device=x.device, dtype=torch.float32)
            _split_sum(partials, total, partials.shape[0], 3 * C, None)
            partials = total
        bn_add_relu_backward_finalize_kernel[(cdiv(C, FINALIZE_BLOCK_C),)](
            partials, sums, norm.invstd, _or(dw, sums), _or(db, sums), norm.invstd, sums, sums,
            C, partials.shape[0], 0.0, 0.0,
            WRITE_DW=dw is not None, WRITE_DB=db is not None, RESIDUAL_IS_BN=False,
            R_WRITE_DW=False, R_WRITE_DB=False, FROM_VAR=False, R_FROM_VAR=False,
            BLOCK_P=FINALIZE_BLOCK_P, BLOCK_C=FINALIZE_BLOCK_C, num_warps=FINALIZE_WARPS,
        )
    if not need_input:
        return None, dw, db
    layout = layout_of(x)
    dx, _ = bn_add_relu_backward_dx(g, g, x, layout, norm, training, RESIDUAL_NONE, sums,
                                    layout.N * layout.HW, d_res=g)
    return dx, dw, db
