"""Both gradients of a 1x1 convolution in one pass over dY and x where the weight
gradients fit one program's accumulators (``dgrad_wgrad_tiles``): ``conv1x1_dgrad_wgrad_kernel``
and its launcher ``conv1x1_dgrad_wgrad``, which takes ``backward``'s two kernels elsewhere."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..bn_add_relu import ChannelNorm, _or, channel_affine
from ..layout import cdiv
from . import plans
from .backward import _second_operands, conv1x1_dgrad, conv1x1_wgrad, dgrad_store
from .common import (
    _check_nhwc,
    _interpreter_bf16,
    _norm_args,
    _norm_flags,
    _nhwc_empty,
    bn_relu_operand,
    geometry_of,
    mma,
    pixel_offsets,
)
from .partials import _summed_splits
from .plans import _plan, dgrad_wgrad_block_n2, dgrad_wgrad_plan, input_precision


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
    target = plans.target_of(x.device) if target is None else target
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
    partials = (torch.empty(cdiv(geo.M, tiles.block_m), 3, K, device=x.device, dtype=torch.float32)
                if prologue is not None else None)

    def fp32(*shape):
        return torch.empty(splits, *shape, device=x.device, dtype=torch.float32)

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
