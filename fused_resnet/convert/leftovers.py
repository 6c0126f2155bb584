"""Step 5: say why each BatchNorm no tail took was left, in the report."""
from __future__ import annotations

from typing import Dict, List, Set, Tuple

import torch.fx as fx
from torch import nn

from ..nn.batchnorm import has_hooks
from ..nn.frozen_batchnorm import computes_frozen_affine, is_frozen_batchnorm
from ..nn.matching import describe, runs_its_class_forward, submodule
from .modules import batchnorm_act_blocker, computes_batchnorm2d, is_batchnorm_act, is_norm, join
from .operands import is_noop_node, read_by
from .report import ConversionReport
from .trace import Region

__all__ = ["SeenBatchNorm", "report_unfused"]

# A BatchNorm call a trace saw: (model path, module, its node, the region).
SeenBatchNorm = Tuple[str, nn.Module, fx.Node, Region]


def _describe_call(root: nn.Module, node: fx.Node) -> str:
    """A node in words, with the class of the module it calls."""
    module = submodule(root, node)
    return describe(node) if module is None else f"{describe(node)} ({type(module).__name__})"


def _reason(module: nn.Module, node: fx.Node, region: Region, unfusable: Dict[int, str]) -> str:
    if id(module) in unfusable:
        return unfusable[id(module)]
    if not runs_its_class_forward(module):
        return "it has hooks" if has_hooks(module) else "a forward is assigned on the instance"
    if is_batchnorm_act(module) and not computes_batchnorm2d(module):
        return batchnorm_act_blocker(module) or f"its activation is {type(module.act).__name__}, not a ReLU"
    if is_frozen_batchnorm(module) and not computes_frozen_affine(module):
        return f"its act is {type(module.act).__name__}, not a ReLU, or its drop is not nn.Identity"
    if len(node.users) != 1:
        return read_by(node)
    user = next(iter(node.users))
    while is_noop_node(region.root, user) and len(user.users) == 1:
        user = next(iter(user.users))
    return f"its output goes to {_describe_call(region.root, user)}, not a ReLU or an add that a ReLU follows"


def report_unfused(report: ConversionReport, batchnorms: List[SeenBatchNorm], opaque: List[Tuple[str, nn.Module, str]],
                   unfusable: Dict[int, str], fused: Set[int], reported: Set[int]) -> None:
    """A skipped entry, with the reason, for every BatchNorm the traces saw and no tail took,
    and for the BatchNorms of modules left opaque (``reported``: the ids already reported)."""
    for path, module, node, region in batchnorms:
        if id(module) in fused or id(module) in reported:
            continue
        reported.add(id(module))
        report.add(path, "skipped", _reason(module, node, region, unfusable))
    for path, module, reason in opaque:
        for child_name, child in module.named_children():
            if is_norm(child) and id(child) not in reported:
                reported.add(id(child))
                report.add(join(path, child_name), "skipped", f"{type(module).__name__} left as it is: {reason}")
