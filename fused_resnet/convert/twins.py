"""Step 4a: swap whole modules. A residual block whose forward matches a fused twin becomes
that twin (its submodules kept); timm's ``BatchNormAct2d`` with a ReLU becomes a
``BatchNormReLU2d`` with the same state_dict."""
from __future__ import annotations

from typing import Dict, Optional, Set

from torch import nn

from ..nn.batchnorm import has_hooks
from ..nn.frozen_batchnorm import is_frozen_batchnorm
from ..nn.blocks import FusedBasicBlock, FusedBottleneck, FusedConvBottleneck, FusedResidual, is_conv_bn_shortcut
from ..nn.matching import BlockMatch, match_residual_block, trace_forward
from .modules import (batchnorm_act_blocker, fused_norm, has_sync_batchnorm, is_batchnorm_act, is_library_leaf, is_within,
                      join)
from .report import ConversionReport
from .trace import Analysis

__all__ = ["TWINS", "replace_batchnorm_acts", "replace_twins"]

# The fused twins, tried in this order against a matched block's attribute names.
TWINS = (FusedBasicBlock, FusedBottleneck, FusedResidual)


def replace_twins(root: nn.Module, analysis: Analysis, report: ConversionReport,
                  fuse_convolutions: bool) -> nn.Module:
    """``root`` with every block that has a fused twin replaced by it; returns the model to use."""

    def visit(module: nn.Module, name: str) -> nn.Module:
        if is_library_leaf(module):
            return module
        if any(type(child) is nn.BatchNorm2d for child in module.children()):
            twin = _twin_of(module, name, analysis, report, fuse_convolutions)
            if twin is not None:
                return twin
        for child_name, child in list(module.named_children()):
            new = visit(child, join(name, child_name))
            if new is not child:
                setattr(module, child_name, new)
        return module

    return visit(root, "")


def _twin_of(module: nn.Module, name: str, analysis: Analysis, report: ConversionReport,
             fuse_convolutions: bool) -> Optional[nn.Module]:
    """The fused twin that computes what ``module`` computes, with its submodules, or None."""
    if has_hooks(module) or id(module) in analysis.pinned:
        return None
    traced = trace_forward(module)
    if isinstance(traced, str) or traced.side_effect:
        return None
    match = match_residual_block(module, traced.graph)
    if not isinstance(match, BlockMatch):
        return None
    for child in module.modules():
        if child is module:
            continue
        if id(child) in analysis.pinned or has_hooks(child):
            return None
        # Called from a forward outside the block (``parent.block.bn1(x)``): it must keep its class.
        if any(not is_within(caller, name) for caller in analysis.callers.get(id(child), ())):
            return None
    twin = _twin_class(module, match)
    if twin is None:
        return None
    gemm_note = ""
    if fuse_convolutions and twin is FusedBottleneck:
        if has_sync_batchnorm(module):
            gemm_note = "; 1x1-convolution GEMMs not used: SyncBatchNorm stays on this path"
        else:
            twin = FusedConvBottleneck
            gemm_note = "; 1x1-convolution GEMMs on channels_last Triton inputs, NCHW and the CPU path run FusedBottleneck's"
    fused = twin.from_block(module, verify=False)
    if list(fused.state_dict().keys()) != list(module.state_dict().keys()):
        return None
    shortcut = getattr(fused, twin.shortcut_name)
    how = ("shortcut BatchNorm fused" if is_conv_bn_shortcut(shortcut)
           else "identity shortcut" if shortcut is None else f"shortcut '{twin.shortcut_name}'")
    report.add(name, "replaced", f"{type(module).__name__} -> {twin.__name__} ({how}{gemm_note})")
    return fused


def _twin_class(module: nn.Module, match: BlockMatch) -> Optional[type]:
    """The fused class with this block's attribute names, or None."""
    candidates = [twin for twin in TWINS
                  if match.stage_names == twin.stages and match.shortcut_name in (None, twin.shortcut_name)]
    for twin in candidates:
        # An identity shortcut needs the twin's shortcut attribute to be None on the block
        # too: a twin would apply a module the block's forward leaves unused.
        if match.shortcut_name is not None or getattr(module, twin.shortcut_name, 0) is None:
            return twin
    return None


def replace_batchnorm_acts(root: nn.Module, report: ConversionReport, reported: Set[int]) -> None:
    """Every timm ``BatchNormAct2d`` (``FrozenBatchNormAct2d``) whose act is a ReLU (and drop a
    no-op) -> ``BatchNormReLU2d`` (its fused frozen subclass); the ones left are reported and
    added to ``reported``."""
    replaced: Dict[int, nn.Module] = {}
    for parent_name, parent in list(root.named_modules()):
        for child_name, child in list(parent.named_children()):
            with_act = is_batchnorm_act(child) or (is_frozen_batchnorm(child) and isinstance(
                getattr(child, "act", None), nn.Module) and isinstance(getattr(child, "drop", None), nn.Module))
            if not with_act or type(child.act) is not nn.ReLU:
                continue
            name = join(parent_name, child_name)
            if id(child) not in replaced:
                blocker = batchnorm_act_blocker(child)
                if blocker is not None:
                    if id(child) not in reported:
                        report.add(name, "skipped", f"{type(child).__name__} left as it is: {blocker}")
                        reported.add(id(child))
                    continue
                replaced[id(child)] = fused_norm(child, add=False)
                report.add(name, "fused", f"{type(child).__name__} -> {type(replaced[id(child)]).__name__} "
                                          "(its act, a ReLU, fused)")
            setattr(parent, child_name, replaced[id(child)])
