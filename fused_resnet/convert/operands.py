"""Step 3: check the operands of a tail, each an answer to "may this value be fused?".

A BatchNorm output may move into a fused op only when nothing else can see it (a new
tensor read by the tail alone, through no-ops and aliases), its module is called once, and
its input cannot change between where it ran and the add where the fused op runs it.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..nn.matching import describe, is_inplace_call, runs_its_class_forward, single_input, submodule
from ..nn.frozen_batchnorm import computes_frozen_affine
from .modules import computes_fusable_norm, fused_add_relu, is_library_leaf, is_noop_module
from .trace import Analysis

__all__ = ["Operand", "batchnorm_blocker", "exclusive", "is_noop_node", "move_blocker", "operand", "read_by"]

# Leaf modules whose output is a new tensor (never an alias of an input), when not in place.
_FRESH_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.modules.pooling._MaxPoolNd,
                  nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                  nn.modules.pooling._AdaptiveMaxPoolNd, nn.Upsample, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU,
                  nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU, nn.Mish)
_FRESH_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub,
                    torch.mul, torch.div, torch.cat, torch.stack, torch.sum, torch.mean, torch.sigmoid, torch.relu,
                    F.relu, torch.conv2d, F.conv2d, F.batch_norm}
_FRESH_METHODS = {"add", "sub", "mul", "div", "sum", "mean", "sigmoid", "relu", "clone"}
# Methods whose result may be their input itself (or a view of it).
_ALIAS_METHODS = {"contiguous", "view", "reshape", "flatten", "view_as", "reshape_as"}


def read_by(node: fx.Node) -> str:
    return f"its output is read {len(node.users)} times ({', '.join(describe(u) for u in node.users)})"


def is_noop_node(root: nn.Module, node: fx.Node) -> bool:
    return (node.op == "call_module" and single_input(node) is not None
            and is_noop_module(submodule(root, node)))


def _fresh(root: nn.Module, node: fx.Node) -> bool:
    """True when ``node``'s value is a new tensor, not an alias of anything."""
    if is_inplace_call(node) and node.op != "call_module":
        return False
    if node.op == "call_module":
        module = submodule(root, node)
        return ((isinstance(module, _FRESH_MODULES) and not getattr(module, "inplace", False)
                 and runs_its_class_forward(module)) or computes_frozen_affine(module))
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS or node.target is fused_add_relu
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    return False


def exclusive(root: nn.Module, node: fx.Node, user: fx.Node, evidence: Optional[List[fx.Node]] = None) -> bool:
    """True when only ``user`` can see ``node``'s tensor: a new tensor read by nothing else.
    The nodes walked go to ``evidence``."""
    while True:
        if evidence is not None:
            evidence.append(node)
        if set(node.users) != {user}:
            return False
        if not _is_alias_step(root, node):
            return _fresh(root, node)
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node):
            return False
        node, user = source, node


def _is_alias_step(root: nn.Module, node: fx.Node) -> bool:
    """``node``'s value is its first argument's tensor (or a view of it): a no-op, a view, an in-place op."""
    if node.op == "call_module":
        module = submodule(root, node)
        inplace_leaf = (isinstance(module, _FRESH_MODULES) and getattr(module, "inplace", False) is True
                        and runs_its_class_forward(module) and single_input(node) is not None)
        return inplace_leaf or is_noop_node(root, node)
    return ((node.op == "call_method" and node.target in _ALIAS_METHODS)
            or (is_inplace_call(node) and node.op != "call_module"))


def _origin(root: nn.Module, node: fx.Node) -> Optional[fx.Node]:
    """The node that allocated ``node``'s tensor (walking back through views and in-place ops), or an
    input placeholder; None when unknown."""
    while _is_alias_step(root, node):
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node):
            return None
        node = source
    return node if node.op == "placeholder" or _fresh(root, node) else None


def _may_mutate(root: nn.Module, node: fx.Node, value: Optional[fx.Node] = None) -> bool:
    """True when ``node`` may write into a tensor it is given (or one it can reach); with ``value``,
    False for an in-place op that writes into a tensor allocated in the graph that is not ``value``'s."""
    if value is not None and node.op in ("call_function", "call_method") and is_inplace_call(node) \
            and node.args and isinstance(node.args[0], fx.Node):
        written, read = _origin(root, node.args[0]), _origin(root, value)
        if written is not None and read is not None and written.op != "placeholder" and written is not read:
            return False
    if node.op == "call_module":
        module = submodule(root, node)
        return (not is_library_leaf(module) or not runs_its_class_forward(module)
                or bool(getattr(module, "inplace", False)))
    if node.op in ("call_function", "call_method"):
        return is_inplace_call(node)
    return False


def batchnorm_blocker(analysis: Analysis, root: nn.Module, node: fx.Node) -> Optional[str]:
    """Why the BatchNorm call ``node`` may not become a fused module, or None."""
    module = submodule(root, node)
    if id(module) in analysis.pinned or analysis.calls.get(id(module), 0) != 1:
        return "it is used in more than one place (shared, or called more than once)"
    if single_input(node) is None:
        return "it is called with extra arguments"
    return None


def move_blocker(root: nn.Module, graph: fx.Graph, bn: fx.Node, at: fx.Node,
                 evidence: List[fx.Node]) -> Optional[str]:
    """Why BatchNorm call ``bn`` may not run later, at ``at`` (the add), or None; the nodes
    the answer rests on go to ``evidence``."""
    source = bn.args[0]
    order = {n: i for i, n in enumerate(graph.nodes)}
    prefix = bn.target + "."
    between = [n for n in graph.nodes if order[bn] < order[n] < order[at]]
    if any(n.op == "get_attr" and n.target.startswith(prefix) for n in between):
        return "its parameters are read between it and the add"
    if exclusive(root, source, bn, evidence):
        return None
    evidence += between
    readers = sum(len(user.args) for user in source.users)
    if readers > 2 and any(n in source.users for n in between):
        # Autograd sums the input's gradients in the order their nodes were made: more than two
        # terms, and a moved BatchNorm would change the order (and the bits).
        return (f"its input {describe(source)} is read {readers} times and the add comes after other readers: "
                "moving it would change the order its gradient is summed in")
    mutating = next((n for n in between if _may_mutate(root, n, source)), None)
    if mutating is not None:
        return (f"its input {describe(source)} is read elsewhere and {describe(mutating)} runs before the add: "
                "the input could change before the moved BatchNorm reads it")
    return None


@dataclass
class Operand:
    """One operand of an add: the value, the BatchNorm-computing call behind its no-ops."""

    value: fx.Node
    source: fx.Node
    chain: List[fx.Node]
    blocker: Optional[str]  # None: ``source`` is a BatchNorm that can be fused into the tail


def behind_noops(root: nn.Module, value: fx.Node, chain: Optional[List[fx.Node]] = None) -> fx.Node:
    """The node ``value`` passes through no-ops (each read once) from; the no-ops go to ``chain``."""
    while len(value.users) == 1 and is_noop_node(root, value):
        if chain is not None:
            chain.append(value)
        value = single_input(value)
    return value


def operand(analysis: Analysis, root: nn.Module, graph: fx.Graph, add: fx.Node, value: fx.Node,
            evidence: List[fx.Node]) -> Operand:
    """The add's operand ``value`` checked: may its BatchNorm (if it is one) be fused into the add?"""
    chain: List[fx.Node] = []
    source = behind_noops(root, value, chain)
    if not computes_fusable_norm(submodule(root, source)):
        return Operand(value, source, chain, "not a BatchNorm")
    if len(source.users) != 1 or len(value.users) != 1:
        return Operand(value, source, chain, read_by(source if len(source.users) != 1 else value))
    blocker = batchnorm_blocker(analysis, root, source) or move_blocker(root, graph, source, add, evidence)
    return Operand(value, source, chain, blocker)
