"""1x1 convolutions with BatchNorm fused into their GEMMs, as autograd ops.

Public functions (arguments as ``F.conv2d`` and ``F.batch_norm``; x is (N, C, H, W)):

- ``conv1x1_bn_relu(x, conv_weight, conv_bias, <bn>, ...)`` =
  ``relu(F.batch_norm(F.conv2d(x, conv_weight, conv_bias, stride), <bn>) [+ residual])``
- ``bn_relu_conv1x1(x, <bn>, conv_weight, conv_bias, ...)`` =
  ``F.conv2d(relu(F.batch_norm(x, <bn>)), conv_weight, conv_bias, stride)``

On the Triton path (channels_last input; see ``backend``) they run the kernels of
``kernels/conv1x1_bn.py``: in training the convolution's GEMM writes y and the batch
statistics of y in its epilogue (the BatchNorm's statistics pass disappears), or applies
relu(bn(x)) to its input tiles as it loads them (the normalised activation is never
written, nor saved: the backward recomputes it). In eval conv + bn + (add) + relu is
one kernel. Elsewhere (CPU, float64, NCHW inputs) they are eager PyTorch's own
sequence, bitwise.

Ops underneath, each a ``torch.library`` custom op with a fake implementation:
``fused_resnet::conv1x1_forward`` / ``conv1x1_backward`` (tied by ``Conv1x1Function``;
``conv1x1_pair_backward`` for two convolutions of one input, ``Conv1x1PairFunction``),
``fused_resnet::conv1x1_bn_eval`` (inference only), ``fused_resnet::batch_stats`` and
``fused_resnet::bn_add_relu_with_stats`` (whose backward is ``bn_add_relu_backward``).
``conv1x1`` / ``batch_stats`` / ``bn_add_relu_with_stats`` are the pieces the
Bottleneck in ``nn/blocks.py`` (FusedConvBottleneck) is built from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend
from .bn_add_relu import _momentum_factor, bn_add_relu, bn_add_relu_backward_implementation, bn_relu, count_empty_batch
from .kernels import RESIDUAL_ADD, RESIDUAL_BN, RESIDUAL_NONE, ChannelNorm, bn_add_relu_forward, bn_stats, layout_of
from .kernels.conv1x1_bn import (
    conv1x1_dgrad,
    conv1x1_dgrad_wgrad,
    conv1x1_forward,
    conv1x1_prologue_backward,
    conv1x1_stats_finalize,
    conv1x1_wgrad,
    geometry_of,
)
from .validation import check_activation, check_batch_norm_args, check_like

_EMPTY = (0,)

__all__ = ["bn_relu_conv1x1", "conv1x1_bn_relu"]


def _nhwc(t: Tensor) -> Tensor:
    """t as a dense channels_last tensor (a copy only when it is not one already)."""
    return t.contiguous(memory_format=torch.channels_last)


def _require_triton(x: Tensor, op: str) -> None:
    # The functions take eager PyTorch's sequence off the Triton path; the ops never run there.
    if not backend.use_triton(x):
        raise RuntimeError(f"fused_resnet::{op} runs only on the Triton path (CUDA, or TRITON_INTERPRET=1 on a CPU)")


def _norm(mean, invstd, weight, bias) -> Optional[ChannelNorm]:
    return None if mean is None else ChannelNorm(mean, invstd, weight, bias)


def _no_pixels(x: Tensor) -> bool:
    """An empty batch (or map): the ops launch nothing and return their fake's outputs zeroed
    (empty activations and gradients, zero parameter gradients, as eager)."""
    return x.shape[0] * x.shape[2] * x.shape[3] == 0


def _zeroed(outputs):
    return tuple(t.zero_() for t in outputs) if isinstance(outputs, tuple) else outputs.zero_()


def allow_tf32(dtype: torch.dtype) -> bool:
    """Whether F.conv2d would compute an fp32 convolution with TF32 now: cuDNN's convolution
    precision ``torch.backends.cudnn.conv.fp32_precision == "tf32"`` (its getter resolves
    "none" through ``torch.backends.cudnn.fp32_precision`` and ``torch.backends.fp32_precision``,
    and cuDNN takes TF32 only on "tf32"), or, on a torch without that API, the legacy
    ``torch.backends.cudnn.allow_tf32`` (which raises once the new API has been used). Never
    read for 16-bit inputs. The ops read it when they run, so a compiled graph (which cannot
    trace the getter) never bakes in a stale value."""
    if dtype != torch.float32:
        return False
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None:
        return conv.fp32_precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


# ----------------------------------------------------------------------------- the ops


@backend.launches_on_input_device
def _conv1x1_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: int,
    p_mean: Optional[Tensor],
    p_invstd: Optional[Tensor],
    p_weight: Optional[Tensor],
    p_bias: Optional[Tensor],
    with_stats: bool,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, invstd): y = conv1x1(a) with a = relu(bn_p(x)) when ``p_mean`` is given
    (p_invstd = 1/sqrt(var + eps)), else a = x. ``with_stats``: mean and 1/sqrt(var +
    eps) of y for the BatchNorm that follows, whose running statistics are updated in
    place; else both are empty. y is channels_last."""
    _require_triton(x, "conv1x1_forward")
    if _no_pixels(x):
        count_empty_batch(with_stats, running_mean, num_batches_tracked)
        return _zeroed(_conv1x1_forward_fake(x, weight, bias, stride, p_mean, p_invstd, p_weight, p_bias, with_stats,
                                             running_mean, running_var, num_batches_tracked, momentum, eps))
    x, tf32 = _nhwc(x), allow_tf32(x.dtype)
    y, partials, tile_rows = conv1x1_forward(x, weight, bias, stride, _norm(p_mean, p_invstd, p_weight, p_bias),
                                             stats=with_stats, allow_tf32=tf32)
    if not with_stats:
        return y, x.new_empty(_EMPTY, dtype=torch.float32), x.new_empty(_EMPTY, dtype=torch.float32)
    mean, invstd = conv1x1_stats_finalize(partials, geometry_of(x, weight, stride).M, tile_rows,
                                          running_mean, running_var, num_batches_tracked, momentum, eps)
    return y, mean, invstd


def _output_shape(x: Tensor, weight: Tensor, stride: int) -> tuple[int, int, int, int]:
    geo = geometry_of(x, weight, stride)
    return geo.N, geo.C_out, geo.H_out, geo.W_out


conv1x1_forward_op = torch.library.custom_op(
    "fused_resnet::conv1x1_forward", mutates_args=("running_mean", "running_var", "num_batches_tracked"))(
    _conv1x1_forward)


@conv1x1_forward_op.register_fake
def _conv1x1_forward_fake(x, weight, bias, stride, p_mean, p_invstd, p_weight, p_bias, with_stats, running_mean,
                          running_var, num_batches_tracked, momentum, eps):
    y = x.new_empty(_output_shape(x, weight, stride)).contiguous(memory_format=torch.channels_last)
    shape = (weight.shape[0],) if with_stats else _EMPTY
    return y, x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)


def _grad_or_empty(grad: Optional[Tensor], x: Tensor) -> Tensor:
    # Custom ops cannot return None: an empty tensor stands for "no gradient".
    return x.new_empty(_EMPTY) if grad is None else grad


@backend.launches_on_input_device
def _conv1x1_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: int,
    has_bias: bool,
    p_mean: Optional[Tensor],
    p_invstd: Optional[Tensor],
    p_weight: Optional[Tensor],
    p_bias: Optional[Tensor],
    p_training: bool,
    output_mask: List[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d_weight, d_bias, d_p_weight, d_p_bias) of ``conv1x1_forward`` (empty = not
    asked for). ``output_mask`` = [x, weight, bias, p_weight, p_bias] need a gradient.
    ``p_training``: p_mean / p_invstd are x's batch statistics (their terms enter dx)."""
    _require_triton(x, "conv1x1_backward")
    if _no_pixels(x):
        return _zeroed(_conv1x1_backward_fake(dy, x, weight, stride, has_bias, p_mean, p_invstd, p_weight, p_bias,
                                              p_training, output_mask))
    need_x, need_w, need_b, need_pw, need_pb = output_mask
    x, dy, tf32 = _nhwc(x), _nhwc(dy), allow_tf32(x.dtype)
    prologue = _norm(p_mean, p_invstd, p_weight, p_bias)
    dx = dw = db = dpw = dpb = None
    need_pw, need_pb = need_pw and prologue is not None, need_pb and prologue is not None
    need_dgrad, need_wgrad = need_x or need_pw or need_pb, need_w or (need_b and has_bias)
    if need_dgrad and need_wgrad:
        g, partials, (dw, db), _ = conv1x1_dgrad_wgrad(dy, weight, x, stride, prologue,
                                                       bias_grad=need_b and has_bias, allow_tf32=tf32)
    elif need_dgrad:
        g, partials = conv1x1_dgrad(dy, weight, x, stride, prologue, allow_tf32=tf32)
    elif need_wgrad:
        dw, db = conv1x1_wgrad(dy, x, weight, stride, prologue, bias_grad=need_b and has_bias,
                               allow_tf32=tf32)
    if need_dgrad:
        if prologue is None:
            dx = g
        else:
            dx, dpw, dpb = conv1x1_prologue_backward(g, partials, x, prologue, p_training, need_pw, need_pb,
                                                     need_input=need_x)
    return (_grad_or_empty(dx if need_x else None, x), _grad_or_empty(dw if need_w else None, x),
            _grad_or_empty(db, x), _grad_or_empty(dpw, x), _grad_or_empty(dpb, x))


conv1x1_backward_op = torch.library.custom_op("fused_resnet::conv1x1_backward",
                                              mutates_args=())(_conv1x1_backward)


@conv1x1_backward_op.register_fake
def _conv1x1_backward_fake(dy, x, weight, stride, has_bias, p_mean, p_invstd, p_weight, p_bias, p_training,
                           output_mask):
    need_x, need_w, need_b, need_pw, need_pb = output_mask
    prologue = p_mean is not None

    def grad(like, need):
        return torch.empty_like(like) if need else x.new_empty(_EMPTY)

    dx = x.new_empty(x.shape).contiguous(memory_format=torch.channels_last) if need_x else x.new_empty(_EMPTY)
    return (dx, grad(weight, need_w), x.new_empty((weight.shape[0],)) if (need_b and has_bias) else x.new_empty(_EMPTY),
            grad(p_weight, need_pw and prologue and p_weight is not None),
            grad(p_bias, need_pb and prologue and p_bias is not None))


@backend.launches_on_input_device
def _conv1x1_pair_backward(
    dy: Tensor,
    dy2: Tensor,
    x: Tensor,
    weight: Tensor,
    weight2: Tensor,
    stride2: int,
    has_bias: bool,
    has_bias2: bool,
    output_mask: List[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d_weight, d_bias, d_weight2, d_bias2) of two 1x1 convolutions of the same x
    (stride 1 and ``stride2``): x's gradient in one GEMM over both (stride2 = 1) or with
    the second's gradient added in the first's epilogue, never by a separate pass.
    ``output_mask`` = [x, weight, bias, weight2, bias2] need a gradient."""
    _require_triton(x, "conv1x1_pair_backward")
    if _no_pixels(x):
        return _zeroed(_conv1x1_pair_backward_fake(dy, dy2, x, weight, weight2, stride2, has_bias, has_bias2,
                                                   output_mask))
    need_x, need_w, need_b, need_w2, need_b2 = output_mask
    x, dy, dy2, tf32 = _nhwc(x), _nhwc(dy), _nhwc(dy2), allow_tf32(x.dtype)
    dx = dw = db = dw2 = db2 = None
    need_wgrad, need_wgrad2 = need_w or (need_b and has_bias), need_w2 or (need_b2 and has_bias2)
    if need_x and need_wgrad and need_wgrad2 and stride2 == 1:
        dx, _, (dw, db), (dw2, db2) = conv1x1_dgrad_wgrad(
            dy, weight, x, 1, second=(dy2, weight2), bias_grad=need_b and has_bias,
            bias_grad2=need_b2 and has_bias2, allow_tf32=tf32)
    else:
        if need_x and stride2 == 1:
            dx, _ = conv1x1_dgrad(dy, weight, x, 1, second=(dy2, weight2), allow_tf32=tf32)
        elif need_x:
            dx2, _ = conv1x1_dgrad(dy2, weight2, x, stride2, allow_tf32=tf32)
            dx, _ = conv1x1_dgrad(dy, weight, x, 1, add=dx2, allow_tf32=tf32)
        if need_wgrad:
            dw, db = conv1x1_wgrad(dy, x, weight, 1, bias_grad=need_b and has_bias, allow_tf32=tf32)
        if need_wgrad2:
            dw2, db2 = conv1x1_wgrad(dy2, x, weight2, stride2, bias_grad=need_b2 and has_bias2,
                                     allow_tf32=tf32)
    return (_grad_or_empty(dx, x), _grad_or_empty(dw if need_w else None, x), _grad_or_empty(db, x),
            _grad_or_empty(dw2 if need_w2 else None, x), _grad_or_empty(db2, x))


conv1x1_pair_backward_op = torch.library.custom_op("fused_resnet::conv1x1_pair_backward",
                                                   mutates_args=())(_conv1x1_pair_backward)


@conv1x1_pair_backward_op.register_fake
def _conv1x1_pair_backward_fake(dy, dy2, x, weight, weight2, stride2, has_bias, has_bias2, output_mask):
    need_x, need_w, need_b, need_w2, need_b2 = output_mask

    def grad(like, need):
        return torch.empty_like(like) if need else x.new_empty(_EMPTY)

    dx = x.new_empty(x.shape).contiguous(memory_format=torch.channels_last) if need_x else x.new_empty(_EMPTY)
    return (dx, grad(weight, need_w), x.new_empty((weight.shape[0],)) if (need_b and has_bias) else x.new_empty(_EMPTY),
            grad(weight2, need_w2),
            x.new_empty((weight2.shape[0],)) if (need_b2 and has_bias2) else x.new_empty(_EMPTY))


@backend.launches_on_input_device
def _conv1x1_bn_eval(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: int,
    p_mean: Optional[Tensor],
    p_invstd: Optional[Tensor],
    p_weight: Optional[Tensor],
    p_bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    eps: float,
    residual: Optional[Tensor],
    relu: bool,
) -> Tensor:
    """``[relu](bn(conv1x1(a)) [+ residual])`` with bn from its running statistics, one
    kernel (inference: no autograd). a as in ``conv1x1_forward``."""
    _require_triton(x, "conv1x1_bn_eval")
    if _no_pixels(x):
        return _conv1x1_bn_eval_fake(x, weight, bias, stride, p_mean, p_invstd, p_weight, p_bias, running_mean,
                                     running_var, bn_weight, bn_bias, eps, residual, relu)
    x, tf32 = _nhwc(x), allow_tf32(x.dtype)
    if residual is not None:
        residual = _nhwc(residual)
    y, _, _ = conv1x1_forward(x, weight, bias, stride, _norm(p_mean, p_invstd, p_weight, p_bias),
                              eval_norm=ChannelNorm(running_mean, running_var, bn_weight, bn_bias), eval_eps=eps,
                              residual=residual, relu=relu, allow_tf32=tf32)
    return y


conv1x1_bn_eval_op = torch.library.custom_op("fused_resnet::conv1x1_bn_eval",
                                             mutates_args=())(_conv1x1_bn_eval)


@conv1x1_bn_eval_op.register_fake
def _conv1x1_bn_eval_fake(x, weight, bias, stride, p_mean, p_invstd, p_weight, p_bias, running_mean, running_var,
                          bn_weight, bn_bias, eps, residual, relu):
    return x.new_empty(_output_shape(x, weight, stride)).contiguous(memory_format=torch.channels_last)


@backend.launches_on_input_device
def _batch_stats(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
) -> tuple[Tensor, Tensor]:
    """(mean, 1/sqrt(var + eps)) of x per channel, fp32, updating the running statistics
    as ``nn.BatchNorm2d`` does (``bn_stats``)."""
    _require_triton(x, "batch_stats")
    if x.numel() == 0:
        count_empty_batch(True, running_mean, num_batches_tracked)
        return _zeroed(_batch_stats_fake(x, running_mean, running_var, num_batches_tracked, momentum, eps))
    x = x if (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)) else x.contiguous()
    return bn_stats(x, layout_of(x), running_mean, running_var, num_batches_tracked, momentum, eps)


batch_stats_op = torch.library.custom_op(
    "fused_resnet::batch_stats", mutates_args=("running_mean", "running_var", "num_batches_tracked"))(_batch_stats)


@batch_stats_op.register_fake
def _batch_stats_fake(x, running_mean, running_var, num_batches_tracked, momentum, eps):
    C = x.shape[1]
    return x.new_empty((C,), dtype=torch.float32), x.new_empty((C,), dtype=torch.float32)


@backend.launches_on_input_device
def _bn_add_relu_with_stats(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual_mode: int,
    residual: Optional[Tensor],
    r_mean: Optional[Tensor],
    r_invstd: Optional[Tensor],
    r_weight: Optional[Tensor],
    r_bias: Optional[Tensor],
) -> Tensor:
    """relu((x - mean) * invstd * weight + bias [+ residual | + the same of residual]):
    ``bn_add_relu``'s elementwise pass with statistics computed elsewhere (by a
    convolution's epilogue). Its backward is ``fused_resnet::bn_add_relu_backward``."""
    _require_triton(x, "bn_add_relu_with_stats")
    if x.numel() == 0:
        return _bn_add_relu_with_stats_fake(x, mean, invstd, weight, bias, residual_mode, residual, r_mean, r_invstd,
                                            r_weight, r_bias)
    x = _nhwc(x)
    layout = layout_of(x)
    if residual is not None:
        residual = residual.contiguous(memory_format=layout.memory_format)
    r_norm = ChannelNorm(r_mean, r_invstd, r_weight, r_bias) if residual_mode == RESIDUAL_BN else None
    return bn_add_relu_forward(x, layout, ChannelNorm(mean, invstd, weight, bias), 0.0, False, residual, r_norm)


bn_add_relu_with_stats_op = torch.library.custom_op("fused_resnet::bn_add_relu_with_stats",
                                                    mutates_args=())(_bn_add_relu_with_stats)


@bn_add_relu_with_stats_op.register_fake
def _bn_add_relu_with_stats_fake(x, mean, invstd, weight, bias, residual_mode, residual, r_mean, r_invstd, r_weight,
                                 r_bias):
    return torch.empty_like(x, memory_format=torch.channels_last)


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
        ctx.save_for_backward(x, weight, p_mean, p_invstd, p_weight, p_bias)
        ctx.config = (stride, bias is not None, p_training)
        return y, mean, invstd

    @staticmethod
    def backward(ctx, dy, _d_mean, _d_invstd):
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
        ctx.save_for_backward(x, weight, weight2)
        ctx.config = (stride2, bias is not None, bias2 is not None)
        return y, mean, invstd, y2, mean2, invstd2

    @staticmethod
    def backward(ctx, dy, _dm, _ds, dy2, _dm2, _ds2):
        x, weight, weight2 = ctx.saved_tensors
        stride2, has_bias, has_bias2 = ctx.config
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
        empty = x.new_empty(_EMPTY, dtype=torch.float32)
        dx, d_res, dw, db, r_dw, r_db = backend.call_op(
            torch.ops.fused_resnet.bn_add_relu_backward, bn_add_relu_backward_implementation,
            (dy, y, x, mean, invstd, None, None, weight, bias, True, 0.0, mode, residual,
             r_mean if is_bn else empty, r_invstd if is_bn else empty, None, None, r_weight, r_bias, True, 0.0,
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
