"""A Bottleneck whose 1x1 convolutions are Triton GEMMs with their BatchNorms fused in.

:class:`FusedConvBottleneck` is :class:`FusedBottleneck` (torchvision's ``Bottleneck``:
same constructor, submodules, parameters, buffers and state_dict keys) whose forward, on
the Triton path with a channels_last input, runs ``fused_resnet/conv1x1_bn.py``'s ops:

training (every BatchNorm on batch statistics)
    conv1 writes y1 and its statistics (bn1's running statistics updated there);
    relu(bn1(y1)) is written once, for conv2 (the 3x3 convolution stays cuDNN's); bn2's
    statistics of y2 in one pass; conv3 applies bn2 + ReLU to its input tiles and writes
    y3 and its statistics; the downsample convolution writes its output and statistics;
    relu(bn3(y3) + bn_d(y_d)) (or + x) is one elementwise pass. In the backward, x's
    gradient from conv1 and the downsample is one GEMM (a stride-1 downsample) or the
    downsample's added in conv1's dgrad epilogue: never a separate accumulation pass.
eval (every BatchNorm on running statistics, no gradient wanted)
    conv1 + bn1 + ReLU is one kernel; the downsample + its BatchNorm one kernel; conv3
    with bn2 + ReLU in its prologue and bn3 + the shortcut + ReLU in its epilogue one
    kernel.

Anything else (the CPU PyTorch path, an NCHW input, autocast, a BatchNorm frozen next to
one training, eval with gradients wanted, submodules that are not plain 1x1 convolutions
and BatchNorms, hooks) takes :class:`FusedBottleneck`'s forward unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import backend
from ..conv1x1_bn import (
    OutputStats,
    Prologue,
    batch_stats,
    bn_add_relu_with_stats,
    conv1x1,
    conv1x1_bn_eval,
    conv1x1_pair,
    eval_prologue,
)
from .batchnorm import BatchNormAddReLU2d, BatchNormReLU2d, batch_norm_arguments, has_hooks
from .blocks import FusedBottleneck

__all__ = ["FusedConvBottleneck"]

_BATCHNORMS = (nn.BatchNorm2d, BatchNormReLU2d, BatchNormAddReLU2d)


def _is_1x1(conv: nn.Module, stride: Optional[int] = 1) -> bool:
    """A plain 1x1 convolution (groups 1, no padding or dilation) of the given square
    stride (None: any square stride)."""
    return (type(conv) is nn.Conv2d and not has_hooks(conv) and conv.kernel_size == (1, 1)
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and conv.stride[0] == conv.stride[1]
            and (stride is None or conv.stride[0] == stride))


def _is_batchnorm(bn: nn.Module) -> bool:
    return type(bn) in _BATCHNORMS and not has_hooks(bn)


def _uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _output_stats(args: dict) -> OutputStats:
    return OutputStats(args["running_mean"], args["running_var"], args["num_batches_tracked"], args["momentum"],
                       args["eps"])


class FusedConvBottleneck(FusedBottleneck):
    """``torchvision.models.resnet.Bottleneck`` with conv1, conv3 and the downsample as
    GEMMs that compute their BatchNorm's statistics (training) or apply it (eval).

    Same constructor, attributes and state_dict keys as torchvision's block (and
    :class:`FusedBottleneck`); ``from_block(block)`` keeps an existing block's modules.
    """

    def _fused_shortcut(self) -> Optional[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        """(conv, bn) of a ``Sequential(1x1 conv, BatchNorm2d)`` downsample, else None."""
        ds = self.downsample
        if (type(ds) is nn.Sequential and len(ds) == 2 and not has_hooks(ds) and _is_1x1(ds[0], None)
                and _is_batchnorm(ds[1])):
            return ds[0], ds[1]
        return None

    def _conv_mode(self, x: Tensor) -> Optional[str]:
        """"train" or "eval" when the fused GEMMs compute this call, else None."""
        if not (isinstance(x, Tensor) and x.dim() == 4 and backend.use_triton(x)
                and x.is_contiguous(memory_format=torch.channels_last)):
            return None
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or torch.is_autocast_enabled(x.device.type):
            return None
        if not (_is_1x1(self.conv1) and _is_1x1(self.conv3) and all(
                _is_batchnorm(bn) for bn in (self.bn1, self.bn2, self.bn3))):
            return None
        if any(conv.weight.dtype != x.dtype for conv in (self.conv1, self.conv3)):
            return None
        norms = [self.bn1, self.bn2, self.bn3]
        shortcut = self._fused_shortcut()
        if shortcut is not None:
            if shortcut[0].weight.dtype != x.dtype:
                return None
            norms.append(shortcut[1])
        batch = {_uses_batch_stats(bn) for bn in norms}
        if batch == {True}:
            return "train"
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if batch == {False} and not needs_grad:
            return "eval"
        return None

    def forward(self, x: Tensor) -> Tensor:
        mode = self._conv_mode(x)
        if mode == "train":
            return self._forward_train(x)
        if mode == "eval":
            return self._forward_eval(x)
        return super().forward(x)

    def _forward_train(self, x: Tensor) -> Tensor:
        bn1, bn2, bn3 = (batch_norm_arguments(bn) for bn in (self.bn1, self.bn2, self.bn3))
        shortcut = self._fused_shortcut()
        if shortcut is not None:
            # conv1 and the downsample read the same x: x's gradient is written once.
            conv, bn = shortcut
            bnd = batch_norm_arguments(bn)
            y1, mean1, invstd1, yd, mean_d, invstd_d = conv1x1_pair(
                x, self.conv1.weight, self.conv1.bias, _output_stats(bn1), conv.weight, conv.bias, conv.stride[0],
                _output_stats(bnd))
        else:
            y1, mean1, invstd1 = conv1x1(x, self.conv1.weight, self.conv1.bias, 1, stats=_output_stats(bn1))
        a1 = bn_add_relu_with_stats(y1, mean1, invstd1, bn1["weight"], bn1["bias"])
        y2 = self.conv2(a1)
        mean2, invstd2 = batch_stats(y2, _output_stats(bn2))
        prologue = Prologue(mean2, invstd2, bn2["weight"], bn2["bias"], training=True)
        y3, mean3, invstd3 = conv1x1(y2, self.conv3.weight, self.conv3.bias, 1, prologue=prologue,
                                     stats=_output_stats(bn3))
        if shortcut is not None:
            return bn_add_relu_with_stats(y3, mean3, invstd3, bn3["weight"], bn3["bias"], yd, mean_d, invstd_d,
                                          bnd["weight"], bnd["bias"])
        identity = x if self.downsample is None else self.downsample(x)
        return bn_add_relu_with_stats(y3, mean3, invstd3, bn3["weight"], bn3["bias"], identity)

    def _forward_eval(self, x: Tensor) -> Tensor:
        bn1, bn2, bn3 = self.bn1, self.bn2, self.bn3
        a1 = conv1x1_bn_eval(x, self.conv1.weight, self.conv1.bias, 1, bn1.running_mean, bn1.running_var,
                             bn1.weight, bn1.bias, bn1.eps, relu=True)
        y2 = self.conv2(a1)
        shortcut = self._fused_shortcut()
        if shortcut is not None:
            conv, bn = shortcut
            identity = conv1x1_bn_eval(x, conv.weight, conv.bias, conv.stride[0], bn.running_mean, bn.running_var,
                                       bn.weight, bn.bias, bn.eps, relu=False)
        else:
            identity = x if self.downsample is None else self.downsample(x)
        prologue = eval_prologue(bn2.running_mean, bn2.running_var, bn2.weight, bn2.bias, bn2.eps)
        return conv1x1_bn_eval(y2, self.conv3.weight, self.conv3.bias, 1, bn3.running_mean, bn3.running_var,
                               bn3.weight, bn3.bias, bn3.eps, residual=identity, relu=True, prologue=prologue)
