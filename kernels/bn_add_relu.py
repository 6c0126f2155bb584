"""BatchNorm + (optional shortcut add) + ReLU: forward and backward kernels.

One family covers the three tails of a residual block:

- ``bn_relu``:        y = relu(bn(x))
- ``bn_add_relu``:    y = relu(bn(x) + r)
- ``bn_add_bn_relu``: y = relu(bn(x) + bn_r(r))   (the shortcut's own BatchNorm fused in)

Forward (the statistics come from ``bn_stats``, or from the running stats in eval):
``bn_add_relu_forward_kernel`` is one elementwise pass y = relu(x*scale[c] + shift[c] (+ r)).

Backward, with g = dy where y > 0 else 0 (the ReLU mask comes from the saved output):
``bn_add_relu_backward_reduce_kernel`` reads dy, y, x (and r) once and writes per-program
partial sums of g and g*(x - mean) per channel; for ``bn_add_relu`` it also writes g,
which *is* d(residual), so the next pass reads g instead of dy and y.
``bn_add_relu_backward_finalize_kernel`` adds the partials in a fixed order and writes
d(weight), d(bias). ``bn_add_relu_backward_dx_kernel`` is one elementwise pass for dx.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .bn_stats import row_tile_offsets
from .layout import FINALIZE_BLOCK_C, FINALIZE_BLOCK_P, FINALIZE_WARPS, Layout, cdiv, elementwise_plan, reduction_plan

# What is added before the final ReLU.
RESIDUAL_NONE = 0
RESIDUAL_ADD = 1
RESIDUAL_BN = 2


@triton.jit
def tile(num_rows, row_len, C, CHANNEL_IS_COL: tl.constexpr, BLOCK_ROWS: tl.constexpr,
         BLOCK_COLS: tl.constexpr):
    """Offsets and mask of this program's [BLOCK_ROWS, BLOCK_COLS] tile, and its channels
    with their mask, shaped to broadcast against the tile ([1, COLS] or [ROWS, 1])."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_mask = rows < num_rows
    col_mask = cols < row_len
    offsets = rows.to(tl.int64)[:, None] * row_len + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if CHANNEL_IS_COL:
        c = cols[None, :]
        c_mask = col_mask[None, :]
    else:
        c = (rows % C)[:, None]
        c_mask = row_mask[:, None]
    return offsets, mask, c, c_mask


@triton.jit
def channel_invstd(invstd_ptr, c, mask, eps, FROM_VAR: tl.constexpr):
    """1/sqrt(var + eps) per channel, in fp32: loaded, or (FROM_VAR) computed from the
    variance invstd_ptr holds (eval: no separate pass over the running variance)."""
    invstd = tl.load(invstd_ptr + c, mask=mask, other=1.0).to(tl.float32)
    if FROM_VAR:
        invstd = 1.0 / tl.sqrt(invstd + eps)
    return invstd


@triton.jit
def channel_affine(c, mask, mean_ptr, invstd_ptr, w_ptr, b_ptr, eps,
                   FROM_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per-channel (mean, scale, shift) of bn(v) = (v - mean) * scale + shift, in fp32.

    scale = invstd * w, shift = b; FROM_VAR: invstd_ptr holds the variance."""
    mean = tl.load(mean_ptr + c, mask=mask, other=0.0).to(tl.float32)
    scale = channel_invstd(invstd_ptr, c, mask, eps, FROM_VAR)
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + c, mask=mask, other=1.0).to(tl.float32)
    shift = 0.0
    if HAS_BIAS:
        shift = tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
    return mean, scale, shift


@triton.jit
def normalize(v, mean, scale, shift):
    # One expression for the forward and for the backward's recomputation, so both round alike.
    return (v - mean) * scale + shift


@triton.jit
def relu_stored(pre, OUT_DTYPE: tl.constexpr):
    """relu(pre) as the forward stores it: NaN kept (not tl.maximum), rounded to OUT_DTYPE."""
    return tl.where(pre < 0.0, 0.0, pre).to(OUT_DTYPE)


# num_rows (N * H * W or N * C) changes with the batch and bounds only the row mask, across
# the vector dimension: specialising it would compile a batch of 31 anew for nothing.
@triton.jit(do_not_specialize=["num_rows"])
def bn_add_relu_forward_kernel(
    x_ptr, r_ptr, y_ptr,
    mean_ptr, invstd_ptr, w_ptr, b_ptr,
    r_mean_ptr, r_invstd_ptr, r_w_ptr, r_b_ptr,
    num_rows, row_len, C, eps, r_eps,
    RESIDUAL: tl.constexpr, FROM_VAR: tl.constexpr, R_FROM_VAR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    R_HAS_WEIGHT: tl.constexpr, R_HAS_BIAS: tl.constexpr,
    CHANNEL_IS_COL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    offsets, mask, c, c_mask = tile(num_rows, row_len, C, CHANNEL_IS_COL, BLOCK_ROWS, BLOCK_COLS)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mean, scale, shift = channel_affine(c, c_mask, mean_ptr, invstd_ptr, w_ptr, b_ptr, eps,
                                        FROM_VAR, HAS_WEIGHT, HAS_BIAS)
    pre = normalize(x, mean, scale, shift)
    if RESIDUAL == 1:
        pre += tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL == 2:
        r = tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        r_mean, r_scale, r_shift = channel_affine(c, c_mask, r_mean_ptr, r_invstd_ptr, r_w_ptr, r_b_ptr, r_eps,
                                                  R_FROM_VAR, R_HAS_WEIGHT, R_HAS_BIAS)
        pre += normalize(r, r_mean, r_scale, r_shift)
    tl.store(y_ptr + offsets, relu_stored(pre, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def relu_grad(dy, y, x, r, mean, scale, shift, r_mean, r_scale, r_shift,
              MASK_FROM_INPUTS: tl.constexpr, RESIDUAL_IS_BN: tl.constexpr, Y_DTYPE: tl.constexpr):
    """g = dy where the stored y > 0, else 0 (NaN passes dy, as in threshold_backward).

    MASK_FROM_INPUTS: y is not read but recomputed from x (and r) with the forward's own
    expression and rounding, so the mask is bitwise the stored output's.
    """
    if MASK_FROM_INPUTS:
        pre = normalize(x, mean, scale, shift)
        if RESIDUAL_IS_BN:
            pre += normalize(r, r_mean, r_scale, r_shift)
        y = relu_stored(pre, Y_DTYPE).to(tl.float32)
    return tl.where(y <= 0.0, 0.0, dy)


# Unspecialised as in bn_stats_partial_kernel; rows_per_program also because, as a constant 1
# next to spans_per_image == 1, it made ptxas spill on sm_80.
@triton.jit(do_not_specialize=["N", "rows_per_program", "spans_per_image"])
def bn_add_relu_backward_reduce_kernel(
    dy_ptr, y_ptr, x_ptr, r_ptr, g_ptr, partial_ptr,
    mean_ptr, invstd_ptr, w_ptr, b_ptr, r_mean_ptr, r_invstd_ptr, r_w_ptr, r_b_ptr,
    N, C, HW, stride_n, stride_c, stride_hw,
    rows_per_program, blocks_per_span, spans_per_image, eps, r_eps,
    STORE_G: tl.constexpr, RESIDUAL_IS_BN: tl.constexpr, MASK_FROM_INPUTS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, R_HAS_WEIGHT: tl.constexpr, R_HAS_BIAS: tl.constexpr,
    FROM_VAR: tl.constexpr, R_FROM_VAR: tl.constexpr,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_p = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    hw = tl.arange(0, BLOCK_HW)
    mean, scale, shift = channel_affine(c[None, :], c_mask[None, :], mean_ptr, invstd_ptr, w_ptr, b_ptr, eps,
                                        FROM_VAR, HAS_WEIGHT, HAS_BIAS)
    r_mean, r_scale, r_shift = mean, scale, shift
    if RESIDUAL_IS_BN:
        r_mean, r_scale, r_shift = channel_affine(c[None, :], c_mask[None, :], r_mean_ptr, r_invstd_ptr, r_w_ptr,
                                                  r_b_ptr, r_eps, R_FROM_VAR, R_HAS_WEIGHT, R_HAS_BIAS)

    acc_g = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    acc_gx = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    acc_gr = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    num_rows = N * spans_per_image
    for i in range(rows_per_program):
        row = pid_p * rows_per_program + i
        for b in range(blocks_per_span):
            offsets, pix_mask = row_tile_offsets(row, b * BLOCK_HW, hw, c, HW, stride_n, stride_c,
                                                 stride_hw, spans_per_image, BLOCK_HW * blocks_per_span)
            mask = pix_mask[:, None] & c_mask[None, :] & (row < num_rows)
            dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            r = 0.0
            if RESIDUAL_IS_BN:
                r = tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            y = 0.0
            if not MASK_FROM_INPUTS:
                y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            g = relu_grad(dy, y, x, r, mean, scale, shift, r_mean, r_scale, r_shift,
                          MASK_FROM_INPUTS, RESIDUAL_IS_BN, y_ptr.dtype.element_ty)
            if STORE_G:
                tl.store(g_ptr + offsets, g.to(g_ptr.dtype.element_ty), mask=mask)
            acc_g += g
            acc_gx += tl.where(mask, g * (x - mean), 0.0)
            if RESIDUAL_IS_BN:
                acc_gr += tl.where(mask, g * (r - r_mean), 0.0)

    # Partials are laid out [num_partials, 3, C]: sum g, sum g*(x-mean), sum g*(r-r_mean).
    out = partial_ptr + pid_p.to(tl.int64) * 3 * C + c
    tl.store(out, tl.sum(acc_g, axis=0), mask=c_mask)
    tl.store(out + C, tl.sum(acc_gx, axis=0), mask=c_mask)
    if RESIDUAL_IS_BN:
        tl.store(out + 2 * C, tl.sum(acc_gr, axis=0), mask=c_mask)


@triton.jit(do_not_specialize=["num_partials"])  # a loop bound, as in bn_stats_finalize_kernel
def bn_add_relu_backward_finalize_kernel(
    partial_ptr, sums_ptr, invstd_ptr, dw_ptr, db_ptr, r_invstd_ptr, r_dw_ptr, r_db_ptr,
    C, num_partials, eps, r_eps,
    WRITE_DW: tl.constexpr, WRITE_DB: tl.constexpr, RESIDUAL_IS_BN: tl.constexpr,
    R_WRITE_DW: tl.constexpr, R_WRITE_DB: tl.constexpr, FROM_VAR: tl.constexpr, R_FROM_VAR: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    p = tl.arange(0, BLOCK_P)
    s_g = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    s_gx = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    s_gr = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    # Fixed-order combination: bitwise reproducible weight gradients.
    for p0 in range(0, num_partials, BLOCK_P):
        rows = (p0 + p).to(tl.int64)
        mask = (rows < num_partials)[:, None] & c_mask[None, :]
        base = partial_ptr + rows[:, None] * 3 * C + c[None, :]
        s_g += tl.load(base, mask=mask, other=0.0)
        s_gx += tl.load(base + C, mask=mask, other=0.0)
        if RESIDUAL_IS_BN:
            s_gr += tl.load(base + 2 * C, mask=mask, other=0.0)
    sum_g = tl.sum(s_g, axis=0)
    sum_gx = tl.sum(s_gx, axis=0)
    # sums_ptr is [3, C] fp32, read back by the dx pass.
    tl.store(sums_ptr + c, sum_g, mask=c_mask)
    tl.store(sums_ptr + C + c, sum_gx, mask=c_mask)
    if WRITE_DW:
        invstd = channel_invstd(invstd_ptr, c, c_mask, eps, FROM_VAR)
        tl.store(dw_ptr + c, (sum_gx * invstd).to(dw_ptr.dtype.element_ty), mask=c_mask)
    if WRITE_DB:
        tl.store(db_ptr + c, sum_g.to(db_ptr.dtype.element_ty), mask=c_mask)
    if RESIDUAL_IS_BN:
        sum_gr = tl.sum(s_gr, axis=0)
        tl.store(sums_ptr + 2 * C + c, sum_gr, mask=c_mask)
        if R_WRITE_DW:
            r_invstd = channel_invstd(r_invstd_ptr, c, c_mask, r_eps, R_FROM_VAR)
            tl.store(r_dw_ptr + c, (sum_gr * r_invstd).to(r_dw_ptr.dtype.element_ty), mask=c_mask)
        if R_WRITE_DB:
            tl.store(r_db_ptr + c, sum_g.to(r_db_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def bn_input_grad(g, v, c, mask, mean, scale, invstd, sum_g_ptr, sum_gv_ptr, count, TRAINING: tl.constexpr):
    """d(input) of bn(v) = (v - mean) * scale + shift given g = d(bn(v)), scale = invstd * w;
    training also carries the terms of the batch statistics."""
    if TRAINING:
        mean_g = tl.load(sum_g_ptr + c, mask=mask, other=0.0) / count
        mean_gv = tl.load(sum_gv_ptr + c, mask=mask, other=0.0) / count
        return scale * (g - mean_g - (v - mean) * invstd * invstd * mean_gv)
    return scale * g


@triton.jit(do_not_specialize=["num_rows"])  # as bn_add_relu_forward_kernel's
def bn_add_relu_backward_dx_kernel(
    dy_ptr, y_ptr, g_ptr, x_ptr, dx_ptr, r_ptr, dr_ptr, sums_ptr,
    mean_ptr, invstd_ptr, w_ptr, b_ptr, r_mean_ptr, r_invstd_ptr, r_w_ptr, r_b_ptr,
    num_rows, row_len, C, eps, r_eps, count,
    G_FROM_BUFFER: tl.constexpr, STORE_G: tl.constexpr, MASK_FROM_INPUTS: tl.constexpr,
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    RESIDUAL_IS_BN: tl.constexpr, R_TRAINING: tl.constexpr, R_HAS_WEIGHT: tl.constexpr, R_HAS_BIAS: tl.constexpr,
    FROM_VAR: tl.constexpr, R_FROM_VAR: tl.constexpr,
    CHANNEL_IS_COL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    offsets, mask, c, c_mask = tile(num_rows, row_len, C, CHANNEL_IS_COL, BLOCK_ROWS, BLOCK_COLS)
    mean, scale, shift = channel_affine(c, c_mask, mean_ptr, invstd_ptr, w_ptr, b_ptr, eps,
                                        FROM_VAR, HAS_WEIGHT, HAS_BIAS)
    r_mean, r_scale, r_shift = mean, scale, shift
    if RESIDUAL_IS_BN:
        r_mean, r_scale, r_shift = channel_affine(c, c_mask, r_mean_ptr, r_invstd_ptr, r_w_ptr, r_b_ptr, r_eps,
                                                  R_FROM_VAR, R_HAS_WEIGHT, R_HAS_BIAS)
    # Eval: dx = g * w * invstd needs no x (a read of T saved); likewise r.
    x = 0.0
    if TRAINING:
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    r = 0.0
    if RESIDUAL_IS_BN and R_TRAINING:
        r = tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if G_FROM_BUFFER:
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        y = 0.0
        if not MASK_FROM_INPUTS:
            y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g = relu_grad(dy, y, x, r, mean, scale, shift, r_mean, r_scale, r_shift,
                      MASK_FROM_INPUTS, RESIDUAL_IS_BN, y_ptr.dtype.element_ty)
        if STORE_G:
            tl.store(g_ptr + offsets, g.to(g_ptr.dtype.element_ty), mask=mask)
    invstd = channel_invstd(invstd_ptr, c, c_mask, eps, FROM_VAR)
    dx = bn_input_grad(g, x, c, c_mask, mean, scale, invstd, sums_ptr, sums_ptr + C, count, TRAINING)
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if RESIDUAL_IS_BN:
        r_invstd = channel_invstd(r_invstd_ptr, c, c_mask, r_eps, R_FROM_VAR)
        dr = bn_input_grad(g, r, c, c_mask, r_mean, r_scale, r_invstd, sums_ptr, sums_ptr + 2 * C, count,
                           R_TRAINING)
        tl.store(dr_ptr + offsets, dr.to(dr_ptr.dtype.element_ty), mask=mask)


class ChannelNorm(NamedTuple):
    """The per-channel affine of one BatchNorm in a launch.

    ``invstd`` holds 1/sqrt(var + eps) (fp32), or the running variance when a kernel is
    told FROM_VAR (eval: the forward's ``from_var``, the backward's ``var_eps``; the
    variance is turned into invstd in the same pass).
    """

    mean: torch.Tensor
    invstd: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


def _or(t: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    # Triton needs a pointer for every argument; flags keep the dummy unread.
    return fallback if t is None else t


def _affine_args(norm: ChannelNorm) -> tuple:
    """mean, invstd, weight, bias pointers of a ChannelNorm (absent ones: unread dummies)."""
    mean, invstd, weight, bias = norm
    return mean, invstd, mean if weight is None else weight, mean if bias is None else bias


def _eps_args(var_eps: Optional[float], r_var_eps: Optional[float]) -> tuple[float, float]:
    """The kernels' eps arguments: read only under FROM_VAR / R_FROM_VAR (a variance given)."""
    return (0.0 if var_eps is None else float(var_eps)), (0.0 if r_var_eps is None else float(r_var_eps))


def can_mask_from_inputs(residual_mode: int, training: bool, r_training: bool = False) -> bool:
    """Whether the backward can recompute the ReLU's input instead of reading y: when every
    term of it is in the backward's hands with the forward's own statistics (batch
    statistics; the eval forward turns the variance into invstd in-kernel, the backward
    in ATen). A plain residual is not saved, so ``bn_add_relu`` reads y (and writes
    d_residual in the same pass). Saves reading y in both passes: 7T -> 5T for
    ``bn_relu``, 10T -> 8T for ``bn_add_bn_relu``."""
    if residual_mode == RESIDUAL_NONE:
        return training
    return residual_mode == RESIDUAL_BN and training and r_training


def bn_add_relu_forward(
    x: torch.Tensor,
    layout: Layout,
    norm: ChannelNorm,
    eps: float,
    from_var: bool,
    residual: Optional[torch.Tensor] = None,
    residual_norm: Optional[ChannelNorm] = None,
    r_eps: float = 0.0,
    r_from_var: bool = False,
) -> torch.Tensor:
    """y = relu(bn(x) [+ residual | + bn_r(residual)]), y in x's dtype and layout.

    ``from_var``: ``norm.invstd`` holds the running variance (eval), turned into
    1/sqrt(var + eps) in the same pass; ``r_eps`` and ``r_from_var`` likewise for
    ``residual_norm``.
    """
    y = torch.empty_like(x)
    if layout.numel == 0:
        return y
    mode = RESIDUAL_NONE if residual is None else (RESIDUAL_ADD if residual_norm is None else RESIDUAL_BN)
    rn = residual_norm if residual_norm is not None else norm
    plan = elementwise_plan(layout)
    bn_add_relu_forward_kernel[plan.grid](
        x, _or(residual, x), y, *_affine_args(norm), *_affine_args(rn),
        plan.num_rows, plan.row_len, layout.C, float(eps), float(r_eps),
        RESIDUAL=mode, FROM_VAR=from_var, R_FROM_VAR=r_from_var,
        HAS_WEIGHT=norm.weight is not None, HAS_BIAS=norm.bias is not None,
        R_HAS_WEIGHT=rn.weight is not None, R_HAS_BIAS=rn.bias is not None,
        CHANNEL_IS_COL=plan.channel_is_col, BLOCK_ROWS=plan.block_rows, BLOCK_COLS=plan.block_cols,
    )
    return y


def bn_add_relu_backward_sums(
    dy: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    layout: Layout,
    norm: ChannelNorm,
    residual_mode: int,
    residual: Optional[torch.Tensor] = None,
    residual_norm: Optional[ChannelNorm] = None,
    need_param_grads: bool = True,
    mask_from_inputs: bool = False,
    var_eps: Optional[float] = None,
    r_var_eps: Optional[float] = None,
):
    """The reduction pass of the backward: per-channel sums and parameter gradients.

    Returns ``(sums, d_residual, d_weight, d_bias, d_r_weight, d_r_bias)``. ``sums`` is
    fp32 [3, C]: sum g, sum g*(x - mean), sum g*(r - r_mean) with g = dy where y > 0.
    For ``RESIDUAL_ADD`` d_residual (= g) is written here; otherwise it is None. The
    parameter gradients come from these sums (local ones, under SyncBatchNorm too).
    ``mask_from_inputs`` (see ``can_mask_from_inputs``): y is recomputed, not read.
    ``var_eps`` (``r_var_eps``): see ``bn_add_relu_backward``.
    """
    C = layout.C
    is_bn = residual_mode == RESIDUAL_BN
    rn = residual_norm if is_bn else norm

    def param_grad(p):
        return torch.empty_like(p) if (need_param_grads and p is not None) else None

    dw, db = param_grad(norm.weight), param_grad(norm.bias)
    r_dw, r_db = (param_grad(rn.weight), param_grad(rn.bias)) if is_bn else (None, None)
    d_res = torch.empty_like(x) if residual_mode == RESIDUAL_ADD else None
    plan = reduction_plan(layout)
    stride_n, stride_c, stride_hw = layout.strides
    partials = torch.empty(plan.num_partials, 3, C, device=x.device, dtype=torch.float32)
    sums = torch.empty(3, C, device=x.device, dtype=torch.float32)
    bn_add_relu_backward_reduce_kernel[plan.grid](
        dy, y, x, _or(residual, x), _or(d_res, x), partials,
        *_affine_args(norm), *_affine_args(rn),
        layout.N, C, layout.HW, stride_n, stride_c, stride_hw,
        plan.rows_per_program, plan.blocks_per_span, plan.spans_per_image, *_eps_args(var_eps, r_var_eps),
        STORE_G=d_res is not None, RESIDUAL_IS_BN=is_bn, MASK_FROM_INPUTS=mask_from_inputs,
        HAS_WEIGHT=norm.weight is not None, HAS_BIAS=norm.bias is not None,
        R_HAS_WEIGHT=rn.weight is not None, R_HAS_BIAS=rn.bias is not None,
        FROM_VAR=var_eps is not None, R_FROM_VAR=r_var_eps is not None,
        BLOCK_HW=plan.block_hw, BLOCK_C=plan.block_c, num_warps=plan.num_warps,
    )
    bn_add_relu_backward_finalize_kernel[(cdiv(C, FINALIZE_BLOCK_C),)](
        partials, sums, norm.invstd, _or(dw, sums), _or(db, sums),
        rn.invstd, _or(r_dw, sums), _or(r_db, sums),
        C, plan.num_partials, *_eps_args(var_eps, r_var_eps),
        WRITE_DW=dw is not None, WRITE_DB=db is not None, RESIDUAL_IS_BN=is_bn,
        R_WRITE_DW=r_dw is not None, R_WRITE_DB=r_db is not None,
        FROM_VAR=var_eps is not None, R_FROM_VAR=r_var_eps is not None,
        BLOCK_P=FINALIZE_BLOCK_P, BLOCK_C=FINALIZE_BLOCK_C, num_warps=FINALIZE_WARPS,
    )
    return sums, d_res, dw, db, r_dw, r_db


def bn_add_relu_backward_dx(
    dy: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    layout: Layout,
    norm: ChannelNorm,
    training: bool,
    residual_mode: int,
    sums: Optional[torch.Tensor],
    count: float,
    d_res: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    residual_norm: Optional[ChannelNorm] = None,
    r_training: bool = False,
    mask_from_inputs: bool = False,
    var_eps: Optional[float] = None,
    r_var_eps: Optional[float] = None,
):
    """The elementwise pass of the backward: dx (and d_residual).

    ``sums`` and ``count`` come from ``bn_add_relu_backward_sums`` (all-reduced across
    processes under SyncBatchNorm); they are only read where a normalisation used batch
    statistics. ``d_res`` given: it already holds g (written by the reduction), read
    instead of dy and y. For ``RESIDUAL_ADD`` without it, g is written here.
    Returns ``(dx, d_residual)``.
    """
    is_bn = residual_mode == RESIDUAL_BN
    rn = residual_norm if is_bn else norm
    dx = torch.empty_like(x)
    g_from_buffer = d_res is not None
    if residual_mode != RESIDUAL_NONE and d_res is None:
        d_res = torch.empty_like(x)
    if layout.numel == 0:
        return dx, d_res
    plan = elementwise_plan(layout)
    bn_add_relu_backward_dx_kernel[plan.grid](
        dy, y, _or(d_res, x), x, dx, _or(residual, x), _or(d_res, x), _or(sums, dx),
        *_affine_args(norm), *_affine_args(rn),
        plan.num_rows, plan.row_len, layout.C, *_eps_args(var_eps, r_var_eps), float(count),
        G_FROM_BUFFER=g_from_buffer,
        STORE_G=residual_mode == RESIDUAL_ADD and not g_from_buffer,
        MASK_FROM_INPUTS=mask_from_inputs and not g_from_buffer,
        TRAINING=training, HAS_WEIGHT=norm.weight is not None, HAS_BIAS=norm.bias is not None,
        RESIDUAL_IS_BN=is_bn, R_TRAINING=is_bn and r_training,
        R_HAS_WEIGHT=rn.weight is not None, R_HAS_BIAS=rn.bias is not None,
        FROM_VAR=var_eps is not None, R_FROM_VAR=r_var_eps is not None,
        CHANNEL_IS_COL=plan.channel_is_col, BLOCK_ROWS=plan.block_rows, BLOCK_COLS=plan.block_cols,
    )
    return dx, d_res


def bn_add_relu_backward(
    dy: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    layout: Layout,
    norm: ChannelNorm,
    training: bool,
    residual_mode: int,
    need_param_grads: bool,
    residual: Optional[torch.Tensor] = None,
    residual_norm: Optional[ChannelNorm] = None,
    r_training: bool = False,
    var_eps: Optional[float] = None,
    r_var_eps: Optional[float] = None,
):
    """Gradients of ``bn_add_relu_forward``: the reduction pass (skipped in eval when no
    parameter needs a gradient), then the elementwise pass.

    ``training`` (``r_training``): the normalisation used batch statistics, so the
    input gradient carries their terms. ``norm.invstd`` is 1/sqrt(var + eps), or with
    ``var_eps`` given the variance (eval: the running variance, turned into invstd in
    the kernels, with that eps); ``r_var_eps`` likewise for ``residual_norm``. Returns
    ``(dx, d_residual, d_weight, d_bias, d_r_weight, d_r_bias)``; entries that do not
    apply are None. dy, y, x (and residual) must be dense in ``layout``.
    """
    is_bn = residual_mode == RESIDUAL_BN
    from_inputs = can_mask_from_inputs(residual_mode, training, r_training)
    sums = d_res = dw = db = r_dw = r_db = None
    # An empty batch needs no special case: its reduction adds no rows, so the sums and
    # parameter gradients come out zero.
    if training or (is_bn and r_training) or need_param_grads:
        sums, d_res, dw, db, r_dw, r_db = bn_add_relu_backward_sums(
            dy, y, x, layout, norm, residual_mode, residual, residual_norm, need_param_grads, from_inputs,
            var_eps, r_var_eps)
    dx, d_res = bn_add_relu_backward_dx(
        dy, y, x, layout, norm, training, residual_mode, sums, layout.N * layout.HW, d_res,
        residual, residual_norm, r_training, from_inputs, var_eps, r_var_eps)
    return dx, d_res, dw, db, r_dw, r_db
