"""Step 2: find the tails of a traced graph, each ending in a ReLU, and what keeps the others.

In a region's graph, through hook-free ``nn.Identity`` / ``Dropout(p=0)`` calls and
DropPath(0)-style no-ops, in place or not:

- ``bn -> relu``                       -> ``BatchNormReLU2d``
- ``bn -> add(r) -> relu``, the BatchNorm on either operand -> ``BatchNormAddReLU2d``
- ``bn(a) + bn_r(b) -> relu``          -> ``BatchNormAddReLU2d`` with ``residual_bn``
- ``a + b -> relu`` with no BatchNorm  -> ``fused_resnet.add_relu``
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch.fx as fx
from torch import nn

from ..nn.matching import ADD_FUNCTIONS, ADD_METHODS, add_operands, describe, is_inplace_add, relu_input, submodule
from ..nn.frozen_batchnorm import is_frozen_batchnorm
from .modules import computes_fusable_norm
from .operands import batchnorm_blocker, behind_noops, exclusive, operand, read_by
from .trace import Analysis

__all__ = ["Tail", "TailSearch", "find_tails"]


@dataclass
class Tail:
    """One fusable tail of a graph: ``relu`` and what feeds it."""

    kind: str  # "bn_relu", "bn_add_relu", "bn_add_bn_relu" or "add_relu"
    relu: fx.Node
    bn: Optional[fx.Node] = None
    add: Optional[fx.Node] = None
    main: Optional[fx.Node] = None  # the add's operand that carries ``bn``'s output
    residual_bn: Optional[fx.Node] = None
    noops: List[fx.Node] = field(default_factory=list)  # erased with the tail, users first
    # Nodes the checks read (an alias chain, the nodes a moved BatchNorm jumps over): a
    # rewrite must see them as the analysis did, so their modules are inlined too.
    evidence: List[fx.Node] = field(default_factory=list)

    def nodes(self) -> List[fx.Node]:
        return [n for n in (self.bn, self.residual_bn, self.add, self.relu) if n is not None] + self.noops


@dataclass
class TailSearch:
    """What :func:`find_tails` found in one graph."""

    tails: List[Tail] = field(default_factory=list)
    reasons: Dict[int, str] = field(default_factory=dict)  # why a BatchNorm next to a tail is not fusable, by id
    unfused_adds: List[Tuple[fx.Node, str]] = field(default_factory=list)  # add -> ReLU pairs left, and why


def _depths(graph: fx.Graph) -> Dict[fx.Node, int]:
    """Longest path from an input to each node: the main path of a block is the deeper operand."""
    depth: Dict[fx.Node, int] = {}
    for node in graph.nodes:
        depth[node] = 1 + max((depth[n] for n in node.all_input_nodes), default=0)
    return depth


def find_tails(analysis: Analysis, root: nn.Module, graph: fx.Graph) -> TailSearch:
    """The fusable tails of ``graph`` (traced from ``root``), why BatchNorms next to a ReLU or
    an add are not fusable, and the add -> ReLU pairs that are not."""
    found = TailSearch()
    depth = _depths(graph)
    for node in graph.nodes:
        source = relu_input(root, node)
        if source is None:
            continue
        noops: List[fx.Node] = []
        value = behind_noops(root, source, noops)
        if computes_fusable_norm(submodule(root, value)):
            if len(value.users) != 1:
                found.reasons[id(submodule(root, value))] = read_by(value)
                continue
            blocker = batchnorm_blocker(analysis, root, value)
            if blocker is not None:
                found.reasons[id(submodule(root, value))] = blocker
                continue
            found.tails.append(Tail("bn_relu", node, bn=value, noops=noops))
            continue
        if add_operands(value) is None:
            if _adds_a_number(value):
                found.unfused_adds.append((value, "one operand is a Python number, not a tensor (add_relu takes two)"))
            continue
        if len(value.users) != 1:
            reason = f"the sum {describe(value)} is read {len(value.users)} times"
            _blame_operands(root, value, reason, found.reasons)
            found.unfused_adds.append((value, reason))
            continue
        tail = _add_tail(analysis, root, graph, value, node, noops, depth, found.reasons)
        if isinstance(tail, str):
            found.unfused_adds.append((value, tail))
        else:
            found.tails.append(tail)
    return found


def _adds_a_number(node: fx.Node) -> bool:
    """``x + 3`` / ``x += 0``: an add whose other operand is not a graph value."""
    is_add = ((node.op == "call_function" and node.target in ADD_FUNCTIONS)
              or (node.op == "call_method" and node.target in ADD_METHODS))
    return is_add and len(node.args) == 2 and any(isinstance(a, (int, float)) for a in node.args)


def _blame_operands(root: nn.Module, add: fx.Node, reason: str, reasons: Dict[int, str]) -> None:
    for value in add_operands(add):
        source = behind_noops(root, value)
        if computes_fusable_norm(submodule(root, source)):
            reasons.setdefault(id(submodule(root, source)), reason)


def _add_tail(analysis: Analysis, root: nn.Module, graph: fx.Graph, add: fx.Node, relu: fx.Node,
              noops: List[fx.Node], depth: Dict[fx.Node, int], reasons: Dict[int, str]) -> Union[Tail, str]:
    """The tail ``relu(add)``, or why it may not be fused."""
    a, b = add_operands(add)
    if a is b:
        return "it adds a value to itself"
    evidence: List[fx.Node] = []
    operands = [operand(analysis, root, graph, add, value, evidence) for value in (a, b)]
    for op in operands:
        if op.blocker not in (None, "not a BatchNorm"):
            reasons.setdefault(id(submodule(root, op.source)), op.blocker)
    fusable = [op for op in operands if op.blocker is None]
    # `a += b` writes into a: harmless when a is a fused BatchNorm's output or a tensor only the add sees.
    if is_inplace_add(add) and not any(op.value is a for op in fusable) and not exclusive(root, a, add, evidence):
        reason = (f"its add writes in place into {describe(a)}, which is read elsewhere or may be a "
                  "tensor seen outside")
        for op in operands:
            if computes_fusable_norm(submodule(root, op.source)):
                reasons[id(submodule(root, op.source))] = reason
        return reason
    fusable.sort(key=lambda op: -depth[op.source])
    if len(fusable) == 2 and len({is_frozen_batchnorm(submodule(root, op.source)) for op in fusable}) == 2:
        fusable = fusable[:1]  # one op computes two BatchNorms of one kind: the other stays as it is
    if len(fusable) == 2:
        main, other = fusable
        return Tail("bn_add_bn_relu", relu, bn=main.source, add=add, main=main.value,
                    residual_bn=other.source, noops=noops + main.chain + other.chain, evidence=evidence)
    if len(fusable) == 1:
        main = fusable[0]
        return Tail("bn_add_relu", relu, bn=main.source, add=add, main=main.value, noops=noops + main.chain,
                    evidence=evidence)
    return Tail("add_relu", relu, add=add, noops=noops, evidence=evidence)
