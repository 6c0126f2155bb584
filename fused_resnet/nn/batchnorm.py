"""``nn.BatchNorm2d`` subclasses whose forward ends in a ReLU (and a shortcut add).

- :class:`BatchNormReLU2d`: ``relu(bn(x))``.
- :class:`BatchNormAddReLU2d`: ``relu(bn(x) + residual)``, or, given the shortcut's own
  plain ``nn.BatchNorm2d`` as ``residual_bn``, ``relu(bn(x) + residual_bn(residual))``
  in one fused op.

Both keep ``nn.BatchNorm2d``'s constructor, parameters, buffers, state_dict keys and
train/eval behaviour; only ``forward`` differs. A module that fuses the ReLU says so
with the class attribute ``applies_relu = True``, which the fused blocks read (and, for
TorchScript, which sees methods but not class attributes, the method
``scripted_applies_relu``). Under ``torch.jit.script`` their forward is the eager
sequence (``nn.BatchNorm2d.forward``, the add, ``torch.relu``).
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bn_add_relu import bn_add_bn_relu, bn_add_relu, bn_relu

__all__ = ["BatchNormAddReLU2d", "BatchNormReLU2d", "FusedBatchNorm2d", "ShortcutNorm", "batch_norm_arguments", "has_hooks", "is_plain_batchnorm",
           "plain_batchnorm", "residual_matches"]

_BN = TypeVar("_BN", bound="FusedBatchNorm2d")


def has_hooks(module: nn.Module) -> bool:
    """True when ``module`` has hooks that only its own ``__call__`` would run."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks)


def is_plain_batchnorm(module: Any) -> bool:
    """True for an ``nn.BatchNorm2d`` itself (no subclass, no hooks): its math is known."""
    return type(module) is nn.BatchNorm2d and not has_hooks(module)


def plain_batchnorm(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """An ``nn.BatchNorm2d`` (the class itself) computing with ``bn``'s own parameters and buffers.

    For a subclass whose forward computes exactly ``nn.BatchNorm2d``'s (timm's
    ``BatchNormAct2d`` without activation): as the class itself, a fused op knows its
    math and can take it as the shortcut's BatchNorm. Nothing is copied: the Parameter
    and buffer objects, hyper-parameters, mode and registered submodules are shared.
    """
    return rebuilt_as(nn.BatchNorm2d, bn)


def rebuilt_as(cls: type, bn: nn.Module) -> nn.Module:
    """A ``cls`` (an nn.BatchNorm2d class) with ``bn``'s attributes and the same Parameter and
    buffer tensors, in containers of its own: later edits of one module do not reach the other."""
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
    return module_rebuilt_as(cls, bn)


def module_rebuilt_as(cls: type, module: nn.Module) -> nn.Module:
    """:func:`rebuilt_as` for any module (the caller checks that ``cls`` can take its attributes)."""
    out = cls.__new__(cls)
    out.__dict__.update(module.__dict__)
    for name in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
                 "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
        if name in module.__dict__:
            out.__dict__[name] = type(module.__dict__[name])(module.__dict__[name])
    return out


def batch_norm_arguments(bn: nn.modules.batchnorm._BatchNorm) -> Dict[str, Any]:
    """The arguments ``_BatchNorm.forward`` would give ``F.batch_norm``, for the fused ops.

    Mirrors ``torch.nn.modules.batchnorm._BatchNorm.forward``: batch statistics in
    training or without running statistics; running statistics passed only when they
    are used; ``num_batches_tracked`` passed only when training with running statistics
    (the op increments it and reads it for ``momentum=None``).
    """
    # Each buffer read once: a module's buffers and parameters are read through
    # nn.Module.__getattr__, host time on every call.
    training, running_mean, running_var = bn.training, bn.running_mean, bn.running_var
    num_batches_tracked = bn.num_batches_tracked
    bn_training = training or (running_mean is None and running_var is None)
    use_running = not training or bn.track_running_stats
    counts_batches = training and bn.track_running_stats and num_batches_tracked is not None
    momentum = bn.momentum
    if momentum is None and not counts_batches:
        # _BatchNorm's factor when it cannot count batches: the running stats stay as they are.
        momentum = 0.0
    return dict(
        running_mean=running_mean if use_running else None,
        running_var=running_var if use_running else None,
        weight=bn.weight,
        bias=bn.bias,
        training=bn_training,
        momentum=momentum,
        eps=bn.eps,
        num_batches_tracked=num_batches_tracked if counts_batches else None,
    )


class FusedBatchNorm2d(nn.BatchNorm2d):
    """What the fused BatchNorms share: the conversion from an existing BatchNorm2d, and
    ``nn.BatchNorm2d``'s own forward as ``batch_norm_forward``."""

    applies_relu = True

    def batch_norm_forward(self, input: Tensor) -> Tensor:
        """``nn.BatchNorm2d.forward``, line for line (torch's ``_BatchNorm.forward``): the
        scripted forwards call it, since TorchScript cannot compile ``super()`` nor an alias
        of another class's ``forward``."""
        self._check_input_dim(input)
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        bn_training = True if self.training else (self.running_mean is None) and (self.running_var is None)
        return F.batch_norm(input, self.running_mean if not self.training or self.track_running_stats else None,
                            self.running_var if not self.training or self.track_running_stats else None,
                            self.weight, self.bias, bn_training, exponential_average_factor, self.eps)

    def scripted_batch_norm(self, input: Tensor) -> Tensor:
        """The BatchNorm of the scripted forwards (the sync modules refuse training here)."""
        return self.batch_norm_forward(input)

    @classmethod
    def from_batchnorm(cls: type[_BN], bn: nn.BatchNorm2d) -> _BN:
        """A ``cls`` computing with ``bn``'s own parameters and buffers (the same tensors).

        Nothing is copied or re-initialised: the new module shares ``bn``'s Parameter and
        buffer objects (so an optimizer built on ``bn`` keeps working), its
        hyper-parameters, its training mode and its hooks.
        """
        return rebuilt_as(cls, bn)


class ShortcutNorm(nn.Module):
    """TorchScript's type of the ``residual_bn`` argument: a module called on one tensor
    (TorchScript takes no plain module argument; an interface it takes, and calls by
    ``.forward``)."""

    def forward(self, input: Tensor) -> Tensor:
        pass


with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice, at every import
    ShortcutNorm = torch.jit.interface(ShortcutNorm)


class _AppliesReLU:
    """Marks, for TorchScript's ``hasattr``, a module that applies the block's ReLU itself."""

    @torch.jit.export
    def scripted_applies_relu(self) -> bool:
        return True


class BatchNormReLU2d(_AppliesReLU, FusedBatchNorm2d):
    """``relu(nn.BatchNorm2d(x))`` in one fused op (``fused_resnet.bn_relu``).

    Same constructor, parameters, buffers, state_dict keys and train/eval behaviour as
    :class:`torch.nn.BatchNorm2d`.
    """

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return torch.relu(self.scripted_batch_norm(input))
        return self._fused_forward(input)

    @torch.jit.unused
    def _fused_forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return bn_relu(input, **batch_norm_arguments(self))


def residual_matches(residual: Any, input: Tensor) -> bool:
    """True when the fused op can take ``residual`` as it is (no broadcast, no promotion)."""
    return (isinstance(residual, Tensor) and residual.shape == input.shape
            and residual.dtype == input.dtype and residual.device == input.device)


class BatchNormAddReLU2d(_AppliesReLU, FusedBatchNorm2d):
    """``relu(nn.BatchNorm2d(x) + residual)`` in one fused op (``fused_resnet.bn_add_relu``).

    With ``residual_bn`` (the shortcut's own BatchNorm, e.g. ``downsample[1]`` of a
    torchvision block) it computes ``relu(bn(x) + residual_bn(residual))`` in one op
    (``fused_resnet.bn_add_bn_relu``), honouring ``residual_bn``'s own training mode,
    running statistics, momentum and eps, and updating its buffers as its forward would.

    Same constructor, parameters, buffers, state_dict keys and train/eval behaviour as
    :class:`torch.nn.BatchNorm2d`.
    """

    @staticmethod
    def can_fuse_residual_bn(residual_bn: Any) -> bool:
        """True for a shortcut BatchNorm whose math this module computes itself.

        Blocks ask this before passing ``residual_bn``; subclasses (SyncBatchNorm) widen it.
        """
        return is_plain_batchnorm(residual_bn)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None,
                residual_bn: Optional[ShortcutNorm] = None) -> Tensor:
        """``residual`` is required; its default only lets TorchScript compile a container
        that still holds this module after ``convert`` rewrote its parent to call it
        directly. ``residual_bn``: None or the shortcut's BatchNorm."""
        if residual is None:
            raise TypeError("forward() missing required argument 'residual'")
        if torch.jit.is_scripting():
            if residual_bn is not None:
                residual = residual_bn.forward(residual)  # TorchScript calls an interface by its method
            return torch.relu(self.scripted_batch_norm(input) + residual)
        return self._fused_forward(input, residual, residual_bn)

    @torch.jit.unused
    def _fused_forward(self, input: Tensor, residual: Tensor, residual_bn: Optional[nn.Module]) -> Tensor:
        self._check_input_dim(input)
        if residual_bn is not None and not isinstance(residual_bn, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"residual_bn must be an nn.BatchNorm2d or None, got {type(residual_bn).__name__}")
        if residual_bn is not None and not self.can_fuse_residual_bn(residual_bn):
            # A subclass or a hooked module: only its own forward knows what it computes.
            residual, residual_bn = residual_bn(residual), None
        if not residual_matches(residual, input):
            # Broadcasting or type promotion: eager PyTorch's unfused math, exactly.
            out = nn.BatchNorm2d.forward(self, input)
            return torch.relu(out + (residual if residual_bn is None else residual_bn(residual)))
        if residual_bn is None:
            return bn_add_relu(input, residual, **batch_norm_arguments(self))
        residual_bn._check_input_dim(residual)
        shortcut = {f"r_{name}": value for name, value in batch_norm_arguments(residual_bn).items()}
        return bn_add_bn_relu(input, residual, **batch_norm_arguments(self), **shortcut)
