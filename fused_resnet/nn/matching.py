"""What a module's forward computes, read from its torch.fx trace: the residual-block pattern.

Shared by :mod:`fused_resnet.convert` (which replaces blocks and rewrites forwards) and
:meth:`fused_resnet.nn.FusedBasicBlock.from_block` (which checks that a block computes
what its fused twin computes); neither imports the other.

- :func:`trace_forward`: a module's own forward as an FX graph, every child a leaf, or
  why it cannot be had (untraceable, depends on ``self.training``, writes attributes,
  prints, computes values it drops).
- :func:`match_residual_block`: whether that graph is ``relu(bn_k(conv_k(...)) + s(x))``.
- :func:`twin_mismatch`: why a fused twin class would not compute what a block computes.

The tracer records augmented assignment (``a += b``) as ``operator.iadd``, which its
generated code replays in place: a plain ``torch.fx.Proxy`` has no ``__iadd__``, so
Python falls back to ``a = a + b`` and the graph would silently lose the write into ``a``.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import operator
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .batchnorm import has_hooks

__all__ = ["BlockMatch", "ChildrenAreLeaves", "InplaceRecordingProxy", "Stage", "Traced", "add_operands",
           "describe", "first_line", "has_add", "is_inplace_add", "is_inplace_call", "is_plain_identity",
           "match_residual_block", "relu_input", "runs_its_class_forward", "single_input", "submodule",
           "trace_forward", "twin_mismatch"]

RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
RELU_METHODS = {"relu", "relu_"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}
# Augmented assignments, recorded as the in-place operator FX's code generator writes back as `a op= b`.
INPLACE_OPERATORS = {
    "__iadd__": operator.iadd, "__isub__": operator.isub, "__imul__": operator.imul,
    "__itruediv__": operator.itruediv, "__ifloordiv__": operator.ifloordiv, "__imod__": operator.imod,
    "__ipow__": operator.ipow, "__imatmul__": operator.imatmul, "__iand__": operator.iand,
    "__ior__": operator.ior, "__ixor__": operator.ixor, "__ilshift__": operator.ilshift,
    "__irshift__": operator.irshift,
}
_INPLACE_FUNCTIONS = set(INPLACE_OPERATORS.values())


# ----------------------------------------------------------------------------- tracing


def _inplace_method(function):
    def method(self, other):
        return self.tracer.create_proxy("call_function", function, (self, other), {})
    return method


class InplaceRecordingProxy(fx.Proxy):
    """An FX proxy that records ``a op= b`` as the in-place operator instead of ``a = a op b``."""


for _name, _function in INPLACE_OPERATORS.items():
    setattr(InplaceRecordingProxy, _name, _inplace_method(_function))


class ChildrenAreLeaves(fx.Tracer):
    """Traces one module's own forward: every submodule call stays one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return InplaceRecordingProxy(node, self)


@dataclass
class Traced:
    """A module's forward as an FX graph, and why it may not be rewritten (None: it may)."""

    graph: fx.Graph
    side_effect: Optional[str]


def _snapshot(module: nn.Module) -> tuple:
    return tuple(dict(d) for d in (module.__dict__, module._modules, module._parameters, module._buffers))


def _same_state(a: tuple, b: tuple) -> bool:
    return all(x.keys() == y.keys() and all(x[k] is y[k] for k in x) for x, y in zip(a, b))


def _container_contents(module: nn.Module) -> dict:
    """The items of the lists, dicts and sets a module holds (``self.cache.append(x)`` changes them)."""
    contents = {}
    for key, value in vars(module).items():
        if isinstance(value, (list, dict, set)) and key not in ("_modules", "_parameters", "_buffers"):
            contents[key] = (value, list(value.items()) if isinstance(value, dict) else list(value))
    return contents


def _restore_contents(saved: dict) -> bool:
    """Puts the saved items back; True when any had changed."""
    changed = False
    for value, items in saved.values():
        now = list(value.items()) if isinstance(value, dict) else list(value)
        if len(now) == len(items) and all(a is b or a == b for a, b in zip(now, items)):
            continue
        changed = True
        value.clear()
        if isinstance(value, dict):
            value.update(items)
        elif isinstance(value, list):
            value.extend(items)
        else:
            value.update(items)
    return changed


@contextlib.contextmanager
def _mode_changes_recorded(changes: List[str]):
    """Records grad-mode, inference-mode and autocast changes, which torch.fx does not put in a graph."""
    patched = [(torch._C, "_set_grad_enabled", "the grad mode (torch.no_grad / enable_grad)"),
               (torch._C, "_InferenceMode", "inference mode"),
               (torch, "set_autocast_enabled", "autocast")]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]

    def recording(function, what):
        def wrapper(*args, **kwargs):
            changes.append(what)
            return function(*args, **kwargs)
        return wrapper

    try:
        for (owner, name, what), (_, _, function) in zip(patched, saved):
            setattr(owner, name, recording(function, what))
        yield
    finally:
        for owner, name, function in saved:
            setattr(owner, name, function)


@contextlib.contextmanager
def _training_flipped(module: nn.Module):
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.train(not module.training)
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def is_inplace_call(node: fx.Node) -> bool:
    """A node that may write into its input (so its value may go unused)."""
    if node.op == "call_module":
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS:
            return True
        name = getattr(node.target, "__name__", "")
        return _inplace_argument(node) or (name.endswith("_") and not name.endswith("__"))
    return False


def _inplace_argument(node: fx.Node) -> bool:
    """True when a function's ``inplace`` argument is given and may be true (``F.relu(x, True)``)."""
    if "inplace" in node.kwargs:
        return node.kwargs["inplace"] is not False
    try:
        names = list(inspect.signature(node.target).parameters)
    except (TypeError, ValueError):
        return False
    if "inplace" not in names:
        return False
    index = names.index("inplace")
    return index < len(node.args) and node.args[index] is not False


# Unused results that say nothing of an effect: an item or attribute read, an assertion.
_HARMLESS_UNUSED = {operator.getitem, getattr, torch._assert, fx._symbolic_trace._assert_is_none}
# The same assertions by name: inside another trace, torch.fx has swapped them for wrappers.
_HARMLESS_NAMES = {"_assert", "_assert_is_none"}


def _dropped_effect(graph: fx.Graph) -> Optional[str]:
    """Why the traced graph may not compute all the forward did, or None."""
    for node in graph.nodes:
        if node.op == "call_function" and (node.target in _HARMLESS_UNUSED
                                           or getattr(node.target, "__name__", None) in _HARMLESS_NAMES):
            continue
        if node.op not in ("placeholder", "output") and not node.users and not is_inplace_call(node):
            return (f"its forward computes {describe(node)} and never uses it (a side effect such as print, "
                    "which torch.fx would drop)")
    return None


def first_line(exc: BaseException, limit: int = 120) -> str:
    """``Type: first line of the message`` of an exception, for the report."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message[:limit]}"


def trace_forward(module: nn.Module, tracer_class: type = ChildrenAreLeaves,
                  concrete_args: Optional[dict] = None) -> Union[Traced, str]:
    """``module``'s own forward as an FX graph (children as leaves), or why it cannot be had.

    The forward is traced in the module's mode and in the other one: a graph that
    differs depends on ``self.training`` in Python, and is refused. Output printed while
    tracing, attributes written while tracing and computed-but-unused values mark the
    graph as incomplete (``Traced.side_effect``): it may be read, not substituted. With
    ``concrete_args`` (as torch.fx takes them): the forward as the calls passing them run it.
    """
    if isinstance(module, torch.jit.ScriptModule):
        return "it is a TorchScript module"
    before = _snapshot(module)
    contents = _container_contents(module)
    printed = io.StringIO()
    mode_changes: List[str] = []
    try:
        with contextlib.redirect_stdout(printed), _mode_changes_recorded(mode_changes):
            graph = tracer_class().trace(module, concrete_args)
            with _training_flipped(module):
                other = tracer_class().trace(module, concrete_args)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot prove it": leave it alone
        return f"torch.fx cannot trace its forward ({first_line(exc)})"
    finally:
        after = _snapshot(module)
        if not _same_state(before, after):
            for live, saved in zip((module.__dict__, module._modules, module._parameters, module._buffers), before):
                live.clear()
                live.update(saved)
        contents_changed = _restore_contents(contents)
    if not _same_state(before, after) or contents_changed:
        return "its forward writes module attributes"
    if mode_changes:
        return f"its forward changes {mode_changes[0]}, which torch.fx does not record"
    if str(graph) != str(other):
        return "its forward depends on self.training"
    side_effect = "its forward prints" if printed.getvalue() else _dropped_effect(graph)
    return Traced(graph, side_effect)


# ----------------------------------------------------------------------- graph patterns


def runs_its_class_forward(module: nn.Module) -> bool:
    """True when calling ``module`` runs its class's forward and nothing else: no hooks, no
    ``forward`` assigned on the instance."""
    return not has_hooks(module) and "forward" not in vars(module)


def submodule(root: nn.Module, node: fx.Node) -> Optional[nn.Module]:
    """The module a ``call_module`` node calls (None for any other node)."""
    if node.op != "call_module":
        return None
    return root.get_submodule(node.target)


def describe(node) -> str:
    """A node, in words, for the report."""
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "call_module":
        return f"'{node.target}'"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', str(node.target))}()"
    if node.op == "placeholder":
        return f"the input '{node.target}'"
    if node.op == "output":
        return "the module's output"
    return f"'{node.target}'"


def relu_input(root: nn.Module, node: fx.Node) -> Optional[fx.Node]:
    """The node a ReLU is applied to, when ``node`` is exactly a ReLU; else None."""
    if node.op == "call_function" and node.target in RELU_FUNCTIONS:
        extra_ok = all(isinstance(a, bool) for a in node.args[1:]) and set(node.kwargs) <= {"inplace"}
        if 1 <= len(node.args) <= 2 and extra_ok and isinstance(node.args[0], fx.Node):
            return node.args[0]
        return None
    if node.op == "call_method" and node.target in RELU_METHODS:
        if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
            return node.args[0]
        return None
    module = submodule(root, node)
    if type(module) is nn.ReLU and runs_its_class_forward(module) and len(node.args) == 1 and not node.kwargs \
            and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def add_operands(node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    """(a, b) when ``node`` is exactly ``a + b`` (or ``a += b``) of two graph values; else None."""
    is_add = ((node.op == "call_function" and node.target in ADD_FUNCTIONS)
              or (node.op == "call_method" and node.target in ADD_METHODS))
    if is_add and len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args):
        return node.args[0], node.args[1]
    return None


def is_inplace_add(node: fx.Node) -> bool:
    """True for ``a += b`` / ``a.add_(b)``: the add writes into its first operand."""
    return ((node.op == "call_function" and node.target is operator.iadd)
            or (node.op == "call_method" and node.target == "add_"))


def single_input(node: fx.Node) -> Optional[fx.Node]:
    """The one argument of a node called with exactly one graph value, else None."""
    if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def is_plain_identity(module: Optional[nn.Module]) -> bool:
    """An ``nn.Identity`` without hooks: dropping its call changes nothing."""
    return type(module) is nn.Identity and runs_its_class_forward(module)


def _skip_identities(root: nn.Module, node: fx.Node, seen: List[fx.Node]) -> fx.Node:
    """Walks back through hook-free ``nn.Identity`` calls (timm's drop_block / aa),
    recording them; a hooked one stops the walk, so the block is not matched through it."""
    while is_plain_identity(submodule(root, node)) and single_input(node) is not None:
        seen.append(node)
        node = single_input(node)
    return node


@dataclass
class Stage:
    """One conv -> BatchNorm2d (-> ReLU) stage of a block's main path."""

    conv: fx.Node
    bn: fx.Node
    relu: Optional[fx.Node]  # None for the last stage: its ReLU follows the add


@dataclass
class BlockMatch:
    """A forward that computes ``relu(bn_k(conv_k(...)) + shortcut(x))``."""

    stages: List[Stage]
    add: fx.Node
    relu: fx.Node
    shortcut: Optional[fx.Node]  # None: the identity

    @property
    def stage_names(self) -> Tuple[Tuple[str, str], ...]:
        return tuple((s.conv.target, s.bn.target) for s in self.stages)

    @property
    def shortcut_name(self) -> Optional[str]:
        return None if self.shortcut is None else self.shortcut.target


def _main_path(root: nn.Module, node: fx.Node, x: fx.Node, seen: List[fx.Node]) -> Union[List[Stage], str]:
    """The conv -> BatchNorm2d (-> ReLU) stages from ``x`` to ``node``, or why there are none.

    Walks backwards from the add's operand ``node``; ``seen`` collects the nodes walked.
    """
    stages: List[Stage] = []
    relu = None  # the ReLU after the stage being read; None for the last stage
    while True:
        bn = _skip_identities(root, node, seen)
        if not stages and relu_input(root, bn) is not None:
            return "a ReLU comes before the add"
        bn_module = submodule(root, bn)
        if type(bn_module) is not nn.BatchNorm2d or single_input(bn) is None:
            return f"the main path has {describe(bn)} where a BatchNorm2d was expected"
        if has_hooks(bn_module):
            return f"the BatchNorm2d {describe(bn)} has hooks"
        conv = _skip_identities(root, single_input(bn), seen)
        if not isinstance(submodule(root, conv), nn.Conv2d) or single_input(conv) is None:
            return f"the BatchNorm2d {describe(bn)} follows {describe(conv)}, not a convolution"
        seen += [bn, conv]
        stages.insert(0, Stage(conv, bn, relu))
        previous = _skip_identities(root, single_input(conv), seen)
        if previous is x:
            return stages
        node = relu_input(root, previous)
        if node is None:
            return f"the convolution {describe(conv)} follows {describe(previous)}, not a ReLU"
        relu = previous
        seen.append(relu)


def match_residual_block(root: nn.Module, graph: fx.Graph) -> Union[BlockMatch, str]:
    """The block ``graph`` computes, or why it is not ``relu(bn(conv(...)) + shortcut(x))``.

    Every node of the graph must belong to the pattern, every intermediate value must
    have exactly one user, and the add must not write into the block's input.
    """
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return f"its forward takes {len(inputs)} inputs"
    x = inputs[0]
    output = nodes[-1]
    result = output.args[0]
    if not isinstance(result, fx.Node):
        return f"its forward returns {describe(result)}"
    add = relu_input(root, result)
    if add is None:
        operands = add_operands(result) or ()
        relu_inputs = [relu_input(root, operand) for operand in operands]
        if any(node is not None and type(submodule(root, node)) is nn.BatchNorm2d for node in relu_inputs):
            return "a ReLU comes before the add and none follows it"
        return f"its output is {describe(result)}, not a ReLU"
    operands = add_operands(add)
    if operands is None:
        return f"its last ReLU is applied to {describe(add)}, not to a sum"
    reasons = []
    for main, shortcut in (operands, operands[::-1]):
        seen: List[fx.Node] = []
        stages = _main_path(root, main, x, seen)
        if isinstance(stages, str):
            reasons.append(stages)
            continue
        for node in seen + [add, result] + ([shortcut] if shortcut is not x else []):
            if len(node.users) != 1:
                return f"the output of {describe(node)} is used {len(node.users)} times"
        if shortcut is not x and not (shortcut.op == "call_module" and single_input(shortcut) is x):
            reasons.append(f"its shortcut is {describe(shortcut)}, not the input or one module applied to it")
            continue
        expected = set(seen) | {x, output, add, result} | ({shortcut} if shortcut is not x else set())
        extra = [n for n in nodes if n not in expected]
        if extra:
            return f"its forward also computes {describe(extra[0])}"
        if len(x.users) != 2:
            return f"its input is used {len(x.users)} times"
        if is_inplace_add(add) and add.args[0] is x:
            return "its add writes into the block's input in place"
        return BlockMatch(stages, add, result, None if shortcut is x else shortcut)
    # The operand that got furthest explains best; a ReLU before the add says it all.
    return next((r for r in reasons if "before the add" in r), reasons[-1])


def has_add(graph: fx.Graph) -> bool:
    """True when the forward adds two computed values (a residual connection)."""
    return any(add_operands(node) is not None for node in graph.nodes)


def twin_mismatch(block: nn.Module, twin: type) -> Optional[str]:
    """Why ``twin.from_block(block)`` would not compute what ``block`` computes (None: it would).

    ``twin`` is a fused block class: its ``stages`` ((conv, norm) attribute names) and
    ``shortcut_name`` are compared with what the block's traced forward applies.
    """
    traced = trace_forward(block)
    if isinstance(traced, str):
        return traced
    match = match_residual_block(block, traced.graph)
    if isinstance(match, str):
        return match
    if match.stage_names != twin.stages:
        return f"its (conv, norm) stages are {match.stage_names}, {twin.__name__}'s are {twin.stages}"
    if match.shortcut_name not in (None, twin.shortcut_name):
        return f"its shortcut is '{match.shortcut_name}', {twin.__name__}'s is '{twin.shortcut_name}'"
    if match.shortcut_name is None and getattr(block, twin.shortcut_name, None) is not None:
        # The twin would apply the module its forward leaves unused.
        return f"its forward does not use its '{twin.shortcut_name}'"
    return None
