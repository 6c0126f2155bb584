"""What a module is, as the converter sees it: a leaf to keep whole, a no-op, a BatchNorm the
fused modules compute exactly; and the fused ``add + ReLU`` a rewritten graph calls."""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..add_relu import add_relu
from ..nn.batchnorm import BatchNormAddReLU2d, BatchNormReLU2d, residual_matches
from ..nn.blocks import _FusedResidualBlock
from ..nn.frozen_batchnorm import computes_frozen_affine, fused_frozen_batchnorm, is_frozen_batchnorm
from ..nn.matching import is_plain_identity, runs_its_class_forward

__all__ = ["fused_add_relu", "computes_batchnorm2d", "computes_fusable_norm", "fused_norm", "is_norm", "batchnorm_act_blocker", "generic_signature",
           "has_sync_batchnorm", "is_batchnorm_act", "is_library_leaf", "is_noop_module", "passes_graph_values",
           "is_within", "join", "relative", "set_submodule"]

_NOOP_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def fused_add_relu(a, b):
    """``relu(a + b)``: one fused op (``fused_resnet.add_relu``) where the operands allow it
    (two floating-point tensors of one shape, dtype and device), else eager's add and ReLU
    (broadcasting, type promotion), exactly as the original computed it. Scripted, the
    eager sequence (TorchScript cannot compile the op's Python checks)."""
    if torch.jit.is_scripting():
        return torch.relu(a + b)
    return _fused_add_relu_eager(a, b)


@torch.jit.unused
def _fused_add_relu_eager(a, b):
    if isinstance(a, Tensor) and a.is_floating_point() and residual_matches(b, a):
        return add_relu(a, b)
    return torch.relu(a + b)


def is_batchnorm_act(module) -> bool:
    """timm's ``BatchNormAct2d``: BatchNorm2d's forward, then ``self.drop``, then ``self.act``."""
    cls = type(module)
    return (isinstance(module, nn.BatchNorm2d) and cls.__name__ == "BatchNormAct2d"
            and cls.__module__.startswith("timm.") and isinstance(getattr(module, "act", None), nn.Module)
            and isinstance(getattr(module, "drop", None), nn.Module))


def is_noop_module(module: Optional[nn.Module]) -> bool:
    """A call that returns its input unchanged: a hook-free nn.Identity or Dropout(p=0)."""
    if module is None or not runs_its_class_forward(module):
        return False
    return is_plain_identity(module) or (type(module) in _NOOP_DROPOUTS and module.p == 0)


def batchnorm_act_blocker(module: nn.Module) -> Optional[str]:
    """Why a BatchNormAct2d does not compute exactly BatchNorm2d (then its act), or None."""
    if not all(runs_its_class_forward(m) for m in (module, module.act, module.drop)):
        return "it has hooks (or a forward assigned on the instance)"
    if not is_noop_module(module.drop):
        return f"its drop is {type(module.drop).__name__}, not a no-op"
    return None


def computes_batchnorm2d(module: Optional[nn.Module]) -> bool:
    """True for a module that computes exactly ``nn.BatchNorm2d.forward``: a hook-free
    nn.BatchNorm2d, or a BatchNormAct2d without activation and without dropout."""
    if type(module) is nn.BatchNorm2d:
        return runs_its_class_forward(module)
    return (is_batchnorm_act(module) and batchnorm_act_blocker(module) is None
            and is_plain_identity(module.act))


def computes_fusable_norm(module: Optional[nn.Module]) -> bool:
    """A BatchNorm a fused module computes exactly: :func:`computes_batchnorm2d`, or a frozen
    BatchNorm (torchvision's ``FrozenBatchNorm2d``, timm's ``FrozenBatchNormAct2d`` without act)."""
    return computes_batchnorm2d(module) or computes_frozen_affine(module)


def is_norm(module: Optional[nn.Module]) -> bool:
    """A BatchNorm the report speaks of when it is left: BatchNorm2d, BatchNormAct2d, frozen."""
    return type(module) is nn.BatchNorm2d or is_batchnorm_act(module) or is_frozen_batchnorm(module)


def fused_norm(bn: nn.Module, add: bool) -> nn.Module:
    """``bn`` (see :func:`computes_fusable_norm`) as the fused module applying the ReLU, after the
    residual's add with ``add``; the same parameter and buffer tensors."""
    if is_frozen_batchnorm(bn):
        return fused_frozen_batchnorm(bn, add)
    return (BatchNormAddReLU2d if add else BatchNormReLU2d).from_batchnorm(bn)


def is_library_leaf(module: nn.Module) -> bool:
    """torch.nn's own modules (torch.fx's default leaves), fused-resnet's, and every BatchNorm
    (frozen ones included)."""
    name = type(module).__module__
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, _FusedResidualBlock)) or is_frozen_batchnorm(module):
        return True
    if name.startswith("fused_resnet."):
        return True
    return (name.startswith("torch.nn") or name.startswith("torch.ao.nn")) and not isinstance(module, nn.Sequential)


def generic_signature(module: nn.Module) -> bool:
    """True when every parameter of the forward is required: a trace with one placeholder
    per parameter then stands for every call."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)


def passes_graph_values(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """True when a call gives every parameter of ``module.forward`` a traced value (no default,
    no Python constant): the module's own trace then computes what this call computes."""
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return False
    for name, parameter in signature.parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            if bound.arguments.get(name):
                return False
        elif not isinstance(bound.arguments.get(name), fx.Proxy):
            return False
    return True


def has_sync_batchnorm(block: nn.Module) -> bool:
    """Whether a norm in ``block`` is a SyncBatchNorm (fused or not): the GEMM path has no cross-process statistics."""
    from ..nn.sync_batchnorm import _SyncMixin  # here: keeps convert's import graph as it was
    return any(isinstance(m, (nn.SyncBatchNorm, _SyncMixin)) for m in block.modules())


# -- module paths


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def relative(path: str, root: str) -> str:
    return path[len(root) + 1:] if root else path


def is_within(path: str, root: str) -> bool:
    """True when module ``path`` is ``root`` or inside it."""
    return not root or path == root or path.startswith(root + ".")


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
