"""Residual blocks whose BatchNorm / add / ReLU tails run as fused ops.

- :class:`FusedBasicBlock`, :class:`FusedBottleneck`: the constructor, attribute names
  and state_dict keys of ``torchvision.models.resnet.BasicBlock`` / ``Bottleneck``, so a
  torchvision checkpoint loads into them unchanged.
- :class:`FusedResidual`: the same for the d2l ``Residual(input_channels, num_channels,
  use_1x1conv=False, strides=1)`` block (``conv3`` is its optional shortcut conv).
- :class:`FusedConvBottleneck`: :class:`FusedBottleneck` whose 1x1 convolutions are
  Triton GEMMs with their BatchNorms fused in (``fuse_convolutions=True``; its comment
  block below says what runs where).

Each block computes ``relu(bn_k(conv_k(... relu(bn_1(conv_1(x))) ...)) + shortcut(x))``:
every BatchNorm but the last is a :class:`BatchNormReLU2d`, the last a
:class:`BatchNormAddReLU2d`. A shortcut that is ``Sequential(conv, nn.BatchNorm2d)``
(torchvision's ``downsample``) has its BatchNorm fused into the last op as well, so it
costs no pass of its own. Every fused call goes through a norm module's ``forward``
(never the functional ops), so subclasses of the fused BatchNorms (a SyncBatchNorm
variant) plug in by overriding its eager half, ``_fused_forward``, only.

A norm that is not a plain ``nn.BatchNorm2d`` (a custom ``norm_layer``) is kept as it is
and followed by a separate add / ReLU, exactly as the torchvision block computes it.

Under ``torch.jit.script`` a block runs ``scripted_forward``: its eager sequence, written
out per block (TorchScript cannot loop over attribute names).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backend
from .. import conv1x1_bn as gemm
from ..conv1x1_bn import (
    OutputStats,
    Prologue,
    batch_stats,
    bn_add_relu_with_stats,
    conv1x1_bn_eval,
    conv1x1_pair,
    eval_prologue,
)
from .batchnorm import BatchNormAddReLU2d, BatchNormReLU2d, batch_norm_arguments, has_hooks, is_plain_batchnorm
from .matching import twin_mismatch

__all__ = ["FusedBasicBlock", "FusedBottleneck", "FusedConvBottleneck", "FusedResidual"]

_Block = TypeVar("_Block", bound="_FusedResidualBlock")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """torchvision's 3x3 convolution with padding (no bias)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """torchvision's 1x1 convolution (no bias)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def as_fused_norm(norm: Optional[nn.Module], fused_class: type) -> Optional[nn.Module]:
    """``norm`` as ``fused_class`` (sharing its tensors) when it is a plain nn.BatchNorm2d, else as it is."""
    return fused_class.from_batchnorm(norm) if is_plain_batchnorm(norm) else norm


def _is_two_step_sequential(shortcut: Optional[nn.Module]) -> bool:
    # Calling its two modules one by one is what its own forward does (no hooks to skip).
    return type(shortcut) is nn.Sequential and len(shortcut) == 2 and not has_hooks(shortcut)


def is_conv_bn_shortcut(shortcut: Optional[nn.Module]) -> bool:
    """True for ``Sequential(conv, nn.BatchNorm2d)`` (torchvision's ``downsample``)."""
    return _is_two_step_sequential(shortcut) and is_plain_batchnorm(shortcut[1])


def fusable_shortcut_bn(norm: nn.Module, shortcut: Optional[nn.Module]) -> Optional[nn.Module]:
    """The shortcut's BatchNorm when ``norm`` can compute it in its own op, else None.

    ``norm`` decides (``can_fuse_residual_bn``): a SyncBatchNorm variant fuses an
    ``nn.SyncBatchNorm`` shortcut that the single-process module would not.
    """
    can_fuse = getattr(norm, "can_fuse_residual_bn", None)
    if can_fuse is not None and _is_two_step_sequential(shortcut) and can_fuse(shortcut[1]):
        return shortcut[1]
    return None


def _applies_relu(norm: nn.Module) -> bool:
    return getattr(norm, "applies_relu", False)


def norm_relu(norm: nn.Module, x: Tensor) -> Tensor:
    """``relu(norm(x))``: one fused op when ``norm`` applies the ReLU itself."""
    if _applies_relu(norm):
        return norm(x)
    return F.relu(norm(x), inplace=True)


def norm_add_relu(norm: nn.Module, x: Tensor, residual: Tensor, residual_bn: Optional[nn.Module]) -> Tensor:
    """``relu(norm(x) + residual_bn(residual))`` (``residual_bn`` None: the identity)."""
    if _applies_relu(norm):
        if residual_bn is None:
            return norm(x, residual)
        return norm(x, residual, residual_bn=residual_bn)
    if residual_bn is not None:
        residual = residual_bn(residual)
    return F.relu(norm(x) + residual, inplace=True)


class _FusedResidualBlock(nn.Module):
    """What every fused block shares: the forward, ``from_block`` and the fold pairs.

    A subclass names its (conv, norm) stages in order and its shortcut attribute.
    """

    # ((conv, norm), ...) in the order the main path applies them; the last one adds the shortcut.
    stages: Tuple[Tuple[str, str], ...] = ()
    # The attribute holding the shortcut module (None: the identity).
    shortcut_name: str = "downsample"
    # Plain attributes of the original block that from_block keeps.
    extra_attributes: Tuple[str, ...] = ()

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self.scripted_forward(x)
        return self._fused_forward(x)

    @torch.jit.unused
    def scripted_forward(self, x: Tensor) -> Tensor:
        """The block's eager sequence in TorchScript; every subclass writes its own."""
        raise NotImplementedError(f"{type(self).__name__} cannot be scripted")

    def scripted_two_stages(self, x: Tensor, identity: Tensor) -> Tensor:
        """``relu(bn2(conv2(relu(bn1(conv1(x))))) + identity)`` in TorchScript (whose hasattr is
        resolved when compiling: the branch not taken is not compiled)."""
        out = self.bn1(self.conv1(x))
        if not hasattr(self.bn1, "scripted_applies_relu"):
            out = torch.relu(out)
        out = self.conv2(out)
        if hasattr(self.bn2, "scripted_applies_relu"):
            return self.bn2(out, identity)
        return torch.relu(self.bn2(out) + identity)

    @torch.jit.unused
    def _fused_forward(self, x: Tensor) -> Tensor:
        out = x
        for conv, norm in self.stages[:-1]:
            out = norm_relu(getattr(self, norm), getattr(self, conv)(out))
        conv, norm = self.stages[-1]
        out, norm = getattr(self, conv)(out), getattr(self, norm)
        shortcut = getattr(self, self.shortcut_name)
        if shortcut is None:
            return norm_add_relu(norm, out, x, None)
        shortcut_bn = fusable_shortcut_bn(norm, shortcut)
        if shortcut_bn is not None:
            return norm_add_relu(norm, out, shortcut[0](x), shortcut_bn)
        return norm_add_relu(norm, out, shortcut(x), None)

    def _fuse_norms(self) -> None:
        """Turn the plain nn.BatchNorm2d stages into their fused classes (same tensors)."""
        for index, (_, norm) in enumerate(self.stages):
            fused_class = BatchNormAddReLU2d if index == len(self.stages) - 1 else BatchNormReLU2d
            setattr(self, norm, as_fused_norm(getattr(self, norm), fused_class))

    def conv_norm_pairs(self) -> List[Tuple[str, str]]:
        """(conv, norm) attribute paths whose norm normalises only that conv's output.

        Used by :func:`fused_resnet.fold_bn`; includes the shortcut's conv + BatchNorm.
        """
        pairs = list(self.stages)
        if is_conv_bn_shortcut(getattr(self, self.shortcut_name)):
            pairs.append((f"{self.shortcut_name}.0", f"{self.shortcut_name}.1"))
        return pairs

    @classmethod
    def module_names(cls) -> Tuple[str, ...]:
        """Every submodule attribute of the block."""
        return tuple(name for stage in cls.stages for name in stage) + (cls.shortcut_name,)

    @classmethod
    def from_block(cls: type[_Block], block: nn.Module, *, verify: bool = True) -> _Block:
        """The fused twin of ``block``, computing with ``block``'s own submodules.

        Nothing is re-initialised or copied: the convolutions and the shortcut are the
        same module objects, and each plain ``nn.BatchNorm2d`` becomes its fused class
        sharing the same Parameter and buffer tensors. Training mode is kept.

        With ``verify`` (the default) the block's forward is traced with torch.fx first
        and a ValueError says why when it does not compute what this class computes.
        """
        if not isinstance(block, nn.Module):
            raise TypeError(f"block must be an nn.Module, got {type(block).__name__}")
        if verify:
            reason = twin_mismatch(block, cls)
            if reason is not None:
                raise ValueError(f"block ({type(block).__name__}) cannot become a {cls.__name__}: {reason}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        names = cls.module_names()
        # The original's registration order first, so state_dict keys come out in its order.
        order = [name for name in block._modules if name in names]
        order += [name for name in names if name not in order]
        for name in order:
            module = getattr(block, name, None)
            if module is not None and not isinstance(module, nn.Module):
                raise TypeError(f"block.{name} must be an nn.Module or None, got {type(module).__name__}")
            if module is None and name != cls.shortcut_name:
                raise TypeError(f"block ({type(block).__name__}) has no submodule '{name}'")
            setattr(fused, name, module)
        for name in cls.extra_attributes:
            if hasattr(block, name):
                setattr(fused, name, getattr(block, name))
        fused._fuse_norms()
        # Only the block's own flag: its submodules keep theirs (a frozen BatchNorm stays frozen).
        fused.training = block.training
        return fused


class FusedBasicBlock(_FusedResidualBlock):
    """``torchvision.models.resnet.BasicBlock`` with its BatchNorm tails fused.

    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))``. Same constructor,
    attributes (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``downsample``, ``stride``) and
    state_dict keys as torchvision's block.
    """

    expansion: int = 1
    stages = (("conv1", "bn1"), ("conv2", "bn2"))
    shortcut_name = "downsample"
    extra_attributes = ("stride",)

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self._fuse_norms()

    def scripted_forward(self, x: Tensor) -> Tensor:
        return self.scripted_two_stages(x, x if self.downsample is None else self.downsample(x))


class FusedBottleneck(_FusedResidualBlock):
    """``torchvision.models.resnet.Bottleneck`` (ResNet v1.5) with its BatchNorm tails fused.

    ``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + downsample(x))``. Same
    constructor (``groups``, ``base_width``, ``dilation``, ``norm_layer``), attributes and
    state_dict keys as torchvision's block.
    """

    expansion: int = 4
    stages = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    shortcut_name = "downsample"
    extra_attributes = ("stride",)

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.downsample = downsample
        self.stride = stride
        self._fuse_norms()

    def scripted_forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x))
        if not hasattr(self.bn1, "scripted_applies_relu"):
            out = torch.relu(out)
        out = self.bn2(self.conv2(out))
        if not hasattr(self.bn2, "scripted_applies_relu"):
            out = torch.relu(out)
        out = self.conv3(out)
        identity = x if self.downsample is None else self.downsample(x)
        if hasattr(self.bn3, "scripted_applies_relu"):
            return self.bn3(out, identity)
        return torch.relu(self.bn3(out) + identity)

    @classmethod
    def from_block(cls, block: nn.Module, *, verify: bool = True, fuse_convolutions: bool = False) -> "FusedBottleneck":
        """The fused twin of ``block`` (see :meth:`_FusedResidualBlock.from_block`).

        With ``fuse_convolutions`` the twin is a
        :class:`FusedConvBottleneck` (conv1, conv3 and the
        downsample as GEMMs with BatchNorm fused in). It is returned for every block this
        class accepts: where the convolutions are not plain 1x1 (groups, padding, dilation),
        or the input is NCHW, on the CPU path or under autocast, its forward runs this
        class's path at call time, so the choice never changes what the block computes.
        """
        if not isinstance(fuse_convolutions, bool):
            raise TypeError(f"fuse_convolutions must be a bool, got {type(fuse_convolutions).__name__}")
        target = cls
        if fuse_convolutions and not issubclass(cls, FusedConvBottleneck):
            target = FusedConvBottleneck
        return super(FusedBottleneck, target).from_block(block, verify=verify)


class FusedResidual(_FusedResidualBlock):
    """The d2l ``Residual`` block with its BatchNorm tails fused.

    ``relu(bn2(conv2(relu(bn1(conv1(X))))) + shortcut(X))`` where the shortcut is
    ``conv3`` (a 1x1 convolution with ``strides``) when ``use_1x1conv``, else the
    identity. Same constructor, attributes (``conv1``, ``conv2``, ``conv3``, ``bn1``,
    ``bn2``) and state_dict keys as the d2l block.
    """

    stages = (("conv1", "bn1"), ("conv2", "bn2"))
    shortcut_name = "conv3"

    def __init__(self, input_channels: int, num_channels: int, use_1x1conv: bool = False, strides: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(input_channels, num_channels, kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(num_channels, num_channels, kernel_size=3, padding=1)
        if use_1x1conv:
            self.conv3 = nn.Conv2d(input_channels, num_channels, kernel_size=1, stride=strides)
        else:
            self.conv3 = None
        self.bn1 = nn.BatchNorm2d(num_channels)
        self.bn2 = nn.BatchNorm2d(num_channels)
        self._fuse_norms()

    def scripted_forward(self, x: Tensor) -> Tensor:
        return self.scripted_two_stages(x, x if self.conv3 is None else self.conv3(x))


# ------------------------------------------------------------------ the 1x1-convolution GEMM path
#
# A Bottleneck whose 1x1 convolutions are Triton GEMMs with their BatchNorms fused in.
#
# :class:`FusedConvBottleneck` is :class:`FusedBottleneck` (torchvision's ``Bottleneck``:
# same constructor, submodules, parameters, buffers and state_dict keys) whose forward, on
# the Triton path with a channels_last input, runs ``fused_resnet/conv1x1_bn/``'s ops:
#
# training (every BatchNorm on batch statistics)
#     conv1 writes y1 and its statistics (bn1's running statistics updated there);
#     relu(bn1(y1)) is written once, for conv2 (the 3x3 convolution stays cuDNN's); bn2's
#     statistics of y2 in one pass; conv3 applies bn2 + ReLU to its input tiles and writes
#     y3 and its statistics; the downsample convolution writes its output and statistics;
#     relu(bn3(y3) + bn_d(y_d)) (or + x) is one elementwise pass. In the backward, x's
#     gradient from conv1 and the downsample is one GEMM (a stride-1 downsample) or the
#     downsample's added in conv1's dgrad epilogue: never a separate accumulation pass.
# eval (every BatchNorm on running statistics, no gradient wanted)
#     conv1 + bn1 + ReLU is one kernel; the downsample + its BatchNorm one kernel; conv3
#     with bn2 + ReLU in its prologue and bn3 + the shortcut + ReLU in its epilogue one
#     kernel.
#
# Anything else (the CPU PyTorch path, an NCHW input, autocast, a BatchNorm frozen next to
# one training, eval with gradients wanted, submodules that are not plain 1x1 convolutions
# and BatchNorms, hooks) takes :class:`FusedBottleneck`'s forward unchanged.

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

    @torch.jit.unused
    def _fused_forward(self, x: Tensor) -> Tensor:
        mode = self._conv_mode(x)
        if mode == "train":
            return self._forward_train(x)
        if mode == "eval":
            return self._forward_eval(x)
        return super()._fused_forward(x)

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
            y1, mean1, invstd1 = gemm.conv1x1(x, self.conv1.weight, self.conv1.bias, 1, stats=_output_stats(bn1))
        a1 = bn_add_relu_with_stats(y1, mean1, invstd1, bn1["weight"], bn1["bias"])
        y2 = self.conv2(a1)
        mean2, invstd2 = batch_stats(y2, _output_stats(bn2))
        prologue = Prologue(mean2, invstd2, bn2["weight"], bn2["bias"], training=True)
        y3, mean3, invstd3 = gemm.conv1x1(y2, self.conv3.weight, self.conv3.bias, 1, prologue=prologue,
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
