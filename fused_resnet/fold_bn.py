"""``fold_bn(model)``: fold each eval-mode BatchNorm into the convolution before it.

In eval mode a BatchNorm is an affine map per channel, so ``bn(conv(x))`` is one
convolution with a rescaled weight and a new bias. What is left of each BatchNorm tail
is its ReLU (one pass, :class:`FoldedBatchNormReLU`) or its shortcut add + ReLU (one
fused pass, :class:`FoldedBatchNormAddReLU`); a BatchNorm with nothing after it (the
shortcut's own) disappears (``nn.Identity``).

The model is converted first (:func:`fused_resnet.convert`), so blocks are fused twins
that know their (conv, norm) pairs; elsewhere a pair is read from the traced forward:
a ``nn.Conv2d`` whose output only the BatchNorm uses.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .add_relu import add_relu
from .convert import INLINED_ATTRIBUTE, REPORT_ATTRIBUTE, ConversionReport, _set_submodule
from .convert import convert as convert_model
from .nn.batchnorm import BatchNormAddReLU2d, BatchNormReLU2d, has_hooks, residual_matches
from .nn.blocks import _FusedResidualBlock
from .nn.matching import single_input, trace_forward

__all__ = ["FoldedBatchNormAddReLU", "FoldedBatchNormReLU", "fold_bn"]

# The BatchNorms fold_bn folds (exact types: a subclass may compute something else).
FOLDABLE_NORMS = (nn.BatchNorm2d, BatchNormReLU2d, BatchNormAddReLU2d)


class FoldedBatchNormReLU(nn.Module):
    """A :class:`BatchNormReLU2d` once its BatchNorm is in the convolution before it: a ReLU."""

    applies_relu = True

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, input: Tensor) -> Tensor:
        return torch.relu(input)

    def extra_repr(self) -> str:
        return str(self.num_features)


class FoldedBatchNormAddReLU(nn.Module):
    """A :class:`BatchNormAddReLU2d` once its BatchNorm is folded: ``add_relu(x, residual)``."""

    applies_relu = True

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, input: Tensor, residual: Tensor, residual_bn: Optional[nn.Module] = None) -> Tensor:
        if residual_bn is not None:
            residual = residual_bn(residual)
        if residual_matches(residual, input):
            return add_relu(input, residual)
        return torch.relu(input + residual)  # broadcasting: eager PyTorch's math

    def extra_repr(self) -> str:
        return str(self.num_features)


def folded_norm(norm: nn.Module) -> nn.Module:
    """What takes a folded BatchNorm's place: what it applied after normalising."""
    if type(norm) is BatchNormReLU2d:
        folded = FoldedBatchNormReLU(norm.num_features)
    elif type(norm) is BatchNormAddReLU2d:
        folded = FoldedBatchNormAddReLU(norm.num_features)
    else:
        folded = nn.Identity()
    return folded.train(norm.training)


def _memory_format(t: Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Makes ``conv`` compute ``bn(conv(x))`` with ``bn``'s running statistics.

    PyTorch's ``fuse_conv_bn_weights`` formula, evaluated in float64 and rounded once to
    the convolution's dtype. New Parameters replace ``conv``'s (tied weights elsewhere
    keep theirs).
    """
    def f64(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.detach().double()

    weight, bias = fuse_conv_bn_weights(f64(conv.weight), f64(conv.bias), f64(bn.running_mean),
                                        f64(bn.running_var), bn.eps, f64(bn.weight), f64(bn.bias))
    old_weight, old_bias = conv.weight, conv.bias
    conv.weight = nn.Parameter(weight.to(dtype=old_weight.dtype, memory_format=_memory_format(old_weight)),
                               requires_grad=old_weight.requires_grad)
    conv.bias = nn.Parameter(bias.to(old_bias.dtype if old_bias is not None else old_weight.dtype),
                             requires_grad=(old_bias if old_bias is not None else old_weight).requires_grad)


def _why_not_foldable(conv: nn.Module, norm: nn.Module) -> Optional[str]:
    if type(norm) not in FOLDABLE_NORMS:
        return f"it is a {type(norm).__name__}, not a BatchNorm2d"
    if type(conv) is not nn.Conv2d:
        return f"it follows {type(conv).__name__}, not an nn.Conv2d"
    if norm.running_mean is None or norm.running_var is None:
        return "it has no running statistics (it normalises with batch statistics even in eval)"
    if has_hooks(conv) or has_hooks(norm):
        return "it or its convolution has hooks"
    return None


def _traced_pairs(module: nn.Module, pinned: set) -> Tuple[List[Tuple[str, str]], Optional[str]]:
    """(conv, norm) children of ``module`` whose conv output only the norm uses, from its forward."""
    traced = trace_forward(module)
    if isinstance(traced, str):
        return [], f"{type(module).__name__}: {traced}"
    calls: Dict[str, int] = {}
    # Children whose forward convert inlined into this one: their modules are called from here only.
    inlined = set(getattr(module, INLINED_ATTRIBUTE, ()))
    for node in traced.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            calls[node.target] = calls.get(node.target, 0) + 1
            if "." in node.target and node.target.rpartition(".")[0] not in inlined:
                # Reached inside a child: that module must keep its meaning.
                try:
                    pinned.add(id(module.get_submodule(node.target)))
                except AttributeError:
                    pass
    pairs = []
    for node in traced.graph.nodes:
        if node.op != "call_module" or type(module.get_submodule(node.target)) not in FOLDABLE_NORMS:
            continue
        conv = node.args[0] if node.args else None
        if (isinstance(conv, torch.fx.Node) and conv.op == "call_module" and len(conv.users) == 1
                and single_input(conv) is not None and "." not in conv.target and "." not in node.target
                and calls[conv.target] == 1 and calls[node.target] == 1):
            pairs.append((conv.target, node.target))
    return pairs, None


def _check_eval(model: nn.Module) -> None:
    training = [name or "(model)" for name, m in model.named_modules()
                if m.training and (m is model or isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)))]
    if training:
        raise RuntimeError(
            f"fold_bn: fusion only for eval (as torch.nn.utils.fusion.fuse_conv_bn_eval): {', '.join(training[:4])}"
            f"{' ...' if len(training) > 4 else ''} in training mode; call model.eval() first")


def fold_bn(model: nn.Module, *, inplace: bool = True, verbose: bool = False) -> nn.Module:
    """Folds every foldable BatchNorm of an eval-mode ``model`` into the convolution before it.

    ``model`` is converted first (:func:`fused_resnet.convert`); then each BatchNorm whose
    input is an ``nn.Conv2d`` output used by nothing else is folded into that
    convolution's weight and bias (float64 arithmetic, rounded once), and replaced by
    what it applied after normalising: nothing, a ReLU, or the fused add + ReLU.
    BatchNorms it cannot fold are left as they are and listed, with the reason, in
    ``model.fused_resnet_report``.

    Args:
        model: an ``nn.Module`` in eval mode.
        inplace: fold ``model`` itself (default) or a deep copy.
        verbose: print the report.

    Returns:
        The folded model (use the returned object, as with :func:`fused_resnet.convert`).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        RuntimeError: ``model``, or one of its convolutions or BatchNorms, is in training
            mode. Folding is only exact with fixed running statistics; PyTorch's
            ``fuse_conv_bn_eval`` refuses the same case.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_eval(model)
    if not inplace:
        model = copy.deepcopy(model)
    model = convert_model(model, inplace=True)
    report: ConversionReport = getattr(model, REPORT_ATTRIBUTE)
    counts: Dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    pinned = {key for key, count in counts.items() if count > 1}

    candidates: List[Tuple[str, nn.Module, List[Tuple[str, str]]]] = []
    unfoldable: Dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, _FusedResidualBlock):
            candidates.append((name, module, module.conv_norm_pairs()))
        elif any(type(child) in FOLDABLE_NORMS for child in module.children()):
            pairs, reason = _traced_pairs(module, pinned)
            candidates.append((name, module, pairs))
            for child in module.children():
                if reason is not None:
                    unfoldable.setdefault(id(child), reason)

    folded_ids = set()
    for name, module, pairs in candidates:
        done = []
        for conv_path, norm_path in pairs:
            conv, norm = module.get_submodule(conv_path), module.get_submodule(norm_path)
            if id(norm) in folded_ids:
                continue
            reason = ("it or its convolution is also used elsewhere" if {id(conv), id(norm)} & pinned
                      else _why_not_foldable(conv, norm))
            if reason is not None:
                unfoldable[id(norm)] = reason
                continue
            fold_into_conv(conv, norm)
            _set_submodule(module, norm_path, folded_norm(norm))
            folded_ids.add(id(norm))
            done.append(f"{norm_path} into {conv_path}")
        if done:
            report.add(name, "folded", ", ".join(done))

    for name, module in model.named_modules():
        if type(module) in FOLDABLE_NORMS:
            reason = unfoldable.get(id(module), "no nn.Conv2d before it whose output only it uses")
            report.add(name, "skipped", f"BatchNorm not folded: {reason}")
    if verbose:
        print(report)
    return model
