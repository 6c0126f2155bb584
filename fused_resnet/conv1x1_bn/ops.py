"""The 1x1-convolution GEMMs as ``torch.library`` custom ops, each with its fake
implementation: ``fused_resnet::conv1x1_forward`` / ``conv1x1_backward`` /
``conv1x1_pair_backward`` / ``conv1x1_bn_eval`` / ``batch_stats`` /
``bn_add_relu_with_stats``, and ``allow_tf32``, the rule by which fp32 takes TF32 (read
each time an op runs)."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .. import backend
from ..bn_add_relu import _EMPTY, _dense, count_empty_batch, fake_grad
from ..kernels import RESIDUAL_BN, ChannelNorm, bn_add_relu_forward, bn_stats, layout_of
from ..kernels.conv1x1_bn import (
    conv1x1_dgrad,
    conv1x1_dgrad_wgrad,
    conv1x1_forward,
    conv1x1_prologue_backward,
    conv1x1_stats_finalize,
    conv1x1_wgrad,
    geometry_of,
)


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
    backend.op_implementation(_conv1x1_forward))


@conv1x1_forward_op.register_fake
def _conv1x1_forward_fake(x, weight, bias, stride, p_mean, p_invstd, p_weight, p_bias, with_stats, running_mean,
                          running_var, num_batches_tracked, momentum, eps):
    y = torch.empty(_output_shape(x, weight, stride), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    shape = (weight.shape[0],) if with_stats else _EMPTY
    return y, x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)


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
    """(dx, d_weight, d_bias, d_p_weight, d_p_bias) of ``conv1x1_forward`` (None here, empty
    from the op: not asked for). ``output_mask`` = [x, weight, bias, p_weight, p_bias] need a gradient.
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
    return dx if need_x else None, dw if need_w else None, db, dpw, dpb


conv1x1_backward_op = torch.library.custom_op("fused_resnet::conv1x1_backward", mutates_args=())(
    backend.op_implementation(_conv1x1_backward))


def _dx_fake(x: Tensor, need: bool) -> Tensor:
    """The 1x1 convolutions' input gradient as their backward ops' fakes return it: channels_last."""
    return torch.empty_like(x, memory_format=torch.channels_last) if need else x.new_empty(_EMPTY)


def _conv_param_grads_fake(x: Tensor, weight: Tensor, has_bias: bool, need_w: bool, need_b: bool) -> tuple:
    """(d_weight, d_bias) of one 1x1 convolution as the backward ops' fakes return them."""
    db = x.new_empty((weight.shape[0],)) if (need_b and has_bias) else x.new_empty(_EMPTY)
    return fake_grad(x, weight, need_w), db


@conv1x1_backward_op.register_fake
def _conv1x1_backward_fake(dy, x, weight, stride, has_bias, p_mean, p_invstd, p_weight, p_bias, p_training,
                           output_mask):
    need_x, need_w, need_b, need_pw, need_pb = output_mask
    prologue = p_mean is not None
    return (_dx_fake(x, need_x), *_conv_param_grads_fake(x, weight, has_bias, need_w, need_b),
            fake_grad(x, p_weight, need_pw and prologue), fake_grad(x, p_bias, need_pb and prologue))


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
    ``output_mask`` = [x, weight, bias, weight2, bias2] need a gradient (None here, empty from
    the op, where not)."""
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
    return dx, dw if need_w else None, db, dw2 if need_w2 else None, db2


conv1x1_pair_backward_op = torch.library.custom_op("fused_resnet::conv1x1_pair_backward", mutates_args=())(
    backend.op_implementation(_conv1x1_pair_backward))


@conv1x1_pair_backward_op.register_fake
def _conv1x1_pair_backward_fake(dy, dy2, x, weight, weight2, stride2, has_bias, has_bias2, output_mask):
    need_x, need_w, need_b, need_w2, need_b2 = output_mask
    return (_dx_fake(x, need_x), *_conv_param_grads_fake(x, weight, has_bias, need_w, need_b),
            *_conv_param_grads_fake(x, weight2, has_bias2, need_w2, need_b2))


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


conv1x1_bn_eval_op = torch.library.custom_op("fused_resnet::conv1x1_bn_eval", mutates_args=())(
    backend.op_implementation(_conv1x1_bn_eval))


@conv1x1_bn_eval_op.register_fake
def _conv1x1_bn_eval_fake(x, weight, bias, stride, p_mean, p_invstd, p_weight, p_bias, running_mean, running_var,
                          bn_weight, bn_bias, eps, residual, relu):
    return torch.empty(_output_shape(x, weight, stride), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


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
    x = _dense(x)
    return bn_stats(x, layout_of(x), running_mean, running_var, num_batches_tracked, momentum, eps)


batch_stats_op = torch.library.custom_op(
    "fused_resnet::batch_stats", mutates_args=("running_mean", "running_var", "num_batches_tracked"))(
    backend.op_implementation(_batch_stats))


@batch_stats_op.register_fake
def _batch_stats_fake(x, running_mean, running_var, num_batches_tracked, momentum, eps):
    C = x.shape[1]
    return x.new_empty((C,), dtype=torch.float32), x.new_empty((C,), dtype=torch.float32)


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


bn_add_relu_with_stats_op = torch.library.custom_op("fused_resnet::bn_add_relu_with_stats", mutates_args=())(
    backend.op_implementation(_bn_add_relu_with_stats))


@bn_add_relu_with_stats_op.register_fake
def _bn_add_relu_with_stats_fake(x, mean, invstd, weight, bias, residual_mode, residual, r_mean, r_invstd, r_weight,
                                 r_bias):
    return torch.empty_like(x, memory_format=torch.channels_last)
