"""The autograd Functions over the 1x1-convolution ops (``ops``), the pieces the Bottleneck
in ``nn/blocks.py`` (FusedConvBottleneck) is built from (``conv1x1``, ``conv1x1_pair``,
``batch_stats``, ``bn_add_relu_with_stats``, ``conv1x1_bn_eval``), and the public
functions ``conv1x1_bn_relu`` and ``bn_relu_conv1x1``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend
from ..bn_add_relu import _momentum_factor, bn_add_relu, bn_add_relu_backward_implementation, bn_relu
from ..kernels import RESIDUAL_ADD, RESIDUAL_BN, RESIDUAL_NONE
from ..validation import check_activation, check_batch_norm_args, check_like
from .ops import (
    _batch_stats,
    _bn_add_relu_with_stats,
    _conv1x1_backward,
    _conv1x1_bn_eval,
    _conv1x1_forward,
    _conv1x1_pair_backward,
    _output_shape,
)


# ---------------------------------------------------------------------------- autograd


@dataclass
class Prologue:
    """relu(bn(x)) applied by a convolution to its input: x's BatchNorm as (mean,
    1/sqrt(var + eps), weight, bias). ``training``: batch statistics of x (the backward
    carries their terms); else running statistics (mean = running_mean)."""

    mean: Tensor
    invstd: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    training: bool


@dataclass
class OutputStats:
    """The BatchNorm whose batch statistics a convolution computes in its epilogue."""

    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    momentum: Optional[float]
    eps: float


class Conv1x1Function(torch.autograd.Function):
    """Ties ``conv1x1_forward`` (which mutates the running statistics) to ``conv1x1_backward``.

    Saves what eager saves for the convolution and the prologue's BatchNorm: x (for a
    prologue the BatchNorm's input, never relu(bn(x))), the weight and x's statistics.
    The statistics outputs are not differentiable: whoever normalises y with them
    (``bn_add_relu_with_stats``, the next convolution's prologue) differentiates the
    BatchNorm through them in its own backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, p_weight, p_bias, p_mean, p_invstd, p_training, stride, with_stats,
                running_mean, running_var, num_batches_tracked, momentum, eps):
        y, mean, invstd = backend.call_op(
            torch.ops.fused_resnet.conv1x1_forward, _conv1x1_forward,
            (x, weight, bias, stride, p_mean, p_invstd, p_weight, p_bias, with_stats,
             running_mean, running_var, num_batches_tracked, momentum, eps),
            mutated=(running_mean, running_var, num_batches_tracked))
        ctx.mark_non_differentiable(mean, invstd)
        # The statistics' gradients are never read: no zero tensors (two launches) for them.
        # Eager only: Dynamo cannot trace set_materialize_grads, and Inductor elides unread zeros.
        if not torch.compiler.is_compiling():
            ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, p_mean, p_invstd, p_weight, p_bias)
        ctx.config = (stride, bias is not None, p_training)
        return y, mean, invstd

    @staticmethod
    def backward(ctx, dy, _d_mean, _d_invstd):
        if dy is None:  # y received no gradient: nothing flows back
            return (None,) * 15
        x, weight, p_mean, p_invstd, p_weight, p_bias = ctx.saved_tensors
        stride, has_bias, p_training = ctx.config
        needs = ctx.needs_input_grad
        dx, dw, db, dpw, dpb = backend.call_op(
            torch.ops.fused_resnet.conv1x1_backward, _conv1x1_backward,
            (dy, x, weight, stride, has_bias, p_mean, p_invstd, p_weight, p_bias, p_training,
             [needs[0], needs[1], needs[2], needs[3], needs[4]]))

        def some(t, need):
            return t if need else None

        return (some(dx, needs[0]), some(dw, needs[1]), some(db, needs[2] and has_bias), some(dpw, needs[3]),
                some(dpb, needs[4]), None, None, None, None, None, None, None, None, None, None)


def conv1x1(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, prologue: Optional[Prologue] = None,
            stats: Optional[OutputStats] = None) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(y, mean, invstd) on the Triton path: y = conv1x1(relu(bn(x)) or x), and with
    ``stats`` the batch statistics of y (running statistics updated); else None, None."""
    p = prologue if prologue is not None else Prologue(None, None, None, None, False)
    s = stats if stats is not None else OutputStats(None, None, None, 0.0, 0.0)
    y, mean, invstd = Conv1x1Function.apply(
        x, weight, bias, p.weight, p.bias, p.mean, p.invstd, p.training, stride, stats is not None,
        s.running_mean, s.running_var, s.num_batches_tracked, s.momentum, s.eps)
    return (y, mean, invstd) if stats is not None else (y, None, None)


class Conv1x1PairFunction(torch.autograd.Function):
    """Two 1x1 convolutions of the same x, each with its output's batch statistics (a
    Bottleneck's conv1 and its downsample): the forward is ``conv1x1_forward`` twice, the
    backward ``conv1x1_pair_backward``, which writes x's gradient once where autograd
    would write two and add them in a third pass. Saves x and the weights, as eager."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight2, bias2, stride2, s1_mean, s1_var, s1_count, s1_momentum, s1_eps,
                s2_mean, s2_var, s2_count, s2_momentum, s2_eps):
        op = torch.ops.fused_resnet.conv1x1_forward
        y, mean, invstd = backend.call_op(
            op, _conv1x1_forward, (x, weight, bias, 1, None, None, None, None, True, s1_mean, s1_var, s1_count,
                                   s1_momentum, s1_eps), mutated=(s1_mean, s1_var, s1_count))
        y2, mean2, invstd2 = backend.call_op(
            op, _conv1x1_forward, (x, weight2, bias2, stride2, None, None, None, None, True, s2_mean, s2_var,
                                   s2_count, s2_momentum, s2_eps), mutated=(s2_mean, s2_var, s2_count))
        ctx.mark_non_differentiable(mean, invstd, mean2, invstd2)
        # As Conv1x1Function: no zero tensors for the statistics' gradients, nor for a y unused.
        if not torch.compiler.is_compiling():
            ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, weight2)
        ctx.config = (stride2, bias is not None, bias2 is not None, y.shape, y2.shape)
        return y, mean, invstd, y2, mean2, invstd2

    @staticmethod
    def backward(ctx, dy, _dm, _ds, dy2, _dm2, _ds2):
        x, weight, weight2 = ctx.saved_tensors
        stride2, has_bias, has_bias2, y_shape, y2_shape = ctx.config
        if dy is None and dy2 is None:
            return (None,) * 16

        def zeros(shape):  # the gradient of an output that received none
            return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last).zero_()

        dy = zeros(y_shape) if dy is None else dy
        dy2 = zeros(y2_shape) if dy2 is None else dy2
        needs = ctx.needs_input_grad
        dx, dw, db, dw2, db2 = backend.call_op(
            torch.ops.fused_resnet.conv1x1_pair_backward, _conv1x1_pair_backward,
            (dy, dy2, x, weight, weight2, stride2, has_bias, has_bias2,
             [needs[0], needs[1], needs[2], needs[3], needs[4]]))

        def some(t, need):
            return t if need else None

        return (some(dx, needs[0]), some(dw, needs[1]), some(db, needs[2] and has_bias), some(dw2, needs[3]),
                some(db2, needs[4] and has_bias2)) + (None,) * 11


def conv1x1_pair(x: Tensor, weight: Tensor, bias: Optional[Tensor], stats: OutputStats, weight2: Tensor,
                 bias2: Optional[Tensor], stride2: int, stats2: OutputStats) -> tuple[Tensor, ...]:
    """(y, mean, invstd, y2, mean2, invstd2) on the Triton path: ``conv1x1`` of x with
    ``weight`` (stride 1) and with ``weight2`` (``stride2``), each with its statistics,
    x's gradient written once (``Conv1x1PairFunction``)."""
    return Conv1x1PairFunction.apply(
        x, weight, bias, weight2, bias2, stride2, stats.running_mean, stats.running_var,
        stats.num_batches_tracked, stats.momentum, stats.eps, stats2.running_mean, stats2.running_var,
        stats2.num_batches_tracked, stats2.momentum, stats2.eps)


def batch_stats(x: Tensor, stats: OutputStats) -> tuple[Tensor, Tensor]:
    """(mean, invstd) of x on the Triton path, running statistics updated. Not
    differentiable: the consumer's backward (a prologue's) carries the statistics' terms."""
    return backend.call_op(torch.ops.fused_resnet.batch_stats, _batch_stats,
                           (x.detach(), stats.running_mean, stats.running_var, stats.num_batches_tracked,
                            stats.momentum, stats.eps),
                           mutated=(stats.running_mean, stats.running_var, stats.num_batches_tracked))


class BnAddReLUWithStatsFunction(torch.autograd.Function):
    """``bn_add_relu_with_stats`` and its backward (``bn_add_relu_backward`` with batch
    statistics: the gradient carries the statistics' terms, so the statistics passed in
    must be x's (and residual's) own batch statistics). Saves x, y (and a normalised
    residual), as ``BnAddReLUFunction``."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, r_weight, r_bias, mean, invstd, r_mean, r_invstd, residual_mode):
        y = backend.call_op(torch.ops.fused_resnet.bn_add_relu_with_stats, _bn_add_relu_with_stats,
                            (x, mean, invstd, weight, bias, residual_mode, residual, r_mean, r_invstd, r_weight,
                             r_bias))
        is_bn = residual_mode == RESIDUAL_BN
        ctx.save_for_backward(x, y, mean, invstd, weight, bias, residual if is_bn else None, r_mean, r_invstd,
                              r_weight, r_bias)
        ctx.residual_mode = residual_mode
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, mean, invstd, weight, bias, residual, r_mean, r_invstd, r_weight, r_bias = ctx.saved_tensors
        mode = ctx.residual_mode
        is_bn = mode == RESIDUAL_BN
        needs = ctx.needs_input_grad
        dx, d_res, dw, db, r_dw, r_db = backend.call_op(
            torch.ops.fused_resnet.bn_add_relu_backward, bn_add_relu_backward_implementation,
            (dy, y, x, mean, invstd, None, None, weight, bias, True, 0.0, mode, residual,
             r_mean if is_bn else None, r_invstd if is_bn else None, None, None, r_weight, r_bias, True, 0.0,
             [needs[1], needs[2], needs[4] and is_bn, needs[5] and is_bn]))

        def some(t, need):
            return t if need else None

        return (some(dx, needs[0]), some(dw, needs[1]), some(db, needs[2]),
                some(d_res, needs[3] and mode != RESIDUAL_NONE), some(r_dw, needs[4] and is_bn),
                some(r_db, needs[5] and is_bn), None, None, None, None, None)


def bn_add_relu_with_stats(x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                           residual: Optional[Tensor] = None, r_mean: Optional[Tensor] = None,
                           r_invstd: Optional[Tensor] = None, r_weight: Optional[Tensor] = None,
                           r_bias: Optional[Tensor] = None) -> Tensor:
    """relu(bn(x) [+ residual | + bn_r(residual)]) on the Triton path with x's (and the
    residual's, when ``r_mean`` is given) batch statistics computed elsewhere."""
    mode = RESIDUAL_NONE if residual is None else (RESIDUAL_ADD if r_mean is None else RESIDUAL_BN)
    return BnAddReLUWithStatsFunction.apply(x, weight, bias, residual, r_weight, r_bias, mean, invstd,
                                            r_mean, r_invstd, mode)


def conv1x1_bn_eval(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, running_mean: Tensor,
                    running_var: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float,
                    residual: Optional[Tensor] = None, relu: bool = True,
                    prologue: Optional[Prologue] = None) -> Tensor:
    """[relu](bn(conv1x1(a)) [+ residual]) in one kernel on the Triton path (no autograd)."""
    p = prologue if prologue is not None else Prologue(None, None, None, None, False)
    return backend.call_op(torch.ops.fused_resnet.conv1x1_bn_eval, _conv1x1_bn_eval,
                           (x, weight, bias, stride, p.mean, p.invstd, p.weight, p.bias, running_mean, running_var,
                            bn_weight, bn_bias, eps, residual, relu))


def running_invstd(running_var: Tensor, eps: float) -> Tensor:
    """1/sqrt(running_var + eps) in fp32: one expression for the forward and the backward,
    so the prologue's recomputed activation is bitwise the forward's."""
    return torch.rsqrt(running_var.float() + eps)


def eval_prologue(running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  eps: float) -> Prologue:
    """The prologue of a BatchNorm that normalises with its running statistics."""
    return Prologue(running_mean.float(), running_invstd(running_var, eps), weight, bias, training=False)


# --------------------------------------------------------------------------- functional


def check_conv1x1_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, name: str = "conv_weight"):
    """The checks ``F.conv2d`` makes for a 1x1 convolution, with the argument named."""
    check_activation("input", x)
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(weight).__name__}")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1):
        raise ValueError(f"{name} must be a (C_out, C_in, 1, 1) 1x1 kernel, got shape {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise RuntimeError(f"{name} of size {list(weight.shape)} expects the input to have {weight.shape[1]} "
                           f"channels, but got {x.shape[1]} channels instead")
    if weight.dtype != x.dtype:
        raise RuntimeError(f"input type ({x.dtype}) and {name} type ({weight.dtype}) should be the same")
    if weight.device != x.device:
        raise RuntimeError(f"{name} is on {weight.device} but the input is on {x.device}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"conv_bias must be a Tensor or None, got {type(bias).__name__}")
        if bias.dim() != 1 or bias.numel() != weight.shape[0]:
            raise RuntimeError(f"conv_bias should contain {weight.shape[0]} elements not {bias.numel()}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise RuntimeError(f"conv_bias must have the input's dtype and device, got {bias.dtype} on {bias.device}")
    if isinstance(stride, bool) or not isinstance(stride, int):
        raise TypeError(f"stride must be an int, got {type(stride).__name__}")
    if stride < 1:
        raise RuntimeError(f"non-positive stride is not supported (stride={stride})")


def _fused_path(x: Tensor) -> bool:
    """The Triton kernels take dense channels_last inputs: anything else stays eager."""
    return backend.use_triton(x) and x.is_contiguous(memory_format=torch.channels_last)


def conv1x1_bn_relu(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    stride: int = 1,
    residual: Optional[Tensor] = None,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """``relu(F.batch_norm(F.conv2d(x, conv_weight, conv_bias, stride), running_mean,
    running_var, weight, bias, training, momentum, eps) [+ residual])``.

    Triton path, training: one GEMM that also writes y's batch statistics (and updates
    the running statistics), then one elementwise pass. Eval without gradients: one
    kernel. ``num_batches_tracked`` as in :func:`fused_resnet.bn_relu`.
    """
    check_conv1x1_args(x, conv_weight, conv_bias, stride)
    out_shape = _output_shape(x, conv_weight, stride)
    out_like = x.new_empty(()).expand(out_shape)  # shape, dtype and device of the output, for the checks
    check_batch_norm_args(out_like, running_mean, running_var, weight, bias, training, momentum, eps,
                          num_batches_tracked)
    if residual is not None:
        check_like("residual", residual, out_like, "the output")
    if not _fused_path(x):
        y = F.batch_norm(F.conv2d(x, conv_weight, conv_bias, stride), running_mean, running_var, weight, bias,
                         training, _momentum_factor(training, running_mean, num_batches_tracked, momentum), eps)
        if residual is not None:
            y = y.add_(residual)
        return torch.relu_(y)
    if training:
        y, mean, invstd = conv1x1(x, conv_weight, conv_bias, stride,
                                  stats=OutputStats(running_mean, running_var, num_batches_tracked, momentum, eps))
        return bn_add_relu_with_stats(y, mean, invstd, weight, bias, residual)
    if backend.needs_autograd(x, conv_weight, conv_bias, weight, bias, residual):
        # Eval with gradients: the convolution's GEMM, then today's eval BatchNorm op.
        y, _, _ = conv1x1(x, conv_weight, conv_bias, stride)
        if residual is None:
            return bn_relu(y, running_mean, running_var, weight, bias, False, momentum, eps)
        return bn_add_relu(y, residual, running_mean, running_var, weight, bias, False, momentum, eps)
    return conv1x1_bn_eval(x, conv_weight, conv_bias, stride, running_mean, running_var, weight, bias, eps,
                           residual, relu=True)


def bn_relu_conv1x1(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor] = None,
    *,
    stride: int = 1,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """``F.conv2d(relu(F.batch_norm(x, running_mean, running_var, weight, bias, training,
    momentum, eps)), conv_weight, conv_bias, stride)``.

    Triton path: the GEMM applies the BatchNorm and ReLU to its input tiles as it loads
    them (in training after one statistics pass over x); relu(bn(x)) is never written,
    nor saved: the backward recomputes it from x.
    """
    check_batch_norm_args(x, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked)
    check_conv1x1_args(x, conv_weight, conv_bias, stride)
    if not _fused_path(x):
        a = F.batch_norm(x, running_mean, running_var, weight, bias, training,
                         _momentum_factor(training, running_mean, num_batches_tracked, momentum), eps)
        return F.conv2d(torch.relu_(a), conv_weight, conv_bias, stride)
    if training:
        mean, invstd = batch_stats(x, OutputStats(running_mean, running_var, num_batches_tracked, momentum, eps))
        prologue = Prologue(mean, invstd, weight, bias, training=True)
    else:
        prologue = eval_prologue(running_mean, running_var, weight, bias, eps)
    y, _, _ = conv1x1(x, conv_weight, conv_bias, stride, prologue=prologue)
    return y
