"""BatchNorm + (optional shortcut add) + ReLU as autograd ops.

Three public functions share one pair of ``torch.library`` custom ops:

- ``bn_relu(x, ...)``                = relu(F.batch_norm(x, ...))
- ``bn_add_relu(x, residual, ...)``  = relu(F.batch_norm(x, ...) + residual)
- ``bn_add_bn_relu(x, residual, ...)`` = relu(F.batch_norm(x, ...) + F.batch_norm(residual, ...))

``fused_resnet::bn_add_relu_forward`` computes the batch statistics, updates the running
statistics in place and writes y; ``fused_resnet::bn_add_relu_backward`` computes every
gradient. Both are opaque single ops to ``torch.compile`` and ``torch.export``.
A custom op that mutates its inputs cannot carry an autograd formula, so the two are
tied together by a ``torch.autograd.Function``, which dynamo traces without a break.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend
from .kernels import (
    RESIDUAL_ADD,
    RESIDUAL_BN,
    RESIDUAL_NONE,
    ChannelNorm,
    as_layout,
    bn_add_relu_backward,
    bn_add_relu_forward,
    bn_stats,
    layout_of,
)
from .validation import check_batch_norm_args, check_like

_EMPTY = (0,)


def stats_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the saved mean / invstd: fp32, or float64 for a float64 input (as ATen)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def count_empty_batch(training: bool, running_mean: Optional[Tensor], num_batches_tracked: Optional[Tensor]) -> None:
    """nn.BatchNorm2d on an empty batch: the running statistics stay as they are, the batch
    is still counted (num_batches_tracked + 1 in training)."""
    if training and running_mean is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)


def empty_batch_stats(x: Tensor, batch: bool) -> tuple[Tensor, Tensor]:
    """(mean, invstd) of an empty batch: zeros per channel (nothing reads them), or None in eval."""
    if not batch:
        return None, None
    zeros = x.new_zeros((x.shape[1],), dtype=stats_dtype(x))
    return zeros, zeros.clone()


def fake_grad(x: Tensor, param: Optional[Tensor], need: bool) -> Tensor:
    """A backward op's fake gradient of ``param``: like it where one is computed, else the
    empty tensor that stands for none (a custom op cannot return None)."""
    return torch.empty_like(param) if (param is not None and need) else x.new_empty(_EMPTY)


def _dense(x: Tensor) -> Tensor:
    """x itself when it is dense NCHW or channels_last, else one NCHW copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def empty_dense_like(x: Tensor) -> Tensor:
    """An uninitialised tensor in the layout the ops give an output of x's shape: ``_dense(x)``'s,
    without the copy. The fakes claim exactly the strides the real ops return (else Inductor
    miscompiles around the op)."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ----------------------------------------------------------------------------- forward


def _momentum_factor(training, running_mean, num_batches_tracked, momentum) -> float:
    """nn.BatchNorm2d's bookkeeping on the host (CPU path): count the batch, and turn
    momentum=None into the cumulative-average factor 1 / num_batches_tracked."""
    if training and running_mean is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        return 1.0 / float(num_batches_tracked) if (training and running_mean is not None) else 0.0
    return momentum


def _bn_composite(x, running_mean, running_var, num_batches_tracked, weight, bias, training, momentum, eps):
    """ATen's batch_norm on the CPU path: returns (out, save_mean, save_invstd), the statistics None in eval."""
    momentum = _momentum_factor(training, running_mean, num_batches_tracked, momentum)
    out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps)
    if not training:
        return out, None, None
    return out, mean.to(stats_dtype(x)), invstd.to(stats_dtype(x))


def _batch_stats_triton(x, layout, running_mean, running_var, num_batches_tracked, weight, bias,
                        training, momentum, eps):
    """(ChannelNorm, from_var, mean_out, invstd_out) for one BatchNorm on the Triton path; the
    statistics outputs are None in eval."""
    if training:
        mean, invstd = bn_stats(x, layout, running_mean, running_var, num_batches_tracked, momentum, eps)
        return ChannelNorm(mean, invstd, weight, bias), False, mean, invstd
    return ChannelNorm(running_mean, running_var, weight, bias), True, None, None


def bn_add_relu_forward_implementation(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    eval_mean: Optional[Tensor],
    eval_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    residual_mode: int,
    residual: Optional[Tensor],
    r_running_mean: Optional[Tensor],
    r_running_var: Optional[Tensor],
    r_num_batches_tracked: Optional[Tensor],
    r_eval_mean: Optional[Tensor],
    r_eval_var: Optional[Tensor],
    r_weight: Optional[Tensor],
    r_bias: Optional[Tensor],
    r_training: bool,
    r_momentum: Optional[float],
    r_eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, mean, invstd, r_mean, r_invstd); a statistic the op does not compute
    (eval) is None here and an empty tensor from the op (``backend.op_implementation``).

    A BatchNorm's running statistics come in the mutated ``running_*`` slots in training
    (updated in place) and in the read-only ``eval_*`` slots in eval (see ``stat_slots``).
    """
    is_bn = residual_mode == RESIDUAL_BN
    if not training:
        running_mean, running_var = eval_mean, eval_var
    if not r_training:
        r_running_mean, r_running_var = r_eval_mean, r_eval_var
    # Both branches compute on a dense x, so y has the layout the fake claims.
    x = _dense(x)
    if not backend.use_triton(x):
        y, mean, invstd = _bn_composite(x, running_mean, running_var, num_batches_tracked, weight, bias,
                                        training, momentum, eps)
        r_mean = r_invstd = None
        if is_bn:
            r_y, r_mean, r_invstd = _bn_composite(residual, r_running_mean, r_running_var, r_num_batches_tracked,
                                                  r_weight, r_bias, r_training, r_momentum, r_eps)
            y.add_(r_y)
        elif residual_mode == RESIDUAL_ADD:
            y.add_(residual)
        return y.relu_(), mean, invstd, r_mean, r_invstd

    if x.numel() == 0:
        # An empty batch launches nothing (the statistics kernel would read x[0]).
        count_empty_batch(training, running_mean, num_batches_tracked)
        mean, invstd = empty_batch_stats(x, training)
        r_mean = r_invstd = None
        if is_bn:
            count_empty_batch(r_training, r_running_mean, r_num_batches_tracked)
            r_mean, r_invstd = empty_batch_stats(x, r_training)
        return torch.empty_like(x), mean, invstd, r_mean, r_invstd
    layout = layout_of(x)
    norm, from_var, mean, invstd = _batch_stats_triton(x, layout, running_mean, running_var, num_batches_tracked,
                                                       weight, bias, training, momentum, eps)
    r_norm, r_from_var, r_mean, r_invstd = None, False, None, None
    if residual is not None:
        residual = as_layout(residual, layout)
    if is_bn:
        r_norm, r_from_var, r_mean, r_invstd = _batch_stats_triton(
            residual, layout, r_running_mean, r_running_var, r_num_batches_tracked, r_weight, r_bias,
            r_training, r_momentum, r_eps)
    y = bn_add_relu_forward(x, layout, norm, eps, from_var, residual=residual, residual_norm=r_norm,
                            r_eps=r_eps, r_from_var=r_from_var)
    return y, mean, invstd, r_mean, r_invstd


bn_add_relu_forward_op = torch.library.custom_op(
    "fused_resnet::bn_add_relu_forward",
    mutates_args=("running_mean", "running_var", "num_batches_tracked",
                  "r_running_mean", "r_running_var", "r_num_batches_tracked"),
)(backend.op_implementation(bn_add_relu_forward_implementation, stats_dtype))


@bn_add_relu_forward_op.register_fake
def _(x, running_mean, running_var, num_batches_tracked, eval_mean, eval_var, weight, bias, training, momentum,
      eps, residual_mode, residual, r_running_mean, r_running_var, r_num_batches_tracked, r_eval_mean, r_eval_var,
      r_weight, r_bias, r_training, r_momentum, r_eps):
    C = x.shape[1]

    def stats(batch):
        shape = (C,) if batch else _EMPTY
        return x.new_empty(shape, dtype=stats_dtype(x)), x.new_empty(shape, dtype=stats_dtype(x))

    mean, invstd = stats(training)
    r_mean, r_invstd = stats(r_training and residual_mode == RESIDUAL_BN)
    return empty_dense_like(x), mean, invstd, r_mean, r_invstd


# ---------------------------------------------------------------------------- backward


def _aten_stats_dtype(x, weight, running_mean) -> torch.dtype:
    """The dtype ATen's batch_norm keeps its statistics in: fp32 when a reduced-precision
    input meets fp32 parameters ("mixed type"), else the input's own dtype."""
    param = weight if weight is not None else running_mean
    if x.dtype in (torch.float16, torch.bfloat16) and param is not None and param.dtype == torch.float32:
        return torch.float32
    return x.dtype


def _bn_backward_composite(g, x, weight, running_mean, running_var, mean, invstd, training, eps):
    if x.numel() == 0:
        # ATen's CPU kernel divides by the element count (SIGFPE on an empty batch).
        zeros = torch.zeros(x.shape[1], dtype=stats_dtype(x), device=x.device)
        return torch.empty_like(x), zeros, zeros.clone()
    if training:
        # The op hands its statistics out in fp32; ATen wants them back in its own dtype.
        dtype = _aten_stats_dtype(x, weight, running_mean)
        mean, invstd = mean.to(dtype), invstd.to(dtype)
    return torch.ops.aten.native_batch_norm_backward(
        g, x, weight, running_mean, running_var,
        mean if training else None, invstd if training else None,
        training, eps, [True, True, True])


def _backward_norm(batch, mean, invstd, running_mean, running_var, weight, bias, eps) -> tuple:
    """(ChannelNorm, var_eps) of one BatchNorm for the backward kernels: its batch statistics, or
    in eval its running ones, the variance as it is (turned into invstd in the kernels)."""
    if batch:
        return ChannelNorm(mean, invstd, weight, bias), None
    return ChannelNorm(running_mean, running_var, weight, bias), eps


def _grad_or_none(grad: Optional[Tensor], param: Optional[Tensor], need: bool) -> Optional[Tensor]:
    """A parameter's gradient in its dtype, or None where it has none."""
    if param is None or not need:
        return None
    return grad if grad.dtype == param.dtype else grad.to(param.dtype)


def bn_add_relu_backward_implementation(
    dy: Tensor,
    y: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    eps: float,
    residual_mode: int,
    residual: Optional[Tensor],
    r_mean: Tensor,
    r_invstd: Tensor,
    r_running_mean: Optional[Tensor],
    r_running_var: Optional[Tensor],
    r_weight: Optional[Tensor],
    r_bias: Optional[Tensor],
    r_training: bool,
    r_eps: float,
    output_mask: List[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, d_residual, d_weight, d_bias, d_r_weight, d_r_bias); None here (empty from
    the op) where there is none. ``output_mask`` = [weight, bias, r_weight, r_bias] need a
    gradient. ``mean`` / ``invstd`` (``r_mean`` / ``r_invstd``) are read only where that
    normalisation used batch statistics: an eager caller may pass None otherwise."""
    need_w, need_b, need_rw, need_rb = output_mask
    is_bn = residual_mode == RESIDUAL_BN
    # Both branches compute in a dense x's layout, so the gradients have the layout the fake claims.
    x = _dense(x)
    layout = layout_of(x)
    if residual is not None:
        residual = as_layout(residual, layout)
    if x.numel() == 0:
        # An empty batch launches nothing: empty input gradients, zero parameter gradients (as eager).
        dw, db, r_dw, r_db = (x.new_zeros((x.shape[1],), dtype=stats_dtype(x)) for _ in range(4))
        dx = torch.empty_like(x)
        d_res = torch.empty_like(x) if residual_mode != RESIDUAL_NONE else None
    elif not backend.use_triton(x):
        g = torch.ops.aten.threshold_backward(dy, y, 0)
        dx, dw, db = _bn_backward_composite(g, x, weight, running_mean, running_var, mean, invstd, training, eps)
        d_res, r_dw, r_db = None, None, None
        if is_bn:
            d_res, r_dw, r_db = _bn_backward_composite(g, residual, r_weight, r_running_mean, r_running_var,
                                                       r_mean, r_invstd, r_training, r_eps)
        elif residual_mode == RESIDUAL_ADD:
            d_res = as_layout(g, layout)
    else:
        dy, y = as_layout(dy, layout), as_layout(y, layout)
        norm, var_eps = _backward_norm(training, mean, invstd, running_mean, running_var, weight, bias, eps)
        r_norm = r_var_eps = None
        if is_bn:
            r_norm, r_var_eps = _backward_norm(r_training, r_mean, r_invstd, r_running_mean, r_running_var,
                                               r_weight, r_bias, r_eps)
        dx, d_res, dw, db, r_dw, r_db = bn_add_relu_backward(
            dy, y, x, layout, norm, training, residual_mode, any(output_mask),
            residual=residual, residual_norm=r_norm, r_training=r_training, var_eps=var_eps, r_var_eps=r_var_eps)
    return (dx, d_res, _grad_or_none(dw, weight, need_w), _grad_or_none(db, bias, need_b),
            _grad_or_none(r_dw, r_weight, need_rw and is_bn), _grad_or_none(r_db, r_bias, need_rb and is_bn))


bn_add_relu_backward_op = torch.library.custom_op("fused_resnet::bn_add_relu_backward", mutates_args=())(
    backend.op_implementation(bn_add_relu_backward_implementation))


@bn_add_relu_backward_op.register_fake
def _(dy, y, x, mean, invstd, running_mean, running_var, weight, bias, training, eps, residual_mode, residual,
      r_mean, r_invstd, r_running_mean, r_running_var, r_weight, r_bias, r_training, r_eps, output_mask):
    need_w, need_b, need_rw, need_rb = output_mask
    is_bn = residual_mode == RESIDUAL_BN
    dx = empty_dense_like(x)
    d_res = empty_dense_like(x) if residual_mode != RESIDUAL_NONE else x.new_empty(_EMPTY)
    return (dx, d_res, fake_grad(x, weight, need_w), fake_grad(x, bias, need_b),
            fake_grad(x, r_weight, need_rw and is_bn), fake_grad(x, r_bias, need_rb and is_bn))


# ---------------------------------------------------------------------------- autograd


def stat_slots(training: bool, running_mean, running_var, num_batches_tracked) -> tuple:
    """The forward op's (mutated running_mean, running_var, num_batches_tracked, read-only
    eval_mean, eval_var) for one BatchNorm. Only training writes the running statistics: in
    eval they go in the read-only slots, so the call leaves their version counters alone and
    a module used twice before one backward (weight sharing, two views, frozen statistics)
    does not invalidate what its first call saved, as with eager ``F.batch_norm``."""
    if training:
        return running_mean, running_var, num_batches_tracked, None, None
    return None, None, None, running_mean, running_var


def bn_add_relu_forward_call(x, running_mean, running_var, num_batches_tracked, weight, bias, training, momentum,
                             eps, residual_mode, residual, r_running_mean, r_running_var, r_num_batches_tracked,
                             r_weight, r_bias, r_training, r_momentum, r_eps) -> tuple:
    """The forward op (its implementation directly in an eager call, ``backend.call_op``, where
    a statistic the op would return empty is None)."""
    slots = stat_slots(training, running_mean, running_var, num_batches_tracked)
    r_slots = stat_slots(r_training, r_running_mean, r_running_var, r_num_batches_tracked)
    return backend.call_op(
        torch.ops.fused_resnet.bn_add_relu_forward, bn_add_relu_forward_implementation,
        (x, *slots, weight, bias, training, momentum, eps, residual_mode, residual, *r_slots, r_weight, r_bias,
         r_training, r_momentum, r_eps),
        mutated=(slots[:3] if training else ()) + (r_slots[:3] if r_training else ()))


class BnAddReLUFunction(torch.autograd.Function):
    """Ties the forward op (which mutates the running statistics) to the backward op."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, r_weight, r_bias,
                running_mean, running_var, num_batches_tracked, training, momentum, eps,
                residual_mode, r_running_mean, r_running_var, r_num_batches_tracked,
                r_training, r_momentum, r_eps):
        y, mean, invstd, r_mean, r_invstd = bn_add_relu_forward_call(
            x, running_mean, running_var, num_batches_tracked, weight, bias, training, momentum, eps, residual_mode,
            residual, r_running_mean, r_running_var, r_num_batches_tracked, r_weight, r_bias, r_training,
            r_momentum, r_eps)
        is_bn = residual_mode == RESIDUAL_BN
        # What eager PyTorch keeps alive: x and y (the ReLU mask), the residual only when it
        # is itself normalised, and the running statistics only where they normalised.
        ctx.save_for_backward(
            x, y, mean, invstd, weight, bias,
            None if training else running_mean, None if training else running_var,
            residual if is_bn else None, r_mean, r_invstd, r_weight, r_bias,
            None if (r_training or not is_bn) else r_running_mean,
            None if (r_training or not is_bn) else r_running_var)
        ctx.config = (training, eps, residual_mode, r_training, r_eps)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x, y, mean, invstd, weight, bias, running_mean, running_var, residual,
         r_mean, r_invstd, r_weight, r_bias, r_running_mean, r_running_var) = ctx.saved_tensors
        training, eps, residual_mode, r_training, r_eps = ctx.config
        needs = ctx.needs_input_grad
        output_mask = [needs[1], needs[2], needs[4], needs[5]]
        dx, d_res, dw, db, r_dw, r_db = backend.call_op(
            torch.ops.fused_resnet.bn_add_relu_backward, bn_add_relu_backward_implementation,
            (dy, y, x, mean, invstd, running_mean, running_var, weight, bias, training, eps,
             residual_mode, residual, r_mean, r_invstd, r_running_mean, r_running_var, r_weight, r_bias,
             r_training, r_eps, output_mask))

        def some(t, need):
            return t if need else None

        return (some(dx, needs[0]), some(dw, needs[1]), some(db, needs[2]),
                some(d_res, needs[3] and residual_mode != RESIDUAL_NONE), some(r_dw, needs[4]), some(r_db, needs[5]),
                None, None, None, None, None, None, None, None, None, None, None, None, None)


# --------------------------------------------------------------------------- functional


def _bn_add_relu(x, weight, bias, residual, r_weight, r_bias, running_mean, running_var, num_batches_tracked,
                 training, momentum, eps, residual_mode, r_running_mean, r_running_var, r_num_batches_tracked,
                 r_training, r_momentum, r_eps):
    """The Triton path goes through the custom ops. Elsewhere (CPU, float64) this is eager
    PyTorch's own sequence, in place where eager allocates, differentiated by autograd:
    the same bits as eager, without the custom-op dispatch cost (~25 us a call on a CPU)."""
    if backend.use_triton(x):
        if not backend.needs_autograd(x, weight, bias, residual, r_weight, r_bias):
            # No gradient wanted: the forward op alone, without the autograd Function's cost.
            return bn_add_relu_forward_call(
                x, running_mean, running_var, num_batches_tracked, weight, bias, training, momentum, eps,
                residual_mode, residual, r_running_mean, r_running_var, r_num_batches_tracked, r_weight, r_bias,
                r_training, r_momentum, r_eps)[0]
        return BnAddReLUFunction.apply(
            x, weight, bias, residual, r_weight, r_bias, running_mean, running_var, num_batches_tracked,
            training, momentum, eps, residual_mode, r_running_mean, r_running_var, r_num_batches_tracked,
            r_training, r_momentum, r_eps)
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training,
                     _momentum_factor(training, running_mean, num_batches_tracked, momentum), eps)
    if residual_mode == RESIDUAL_BN:
        y = y.add_(F.batch_norm(residual, r_running_mean, r_running_var, r_weight, r_bias, r_training,
                                _momentum_factor(r_training, r_running_mean, r_num_batches_tracked, r_momentum),
                                r_eps))
    elif residual_mode == RESIDUAL_ADD:
        y = y.add_(residual)
    return torch.relu_(y)


def bn_relu(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """``relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))``.

    Arguments as in :func:`torch.nn.functional.batch_norm`; ``x`` is (N, C, H, W).
    ``num_batches_tracked``, when given, is incremented in training (as
    ``nn.BatchNorm2d`` does) and lets ``momentum=None`` mean a cumulative average.
    """
    check_batch_norm_args(x, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked)
    return _bn_add_relu(
        x, weight, bias, None, None, None, running_mean, running_var, num_batches_tracked,
        training, momentum, eps, RESIDUAL_NONE, None, None, None, False, 0.0, 0.0)


def bn_add_relu(
    x: Tensor,
    residual: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """``relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps) + residual)``.

    ``residual`` must have x's shape, dtype and device (it need not share its memory format).
    """
    check_batch_norm_args(x, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked)
    check_like("residual", residual, x)
    return _bn_add_relu(
        x, weight, bias, residual, None, None, running_mean, running_var, num_batches_tracked,
        training, momentum, eps, RESIDUAL_ADD, None, None, None, False, 0.0, 0.0)


def bn_add_bn_relu(
    x: Tensor,
    residual: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    r_running_mean: Optional[Tensor],
    r_running_var: Optional[Tensor],
    r_weight: Optional[Tensor],
    r_bias: Optional[Tensor],
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    r_training: Optional[bool] = None,
    r_momentum: Optional[float] = 0.1,
    r_eps: float = 1e-5,
    num_batches_tracked: Optional[Tensor] = None,
    r_num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """``relu(F.batch_norm(x, ...) + F.batch_norm(residual, r_...))``: a block's main path and
    its shortcut's own BatchNorm (the ``downsample`` of torchvision) in one pass.

    ``r_training`` defaults to ``training``.
    """
    if r_training is None:
        r_training = training
    check_batch_norm_args(x, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked)
    check_like("residual", residual, x)
    check_batch_norm_args(residual, r_running_mean, r_running_var, r_weight, r_bias, r_training, r_momentum, r_eps,
                          r_num_batches_tracked, prefix="r_")
    return _bn_add_relu(
        x, weight, bias, residual, r_weight, r_bias, running_mean, running_var, num_batches_tracked,
        training, momentum, eps, RESIDUAL_BN, r_running_mean, r_running_var, r_num_batches_tracked,
        r_training, r_momentum, r_eps)
