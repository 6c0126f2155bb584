"""``convert(model)``: swap a ResNet's BatchNorm / add / ReLU tails for fused ops, in place.

What it does:

1. **Whole blocks.** A block whose own forward (traced with torch.fx, every child a leaf)
   computes ``relu(bn_k(conv_k(...relu(bn_1(conv_1(x)))...)) + s)``, with ``s`` the input or
   one module applied to it, and whose attribute names are torchvision's (``conv1``,
   ``bn1``, ..., ``downsample``) or the d2l ``Residual``'s (``conv3`` shortcut), is
   replaced by its fused twin (:class:`FusedBasicBlock`, :class:`FusedBottleneck`,
   :class:`FusedResidual`), keeping its submodules.
2. **timm's** ``BatchNormAct2d`` (a BatchNorm2d subclass applying its own ``drop`` and
   ``act``) with a ReLU and no dropout becomes a :class:`BatchNormReLU2d` with the same
   state_dict (its ``drop`` / ``act`` stay registered).
3. **Every other tail, across module boundaries.** Each module's forward is traced with
   its children inlined down to the leaves (convolutions, BatchNorms, activations, and
   any module that cannot or must not be traced: hooks, data-dependent control flow, a
   forward that depends on ``self.training`` in Python, prints or writes attributes; a
   call passing Python values, a default or a list of tensors is judged by the forward as
   that call runs it). The BatchNorms are ``nn.BatchNorm2d``, timm's ``BatchNormAct2d``
   without act, and frozen ones (torchvision's ``FrozenBatchNorm2d``, timm's
   ``FrozenBatchNormAct2d``: eval-statistics tails in a training model, see
   :mod:`fused_resnet.nn.frozen_batchnorm`). In that graph it finds, through hook-free ``nn.Identity`` / ``Dropout(p=0)`` calls and
   DropPath(0)-style no-ops, in-place or not:

   - ``bn -> relu``                       -> :class:`BatchNormReLU2d`
   - ``bn -> add(r) -> relu``, the BatchNorm on either operand -> :class:`BatchNormAddReLU2d`
   - ``bn(a) + bn_r(b) -> relu``          -> :class:`BatchNormAddReLU2d` with ``residual_bn``
   - ``a + b -> relu`` with no BatchNorm  -> ``fused_resnet.add_relu``
   - of a longer sum, the last add with the ReLU and one BatchNorm operand.

   A ``bn -> relu`` whose ReLU is an ``nn.ReLU`` called once is fused by swapping modules
   (the BatchNorm applies the ReLU, the ReLU becomes ``nn.Identity``), the forwards
   untouched. Every other tail is fused by rewriting the forward of the innermost module
   whose forward contains all of it as a ``torch.fx.GraphModule``: the inlined children
   stay registered (the same objects, so ``named_modules()`` and the state_dict keys are
   unchanged) and the new graph calls their leaves directly.
4. Anything it cannot prove equivalent is left exactly as it was, and the report says
   why: a BatchNorm output or a sum read by anything but the tail, a module used in more
   than one place, hooks, an add that writes in place into a tensor seen elsewhere, an
   input that could change before the moved BatchNorm runs or whose gradient sum a move
   would reorder, a forward torch.fx cannot trace.

Parameters and buffers are the same tensor objects before and after (nothing is
re-initialised or copied), so train/eval mode, device, dtype and memory format are
kept, and an optimizer built before the conversion keeps working.

The :class:`ConversionReport` lists every replaced, fused and skipped module with the
reason; it is attached to the returned model as ``model.fused_resnet_report`` and
printed with ``verbose=True``.

The steps, one file each, in the order they run: :mod:`.trace` (the model as regions,
children inlined), :mod:`.tails` (the tails of each region's graph), :mod:`.operands` (may
this operand be fused?), :mod:`.twins` and :mod:`.rewrite` (swap modules, rewrite forwards),
:mod:`.leftovers` and :mod:`.report` (what was left, and why).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Set

from torch import nn

from ..nn.matching import describe, submodule, trace_forward, twin_mismatch
from .leftovers import SeenBatchNorm, report_unfused
from .modules import fused_add_relu, is_batchnorm_act, is_norm, join, set_submodule
from .report import REPORT_ATTRIBUTE, ConversionReport, ReportEntry
from .rewrite import INLINED_ATTRIBUTE, Plans, Rewriter, merged
from .tails import find_tails
from .trace import OWNERS, ModuleKinds
from .twins import replace_batchnorm_acts, replace_twins

__all__ = ["ConversionReport", "ReportEntry", "convert", "fused_add_relu", "is_batchnorm_act",
           "trace_forward", "twin_mismatch"]

# fold_bn imports INLINED_ATTRIBUTE, REPORT_ATTRIBUTE and this from here.
_set_submodule = set_submodule


def _run(model: nn.Module, report: ConversionReport, fuse_convolutions: bool) -> nn.Module:
    """Twins, then BatchNormAct2d, then every tail the traces find; returns the model to use."""
    kinds = ModuleKinds()
    reported: Set[int] = set()
    # Who calls what: a twin must not lose a BatchNorm called from outside its block.
    model = replace_twins(model, kinds.analyze(model), report, fuse_convolutions)
    replace_batchnorm_acts(model, report, reported)
    analysis = kinds.analyze(model)
    rewriter = Rewriter(model, analysis, kinds, report)
    plans: Plans = {}
    unfusable: Dict[int, str] = {}
    batchnorms: List[SeenBatchNorm] = []
    for region in analysis.regions:
        found = find_tails(analysis, region.root, region.graph)
        for key, reason in found.reasons.items():
            unfusable.setdefault(key, reason)
        for add, reason in found.unfused_adds:
            owner = add.meta.get(OWNERS, ())
            owner_path = join(region.path, owner[-1]) if owner else region.path
            owner_module = model.get_submodule(owner_path) if owner_path else model
            report.add(owner_path, "skipped", f"{type(owner_module).__name__}: {describe(add)} -> ReLU "
                                              f"left unfused: {reason}")
        for node in region.graph.nodes:
            module = submodule(region.root, node)
            if is_norm(module):
                batchnorms.append((join(region.path, node.target), module, node, region))
        for tail in found.tails:
            if rewriter.module_swap(region, tail):
                continue
            plan = rewriter.rewrite_root(region, tail)
            if isinstance(plan, str):
                for bn in (tail.bn, tail.residual_bn):
                    if bn is not None:
                        unfusable[id(submodule(region.root, bn))] = plan
                continue
            path, inline = plan
            planned = plans.setdefault(path, (set(), []))
            planned[0].update(inline)
            planned[1].append(tail)
    for path, (inline, planned) in merged(plans):
        rewriter.rewrite(path, inline, len(planned))
    report_unfused(report, batchnorms, analysis.opaque, unfusable, rewriter.fused, reported)
    return rewriter.root


def convert(model: nn.Module, *, inplace: bool = True, verbose: bool = False,
            fuse_convolutions: bool = False) -> nn.Module:
    """Swaps ``model``'s residual blocks and BatchNorm / add / ReLU tails for fused modules.

    Args:
        model: any ``nn.Module`` (a torchvision / timm / transformers / hand-written ResNet).
        inplace: convert ``model`` itself (default) or a deep copy of it.
        verbose: print the conversion report.
        fuse_convolutions: Bottleneck blocks become ``FusedConvBottleneck`` (conv1, conv3 and
            the downsample as Triton GEMMs with BatchNorm fused in; off by default until GPU
            figures show it faster). NCHW inputs and the CPU path run ``FusedBottleneck``'s
            path; blocks with SyncBatchNorm stay ``FusedBottleneck`` (the report says so).

    Returns:
        The converted model: ``model`` itself, except when the root module's own forward
        had to be rewritten with torch.fx (then a ``torch.fx.GraphModule`` with the same
        submodules; always use the returned model). Its report is
        ``model.fused_resnet_report`` (a :class:`ConversionReport`).

    The converted model computes what the original computed, forward and backward,
    in train and eval mode, and keeps its parameters (the same tensors), buffers,
    state_dict keys, mode, device, dtype and memory format. See the module docstring
    for what is fused and what is left alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(fuse_convolutions, bool):
        raise TypeError(f"fuse_convolutions must be a bool, got {type(fuse_convolutions).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    converted = _run(model, report, fuse_convolutions)
    setattr(converted, REPORT_ATTRIBUTE, report)
    if verbose:
        print(report)
    return converted
