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
   forward that depends on ``self.training`` in Python, prints or writes attributes).
   In that graph it finds, through hook-free ``nn.Identity`` / ``Dropout(p=0)`` calls and
   DropPath(0)-style no-ops, in-place or not:

   - ``bn -> relu``                       -> :class:`BatchNormReLU2d`
   - ``bn -> add(r) -> relu``, the BatchNorm on either operand -> :class:`BatchNormAddReLU2d`
   - ``bn(a) + bn_r(b) -> relu``          -> :class:`BatchNormAddReLU2d` with ``residual_bn``
   - ``a + b -> relu`` with no BatchNorm  -> ``fused_resnet.add_relu``

   A ``bn -> relu`` whose ReLU is an ``nn.ReLU`` called once is fused by swapping modules
   (the BatchNorm applies the ReLU, the ReLU becomes ``nn.Identity``), the forwards
   untouched. Every other tail is fused by rewriting the forward of the innermost module
   whose forward contains all of it as a ``torch.fx.GraphModule``: the inlined children
   stay registered (the same objects, so ``named_modules()`` and the state_dict keys are
   unchanged) and the new graph calls their leaves directly.
4. Anything it cannot prove equivalent is left exactly as it was, and the report says
   why: a BatchNorm output or a sum read by anything but the tail, a module used in more
   than one place, hooks, an add that writes in place into a tensor seen elsewhere, an
   input that could change before the moved BatchNorm runs, a forward torch.fx cannot
   trace.

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
import inspect
import io
import operator
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .add_relu import add_relu
from .nn.batchnorm import BatchNormAddReLU2d, BatchNormReLU2d, has_hooks, plain_batchnorm, residual_matches
from .nn.blocks import (FusedBasicBlock, FusedBottleneck, FusedConvBottleneck, FusedResidual, _FusedResidualBlock,
                        is_conv_bn_shortcut)
from .nn.matching import (BlockMatch, ChildrenAreLeaves, InplaceRecordingProxy, Traced, add_operands, describe,
                          first_line, has_add, is_inplace_add, is_inplace_call, is_plain_identity,
                          match_residual_block, relu_input, runs_its_class_forward, single_input, submodule,
                          trace_forward, twin_mismatch)

__all__ = ["ConversionReport", "ReportEntry", "convert", "fused_add_relu", "is_batchnorm_act",
           "trace_forward", "twin_mismatch"]

REPORT_ATTRIBUTE = "fused_resnet_report"
# On a forward convert rewrote: the paths of the children it inlines (their own forward is not called).
INLINED_ATTRIBUTE = "fused_resnet_inlined"
# The fused twins, tried in this order against a matched block's attribute names.
TWINS = (FusedBasicBlock, FusedBottleneck, FusedResidual)
# Node metadata: the paths of the inlined modules whose forward created the node.
_OWNERS = "fused_resnet_owners"
_NOOP_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
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


# ------------------------------------------------------------------ what a graph calls


def fused_add_relu(a, b):
    """``relu(a + b)``: one fused op (``fused_resnet.add_relu``) where the operands allow it
    (two floating-point tensors of one shape, dtype and device), else eager's add and ReLU
    (broadcasting, type promotion), exactly as the original computed it."""
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


def _batchnorm_act_blocker(module: nn.Module) -> Optional[str]:
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
    return (is_batchnorm_act(module) and _batchnorm_act_blocker(module) is None
            and is_plain_identity(module.act))


def _is_library_leaf(module: nn.Module) -> bool:
    """torch.nn's own modules (torch.fx's default leaves), fused-resnet's, and every BatchNorm."""
    name = type(module).__module__
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, _FusedResidualBlock)):
        return True
    if name.startswith("fused_resnet."):
        return True
    return (name.startswith("torch.nn") or name.startswith("torch.ao.nn")) and not isinstance(module, nn.Sequential)


def _generic_signature(module: nn.Module) -> bool:
    """True when every parameter of the forward is required: a trace with one placeholder
    per parameter then stands for every call."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)


def _passes_graph_values(module: nn.Module, args: tuple, kwargs: dict) -> bool:
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


def describe_call(root: nn.Module, node: fx.Node) -> str:
    """A node in words, with the class of the module it calls."""
    module = submodule(root, node)
    return describe(node) if module is None else f"{describe(node)} ({type(module).__name__})"


def _read_by(node: fx.Node) -> str:
    return f"its output is read {len(node.users)} times ({', '.join(describe(u) for u in node.users)})"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _relative(path: str, root: str) -> str:
    return path[len(root) + 1:] if root else path


def _is_within(path: str, root: str) -> bool:
    """True when module ``path`` is ``root`` or inside it."""
    return not root or path == root or path.startswith(root + ".")


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@contextlib.contextmanager
def _state_kept(module: nn.Module):
    """Tracing must not leave anything on the module (torch.fx stores tensor constants on it)."""
    saved = dict(module.__dict__)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        module.__dict__.clear()
        module.__dict__.update(saved)


class _InliningTracer(fx.Tracer):
    """Traces a forward with its children inlined where ``inline(module, path)`` says so.

    Records, per module object, how often it is called, from which forward, and whether
    every inlined call passed traced values for all its parameters; every node gets the
    paths of the inlined modules whose forward created it (``node.meta[_OWNERS]``).
    """

    def __init__(self, inline: Callable[[nn.Module, str], bool]):
        super().__init__()
        self._inline = inline
        self.stack: List[str] = []
        self.calls: Dict[int, int] = {}
        self.callers: Dict[int, Set[str]] = {}
        self.generic_calls: Dict[int, bool] = {}
        self.modules: Dict[int, Tuple[str, nn.Module]] = {}
        self.transparent: Set[int] = set()  # inlined modules whose forward added no node (a no-op)
        self.failed: Optional[nn.Module] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not self._inline(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return InplaceRecordingProxy(node, self)

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta[_OWNERS] = tuple(self.stack)
        return node

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        key = id(m)
        self.calls[key] = self.calls.get(key, 0) + 1
        self.callers.setdefault(key, set()).add(self.stack[-1] if self.stack else "")
        self.modules[key] = (path, m)
        if self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)
        self.generic_calls[key] = self.generic_calls.get(key, True) and _passes_graph_values(m, args, kwargs)
        self.stack.append(path)
        before = len(self.graph.nodes)
        try:
            result = super().call_module(m, forward, args, kwargs)
            if len(self.graph.nodes) == before:
                self.transparent.add(key)
            return result
        except Exception:
            if self.failed is None:
                self.failed = m
            raise
        finally:
            self.stack.pop()


@dataclass
class _Region:
    """A module traced with every traceable descendant inlined, and what the trace saw."""

    path: str
    root: nn.Module
    graph: fx.Graph
    tracer: _InliningTracer


# ----------------------------------------------------------------------------- tails


@dataclass
class _Tail:
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
class _Operand:
    """One operand of an add: the value, the BatchNorm-computing call behind its no-ops."""

    value: fx.Node
    source: fx.Node
    chain: List[fx.Node]
    blocker: Optional[str]  # None: ``source`` is a BatchNorm that can be fused into the tail


def _depths(graph: fx.Graph) -> Dict[fx.Node, int]:
    """Longest path from an input to each node: the main path of a block is the deeper operand."""
    depth: Dict[fx.Node, int] = {}
    for node in graph.nodes:
        depth[node] = 1 + max((depth[n] for n in node.all_input_nodes), default=0)
    return depth


# ------------------------------------------------------------------------- the pass


class _Converter:
    """One conversion: the model, the report, what the traces saw, and what was fused."""

    def __init__(self, model: nn.Module, report: ConversionReport, fuse_convolutions: bool = False):
        self.root = model
        self.report = report
        self.fuse_convolutions = fuse_convolutions
        self._kinds: Dict[int, Tuple[nn.Module, Optional[str]]] = {}
        self.fused: Set[int] = set()
        self.reported: Set[int] = set()

    # -- what a module is

    def pinned_modules(self) -> Set[int]:
        counts: Dict[int, int] = {}
        for _, m in self.root.named_modules(remove_duplicate=False):
            counts[id(m)] = counts.get(id(m), 0) + 1
        return {key for key, count in counts.items() if count > 1}

    def kind(self, module: nn.Module) -> Optional[str]:
        """None: a forward to trace through; "leaf": a library module; else why it is opaque."""
        cached = self._kinds.get(id(module))
        if cached is not None and cached[0] is module:
            return cached[1]
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            kind = f"a {type(module).__name__} is never called itself: its parent calls its modules"
        elif _is_library_leaf(module):
            kind = "leaf"
        elif has_hooks(module):
            kind = "it has hooks"
        else:
            traced = trace_forward(module)
            kind = traced if isinstance(traced, str) else traced.side_effect
            if isinstance(traced, Traced) and kind is not None and has_add(traced.graph):
                structure = match_residual_block(module, traced.graph)
                if isinstance(structure, str):
                    kind = f"{kind}; {structure}"
        self._kinds[id(module)] = (module, kind)  # the module is kept: its id is not reused
        return kind

    def set_opaque(self, module: nn.Module, reason: str) -> None:
        self._kinds[id(module)] = (module, reason)

    def inlinable(self, module: nn.Module, path: str = "") -> bool:
        return self.kind(module) is None

    # -- analysis: trace every region

    def analyze(self) -> None:
        """Traces the model as regions: a module torch.fx can trace through, with every
        traceable descendant inlined; the children of an opaque module start new regions."""
        self.pinned = self.pinned_modules()
        self.regions: List[_Region] = []
        self.opaque: List[Tuple[str, nn.Module, str]] = []
        self.calls: Dict[int, int] = {}
        self.generic: Dict[int, bool] = {}
        self.callers: Dict[int, Set[str]] = {}
        self.transparent: Set[int] = set()
        # (path, module, why its parent is opaque): a ModuleList's modules are left for its parent's reason.
        queue = deque([("", self.root, None)])
        seen: Set[int] = set()
        while queue:
            path, module, inherited = queue.popleft()
            if id(module) in seen:
                continue
            seen.add(id(module))
            kind = self.kind(module)
            if kind == "leaf":
                continue
            region = self.trace_region(path, module) if kind is None else None
            if region is None:
                container = isinstance(module, (nn.ModuleList, nn.ModuleDict))
                why = inherited if container and inherited else self.kind(module)
                self.opaque.append((path, module, why))
                queue.extend((_join(path, name), child, why) for name, child in module.named_children())
                continue
            self.regions.append(region)
            tracer = region.tracer
            for key, count in tracer.calls.items():
                self.calls[key] = self.calls.get(key, 0) + count
                self.callers.setdefault(key, set()).update(_join(path, c) if c else path for c in tracer.callers[key])
            for key, generic in tracer.generic_calls.items():
                self.generic[key] = self.generic.get(key, True) and generic
            self.transparent |= tracer.transparent
            for key, (relative, called) in tracer.modules.items():
                called_kind = self.kind(called)
                if called_kind not in (None, "leaf"):
                    self.opaque.append((_join(path, relative), called, called_kind))
                    queue.extend((_join(_join(path, relative), name), child, called_kind)
                                 for name, child in called.named_children())

    def trace_region(self, path: str, module: nn.Module) -> Optional[_Region]:
        """``module`` traced with its descendants inlined; a descendant whose inlined trace
        fails becomes a leaf and the trace is retried. None: ``module`` itself fails."""
        while True:
            tracer = _InliningTracer(self.inlinable)
            try:
                with _state_kept(module):
                    graph = tracer.trace(module)
            except Exception as exc:  # noqa: BLE001 - whatever fails is left alone
                failed = tracer.failed
                reason = f"torch.fx cannot trace its forward with its children inlined ({first_line(exc)})"
                if failed is None or failed is module:
                    self.set_opaque(module, reason)
                    return None
                self.set_opaque(failed, reason)
                continue
            return _Region(path, module, graph, tracer)

    # -- 1. whole-block twins

    def replace_twins(self) -> None:
        self.root = self.visit_twins(self.root, "")

    def visit_twins(self, module: nn.Module, name: str) -> nn.Module:
        if _is_library_leaf(module):
            return module
        if any(type(child) is nn.BatchNorm2d for child in module.children()):
            twin = self.twin_of(module, name)
            if twin is not None:
                return twin
        for child_name, child in list(module.named_children()):
            new = self.visit_twins(child, _join(name, child_name))
            if new is not child:
                setattr(module, child_name, new)
        return module

    def twin_of(self, module: nn.Module, name: str) -> Optional[nn.Module]:
        """The fused twin that computes what ``module`` computes, with its submodules, or None."""
        if has_hooks(module) or id(module) in self.pinned:
            return None
        traced = trace_forward(module)
        if isinstance(traced, str) or traced.side_effect:
            return None
        match = match_residual_block(module, traced.graph)
        if not isinstance(match, BlockMatch):
            return None
        for child_name, child in module.named_modules():
            if child is module:
                continue
            if id(child) in self.pinned or has_hooks(child):
                return None
            # Called from a forward outside the block (``parent.block.bn1(x)``): it must keep its class.
            if any(not _is_within(caller, name) for caller in self.callers.get(id(child), ())):
                return None
        twin = self.twin_for(module, match)
        if twin is None:
            return None
        gemm_note = ""
        if self.fuse_convolutions and twin is FusedBottleneck:
            if _has_sync_batchnorm(module):
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
        self.report.add(name, "replaced", f"{type(module).__name__} -> {twin.__name__} ({how}{gemm_note})")
        return fused

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

    # -- 2. timm's BatchNormAct2d

    def replace_batchnorm_acts(self) -> None:
        replaced: Dict[int, nn.Module] = {}
        for parent_name, parent in list(self.root.named_modules()):
            for child_name, child in list(parent.named_children()):
                if not is_batchnorm_act(child) or type(child.act) is not nn.ReLU:
                    continue
                name = _join(parent_name, child_name)
                if id(child) not in replaced:
                    blocker = _batchnorm_act_blocker(child)
                    if blocker is not None:
                        if id(child) not in self.reported:
                            self.report.add(name, "skipped", f"BatchNormAct2d left as it is: {blocker}")
                            self.reported.add(id(child))
                        continue
                    replaced[id(child)] = BatchNormReLU2d.from_batchnorm(child)
                    self.report.add(name, "fused", "BatchNormAct2d -> BatchNormReLU2d (its act, a ReLU, fused)")
                setattr(parent, child_name, replaced[id(child)])

    # -- 3. tails in the traced graphs

    def is_noop_node(self, root: nn.Module, node: fx.Node) -> bool:
        return (node.op == "call_module" and single_input(node) is not None
                and is_noop_module(submodule(root, node)))

    def fresh(self, root: nn.Module, node: fx.Node) -> bool:
        """True when ``node``'s value is a new tensor, not an alias of anything."""
        if is_inplace_call(node) and node.op != "call_module":
            return False
        if node.op == "call_module":
            module = submodule(root, node)
            return (isinstance(module, _FRESH_MODULES) and not getattr(module, "inplace", False)
                    and runs_its_class_forward(module))
        if node.op == "call_function":
            return node.target in _FRESH_FUNCTIONS or node.target is fused_add_relu
        if node.op == "call_method":
            return node.target in _FRESH_METHODS
        return False

    def exclusive(self, root: nn.Module, node: fx.Node, user: fx.Node,
                  evidence: Optional[List[fx.Node]] = None) -> bool:
        """True when only ``user`` can see ``node``'s tensor: a new tensor read by nothing else.
        The nodes walked go to ``evidence``."""
        while True:
            if evidence is not None:
                evidence.append(node)
            if set(node.users) != {user}:
                return False
            aliasing = (self.is_noop_node(root, node)
                        or (node.op == "call_method" and node.target in _ALIAS_METHODS)
                        or (is_inplace_call(node) and node.op != "call_module"))
            if not aliasing:
                return self.fresh(root, node)
            source = node.args[0] if node.args else None
            if not isinstance(source, fx.Node):
                return False
            node, user = source, node

    def may_mutate(self, root: nn.Module, node: fx.Node) -> bool:
        """True when ``node`` may write into a tensor it is given (or one it can reach)."""
        if node.op == "call_module":
            module = submodule(root, node)
            return (not _is_library_leaf(module) or not runs_its_class_forward(module)
                    or bool(getattr(module, "inplace", False)))
        if node.op in ("call_function", "call_method"):
            return is_inplace_call(node)
        return False

    def batchnorm_blocker(self, root: nn.Module, node: fx.Node) -> Optional[str]:
        """Why the BatchNorm call ``node`` may not become a fused module, or None."""
        module = submodule(root, node)
        if id(module) in self.pinned or self.calls.get(id(module), 0) != 1:
            return "it is used in more than one place (shared, or called more than once)"
        if single_input(node) is None:
            return "it is called with extra arguments"
        return None

    def move_blocker(self, root: nn.Module, graph: fx.Graph, bn: fx.Node, at: fx.Node,
                     evidence: List[fx.Node]) -> Optional[str]:
        """Why BatchNorm call ``bn`` may not run later, at ``at`` (the add), or None; the nodes
        the answer rests on go to ``evidence``."""
        source = bn.args[0]
        order = {n: i for i, n in enumerate(graph.nodes)}
        prefix = bn.target + "."
        between = [n for n in graph.nodes if order[bn] < order[n] < order[at]]
        if any(n.op == "get_attr" and n.target.startswith(prefix) for n in between):
            return "its parameters are read between it and the add"
        if self.exclusive(root, source, bn, evidence):
            return None
        evidence += between
        mutating = next((n for n in between if self.may_mutate(root, n)), None)
        if mutating is not None:
            return (f"its input {describe(source)} is read elsewhere and {describe(mutating)} runs before the add: "
                    "the input could change before the moved BatchNorm reads it")
        return None

    def find_tails(self, root: nn.Module,
                   graph: fx.Graph) -> Tuple[List[_Tail], Dict[int, str], List[Tuple[fx.Node, str]]]:
        """The fusable tails of ``graph`` (traced from ``root``), why BatchNorms next to a ReLU or
        an add are not fusable (by module id), and the add -> ReLU pairs that are not."""
        tails: List[_Tail] = []
        reasons: Dict[int, str] = {}
        unfused_adds: List[Tuple[fx.Node, str]] = []
        depth = _depths(graph)
        for node in graph.nodes:
            source = relu_input(root, node)
            if source is None:
                continue
            noops: List[fx.Node] = []
            value = source
            while len(value.users) == 1 and self.is_noop_node(root, value):
                noops.append(value)
                value = single_input(value)
            if computes_batchnorm2d(submodule(root, value)):
                if len(value.users) != 1:
                    reasons[id(submodule(root, value))] = _read_by(value)
                    continue
                blocker = self.batchnorm_blocker(root, value)
                if blocker is not None:
                    reasons[id(submodule(root, value))] = blocker
                    continue
                tails.append(_Tail("bn_relu", node, bn=value, noops=noops))
                continue
            if add_operands(value) is None:
                continue
            if len(value.users) != 1:
                reason = f"the sum {describe(value)} is read {len(value.users)} times"
                self.blame_operands(root, value, reason, reasons)
                unfused_adds.append((value, reason))
                continue
            tail = self.add_tail(root, graph, value, node, noops, depth, reasons)
            if isinstance(tail, str):
                unfused_adds.append((value, tail))
            else:
                tails.append(tail)
        return tails, reasons, unfused_adds

    def blame_operands(self, root: nn.Module, add: fx.Node, reason: str, reasons: Dict[int, str]) -> None:
        for operand in add_operands(add):
            source = operand
            while len(source.users) == 1 and self.is_noop_node(root, source):
                source = single_input(source)
            if computes_batchnorm2d(submodule(root, source)):
                reasons.setdefault(id(submodule(root, source)), reason)

    def operand(self, root: nn.Module, graph: fx.Graph, add: fx.Node, value: fx.Node,
                evidence: List[fx.Node]) -> _Operand:
        chain: List[fx.Node] = []
        source = value
        while len(source.users) == 1 and self.is_noop_node(root, source):
            chain.append(source)
            source = single_input(source)
        if not computes_batchnorm2d(submodule(root, source)):
            return _Operand(value, source, chain, "not a BatchNorm")
        if len(source.users) != 1 or len(value.users) != 1:
            return _Operand(value, source, chain, _read_by(source if len(source.users) != 1 else value))
        blocker = self.batchnorm_blocker(root, source) or self.move_blocker(root, graph, source, add, evidence)
        return _Operand(value, source, chain, blocker)

    def add_tail(self, root: nn.Module, graph: fx.Graph, add: fx.Node, relu: fx.Node, noops: List[fx.Node],
                 depth: Dict[fx.Node, int], reasons: Dict[int, str]) -> Union[_Tail, str]:
        """The tail ``relu(add)``, or why it may not be fused."""
        a, b = add_operands(add)
        if a is b:
            return "it adds a value to itself"
        evidence: List[fx.Node] = []
        operands = [self.operand(root, graph, add, value, evidence) for value in (a, b)]
        for op in operands:
            if op.blocker not in (None, "not a BatchNorm"):
                reasons.setdefault(id(submodule(root, op.source)), op.blocker)
        fusable = [op for op in operands if op.blocker is None]
        # `a += b` writes into a: harmless when a is a fused BatchNorm's output or a tensor only the add sees.
        if is_inplace_add(add) and not any(op.value is a for op in fusable) \
                and not self.exclusive(root, a, add, evidence):
            reason = (f"its add writes in place into {describe(a)}, which is read elsewhere or may be a "
                      "tensor seen outside")
            for op in operands:
                if computes_batchnorm2d(submodule(root, op.source)):
                    reasons[id(submodule(root, op.source))] = reason
            return reason
        if len(fusable) == 2:
            main, other = sorted(fusable, key=lambda op: -depth[op.source])
            return _Tail("bn_add_bn_relu", relu, bn=main.source, add=add, main=main.value,
                         residual_bn=other.source, noops=noops + main.chain + other.chain, evidence=evidence)
        if len(fusable) == 1:
            main = fusable[0]
            return _Tail("bn_add_relu", relu, bn=main.source, add=add, main=main.value, noops=noops + main.chain,
                         evidence=evidence)
        return _Tail("add_relu", relu, add=add, noops=noops, evidence=evidence)

    # -- applying tails

    def module_swap(self, region: _Region, tail: _Tail) -> bool:
        """A ``bn -> nn.ReLU`` tail fused without touching a forward: the BatchNorm applies the
        ReLU, the ReLU module becomes nn.Identity. False where the ReLU is not such a module."""
        relu = submodule(region.root, tail.relu)
        if tail.kind != "bn_relu" or relu is None or id(relu) in self.pinned or self.calls.get(id(relu)) != 1:
            return False
        bn_path, relu_path = _join(region.path, tail.bn.target), _join(region.path, tail.relu.target)
        bn = region.root.get_submodule(tail.bn.target)
        _set_submodule(region.root, tail.bn.target, BatchNormReLU2d.from_batchnorm(bn))
        _set_submodule(region.root, tail.relu.target, nn.Identity().train(relu.training))
        self.fused.add(id(bn))
        self.report.add(bn_path, "fused", f"{type(bn).__name__} -> BatchNormReLU2d ('{relu_path}' -> Identity)")
        return True

    def rewrite_root(self, region: _Region, tail: _Tail) -> Union[Tuple[str, Set[str]], str]:
        """The innermost module whose forward holds the whole tail and may be rewritten, and
        the modules to inline into it (model paths), or why there is none."""
        stacks = [node.meta.get(_OWNERS, ()) for node in tail.nodes() + tail.evidence
                  if node.op != "placeholder"]
        common: List[str] = []
        for level in zip(*stacks):
            if any(path != level[0] for path in level):
                break
            common.append(level[0])
        candidates = [(path, len(common) - i) for i, path in enumerate(reversed(common))] + [("", 0)]
        why = "no module around it can be rewritten"
        for relative, level in candidates:
            module = region.root.get_submodule(relative) if relative else region.root
            if id(module) in self.pinned:
                why = f"'{_join(region.path, relative)}' is used in more than one place"
                continue
            generic = _generic_signature(module) if not relative else self.generic.get(id(module), False)
            if not generic:
                why = f"'{_join(region.path, relative) or '(model)'}' is called with Python values, not only tensors"
                continue
            inline = {_join(region.path, path) for stack in stacks for path in stack[level:]}
            return _join(region.path, relative), inline
        return why

    def rewrite(self, path: str, inline: Set[str], planned: int) -> None:
        """Retraces the module at ``path`` with ``inline`` inlined and fuses every tail of that graph
        (the analysis found ``planned`` of them)."""
        module = self.root.get_submodule(path) if path else self.root
        relative = {_relative(p, path) for p in inline}
        # A module the analysis saw add no node (DropPath(0)) is inlined too: in the analysed graph it vanished.
        tracer = _InliningTracer(lambda m, qualified: (qualified in relative or id(m) in self.transparent)
                                 and self.inlinable(m))
        try:
            with _state_kept(module):
                graph = tracer.trace(module)
        except Exception as exc:  # noqa: BLE001 - traced once already; refuse rather than guess
            self.report.add(path, "skipped", f"{type(module).__name__} left as it is: {first_line(exc)}")
            return
        tails, _, _ = self.find_tails(module, graph)
        kind = type(module).__name__
        if len(tails) < planned:
            self.report.add(path, "skipped", f"{kind}: {planned - len(tails)} of the {planned} tails the analysis "
                                             "found are not in its own trace; left unfused")
        if not tails:
            return
        descriptions = [self.apply_tail(module, graph, tail) for tail in tails]
        graph.lint()
        # Unpickling re-traces the generated code with this class: its proxies keep `a += b` in place.
        graph._tracer_cls = ChildrenAreLeaves
        rewritten = fx.GraphModule(module, graph, class_name=kind)
        rewritten._modules = OrderedDict(module._modules)
        rewritten._parameters = OrderedDict(module._parameters)
        rewritten._buffers = OrderedDict(module._buffers)
        rewritten._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
        rewritten.training = module.training
        for key, value in vars(module).items():
            if not key.startswith("_") and not hasattr(rewritten, key):
                setattr(rewritten, key, value)
        # The children whose forward this graph inlines: only it calls their modules now (fold_bn reads it).
        setattr(rewritten, INLINED_ATTRIBUTE, tuple(sorted(set(getattr(module, INLINED_ATTRIBUTE, ())) | relative)))
        if path:
            _set_submodule(self.root, path, rewritten)
        else:
            self.root = rewritten
        self.report.add(path, "fused", f"{kind}: forward rewritten with torch.fx ({', '.join(descriptions)})")

    def apply_tail(self, module: nn.Module, graph: fx.Graph, tail: _Tail) -> str:
        """Fuses one tail in ``graph``; returns what was done, in words."""
        erase = [tail.relu] + tail.noops
        if tail.kind == "bn_relu":
            bn = module.get_submodule(tail.bn.target)
            _set_submodule(module, tail.bn.target, BatchNormReLU2d.from_batchnorm(bn))
            self.fused.add(id(bn))
            tail.relu.replace_all_uses_with(tail.bn)
            description = f"{tail.bn.target} -> BatchNormReLU2d"
        elif tail.kind == "add_relu":
            with graph.inserting_before(tail.add):
                fused = graph.call_function(fused_add_relu, tuple(tail.add.args))
            tail.relu.replace_all_uses_with(fused)
            erase.append(tail.add)
            description = f"{describe(tail.add)} + ReLU -> add_relu"
        else:
            a, b = tail.add.args
            residual = b if a is tail.main else a
            bn = module.get_submodule(tail.bn.target)
            _set_submodule(module, tail.bn.target, BatchNormAddReLU2d.from_batchnorm(bn))
            self.fused.add(id(bn))
            kwargs = {}
            description = f"{tail.bn.target} -> BatchNormAddReLU2d"
            if tail.kind == "bn_add_bn_relu":
                residual = tail.residual_bn.args[0]
                residual_bn = module.get_submodule(tail.residual_bn.target)
                if type(residual_bn) is not nn.BatchNorm2d:  # timm's BatchNormAct2d without activation
                    _set_submodule(module, tail.residual_bn.target, plain_batchnorm(residual_bn))
                self.fused.add(id(residual_bn))
                with graph.inserting_before(tail.add):
                    kwargs["residual_bn"] = graph.get_attr(tail.residual_bn.target)
                description += f" with shortcut BatchNorm '{tail.residual_bn.target}'"
            with graph.inserting_before(tail.add):
                fused = graph.call_module(tail.bn.target, (tail.bn.args[0], residual), kwargs)
            tail.relu.replace_all_uses_with(fused)
            erase += [tail.add, tail.bn] + ([tail.residual_bn] if tail.residual_bn is not None else [])
        self.erase(graph, erase)
        return description

    @staticmethod
    def erase(graph: fx.Graph, nodes: List[fx.Node]) -> None:
        """Erases ``nodes`` as their users go (each is used only within the tail)."""
        pending = list(dict.fromkeys(nodes))
        while pending:
            free = [n for n in pending if not n.users]
            if not free:
                raise RuntimeError(f"fused-resnet: cannot erase {[describe(n) for n in pending]}")
            for node in free:
                graph.erase_node(node)
                pending.remove(node)

    # -- the whole pass

    def run(self) -> nn.Module:
        """Twins, then BatchNormAct2d, then every tail the traces find; returns the model to use."""
        self.analyze()  # who calls what: a twin must not lose a BatchNorm called from outside its block
        self.replace_twins()
        self.replace_batchnorm_acts()
        self.analyze()
        plans: Dict[str, Tuple[Set[str], List[_Tail]]] = {}
        unfusable: Dict[int, str] = {}
        batchnorms: List[Tuple[str, nn.Module, fx.Node, _Region]] = []
        for region in self.regions:
            tails, reasons, unfused_adds = self.find_tails(region.root, region.graph)
            for key, reason in reasons.items():
                unfusable.setdefault(key, reason)
            for add, reason in unfused_adds:
                owner = add.meta.get(_OWNERS, ())
                owner_path = _join(region.path, owner[-1]) if owner else region.path
                owner_module = self.root.get_submodule(owner_path) if owner_path else self.root
                self.report.add(owner_path, "skipped", f"{type(owner_module).__name__}: {describe(add)} -> ReLU "
                                                       f"left unfused: {reason}")
            for node in region.graph.nodes:
                module = submodule(region.root, node)
                if type(module) is nn.BatchNorm2d or is_batchnorm_act(module):
                    batchnorms.append((_join(region.path, node.target), module, node, region))
            for tail in tails:
                if self.module_swap(region, tail):
                    continue
                plan = self.rewrite_root(region, tail)
                if isinstance(plan, str):
                    for bn in (tail.bn, tail.residual_bn):
                        if bn is not None:
                            unfusable[id(submodule(region.root, bn))] = plan
                    continue
                path, inline = plan
                planned = plans.setdefault(path, (set(), []))
                planned[0].update(inline)
                planned[1].append(tail)
        for path, (inline, planned) in self.merged(plans):
            self.rewrite(path, inline, len(planned))
        self.report_unfused(batchnorms, unfusable)
        return self.root

    @staticmethod
    def merged(plans: Dict[str, Tuple[Set[str], list]]) -> List[Tuple[str, Tuple[Set[str], list]]]:
        """Rewrite roots (model path -> (modules to inline, tails)), a root inlined into another
        merged into it, deepest first."""
        plans = {path: (set(inline), list(tails)) for path, (inline, tails) in plans.items()}
        changed = True
        while changed:
            changed = False
            for inner in list(plans):
                outer = next((p for p, (inline, _) in plans.items() if p != inner and inner in inline), None)
                if outer is not None:
                    inline, tails = plans.pop(inner)
                    plans[outer][0].update(inline)
                    plans[outer][1].extend(tails)
                    changed = True
                    break
        return sorted(plans.items(), key=lambda item: -(item[0].count(".") + bool(item[0])))

    def report_unfused(self, batchnorms, unfusable: Dict[int, str]) -> None:
        """A skipped entry, with the reason, for every BatchNorm the traces saw and no tail took,
        and for the BatchNorms of modules left opaque."""
        for path, module, node, region in batchnorms:
            if id(module) in self.fused or id(module) in self.reported:
                continue
            self.reported.add(id(module))
            if id(module) in unfusable:
                reason = unfusable[id(module)]
            elif not runs_its_class_forward(module):
                reason = "it has hooks" if has_hooks(module) else "a forward is assigned on the instance"
            elif is_batchnorm_act(module) and not computes_batchnorm2d(module):
                reason = (_batchnorm_act_blocker(module)
                          or f"its activation is {type(module.act).__name__}, not a ReLU")
            elif len(node.users) != 1:
                reason = _read_by(node)
            else:
                user = next(iter(node.users))
                while self.is_noop_node(region.root, user) and len(user.users) == 1:
                    user = next(iter(user.users))
                reason = (f"its output goes to {describe_call(region.root, user)}, not a ReLU or an add that a "
                          "ReLU follows")
            self.report.add(path, "skipped", reason)
        for path, module, reason in self.opaque:
            for child_name, child in module.named_children():
                if (type(child) is nn.BatchNorm2d or is_batchnorm_act(child)) and id(child) not in self.reported:
                    self.reported.add(id(child))
                    self.report.add(_join(path, child_name), "skipped",
                                    f"{type(module).__name__} left as it is: {reason}")


def _has_sync_batchnorm(block: nn.Module) -> bool:
    """Whether a norm in ``block`` is a SyncBatchNorm (fused or not): the GEMM path has no cross-process statistics."""
    from .nn.sync_batchnorm import _SyncMixin  # here: keeps convert's import graph as it was
    return any(isinstance(m, (nn.SyncBatchNorm, _SyncMixin)) for m in block.modules())


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
    converted = _Converter(model, report, fuse_convolutions).run()
    setattr(converted, REPORT_ATTRIBUTE, report)
    if verbose:
        print(report)
    return converted
