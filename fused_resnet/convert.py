"""``convert(model)``: swap a ResNet's BatchNorm / add / ReLU tails for fused ops, in place.

What it does, module by module, top-down (each module's own ``forward`` is traced with
torch.fx, every child a leaf, in train *and* eval mode; a forward that branches on
``self.training`` is left alone):

1. A block whose forward computes ``relu(bn_k(conv_k(...relu(bn_1(conv_1(x)))...)) + s)``,
   with ``s`` the input or one module applied to it, and whose attribute names are
   torchvision's (``conv1``, ``bn1``, ..., ``downsample``) or the d2l ``Residual``'s
   (``conv3`` shortcut) is replaced by its fused twin (:class:`FusedBasicBlock`,
   :class:`FusedBottleneck`, :class:`FusedResidual`), keeping its submodules. Blocks are
   recognised by what they compute, never by class name.
2. A block that computes the same but names its parts otherwise has its forward
   rewritten: the traced graph, with each BatchNorm2d -> ReLU and BatchNorm2d -> add ->
   ReLU replaced by one fused module call, becomes a ``torch.fx.GraphModule`` with the
   same submodules and state_dict keys.
3. Any other BatchNorm2d whose output goes only into a ReLU (a stem) becomes a
   :class:`BatchNormReLU2d`; the ReLU module it fed becomes ``nn.Identity`` (the
   forward is untouched), or, for a functional ReLU, the forward is rewritten as in 2.
4. Anything it cannot prove equivalent is left exactly as it was: a module with an add
   that is not such a block (a ReLU before the add, a pre-activation block), a
   BatchNorm output used twice, a forward FX cannot trace, a module with hooks, a
   forward with effects FX would drop (``print``) for 1 and 2.

Parameters and buffers are the same tensor objects before and after (nothing is
re-initialised or copied), so train/eval mode, device, dtype and memory format are
kept, and an optimizer built before the conversion keeps working.

The :class:`ConversionReport` lists every replaced, fused and skipped module with the
reason; it is attached to the returned model as ``model.fused_resnet_report`` and
printed with ``verbose=True``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import operator
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .nn.batchnorm import BatchNormAddReLU2d, BatchNormReLU2d, has_hooks
from .nn.blocks import FusedBasicBlock, FusedBottleneck, FusedResidual, _FusedResidualBlock, is_conv_bn_shortcut

__all__ = ["ConversionReport", "ReportEntry", "convert"]

REPORT_ATTRIBUTE = "fused_resnet_report"
# The fused twins, tried in this order against a matched block's attribute names.
TWINS = (FusedBasicBlock, FusedBottleneck, FusedResidual)

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
# `a += b` on an FX proxy traces as `a + b`: where `a` is observable elsewhere, the
# traced graph may have lost an in-place write.
_AUGMENTABLE = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
                operator.pow, operator.matmul, operator.and_, operator.or_, operator.xor, operator.lshift,
                operator.rshift}


# ------------------------------------------------------------------------------ report


@dataclass(frozen=True)
class ReportEntry:
    """One line of the report: a module (qualified name), what happened to it, and why."""

    name: str
    action: str  # "replaced", "fused", "folded" or "skipped"
    detail: str

    @property
    def display_name(self) -> str:
        return self.name or "(model)"


class ConversionReport:
    """What :func:`convert` (and :func:`fused_resnet.fold_bn`) did to each module.

    A sequence of :class:`ReportEntry`; ``str(report)`` is a readable table.
    """

    ACTIONS = ("replaced", "fused", "folded", "skipped")

    def __init__(self, entries: Sequence[ReportEntry] = ()):
        self.entries: List[ReportEntry] = list(entries)

    def add(self, name: str, action: str, detail: str) -> None:
        if action not in self.ACTIONS:
            raise ValueError(f"action must be one of {', '.join(self.ACTIONS)}, got '{action}'")
        self.entries.append(ReportEntry(name, action, detail))

    def __iter__(self) -> Iterator[ReportEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index):
        return self.entries[index]

    def of(self, action: str) -> List[ReportEntry]:
        """The entries with this action."""
        return [entry for entry in self.entries if entry.action == action]

    @property
    def replaced(self) -> List[ReportEntry]:
        return self.of("replaced")

    @property
    def fused(self) -> List[ReportEntry]:
        return self.of("fused")

    @property
    def folded(self) -> List[ReportEntry]:
        return self.of("folded")

    @property
    def skipped(self) -> List[ReportEntry]:
        return self.of("skipped")

    def entry(self, name: str) -> ReportEntry:
        """The last entry about module ``name`` (KeyError if none)."""
        for entry in reversed(self.entries):
            if entry.name == name:
                return entry
        raise KeyError(f"no report entry for module '{name}'")

    def summary(self) -> str:
        counts = [f"{len(self.of(action))} {action}" for action in self.ACTIONS if self.of(action)]
        return "fused-resnet: " + (", ".join(counts) if counts else "nothing to convert")

    def __str__(self) -> str:
        rows = [("module", "action", "detail")] + [(e.display_name, e.action, e.detail) for e in self.entries]
        widths = [max(len(row[i]) for row in rows) for i in range(2)]
        lines = [self.summary()]
        for index, (name, action, detail) in enumerate(rows):
            lines.append(f"  {name:<{widths[0]}}  {action:<{widths[1]}}  {detail}".rstrip())
            if index == 0:
                lines.append(f"  {'-' * widths[0]}  {'-' * widths[1]}  {'-' * 6}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ConversionReport({self.summary()!r}, {len(self.entries)} entries)"


# ----------------------------------------------------------------------------- tracing


class _ChildrenAreLeaves(fx.Tracer):
    """Traces one module's own forward: every submodule call stays one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


@dataclass
class Traced:
    """A module's forward as an FX graph, and why it may not be rewritten (None: it may)."""

    graph: fx.Graph
    side_effect: Optional[str]


def _snapshot(module: nn.Module) -> tuple:
    return tuple(dict(d) for d in (module.__dict__, module._modules, module._parameters, module._buffers))


def _same_state(a: tuple, b: tuple) -> bool:
    return all(x.keys() == y.keys() and all(x[k] is y[k] for k in x) for x, y in zip(a, b))


@contextlib.contextmanager
def _training_flipped(module: nn.Module):
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.train(not module.training)
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _is_inplace_call(node: fx.Node) -> bool:
    """A node whose value may be unused because it writes into its input."""
    if node.op == "call_module":
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return bool(node.kwargs.get("inplace")) or (name.endswith("_") and not name.endswith("__"))
    return False


def _dropped_effect(graph: fx.Graph) -> Optional[str]:
    """Why the traced graph may not compute all the forward did, or None."""
    for node in graph.nodes:
        if node.op not in ("placeholder", "output") and not node.users and not _is_inplace_call(node):
            return (f"its forward computes {describe(node)} and never uses it (a side effect such as print, "
                    "which torch.fx would drop)")
    return None


def trace_forward(module: nn.Module) -> Union[Traced, str]:
    """``module``'s own forward as an FX graph (children as leaves), or why it cannot be had.

    The forward is traced in the module's mode and in the other one: a graph that
    differs depends on ``self.training`` in Python, and is refused. Output printed while
    tracing, attributes written while tracing and computed-but-unused values mark the
    graph as incomplete (``Traced.side_effect``): it may be read, not substituted.
    """
    if isinstance(module, torch.jit.ScriptModule):
        return "it is a TorchScript module"
    before = _snapshot(module)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            graph = _ChildrenAreLeaves().trace(module)
            with _training_flipped(module):
                other = _ChildrenAreLeaves().trace(module)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot prove it": leave it alone
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"torch.fx cannot trace its forward ({type(exc).__name__}: {message[:120]})"
    finally:
        after = _snapshot(module)
        if not _same_state(before, after):
            for live, saved in zip((module.__dict__, module._modules, module._parameters, module._buffers), before):
                live.clear()
                live.update(saved)
    if not _same_state(before, after):
        return "its forward writes module attributes"
    if str(graph) != str(other):
        return "its forward depends on self.training"
    side_effect = "its forward prints" if printed.getvalue() else _dropped_effect(graph)
    return Traced(graph, side_effect)


# ----------------------------------------------------------------------- graph patterns


def _submodule(root: nn.Module, node: fx.Node) -> Optional[nn.Module]:
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
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        extra_ok = all(isinstance(a, bool) for a in node.args[1:]) and set(node.kwargs) <= {"inplace"}
        if 1 <= len(node.args) <= 2 and extra_ok and isinstance(node.args[0], fx.Node):
            return node.args[0]
        return None
    if node.op == "call_method" and node.target in _RELU_METHODS:
        if len(node.args) == 1 and not node.kwargs:
            return node.args[0]
        return None
    module = _submodule(root, node)
    if type(module) is nn.ReLU and not has_hooks(module) and len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    return None


def add_operands(node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    """(a, b) when ``node`` is exactly ``a + b`` of two graph values; else None."""
    is_add = ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
              or (node.op == "call_method" and node.target in _ADD_METHODS))
    if is_add and len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args):
        return node.args[0], node.args[1]
    return None


def _single_input(node: fx.Node) -> Optional[fx.Node]:
    if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _is_plain_identity(module: Optional[nn.Module]) -> bool:
    """An ``nn.Identity`` without hooks: dropping its call changes nothing."""
    return type(module) is nn.Identity and not has_hooks(module)


def _skip_identities(root: nn.Module, node: fx.Node, seen: List[fx.Node]) -> fx.Node:
    """Walks back through hook-free ``nn.Identity`` calls (timm's drop_block / aa),
    recording them; a hooked one stops the walk, so the block is not matched through it."""
    while _is_plain_identity(_submodule(root, node)) and _single_input(node) is not None:
        seen.append(node)
        node = _single_input(node)
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
        bn_module = _submodule(root, bn)
        if type(bn_module) is not nn.BatchNorm2d or _single_input(bn) is None:
            return f"the main path has {describe(bn)} where a BatchNorm2d was expected"
        if has_hooks(bn_module):
            return f"the BatchNorm2d {describe(bn)} has hooks"
        conv = _skip_identities(root, _single_input(bn), seen)
        if not isinstance(_submodule(root, conv), nn.Conv2d) or _single_input(conv) is None:
            return f"the BatchNorm2d {describe(bn)} follows {describe(conv)}, not a convolution"
        seen += [bn, conv]
        stages.insert(0, Stage(conv, bn, relu))
        previous = _skip_identities(root, _single_input(conv), seen)
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
        if any(node is not None and type(_submodule(root, node)) is nn.BatchNorm2d for node in relu_inputs):
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
        if shortcut is not x and not (shortcut.op == "call_module" and _single_input(shortcut) is x):
            reasons.append(f"its shortcut is {describe(shortcut)}, not the input or one module applied to it")
            continue
        expected = set(seen) | {x, output, add, result} | ({shortcut} if shortcut is not x else set())
        extra = [n for n in nodes if n not in expected]
        if extra:
            return f"its forward also computes {describe(extra[0])}"
        if len(x.users) != 2:
            return f"its input is used {len(x.users)} times"
        if add.args[0] is x:
            return "its add may write into the block's input in place"
        return BlockMatch(stages, add, result, None if shortcut is x else shortcut)
    # The operand that got furthest explains best; a ReLU before the add says it all.
    return next((r for r in reasons if "before the add" in r), reasons[-1])


def has_add(graph: fx.Graph) -> bool:
    """True when the forward adds two computed values (a residual connection)."""
    return any(add_operands(node) is not None for node in graph.nodes)


def _inplace_ambiguity(graph: fx.Graph) -> Optional[str]:
    """Why an FX rewrite could lose an in-place ``+=`` (see ``_AUGMENTABLE``), or None."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _AUGMENTABLE or not node.args:
            continue
        target = node.args[0]
        if not isinstance(target, fx.Node):
            continue
        later_users = [u for u in target.users if u is not node and order[u] > order[node]]
        if target.op in ("placeholder", "get_attr") or later_users:
            return (f"{describe(node)} on {describe(target)} may be an in-place `+=` that torch.fx "
                    "does not record")
    return None


def twin_mismatch(block: nn.Module, twin: type) -> Optional[str]:
    """Why ``twin.from_block(block)`` would not compute what ``block`` computes (None: it would)."""
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


# ---------------------------------------------------------------------------- the pass


@dataclass
class _Fusion:
    """One BatchNorm2d whose output feeds only a ReLU (``add`` None) or an add then a ReLU."""

    bn: fx.Node
    relu: fx.Node
    add: Optional[fx.Node] = None


def _describe_swaps(fusions: Sequence[_Fusion]) -> str:
    return ", ".join(f"{f.bn.target} -> {'BatchNormReLU2d' if f.add is None else 'BatchNormAddReLU2d'}"
                     for f in fusions)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _Converter:
    """One conversion: the model, the report, and the modules that must keep their identity."""

    def __init__(self, model: nn.Module, report: ConversionReport):
        self.model = model
        self.report = report
        counts: Dict[int, int] = {}
        for _, m in model.named_modules(remove_duplicate=False):
            counts[id(m)] = counts.get(id(m), 0) + 1
        # Modules reachable under more than one name, or called from outside their parent's forward.
        self.pinned: Set[int] = {key for key, count in counts.items() if count > 1}
        self.visited: Set[int] = set()

    def run(self) -> nn.Module:
        return self.visit(self.model, "")

    # -- recursion

    def visit(self, module: nn.Module, name: str) -> nn.Module:
        """Converts ``module``'s own forward, then its children; returns what takes its place."""
        if id(module) in self.visited:
            return module
        self.visited.add(id(module))
        if isinstance(module, _FusedResidualBlock):
            return module
        done: Set[str] = set()
        if any(type(child) is nn.BatchNorm2d for child in module.children()):
            module, done = self.convert_forward(module, name)
        elif any(True for child in module.children() for _ in child.children()):
            # Only to learn which grandchildren its forward calls directly (``self.seq[1](x)``).
            # Best effort: a forward torch.fx cannot trace pins nothing.
            traced = trace_forward(module)
            if isinstance(traced, Traced):
                self.pin_reached_modules(module, traced.graph)
        for child_name, child in list(module.named_children()):
            if child_name in done:
                continue
            new = self.visit(child, _qualified(name, child_name))
            if new is not child:
                setattr(module, child_name, new)
        return module

    def pin_reached_modules(self, module: nn.Module, graph: fx.Graph) -> None:
        """Modules the forward reaches inside a child (``self.seq[1](x)``) keep their class."""
        for node in graph.nodes:
            if node.op in ("call_module", "get_attr") and "." in node.target:
                try:
                    self.pinned.add(id(module.get_submodule(node.target)))
                except AttributeError:  # a parameter or buffer
                    continue

    def skip_batchnorms(self, module: nn.Module, name: str, reason: str) -> None:
        for child_name, child in module.named_children():
            if type(child) is nn.BatchNorm2d:
                self.report.add(_qualified(name, child_name), "skipped", reason)

    def convert_forward(self, module: nn.Module, name: str) -> Tuple[nn.Module, Set[str]]:
        """Fuses what ``module``'s own forward does with its BatchNorm2d children.

        Returns the module to use in its place and the children already handled.
        """
        kind = type(module).__name__
        traced = trace_forward(module)
        if isinstance(traced, str):
            self.skip_batchnorms(module, name, f"{kind} left as it is: {traced}")
            return module, set()
        self.pin_reached_modules(module, traced.graph)
        match = match_residual_block(module, traced.graph)
        if isinstance(match, BlockMatch):
            return self.convert_block(module, name, traced, match)
        if has_add(traced.graph):
            self.report.add(name, "skipped", f"{kind} left as it is: {match}")
            return module, {n for n, c in module.named_children() if type(c) is nn.BatchNorm2d}
        return self.fuse_batchnorm_relu(module, name, traced), set()

    # -- blocks

    def replacement_blocker(self, module: nn.Module, traced: Traced, bns: Sequence[fx.Node]) -> Optional[str]:
        """Why ``module`` may not be replaced by a new object computing its graph, or None."""
        if has_hooks(module):
            return "it has hooks"
        if id(module) in self.pinned:
            return "it is used in more than one place"
        if traced.side_effect:
            return traced.side_effect
        for node in bns:
            if id(module.get_submodule(node.target)) in self.pinned:
                return f"its BatchNorm2d '{node.target}' is also used elsewhere"
        for child_name, child in module.named_modules():
            if child is not module and id(child) in self.pinned:
                return f"its submodule '{child_name}' is also used elsewhere"
        return None

    def convert_block(self, module: nn.Module, name: str, traced: Traced,
                      match: BlockMatch) -> Tuple[nn.Module, Set[str]]:
        kind = type(module).__name__
        blocker = self.replacement_blocker(module, traced, [stage.bn for stage in match.stages])
        if blocker is not None:
            self.report.add(name, "skipped", f"{kind} left as it is: {blocker}")
            return module, {n for n, c in module.named_children() if type(c) is nn.BatchNorm2d}
        twin = self.twin_for(module, match)
        if twin is not None:
            fused = twin.from_block(module, verify=False)
            if list(fused.state_dict().keys()) == list(module.state_dict().keys()):
                shortcut = getattr(fused, twin.shortcut_name)
                how = ("shortcut BatchNorm fused" if is_conv_bn_shortcut(shortcut)
                       else "identity shortcut" if shortcut is None else f"shortcut '{twin.shortcut_name}'")
                self.report.add(name, "replaced", f"{kind} -> {twin.__name__} ({how})")
                handled = {twin.shortcut_name} if is_conv_bn_shortcut(shortcut) else set()
                return fused, handled | {norm for _, norm in twin.stages}
        ambiguity = _inplace_ambiguity(traced.graph)
        if ambiguity is not None:
            self.report.add(name, "skipped", f"{kind} left as it is: {ambiguity}")
            return module, {n for n, c in module.named_children() if type(c) is nn.BatchNorm2d}
        fusions = [_Fusion(stage.bn, stage.relu) for stage in match.stages[:-1]]
        fusions.append(_Fusion(match.stages[-1].bn, match.relu, match.add))
        rewritten = self.rewrite(module, fusions)
        self.report.add(name, "fused", f"{kind}: forward rewritten with torch.fx ({_describe_swaps(fusions)})")
        return rewritten, {f.bn.target for f in fusions}

    @staticmethod
    def twin_for(module: nn.Module, match: BlockMatch) -> Optional[type]:
        """The fused class with this block's attribute names, or None."""
        candidates = [twin for twin in TWINS
                      if match.stage_names == twin.stages and match.shortcut_name in (None, twin.shortcut_name)]
        for twin in candidates:
            # An identity shortcut needs the twin's shortcut attribute to be None on the block
            # too: a twin would apply a module the block's forward leaves unused.
            if match.shortcut_name is not None or getattr(module, twin.shortcut_name, 0) is None:
                return twin
        return None

    # -- BatchNorm -> ReLU outside blocks

    def fusion_of(self, module: nn.Module, graph: fx.Graph, bn_name: str) -> Union[_Fusion, str]:
        """How the BatchNorm2d child ``bn_name`` can be fused with the ReLU it feeds, or why not."""
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == bn_name]
        bn = getattr(module, bn_name)
        if not calls:
            return "not called by its parent's forward" + (" (called from elsewhere)" if id(bn) in self.pinned else "")
        if len(calls) > 1 or id(bn) in self.pinned:
            return "it is used in more than one place (shared, or called from outside its parent)"
        if has_hooks(bn):
            return "it has hooks"
        node = calls[0]
        if _single_input(node) is None:
            return "it is called with extra arguments"
        if len(node.users) != 1:
            return f"its output has {len(node.users)} users"
        user = next(iter(node.users))
        if relu_input(module, user) is not node:
            return f"its output goes to {describe(user)}, not a ReLU"
        return _Fusion(node, user)

    def fuse_batchnorm_relu(self, module: nn.Module, name: str, traced: Traced) -> nn.Module:
        """BatchNorm2d -> ReLU outside blocks: swap modules where it can, else rewrite the forward."""
        kind = type(module).__name__
        graph = traced.graph
        in_graph: List[_Fusion] = []
        for bn_name, bn in list(module.named_children()):
            if type(bn) is not nn.BatchNorm2d:
                continue
            qualified = _qualified(name, bn_name)
            fusion = self.fusion_of(module, graph, bn_name)
            if isinstance(fusion, str):
                self.report.add(qualified, "skipped", fusion)
                continue
            relu = _submodule(module, fusion.relu)
            relu_calls = [n for n in graph.nodes if n.op == "call_module" and n.target == fusion.relu.target]
            if relu is not None and len(relu_calls) == 1 and id(relu) not in self.pinned:
                # The forward stays as written: the BatchNorm applies the ReLU, the ReLU passes through.
                _set_submodule(module, bn_name, BatchNormReLU2d.from_batchnorm(bn))
                _set_submodule(module, fusion.relu.target, nn.Identity().train(relu.training))
                self.report.add(qualified, "fused", f"BatchNorm2d -> BatchNormReLU2d ('{fusion.relu.target}' -> "
                                                    f"Identity)")
            else:
                in_graph.append(fusion)
        if not in_graph:
            return module
        blocker = (self.replacement_blocker(module, traced, [f.bn for f in in_graph])
                   or _inplace_ambiguity(graph))
        if blocker is not None:
            for fusion in in_graph:
                self.report.add(_qualified(name, fusion.bn.target), "skipped",
                                f"its ReLU is {describe(fusion.relu)} in {kind}'s forward, which is not "
                                f"rewritten: {blocker}")
            return module
        self.report.add(name, "fused", f"{kind}: forward rewritten with torch.fx ({_describe_swaps(in_graph)})")
        return self.rewrite(module, in_graph)

    # -- the FX rewrite

    @staticmethod
    def rewrite(module: nn.Module, fusions: Sequence[_Fusion]) -> fx.GraphModule:
        """``module`` as a GraphModule whose graph calls one fused BatchNorm per fusion.

        The GraphModule has ``module``'s submodules (the same objects, in the same order),
        parameters, buffers and public attributes, so its state_dict keys are the same.
        """
        graph = fusions[0].bn.graph
        for node in list(graph.nodes):
            # nn.Identity calls (timm's drop_block, aa) compute nothing: drop them so BatchNorm,
            # add and ReLU are adjacent. The modules stay registered.
            identity = _submodule(module, node)
            if _is_plain_identity(identity) and _single_input(node) is not None:
                node.replace_all_uses_with(_single_input(node))
                graph.erase_node(node)
        for fusion in fusions:
            bn = module.get_submodule(fusion.bn.target)
            if fusion.add is None:
                _set_submodule(module, fusion.bn.target, BatchNormReLU2d.from_batchnorm(bn))
                fusion.relu.replace_all_uses_with(fusion.bn)
                graph.erase_node(fusion.relu)
                continue
            _set_submodule(module, fusion.bn.target, BatchNormAddReLU2d.from_batchnorm(bn))
            a, b = fusion.add.args
            residual = b if a is fusion.bn else a
            # At the add: the residual may be computed after the BatchNorm.
            with graph.inserting_before(fusion.add):
                fused = graph.call_module(fusion.bn.target, (fusion.bn.args[0], residual))
            fusion.relu.replace_all_uses_with(fused)
            for node in (fusion.relu, fusion.add, fusion.bn):
                graph.erase_node(node)
        graph.lint()
        rewritten = fx.GraphModule(module, graph, class_name=type(module).__name__)
        rewritten._modules = OrderedDict(module._modules)
        rewritten._parameters = OrderedDict(module._parameters)
        rewritten._buffers = OrderedDict(module._buffers)
        rewritten._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
        rewritten.training = module.training
        for key, value in vars(module).items():
            if not key.startswith("_") and not hasattr(rewritten, key):
                setattr(rewritten, key, value)
        return rewritten


def convert(model: nn.Module, *, inplace: bool = True, verbose: bool = False) -> nn.Module:
    """Swaps ``model``'s residual blocks and BatchNorm -> ReLU pairs for fused modules.

    Args:
        model: any ``nn.Module`` (a torchvision / timm / hand-written ResNet).
        inplace: convert ``model`` itself (default) or a deep copy of it.
        verbose: print the conversion report.

    Returns:
        The converted model: ``model`` itself, except when the root module's own forward
        had to be rewritten with torch.fx (then a ``torch.fx.GraphModule`` with the same
        submodules; always use the returned model). Its report is
        ``model.fused_resnet_report`` (a :class:`ConversionReport`).

    The converted model computes what the original computed, forward and backward,
    in train and eval mode, and keeps its parameters (the same tensors), buffers,
    state_dict keys, mode, device, dtype and memory format. See the module docstring
    for what is replaced and what is left alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    converted = _Converter(model, report).run()
    setattr(converted, REPORT_ATTRIBUTE, report)
    if verbose:
        print(report)
    return converted
