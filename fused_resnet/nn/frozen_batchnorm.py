"""Frozen BatchNorm with its ReLU (and shortcut add) fused: torchvision's ``FrozenBatchNorm2d``
(what its detection and segmentation backbones use) and timm's ``FrozenBatchNormAct2d``.

A frozen BatchNorm is a per-channel affine from buffers, ``x * scale + bias`` with
``scale = weight * rsqrt(running_var + eps)``, in a model that trains: the fused ops run
it as an eval-mode BatchNorm (running statistics, nothing updated), whatever the module's
mode, with gradients for the input and the residual only (the buffers have none).

The fused modules are subclasses of the original class (``isinstance`` still holds, the
state_dict keys and ``_load_from_state_dict`` are the original's), built on first use so
that the library never imports torchvision or timm itself; :func:`fused_frozen_batchnorm`
makes one from an existing module, sharing its buffers. On the CPU path (and wherever the
fused op cannot take the operands) they compute the original's ops, in its order: the
same bits, forward and backward.
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import backend
from ..bn_add_relu import bn_add_bn_relu, bn_add_relu, bn_relu
from .batchnorm import module_rebuilt_as, residual_matches
from .matching import runs_its_class_forward

__all__ = ["computes_frozen_affine", "frozen_affine", "fused_frozen_batchnorm", "is_frozen_batchnorm"]

# The frozen classes (module, class name) and the names of their fused subclasses (ReLU, add + ReLU).
FROZEN_CLASSES: Dict[Tuple[str, str], Tuple[str, str]] = {
    ("torchvision.ops.misc", "FrozenBatchNorm2d"): ("FrozenBatchNormReLU2d", "FrozenBatchNormAddReLU2d"),
    ("timm.layers.norm_act", "FrozenBatchNormAct2d"): ("FrozenBatchNormActReLU2d", "FrozenBatchNormActAddReLU2d"),
}
_BUILT: Dict[Tuple[type, bool], type] = {}


def _frozen_key(cls: type) -> Tuple[str, str]:
    return cls.__module__, cls.__qualname__


def _frozen_base(cls: type) -> Optional[type]:
    """The frozen class ``cls`` is or derives from, or None."""
    return next((c for c in cls.__mro__ if _frozen_key(c) in FROZEN_CLASSES), None)


def is_frozen_batchnorm(module) -> bool:
    """True for a torchvision ``FrozenBatchNorm2d`` or a timm ``FrozenBatchNormAct2d``: the
    classes themselves, whose forward is known."""
    return _frozen_key(type(module)) in FROZEN_CLASSES


def computes_frozen_affine(module) -> bool:
    """True for a frozen BatchNorm that computes exactly :func:`frozen_affine`: no hooks, no
    forward assigned on the instance, and (timm's) its ``drop`` and ``act`` hook-free ``nn.Identity``."""
    if not is_frozen_batchnorm(module) or not runs_its_class_forward(module):
        return False
    extras = [getattr(module, name) for name in ("drop", "act") if hasattr(module, name)]
    return all(type(m) is nn.Identity and runs_its_class_forward(m) for m in extras)


def frozen_affine(module: nn.Module, x: Tensor) -> Tensor:
    """The frozen BatchNorm's own math (torchvision's and timm's forward, op for op)."""
    w = module.weight.reshape(1, -1, 1, 1)
    b = module.bias.reshape(1, -1, 1, 1)
    rv = module.running_var.reshape(1, -1, 1, 1)
    rm = module.running_mean.reshape(1, -1, 1, 1)
    scale = w * (rv + module.eps).rsqrt()
    bias = b - rm * scale
    return x * scale + bias


def _runs_fused(module: nn.Module, x: Tensor) -> bool:
    """True where the fused op computes what ``frozen_affine`` would, dtype included: the Triton
    path, a 4-d input of the buffers' dtype and device (a bf16 input would promote to fp32)."""
    if not isinstance(x, Tensor) or x.dim() != 4 or not backend.use_triton(x):
        return False
    return all(t.dtype == x.dtype and t.device == x.device
               for t in (module.weight, module.bias, module.running_mean, module.running_var))


def _eval_arguments(module: nn.Module, prefix: str = "") -> dict:
    """The fused op's arguments for an eval-mode BatchNorm with the frozen module's buffers."""
    return {f"{prefix}running_mean": module.running_mean, f"{prefix}running_var": module.running_var,
            f"{prefix}weight": module.weight, f"{prefix}bias": module.bias, f"{prefix}momentum": 0.0,
            f"{prefix}eps": module.eps}


class _FusedFrozen:
    """What the fused frozen BatchNorms share (built from an existing module by
    :func:`fused_frozen_batchnorm`, sharing its buffers)."""

    applies_relu = True


class _FrozenReLU(_FusedFrozen):
    """``relu(frozen_bn(x))``: ``fused_resnet.bn_relu`` in eval mode on the Triton path."""

    def forward(self, input: Tensor) -> Tensor:
        if _runs_fused(self, input):
            return bn_relu(input, training=False, **_eval_arguments(self))
        return torch.relu(frozen_affine(self, input))


class _FrozenAddReLU(_FusedFrozen):
    """``relu(frozen_bn(x) + residual)``, or with the shortcut's own frozen BatchNorm as
    ``residual_bn``, ``relu(frozen_bn(x) + residual_bn(residual))``, in one op on the Triton path."""

    def forward(self, input: Tensor, residual: Tensor, residual_bn: Optional[nn.Module] = None) -> Tensor:
        if residual_bn is not None and not computes_frozen_affine(residual_bn):
            residual, residual_bn = residual_bn(residual), None
        if (_runs_fused(self, input) and residual_matches(residual, input)
                and (residual_bn is None or _runs_fused(residual_bn, residual))):
            if residual_bn is None:
                return bn_add_relu(input, residual, training=False, **_eval_arguments(self))
            return bn_add_bn_relu(input, residual, training=False, r_training=False, **_eval_arguments(self),
                                  **_eval_arguments(residual_bn, "r_"))
        shortcut = residual if residual_bn is None else frozen_affine(residual_bn, residual)
        return torch.relu(frozen_affine(self, input) + shortcut)


def _fused_class(base: type, add: bool) -> type:
    """The fused subclass of the frozen class ``base``, built once."""
    if (base, add) not in _BUILT:
        name = FROZEN_CLASSES[_frozen_key(base)][add]
        cls = type(name, (_FrozenAddReLU if add else _FrozenReLU, base),
                   {"__module__": __name__, "__qualname__": name, "__doc__": (_FrozenAddReLU if add else _FrozenReLU).__doc__})
        _BUILT[(base, add)] = cls
    return _BUILT[(base, add)]


def fused_frozen_batchnorm(module: nn.Module, add: bool = False) -> nn.Module:
    """``module`` (a frozen BatchNorm, see :func:`is_frozen_batchnorm`) as its fused subclass:
    ``forward(x)`` applies the ReLU, or with ``add``, ``forward(x, residual, residual_bn=None)``
    adds the residual first. The buffers are the same tensors."""
    base = _frozen_base(type(module))
    if base is None:
        raise TypeError(f"module must be a torchvision FrozenBatchNorm2d or timm FrozenBatchNormAct2d, "
                        f"got {type(module).__name__}")
    return module_rebuilt_as(_fused_class(base, add), module)


def __getattr__(name: str) -> type:
    """The fused classes by name (pickle finds them here): built from their frozen class on first use."""
    for (module_name, class_name), names in FROZEN_CLASSES.items():
        if name in names:
            base = getattr(importlib.import_module(module_name), class_name)
            return _fused_class(base, names.index(name) == 1)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
