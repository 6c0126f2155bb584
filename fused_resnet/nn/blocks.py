"""Residual blocks whose BatchNorm / add / ReLU tails run as fused ops.

- :class:`FusedBasicBlock`, :class:`FusedBottleneck`: the constructor, attribute names
  and state_dict keys of ``torchvision.models.resnet.BasicBlock`` / ``Bottleneck``, so a
  torchvision checkpoint loads into them unchanged.
- :class:`FusedResidual`: the same for the d2l ``Residual(input_channels, num_channels,
  use_1x1conv=False, strides=1)`` block (``conv3`` is its optional shortcut conv).

Each block computes ``relu(bn_k(conv_k(... relu(bn_1(conv_1(x))) ...)) + shortcut(x))``:
every BatchNorm but the last is a :class:`BatchNormReLU2d`, the last a
:class:`BatchNormAddReLU2d`. A shortcut that is ``Sequential(conv, nn.BatchNorm2d)``
(torchvision's ``downsample``) has its BatchNorm fused into the last op as well, so it
costs no pass of its own. Every fused call goes through a norm module's ``forward``
(never the functional ops), so subclasses of the fused BatchNorms (a SyncBatchNorm
variant) plug in by overriding ``forward`` only.

A norm that is not a plain ``nn.BatchNorm2d`` (a custom ``norm_layer``) is kept as it is
and followed by a separate add / ReLU, exactly as the torchvision block computes it.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple, TypeVar

import torch.nn.functional as F
from torch import Tensor, nn

from .batchnorm import BatchNormAddReLU2d, BatchNormReLU2d, has_hooks, is_plain_batchnorm
from .matching import twin_mismatch

__all__ = ["FusedBasicBlock", "FusedBottleneck", "FusedResidual"]

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
