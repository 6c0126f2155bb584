"""Step 1: trace the model as regions, each module's forward with its children inlined.

A region is a module torch.fx can trace through, with every traceable descendant inlined
down to the leaves (convolutions, BatchNorms, activations, and any module that cannot or
must not be traced: hooks, data-dependent control flow, a forward that depends on
``self.training`` in Python, prints or writes attributes); the children of an opaque
module start new regions. The traces also say who calls which module, how often, and
with what (the later steps refuse a module used in more than one place).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch.fx as fx
from torch import nn

from ..nn.batchnorm import has_hooks
from ..nn.matching import InplaceRecordingProxy, Traced, first_line, has_add, match_residual_block, trace_forward
from .modules import is_library_leaf, join, passes_graph_values

__all__ = ["OWNERS", "Analysis", "InliningTracer", "ModuleKinds", "Region", "state_kept", "trace_inlined"]

# Node metadata: the paths of the inlined modules whose forward created the node.
OWNERS = "fused_resnet_owners"


@contextlib.contextmanager
def state_kept(module: nn.Module):
    """Tracing must not leave anything on the module (torch.fx stores tensor constants on it)."""
    saved = dict(module.__dict__)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        module.__dict__.clear()
        module.__dict__.update(saved)


# inline(module, path, args, kwargs): whether this call of ``module`` is inlined.
InlineRule = Callable[[nn.Module, str, tuple, dict], bool]


class InliningTracer(fx.Tracer):
    """Traces a forward with its children inlined where ``inline(module, path, args, kwargs)`` says so.

    Records, per module object, how often it is called, from which forward, whether every
    inlined call passed traced values for all its parameters, and whether it was inlined
    or kept as one call; every node gets the paths of the inlined modules whose forward
    created it (``node.meta[OWNERS]``).
    """

    def __init__(self, inline: InlineRule):
        super().__init__()
        self._inline = inline
        self._call: Optional[Tuple[nn.Module, bool]] = None  # (module, inlined?) of the call being made
        self.inlined: Set[int] = set()
        self.kept: Set[int] = set()  # modules called as one node (at least once)
        self.stack: List[str] = []
        self.calls: Dict[int, int] = {}
        self.callers: Dict[int, Set[str]] = {}
        self.generic_calls: Dict[int, bool] = {}
        self.modules: Dict[int, Tuple[str, nn.Module]] = {}
        self.transparent: Set[int] = set()  # inlined modules whose forward added no node (a no-op)
        self.failed: Optional[nn.Module] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._call is not None and self._call[0] is m:
            return not self._call[1]
        return not self._inline(m, module_qualified_name, (), {})

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return InplaceRecordingProxy(node, self)

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta[OWNERS] = tuple(self.stack)
        return node

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        key = id(m)
        self.calls[key] = self.calls.get(key, 0) + 1
        self.callers.setdefault(key, set()).add(self.stack[-1] if self.stack else "")
        self.modules[key] = (path, m)
        inline = self._inline(m, path, args, kwargs)
        self._call = (m, inline)
        if not inline:
            self.kept.add(key)
            return super().call_module(m, forward, args, kwargs)
        self.inlined.add(key)
        self.generic_calls[key] = self.generic_calls.get(key, True) and passes_graph_values(m, args, kwargs)
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


def trace_inlined(module: nn.Module, tracer: InliningTracer) -> fx.Graph:
    """``module``'s forward traced by ``tracer``, leaving nothing on the module."""
    with state_kept(module):
        return tracer.trace(module)


@dataclass
class Region:
    """A module traced with every traceable descendant inlined, and what the trace saw."""

    path: str
    root: nn.Module
    graph: fx.Graph
    tracer: InliningTracer


@dataclass
class Analysis:
    """The model's regions and, over all of them, who calls which module (by module id)."""

    pinned: Set[int]  # modules registered under more than one name
    regions: List[Region] = field(default_factory=list)
    opaque: List[Tuple[str, nn.Module, str]] = field(default_factory=list)  # (path, module, why not traced)
    calls: Dict[int, int] = field(default_factory=dict)
    generic: Dict[int, bool] = field(default_factory=dict)  # every call passed traced values only
    callers: Dict[int, Set[str]] = field(default_factory=dict)
    transparent: Set[int] = field(default_factory=set)
    inlined: Dict[int, nn.Module] = field(default_factory=dict)  # inlined at some call
    kept: Set[int] = field(default_factory=set)  # called as one node at some call

    def add(self, region: Region) -> None:
        self.regions.append(region)
        tracer = region.tracer
        for key, count in tracer.calls.items():
            self.calls[key] = self.calls.get(key, 0) + count
            self.callers.setdefault(key, set()).update(join(region.path, c) if c else region.path
                                                       for c in tracer.callers[key])
        for key, generic in tracer.generic_calls.items():
            self.generic[key] = self.generic.get(key, True) and generic
        self.transparent |= tracer.transparent
        self.inlined.update((key, tracer.modules[key][1]) for key in tracer.inlined)
        self.kept |= tracer.kept
        # Inlined at one call, kept whole at another: its insides run unseen there, so none may change.
        for key in self.kept & self.inlined.keys():
            self.pinned |= {id(m) for m in self.inlined[key].modules()}


def pinned_modules(root: nn.Module) -> Set[int]:
    counts: Dict[int, int] = {}
    for _, m in root.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    return {key for key, count in counts.items() if count > 1}


def _traced_kind(module: nn.Module, traced) -> Optional[str]:
    """Why a forward traced by ``trace_forward`` may not be inlined, or None."""
    kind = traced if isinstance(traced, str) else traced.side_effect
    if isinstance(traced, Traced) and kind is not None and has_add(traced.graph):
        structure = match_residual_block(module, traced.graph)
        if isinstance(structure, str):
            kind = f"{kind}; {structure}"
    return kind


def call_values(module: nn.Module, args: tuple, kwargs: dict) -> Optional[dict]:
    """The Python values one call passes ``module.forward`` (defaults included), as torch.fx's
    ``concrete_args``: a traced value stays an input (``PH`` inside a list or tuple), None, a bool,
    a number or a string is fixed. None: the call passes something else (an object, a dict)."""
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    concrete = {}
    for name, parameter in signature.parameters.items():
        value = bound.arguments.get(name)
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            if value:
                return None
            continue
        if isinstance(value, fx.Proxy):
            continue
        if isinstance(value, (list, tuple)) and all(isinstance(v, fx.Proxy) or _is_constant(v) for v in value):
            concrete[name] = type(value)(fx._symbolic_trace.PH if isinstance(v, fx.Proxy) else v for v in value)
        elif _is_constant(value):
            concrete[name] = value
        else:
            return None
    return concrete


def _is_constant(value) -> bool:
    return value is None or type(value) in (bool, int, float, str)


class ModuleKinds:
    """What each module is to the tracer, decided once per module object."""

    def __init__(self):
        self._kinds: Dict[int, Tuple[nn.Module, Optional[str]]] = {}
        # Traced modules: a call that passes Python values (a default, None, a list of tensors) is
        # judged by the forward as that call runs it, those values fixed.
        self._per_call: Set[int] = set()
        self._call_kinds: Dict[Tuple[int, str], Optional[str]] = {}
        self._refused_calls: Dict[int, str] = {}  # why a call of a traced module was kept whole

    def kind(self, module: nn.Module) -> Optional[str]:
        """None: a forward to trace through; "leaf": a library module; else why it is opaque."""
        cached = self._kinds.get(id(module))
        if cached is not None and cached[0] is module:
            return cached[1]
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)) and type(module).forward is nn.Module.forward:
            kind = f"a {type(module).__name__} is never called itself: its parent calls its modules"
        elif is_library_leaf(module):
            kind = "leaf"
        elif has_hooks(module):
            kind = "it has hooks"
        else:
            kind = _traced_kind(module, trace_forward(module))
            self._per_call.add(id(module))
        self._kinds[id(module)] = (module, kind)  # the module is kept: its id is not reused
        return kind

    def set_opaque(self, module: nn.Module, reason: str) -> None:
        self._kinds[id(module)] = (module, reason)
        self._per_call.discard(id(module))

    def inlinable(self, module: nn.Module, path: str = "", args: tuple = (), kwargs: Optional[dict] = None) -> bool:
        """Whether this call of ``module`` may be inlined (without ``args``: every call)."""
        kind = self.kind(module)
        if id(module) not in self._per_call or not (args or kwargs):
            return kind is None
        concrete = call_values(module, args, kwargs or {})
        if not concrete:  # traced values only (or values torch.fx cannot fix): the module's own trace
            return kind is None
        key = (id(module), repr(concrete))
        if key not in self._call_kinds:
            with warnings.catch_warnings():  # torch.fx warns that it cannot assert a fixed string
                warnings.simplefilter("ignore")
                self._call_kinds[key] = _traced_kind(module, trace_forward(module, concrete_args=concrete))
        if self._call_kinds[key] is not None:
            self._refused_calls[id(module)] = f"called with {concrete}: {self._call_kinds[key]}"
        return self._call_kinds[key] is None

    def analyze(self, root: nn.Module) -> Analysis:
        """Traces ``root`` as regions: a module torch.fx can trace through, with every
        traceable descendant inlined; the children of an opaque module start new regions."""
        analysis = Analysis(pinned_modules(root))
        # (path, module, why its parent is opaque): a ModuleList's modules are left for its parent's reason.
        queue = deque([("", root, None)])
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
                analysis.opaque.append((path, module, why))
                queue.extend((join(path, name), child, why) for name, child in module.named_children())
                continue
            analysis.add(region)
            for key, (relative, called) in region.tracer.modules.items():
                if key in region.tracer.inlined:
                    continue
                called_kind = self.kind(called) or self._refused_calls.get(key)
                if called_kind not in (None, "leaf"):
                    analysis.opaque.append((join(path, relative), called, called_kind))
                    queue.extend((join(join(path, relative), name), child, called_kind)
                                 for name, child in called.named_children())
        return analysis

    def trace_region(self, path: str, module: nn.Module) -> Optional[Region]:
        """``module`` traced with its descendants inlined; a descendant whose inlined trace
        fails becomes a leaf and the trace is retried. None: ``module`` itself fails."""
        while True:
            tracer = InliningTracer(self.inlinable)
            try:
                graph = trace_inlined(module, tracer)
            except Exception as exc:  # noqa: BLE001 - whatever fails is left alone
                failed = tracer.failed
                reason = f"torch.fx cannot trace its forward with its children inlined ({first_line(exc)})"
                if failed is None or failed is module:
                    self.set_opaque(module, reason)
                    return None
                self.set_opaque(failed, reason)
                continue
            return Region(path, module, graph, tracer)
