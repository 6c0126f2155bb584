"""Step 4b: fuse the tails found. A ``bn -> nn.ReLU`` pair by swapping modules; every other
tail by rewriting the forward of the innermost module that holds all of it as a
``torch.fx.GraphModule`` (its children stay registered, the same objects)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Set, Tuple, Union

import torch.fx as fx
from torch import nn

from ..nn.batchnorm import plain_batchnorm
from ..nn.frozen_batchnorm import is_frozen_batchnorm
from ..nn.matching import ChildrenAreLeaves, describe, first_line, submodule
from .modules import fused_add_relu, fused_norm, generic_signature, join, relative, set_submodule
from .report import ConversionReport
from .tails import Tail, find_tails
from .trace import OWNERS, Analysis, InliningTracer, ModuleKinds, Region, trace_inlined

__all__ = ["INLINED_ATTRIBUTE", "Plans", "Rewriter"]

# On a forward convert rewrote: the paths of the children it inlines (their own forward is not called).
INLINED_ATTRIBUTE = "fused_resnet_inlined"
# Rewrite roots: model path -> (the modules to inline into it, the tails to fuse there).
Plans = Dict[str, Tuple[Set[str], List[Tail]]]


class Rewriter:
    """Applies tails to the model; ``fused`` collects the ids of the BatchNorms fused."""

    def __init__(self, root: nn.Module, analysis: Analysis, kinds: ModuleKinds, report: ConversionReport):
        self.root = root
        self.analysis = analysis
        self.kinds = kinds
        self.report = report
        self.fused: Set[int] = set()

    def module_swap(self, region: Region, tail: Tail) -> bool:
        """A ``bn -> nn.ReLU`` tail fused without touching a forward: the BatchNorm applies the
        ReLU, the ReLU module becomes nn.Identity. False where the ReLU is not such a module."""
        relu = submodule(region.root, tail.relu)
        if (tail.kind != "bn_relu" or relu is None or id(relu) in self.analysis.pinned
                or self.analysis.calls.get(id(relu)) != 1):
            return False
        bn_path, relu_path = join(region.path, tail.bn.target), join(region.path, tail.relu.target)
        bn = region.root.get_submodule(tail.bn.target)
        fused = fused_norm(bn, add=False)
        set_submodule(region.root, tail.bn.target, fused)
        set_submodule(region.root, tail.relu.target, nn.Identity().train(relu.training))
        self.fused.add(id(bn))
        self.report.add(bn_path, "fused",
                        f"{type(bn).__name__} -> {type(fused).__name__} ('{relu_path}' -> Identity)")
        return True

    def rewrite_root(self, region: Region, tail: Tail) -> Union[Tuple[str, Set[str]], str]:
        """The innermost module whose forward holds the whole tail and may be rewritten, and
        the modules to inline into it (model paths), or why there is none."""
        stacks = [node.meta.get(OWNERS, ()) for node in tail.nodes() + tail.evidence if node.op != "placeholder"]
        common: List[str] = []
        for level in zip(*stacks):
            if any(path != level[0] for path in level):
                break
            common.append(level[0])
        candidates = [(path, len(common) - i) for i, path in enumerate(reversed(common))] + [("", 0)]
        why = "no module around it can be rewritten"
        for inner, level in candidates:
            module = region.root.get_submodule(inner) if inner else region.root
            if id(module) in self.analysis.pinned:
                why = f"'{join(region.path, inner)}' is used in more than one place"
                continue
            generic = generic_signature(module) if not inner else self.analysis.generic.get(id(module), False)
            if not generic:
                why = f"'{join(region.path, inner) or '(model)'}' is called with Python values, not only tensors"
                continue
            inline = {join(region.path, path) for stack in stacks for path in stack[level:]}
            return join(region.path, inner), inline
        return why

    def rewrite(self, path: str, inline: Set[str], planned: int) -> None:
        """Retraces the module at ``path`` with ``inline`` inlined and fuses every tail of that graph
        (the analysis found ``planned`` of them)."""
        module = self.root.get_submodule(path) if path else self.root
        inlined = {relative(p, path) for p in inline}
        # A module the analysis saw add no node (DropPath(0)) is inlined too: in the analysed graph it vanished.
        tracer = InliningTracer(lambda m, qualified, args, kwargs: (
            (qualified in inlined or id(m) in self.analysis.transparent) and self.kinds.inlinable(m, qualified, args, kwargs)))
        try:
            graph = trace_inlined(module, tracer)
        except Exception as exc:  # noqa: BLE001 - traced once already; refuse rather than guess
            self.report.add(path, "skipped", f"{type(module).__name__} left as it is: {first_line(exc)}")
            return
        tails = find_tails(self.analysis, module, graph).tails
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
        setattr(rewritten, INLINED_ATTRIBUTE, tuple(sorted(set(getattr(module, INLINED_ATTRIBUTE, ())) | inlined)))
        if path:
            set_submodule(self.root, path, rewritten)
        else:
            self.root = rewritten
        self.report.add(path, "fused", f"{kind}: forward rewritten with torch.fx ({', '.join(descriptions)})")

    def apply_tail(self, module: nn.Module, graph: fx.Graph, tail: Tail) -> str:
        """Fuses one tail in ``graph``; returns what was done, in words."""
        erase = [tail.relu] + tail.noops
        if tail.kind == "bn_relu":
            bn = module.get_submodule(tail.bn.target)
            fused = fused_norm(bn, add=False)
            set_submodule(module, tail.bn.target, fused)
            self.fused.add(id(bn))
            tail.relu.replace_all_uses_with(tail.bn)
            description = f"{tail.bn.target} -> {type(fused).__name__}"
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
            fused_bn = fused_norm(bn, add=True)
            set_submodule(module, tail.bn.target, fused_bn)
            self.fused.add(id(bn))
            kwargs = {}
            description = f"{tail.bn.target} -> {type(fused_bn).__name__}"
            if tail.kind == "bn_add_bn_relu":
                residual = tail.residual_bn.args[0]
                residual_bn = module.get_submodule(tail.residual_bn.target)
                if type(residual_bn) is not nn.BatchNorm2d and not is_frozen_batchnorm(residual_bn):
                    # timm's BatchNormAct2d without activation
                    set_submodule(module, tail.residual_bn.target, plain_batchnorm(residual_bn))
                self.fused.add(id(residual_bn))
                with graph.inserting_before(tail.add):
                    kwargs["residual_bn"] = graph.get_attr(tail.residual_bn.target)
                description += f" with shortcut BatchNorm '{tail.residual_bn.target}'"
            with graph.inserting_before(tail.add):
                fused = graph.call_module(tail.bn.target, (tail.bn.args[0], residual), kwargs)
            tail.relu.replace_all_uses_with(fused)
            erase += [tail.add, tail.bn] + ([tail.residual_bn] if tail.residual_bn is not None else [])
        _erase(graph, erase)
        return description


def _erase(graph: fx.Graph, nodes: List[fx.Node]) -> None:
    """Erases ``nodes`` as their users go (each is used only within the tail)."""
    pending = list(dict.fromkeys(nodes))
    while pending:
        free = [n for n in pending if not n.users]
        if not free:
            raise RuntimeError(f"fused-resnet: cannot erase {[describe(n) for n in pending]}")
        for node in free:
            graph.erase_node(node)
            pending.remove(node)


def merged(plans: Plans) -> List[Tuple[str, Tuple[Set[str], List[Tail]]]]:
    """Rewrite roots, a root inlined into another merged into it, deepest first."""
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
