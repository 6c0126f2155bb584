"""Fused BatchNorm tails with statistics synchronised across processes (``nn.SyncBatchNorm``).

- :class:`SyncBatchNormReLU2d`: ``relu(nn.SyncBatchNorm(x))``.
- :class:`SyncBatchNormAddReLU2d`: ``relu(nn.SyncBatchNorm(x) + residual)``, or, given the
  shortcut's own BatchNorm (``nn.SyncBatchNorm`` or ``nn.BatchNorm2d``) as ``residual_bn``,
  ``relu(bn(x) + residual_bn(residual))`` with both statistics gathered in ONE collective.
- :class:`SyncBatchNorm2d`: ``nn.SyncBatchNorm`` for (N, C, H, W) input without the ReLU,
  on any device: what a converted model's other BatchNorm2d (the shortcut's, which the
  fused tail computes) become, so that DDP accepts the model on CPU / gloo too (DDP
  refuses any ``nn.SyncBatchNorm`` in a CPU module).
- :func:`convert_sync_batchnorm`: what ``nn.SyncBatchNorm.convert_sync_batchnorm`` does,
  for models holding the fused modules (use it instead of torch's, which would turn a
  ``BatchNormReLU2d`` into an ``nn.SyncBatchNorm`` and lose its ReLU).

They are the fused modules of :mod:`fused_resnet.nn.batchnorm` (so ``nn.BatchNorm2d``
subclasses with the same parameters, buffers and state_dict keys) with
``nn.SyncBatchNorm``'s constructor (``process_group``) and behaviour: statistics are
synchronised in training only, across ``process_group`` (None: the whole world); in eval,
outside an initialised process group, or with one process, they are the single-process
modules. Unlike ``nn.SyncBatchNorm`` they also run on CPU tensors (gloo).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..kernels import RESIDUAL_ADD, RESIDUAL_BN, RESIDUAL_NONE
from ..sync_batchnorm import resolve_group, sync_batch_norm_add_relu, sync_world_size
from .batchnorm import BatchNormAddReLU2d, BatchNormReLU2d, FusedBatchNorm2d, batch_norm_arguments, has_hooks

__all__ = ["SyncBatchNorm2d", "SyncBatchNormAddReLU2d", "SyncBatchNormReLU2d", "convert_sync_batchnorm"]


def _matches(residual: Any, input: Tensor) -> bool:
    """True when the fused op can take ``residual`` as it is (no broadcast, no promotion)."""
    return (isinstance(residual, Tensor) and residual.shape == input.shape
            and residual.dtype == input.dtype and residual.device == input.device)


class _SyncMixin:
    """``nn.SyncBatchNorm``'s constructor, checks and ``process_group`` for the fused modules."""

    # process_group: a ProcessGroup or None (no class annotation: TorchScript would try to type it)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[Any] = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        kwargs = {} if bias else {"bias": False}  # torch versions without the keyword still build
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **kwargs)
        self.process_group = process_group

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, process_group: Optional[Any] = None):
        """A ``cls`` computing with ``bn``'s own parameters and buffers, synchronised over
        ``process_group`` (None: the whole world)."""
        fused = super().from_batchnorm(bn)
        fused.process_group = process_group
        return fused

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def scripted_batch_norm(self, input: Tensor) -> Tensor:
        # TorchScript cannot run the collectives: a scripted module would silently use local statistics.
        if self.training:
            raise RuntimeError("a scripted fused SyncBatchNorm module cannot synchronise statistics in training: "
                               "script the model in eval mode, or before convert_sync_batchnorm")
        return self.batch_norm_forward(input)

    def _syncs(self) -> bool:
        """True when this forward synchronises statistics (nn.SyncBatchNorm's need_sync)."""
        return self.training and sync_world_size(self.process_group) > 1

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.process_group is None else f", process_group={self.process_group}")


class SyncBatchNormReLU2d(_SyncMixin, BatchNormReLU2d):
    """``relu(nn.SyncBatchNorm(x))`` for (N, C, H, W) input, in one fused op.

    Same constructor as :class:`torch.nn.SyncBatchNorm`; same parameters, buffers and
    state_dict keys as :class:`torch.nn.BatchNorm2d`. Every process of the group must call
    it in training (one ``all_gather`` forward, one ``all_reduce`` backward).
    """

    @torch.jit.unused
    def _fused_forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        return sync_batch_norm_add_relu(input, None, RESIDUAL_NONE, batch_norm_arguments(self),
                                        sync=self.training, process_group=self.process_group)


class SyncBatchNorm2d(_SyncMixin, FusedBatchNorm2d):
    """``nn.SyncBatchNorm`` for (N, C, H, W) input, on CUDA and CPU tensors alike.

    Same constructor as :class:`torch.nn.SyncBatchNorm`, same parameters, buffers and
    state_dict keys as :class:`torch.nn.BatchNorm2d` (of which it is a subclass, not of
    ``nn.SyncBatchNorm``: DDP refuses those in a CPU module). In training with 2+
    processes the statistics are synchronised as in the fused modules (one
    ``all_gather`` forward, one ``all_reduce`` backward); otherwise it is
    ``nn.BatchNorm2d``'s own forward. :class:`SyncBatchNormAddReLU2d` takes it as the
    shortcut's BatchNorm and synchronises both in one collective.
    """

    applies_relu = False

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self.scripted_batch_norm(input)
        return self._synchronised_forward(input)

    @torch.jit.unused
    def _synchronised_forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if not self._syncs():
            return self.batch_norm_forward(input)
        return sync_batch_norm_add_relu(input, None, RESIDUAL_NONE, batch_norm_arguments(self), sync=True,
                                        process_group=self.process_group, relu=False)


# The shortcut BatchNorms a SyncBatchNormAddReLU2d computes in its own op (synchronised or not).
_SHORTCUT_BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, SyncBatchNorm2d)


class SyncBatchNormAddReLU2d(_SyncMixin, BatchNormAddReLU2d):
    """``relu(nn.SyncBatchNorm(x) + residual)`` in one fused op.

    With ``residual_bn`` (the shortcut's BatchNorm, e.g. ``downsample[1]`` of a
    torchvision block, an ``nn.SyncBatchNorm`` after :func:`convert_sync_batchnorm`) it
    computes ``relu(self(x) + residual_bn(residual))`` in one op, honouring
    ``residual_bn``'s own training mode, running statistics, momentum and eps; an
    ``nn.SyncBatchNorm`` shortcut is synchronised in the same collective as this one, a
    plain ``nn.BatchNorm2d`` one keeps its local statistics, as its own forward would.
    """

    @staticmethod
    def can_fuse_residual_bn(residual_bn: Any) -> bool:
        """True for a shortcut BatchNorm this module computes itself (its math is known)."""
        return type(residual_bn) in _SHORTCUT_BATCHNORMS and not has_hooks(residual_bn)

    @torch.jit.unused
    def _fused_forward(self, input: Tensor, residual: Tensor, residual_bn: Optional[nn.Module]) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if residual_bn is not None and not isinstance(residual_bn, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"residual_bn must be an nn.BatchNorm2d, an nn.SyncBatchNorm or None, "
                            f"got {type(residual_bn).__name__}")
        r_sync = False
        if residual_bn is not None and self.can_fuse_residual_bn(residual_bn):
            r_sync = (isinstance(residual_bn, (nn.SyncBatchNorm, SyncBatchNorm2d)) and residual_bn.training
                      and sync_world_size(residual_bn.process_group) > 1)
            if r_sync and self._syncs() and (resolve_group(residual_bn.process_group)
                                              is not resolve_group(self.process_group)):
                # Two process groups cannot share one collective: the shortcut runs its own forward.
                r_sync = False
                residual, residual_bn = residual_bn(residual), None
        elif residual_bn is not None:
            # A subclass or a hooked module: only its own forward knows what it computes.
            residual, residual_bn = residual_bn(residual), None

        args = batch_norm_arguments(self)
        if not _matches(residual, input):
            # Broadcasting or type promotion: the un-fused nn.SyncBatchNorm -> add -> ReLU.
            out = sync_batch_norm_add_relu(input, None, RESIDUAL_NONE, args, sync=self.training,
                                           process_group=self.process_group, relu=False)
            return torch.relu(out + (residual if residual_bn is None else residual_bn(residual)))
        if residual_bn is None:
            return sync_batch_norm_add_relu(input, residual, RESIDUAL_ADD, args, sync=self.training,
                                            process_group=self.process_group)
        residual_bn._check_input_dim(residual)
        # The collective runs over this module's group, or the shortcut's when only it synchronises.
        group = residual_bn.process_group if (r_sync and not self._syncs()) else self.process_group
        return sync_batch_norm_add_relu(input, residual, RESIDUAL_BN, args, batch_norm_arguments(residual_bn),
                                        sync=self.training, r_sync=r_sync, process_group=group)


def _sync_twin(cls: type, module: nn.modules.batchnorm._BatchNorm, process_group: Optional[Any]) -> nn.Module:
    """A new ``cls`` holding ``module``'s parameters and buffers, as torch's converter builds one."""
    out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
              process_group)
    if module.affine:
        with torch.no_grad():
            out.weight = module.weight
            out.bias = module.bias
    out.running_mean = module.running_mean
    out.running_var = module.running_var
    out.num_batches_tracked = module.num_batches_tracked
    out.training = module.training
    if hasattr(module, "qconfig"):
        out.qconfig = module.qconfig
    return out


def convert_sync_batchnorm(module: nn.Module, process_group: Optional[Any] = None) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` for models holding fused modules.

    Every :class:`~fused_resnet.nn.BatchNormAddReLU2d` becomes a
    :class:`SyncBatchNormAddReLU2d`, every :class:`~fused_resnet.nn.BatchNormReLU2d` a
    :class:`SyncBatchNormReLU2d`, every other ``BatchNorm2d`` (a shortcut's, which the
    fused tail computes) a :class:`SyncBatchNorm2d`, which DDP accepts on CPU too, and
    every other ``BatchNorm*D`` an ``nn.SyncBatchNorm``, as torch's converter does. The new
    modules hold the same Parameter and buffer objects (so ``requires_grad`` and an optimizer built before stay valid), the
    training mode and the ``qconfig``; synchronisation is over ``process_group`` (None: the
    whole world). Returns ``module`` converted in place, or the new module when
    ``module`` itself is a BatchNorm.
    """
    out = module
    if isinstance(module, BatchNormAddReLU2d):
        out = _sync_twin(SyncBatchNormAddReLU2d, module, process_group)
    elif isinstance(module, BatchNormReLU2d):
        out = _sync_twin(SyncBatchNormReLU2d, module, process_group)
    elif isinstance(module, nn.BatchNorm2d):
        out = _sync_twin(SyncBatchNorm2d, module, process_group)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        out = _sync_twin(nn.SyncBatchNorm, module, process_group)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out
