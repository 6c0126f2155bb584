"""The correctness checks of ``fused-resnet gpu``: each returns a JSON-able dict with ``passed``.

- :func:`run_pytest_subset`: the parity, hardening and kernel tests in a pytest subprocess
  (on a CUDA machine their tensors are on the GPU, so they run the compiled kernels);
- :func:`check_no_host_sync`: every fused op, forward and backward, under
  ``torch.cuda.set_sync_debug_mode("error")``;
- :func:`check_determinism`: a converted model's training step twice from the same state, bitwise;
  :func:`check_ops_determinism`: the same for the fused ops alone;
- :func:`check_cuda_graph`: a converted model's training step captured in a CUDA graph and replayed;
- :func:`check_last_device`: a converted model's training step on the last CUDA device while device 0
  is current (the ops must launch on their input's device), against the same step on device 0;
- :func:`check_compile_fullgraph`: ``torch.compile(fullgraph=True)`` of a converted model, the
  fused ops inside the graph, the same numbers as uncompiled;
- :func:`jit_kernel_facts` / :func:`offline_kernel_facts`: registers, spills and shared memory of
  the kernels as compiled on this device (or, without one, for sm_90a ahead of time).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .bench import capture_cuda_graph
from .check import TOLERANCES, normalised_error
from .common import (DTYPES, MEMORY_FORMATS, OP_PASSES, TAIL_OPS, convert_model, fused_tail, synchronize,
                     tail_case, torchvision_resnet)

# pytest -v prints "path::test[id] PASSED [ 12%]"; the -ra summary lines start with the outcome instead.
_PYTEST_LINE = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def repository_root() -> Optional[Path]:
    """The source tree the package runs from (an editable install), where ``tests/`` lives; else None."""
    import fused_resnet

    root = Path(fused_resnet.__file__).resolve().parents[1]
    return root if (root / "tests" / "conftest.py").is_file() else None


def parse_pytest_output(text: str) -> dict:
    """Outcome counts and the failing test ids of a ``pytest -v`` run (complete or cut short)."""
    outcomes: dict[str, str] = {}
    for line in text.splitlines():
        m = _PYTEST_LINE.match(line.strip())
        if m:
            outcomes[m.group(1)] = m.group(2)
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    return {"tests_passed": counts["PASSED"], "tests_failed": counts["FAILED"], "tests_errors": counts["ERROR"],
            "tests_skipped": counts["SKIPPED"],
            "failures": [t for t, v in outcomes.items() if v in ("FAILED", "ERROR")]}


def run_pytest_subset(paths: list[str], marker: str, keyword: Optional[str], timeout_s: float, log_path: str,
                      interpreter: bool) -> dict:
    """Run ``pytest -v -m marker [-k keyword] paths`` from the source tree, its output into ``log_path``.

    Cut at ``timeout_s`` (the process is killed; the tests that finished are counted).
    """
    root = repository_root()
    if root is None:
        return {"status": "skipped", "passed": None, "reason": "tests/ not found next to the package "
                "(not an editable install from the source tree)"}
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "passed": None, "reason": "pytest is not installed"}
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", marker, *paths]
    if keyword:
        cmd += ["-k", keyword]
    env = dict(os.environ)
    if interpreter:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(("TRITON_INTERPRET=1 " if interpreter else "") + " ".join(cmd[1:]) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env)
        try:
            returncode, cut = proc.wait(timeout=max(timeout_s, 1)), False
        except subprocess.TimeoutExpired:
            proc.kill()
            returncode, cut = proc.wait(), True
    with open(log_path) as log:
        counts = parse_pytest_output(log.read())
    with open(log_path, "a") as log:
        if cut:
            log.write(f"\n[fused-resnet gpu] cut after {timeout_s:.0f} s (time budget)\n")
    ran = counts["tests_passed"] + counts["tests_failed"] + counts["tests_errors"]
    passed = not counts["failures"] and ran > 0 and (cut or returncode == 0)
    return {"status": "cut" if cut else "ok", "passed": passed, "command": " ".join(cmd[1:]),
            "interpreter": interpreter, "returncode": returncode, "seconds": time.perf_counter() - start,
            **counts, "log": os.path.basename(log_path)}


# --------------------------------------------------------------------------- fused ops on the device


def check_no_host_sync(shape: tuple, dtype: str, device: str) -> dict:
    """Every fused op and pass (momentum 0.1 and None in training) under sync debug mode "error"."""
    failures, cases = [], 0
    for op in TAIL_OPS:
        for pass_ in OP_PASSES[op]:
            for momentum in ((0.1, None) if pass_.endswith("train") else (0.1,)):
                case = tail_case(op, pass_, shape, dtype, "channels_last", device)
                for bn in (case.norms.bn, case.norms.bn_r):
                    bn.momentum = momentum
                dy = torch.randn_like(case.x_leaf)
                torch.cuda.synchronize()
                cases += 1
                try:
                    torch.cuda.set_sync_debug_mode("error")
                    with torch.no_grad() if pass_ == "forward_eval" else contextlib.nullcontext():
                        y = case.forward(fused_tail)
                        if pass_.startswith("backward"):
                            torch.autograd.grad(y, case.differentiable(), dy)
                except RuntimeError as exc:
                    failures.append(f"{op} {pass_} momentum={momentum}: {exc}"[:300])
                finally:
                    torch.cuda.set_sync_debug_mode("default")
    return {"passed": not failures, "cases": cases, "shape": list(shape), "dtype": dtype, "failures": failures}


def _train_step(model: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, every parameter gradient and every buffer after one training step's forward and backward."""
    model.train()
    params = dict(model.named_parameters())
    out = model(x)
    grads = torch.autograd.grad(out, list(params.values()), grad_out)
    result = {"output": out.detach()}
    result.update({f"grad {name}": g for name, g in zip(params, grads)})
    result.update({f"buffer {name}": b.detach().clone() for name, b in model.named_buffers()})
    return result


@contextlib.contextmanager
def deterministic_algorithms():
    """cuDNN and ATen restricted to deterministic algorithms inside the block (warnings, not errors,
    where PyTorch has none); restored afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def _model_inputs(batch: int, resolution: int, dtype: str, memory_format: str, device: str, seed: int = 1):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, 3, resolution, resolution, generator=gen, device=device).to(
        dtype=DTYPES[dtype], memory_format=MEMORY_FORMATS[memory_format])
    return x, torch.randn(batch, 1000, generator=gen, device=device).to(DTYPES[dtype])


def _twice_equal(make_model: Callable[[], nn.Module], x: torch.Tensor, grad_out: torch.Tensor) -> list[str]:
    """Names of the step's tensors that differ between two runs from the same state."""
    model = make_model()
    state = copy.deepcopy(model.state_dict())
    first = _train_step(model, x, grad_out)
    model.load_state_dict(state)
    second = _train_step(model, x, grad_out)
    return [k for k in first if not torch.equal(first[k], second[k])]


def check_determinism(model_name: str, batch: int, resolution: int, dtype: str, memory_format: str,
                      device: str) -> dict:
    """A converted model's training step, run twice from the same state: bitwise the same output,
    gradients and running statistics?

    Where it differs, the eager model is run the same way: if that differs too, the
    nondeterminism is in an ATen op (convolution, pooling), not in the fused ops.
    """
    x, grad_out = _model_inputs(batch, resolution, dtype, memory_format, device)

    def build(variant):
        def make():
            model = torchvision_resnet(model_name, 0)
            model = convert_model(model) if variant == "fused" else model
            return model.to(device=device, dtype=DTYPES[dtype], memory_format=MEMORY_FORMATS[memory_format])
        return make

    with deterministic_algorithms():
        fused_diff = _twice_equal(build("fused"), x, grad_out)
        eager_diff = _twice_equal(build("eager"), x, grad_out) if fused_diff else None
    return {"passed": not fused_diff or bool(eager_diff), "model": model_name, "batch": batch,
            "resolution": resolution, "dtype": dtype, "memory_format": memory_format, "path": execution_path(device),
            "bitwise_equal": not fused_diff, "differing": fused_diff[:20],
            "eager_bitwise_equal": None if eager_diff is None else not eager_diff,
            "note": ("deterministic algorithms on (cuDNN deterministic, no benchmark). A difference that eager "
                     "shares is an ATen op's, not the fused ops'.")}


def check_ops_determinism(shape: tuple, dtype: str, memory_format: str, device: str) -> dict:
    """Every BatchNorm op alone, forward and backward in training, twice: bitwise the same output,
    gradients and running statistics?"""
    differing = []
    for op in TAIL_OPS[:-1]:
        runs = []
        for _ in range(2):
            case = tail_case(op, "backward_train", shape, dtype, memory_format, device)
            y = case.forward(fused_tail)
            grads = torch.autograd.grad(y, case.differentiable(), case.grad_output(y))
            runs.append([y.detach(), *grads, case.norms.bn.running_mean, case.norms.bn.running_var])
        differing += [f"{op}[{i}]" for i, (a, b) in enumerate(zip(*runs)) if not torch.equal(a, b)]
    return {"passed": not differing, "shape": list(shape), "dtype": dtype, "memory_format": memory_format,
            "path": execution_path(device), "bitwise_equal": not differing, "differing": differing}


def execution_path(device) -> str:
    """Which implementation the fused ops take for tensors on ``device``."""
    from fused_resnet import backend

    if torch.device(device).type == "cuda":
        return "Triton kernels"
    return "Triton kernels in the interpreter" if backend.INTERPRET else "CPU path: ATen composite"


def check_last_device(model_name: str, batch: int, resolution: int, dtype: str, memory_format: str) -> dict:
    """A converted model (1x1 convolutions fused too) trains one step on the last CUDA device while
    device 0 is current, as a DDP script that calls ``model.to(rank)`` without ``set_device`` does:
    the same output, gradients and buffers as the same step on device 0. Skipped with one device."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return {"passed": None, "status": "skipped",
                "reason": f"{count} CUDA device(s): the check needs two or more"}
    last = f"cuda:{count - 1}"
    steps = {}
    with torch.cuda.device(0):
        for device in ("cuda:0", last):
            model = convert_model(torchvision_resnet(model_name, 0), fuse_convolutions=True).to(
                device=device, dtype=DTYPES[dtype], memory_format=MEMORY_FORMATS[memory_format])
            x, grad_out = _model_inputs(batch, resolution, dtype, memory_format, device)
            steps[device] = _train_step(model, x, grad_out)
            synchronize(device)
        still_current = torch.cuda.current_device()
    reference = {k: v.to("cuda:0") for k, v in steps[last].items()}
    error = normalised_error([steps["cuda:0"][k] for k in reference], [v.double() for v in reference.values()])
    tolerance = TOLERANCES[dtype]
    return {"passed": bool(error <= tolerance) and still_current == 0, "model": model_name, "batch": batch,
            "dtype": dtype, "memory_format": memory_format, "device": last, "current_device": still_current,
            "last_vs_device0_error": error, "tolerance": tolerance}


def check_cuda_graph(model_name: str, batch: int, resolution: int, dtype: str, memory_format: str,
                     device: str) -> dict:
    """Capture a converted model's training step (forward + backward) in a CUDA graph, replay it, and
    compare with the same step run uncaptured; the running statistics must advance inside the graph."""
    model = convert_model(torchvision_resnet(model_name, 0)).to(
        device=device, dtype=DTYPES[dtype], memory_format=MEMORY_FORMATS[memory_format]).train()
    params = list(model.parameters())
    x, grad_out = _model_inputs(batch, resolution, dtype, memory_format, device)

    def step():
        out = model(x)
        return [out, *torch.autograd.grad(out, params, grad_out)]

    graph, captured = capture_cuda_graph(step)
    tracked = next(b for name, b in model.named_buffers() if name.endswith("num_batches_tracked"))
    before = int(tracked)
    reference = [t.detach().clone() for t in step()]
    graph.replay()
    torch.cuda.synchronize()
    advanced = int(tracked) - before
    error = normalised_error([c.detach() for c in captured], [r.double() for r in reference])
    bitwise = all(torch.equal(c, r) for c, r in zip(captured, reference))
    tolerance = TOLERANCES[dtype]
    return {"passed": bool(error <= tolerance) and advanced == 2, "model": model_name, "batch": batch,
            "dtype": dtype, "memory_format": memory_format, "replay_vs_uncaptured_error": error,
            "tolerance": tolerance, "bitwise_equal": bitwise, "num_batches_tracked_advance": advanced,
            "note": "advance 2 = one uncaptured step + one replay: the statistics update runs inside the graph"}


def recording_backend(name: str, graphs: list) -> Callable:
    """A torch.compile backend that records each graph's call targets in ``graphs``, then hands the
    graph to the backend ``name`` ('inductor', 'aot_eager', ...)."""
    from torch._dynamo.backends.registry import lookup_backend

    inner = lookup_backend(name)

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append([str(n.target) for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
                       for n in m.graph.nodes if n.op == "call_function"])
        return inner(gm, example_inputs)
    return backend


def check_compile_fullgraph(compiled: nn.Module, fused: nn.Module, graphs: list, x: torch.Tensor,
                            dtype: str) -> dict:
    """A training step of ``compiled`` (torch.compile(fused, fullgraph=True) with a
    :func:`recording_backend`) against the same step of ``fused``; compile time apart."""
    params = [p for p in fused.parameters() if p.requires_grad]
    fused.train()
    with torch.no_grad():
        grad_out = torch.randn_like(fused(x))
    seen = len(graphs)
    synchronize(x.device)
    start = time.perf_counter()
    out_c = compiled(x)
    grads_c = torch.autograd.grad(out_c, params, grad_out)
    synchronize(x.device)
    compile_s = time.perf_counter() - start
    out_f = fused(x)
    grads_f = torch.autograd.grad(out_f, params, grad_out)
    targets = [t for g in graphs[seen:] for t in g]
    fused_nodes = sorted({t for t in targets if "fused_resnet" in t})
    error = normalised_error([out_c.detach(), *grads_c], [t.detach().double() for t in (out_f, *grads_f)])
    tolerance = TOLERANCES[dtype]
    path = execution_path(x.device)
    # On the CPU path the fused ops are ATen calls, not custom ops: nothing of theirs to find in the graph.
    passed = bool(error <= tolerance) and (bool(fused_nodes) or path.startswith("CPU"))
    return {"passed": passed, "fullgraph": True, "path": path, "graphs": len(graphs) - seen,
            "fused_op_nodes": fused_nodes,
            "fused_op_node_count": sum("fused_resnet" in t for t in targets), "compile_s": compile_s,
            "compiled_vs_uncompiled_error": error, "tolerance": tolerance,
            "note": "compile_s: the first training step (compilation and one step)"}


# --------------------------------------------------------------------------- the kernels as compiled


def _jit_kernels():
    """(name, JITFunction) of every kernel the package defines, in every module of fused_resnet.kernels."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import fused_resnet.kernels as kernels

    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"fused_resnet.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.__module__ == module.__name__:
                yield name, obj


def jit_kernel_facts() -> dict:
    """Registers, spills and shared memory of every kernel specialisation compiled in this process
    (``CompiledKernel.n_regs`` / ``n_spills`` / ``metadata.shared``, plus cuobjdump's figures where
    it runs)."""
    from fused_resnet.kernels.aot import resource_usage

    specialisations = []
    for name, kernel in _jit_kernels():
        for entry in getattr(kernel, "device_caches", {}).values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for compiled in list(cache.values()) if isinstance(cache, dict) else []:
                if hasattr(compiled, "_init_handles"):
                    compiled._init_handles()
                meta = compiled.metadata
                facts = {"kernel": name, "registers": getattr(compiled, "n_regs", None),
                         "spills": getattr(compiled, "n_spills", None), "shared_bytes": getattr(meta, "shared", None),
                         "num_warps": getattr(meta, "num_warps", None), "num_stages": getattr(meta, "num_stages", None)}
                try:
                    facts["cuobjdump"] = resource_usage(compiled)
                except Exception as exc:  # noqa: BLE001 - cuobjdump is optional; the JIT's own figures stand
                    facts["cuobjdump"] = f"unavailable: {type(exc).__name__}"
                specialisations.append(facts)
    return summarise_kernel_facts(specialisations, "JIT-compiled on this device")


def offline_kernel_facts(target_name: str = "sm_90a", limit: int = 1) -> dict:
    """Without a GPU: the first ``limit`` recorded launches compiled ahead of time for ``target_name``
    (kernels/aot.py), so the same report fields exist; tests/kernels/test_aot_compile.py compiles all."""
    from fused_resnet.kernels.aot import TARGETS, compile_launch, launches_of_every_kernel, resource_usage

    target = TARGETS[target_name]
    specialisations, seen = [], set()
    for launch in launches_of_every_kernel(target):
        if launch.name in seen or len(seen) >= limit:
            continue
        seen.add(launch.name)
        usage = resource_usage(compile_launch(launch, target))
        specialisations.append({"kernel": launch.name, "registers": usage["registers"], "spills": usage["spills"],
                                "shared_bytes": usage["shared_bytes"], "num_warps": None, "num_stages": None})
    return summarise_kernel_facts(specialisations, f"compiled ahead of time for {target_name} (no GPU here)")


def summarise_kernel_facts(specialisations: list[dict], source: str) -> dict:
    """Per kernel: specialisations, max registers, max shared memory, total spills; passed = no spill."""
    kernels: dict[str, dict] = {}
    for s in specialisations:
        k = kernels.setdefault(s["kernel"], {"specialisations": 0, "max_registers": 0, "max_shared_bytes": 0,
                                             "spills": 0})
        k["specialisations"] += 1
        k["max_registers"] = max(k["max_registers"], s["registers"] or 0)
        k["max_shared_bytes"] = max(k["max_shared_bytes"], s["shared_bytes"] or 0)
        k["spills"] += s["spills"] or 0
    return {"passed": bool(kernels) and not any(k["spills"] for k in kernels.values()), "source": source,
            "kernels": kernels, "specialisations": specialisations}
