"""``fused-resnet gpu`` (``make gpu``): is the library right and fast on this GPU? One command, one
folder, a time budget.

Phases, in order, each with a share of the budget (``PHASE_SHARES``, seconds of the default
540; a phase's deadline is the sum of the shares up to it, so time one phase leaves over
goes to the next):

1. ``machine``: GPU, SMs, memory, driver, CUDA, clocks, versions;
2. ``correctness``: the pytest subset on CUDA tensors, no host sync, determinism, a CUDA
   graph, ``torch.compile(fullgraph=True)`` (see :mod:`fused_resnet.tools.gpu_checks`);
3. ``kernels``: every fused kernel family alone at ResNet-50 stage shapes, bf16 and fp32,
   channels_last and NCHW, GB/s and fraction of peak, next to eager's sequence; then the
   1x1-convolution GEMMs at ResNet-50's 1x1 shapes (bf16, then fp32), every pass against
   cuDNN's convolution + the ops it fuses: time, ratio, TFLOP/s and GB/s;
4. ``device_aot``: registers, spills and shared memory of the kernels as compiled here;
5. ``stages``: images/s per stage, eager / fused / torch.compile(eager) / torch.compile(fused),
   compile time apart, and fused_conv (``fuse_convolutions=True``) at layer1..layer4; eager, fused
   and fused_conv also replayed from a CUDA graph (no host time: how much of each the host takes);
6. ``report``: gpu.json, summary.md, gpu.png (with log.txt and pytest.txt, five files).

A phase that runs out of time stops between two measurements, keeps what it measured and
is marked ``cut``. ``--smoke`` runs every phase at toy sizes on the CPU: the fused ops alone
(the kernels phase, their determinism) through the kernels in a child process with
``TRITON_INTERPRET=1`` (triton reads it at import), the whole-model checks on the CPU path
(a ResNet through the interpreter takes minutes); CUDA-only checks are reported as skipped.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from .bench import GRAPH_VARIANTS, ModelCache, Measurement, make_input, measure_case
from .common import (OP_PASSES, TAIL_OPS, CPU_NOTE, CUDA_NOTE, gpu_details, machine_info, stage_input_shapes,
                     write_json)
from .gpu_report import summary_markdown, verdicts, write_chart
from .kernel_bench import (SMOKE_CONV1X1, conv1x1_cases, kernel_result, kernel_shapes, measure_conv1x1,
                           prepare_tail_step, time_kernel)

PHASES = ("machine", "correctness", "kernels", "device_aot", "stages", "report")
# Seconds of the default 540 s budget; other budgets scale them.
# kernels holds the tails and the 1x1-convolution GEMMs (their JIT compiles too): 50 s each from correctness and stages.
# stages times eager, fused and fused_conv from CUDA graphs too: 10 s from report (files written in seconds).
PHASE_SHARES = {"machine": 5, "correctness": 165, "kernels": 140, "device_aot": 5, "stages": 215, "report": 10}
# The BatchNorm tails' part of the kernels phase on a GPU; the 1x1 GEMMs get the rest.
TAIL_SHARE_OF_KERNELS = 0.55
DEFAULT_BUDGET_S = 540
# The pytest subset gets at most this fraction of the correctness phase's time.
PYTEST_SHARE = 0.45
# Every pass of a fused kernel family that has a design traffic figure (a BatchNorm's
# backward in eval mode has none: it moves more than its minimum, see the audit).
KERNEL_PASSES = {op: [p for p in OP_PASSES[op] if op == "add_relu" or p != "backward_eval"] for op in TAIL_OPS}
OUT_FILES = ("gpu.json", "summary.md", "gpu.png", "log.txt", "pytest.txt")


@dataclass
class GpuSettings:
    """The sizes of every phase: ResNet-50 at batch 256 on a GPU; toy sizes in a smoke run."""

    smoke: bool
    device: str
    model: str = "resnet50"
    batch: int = 256
    resolution: int = 224
    dtype: str = "bfloat16"  # the stage phase's
    memory_format: str = "channels_last"
    stages: tuple = ("all", "stem", "layer1", "layer2", "layer3", "layer4")
    modes: tuple = ("train_backward", "eval")
    stage_warmup: int = 3
    stage_iters: int = 10
    kernel_dtypes: tuple = ("bfloat16", "float32")
    kernel_formats: tuple = ("channels_last", "nchw")
    kernel_stages: Optional[tuple] = None  # None: every stage
    kernel_warmup: int = 3
    kernel_iters: int = 20
    conv1x1_shapes: Optional[tuple] = None  # None: kernels/conv1x1_bn/plans.py RESNET50_CONV1X1
    conv1x1_dtypes: tuple = ("bfloat16", "float32")
    # Stages whose Bottlenecks the fuse_convolutions variant changes (stem has no 1x1 convolution).
    fused_conv_stages: tuple = ("layer1", "layer2", "layer3", "layer4")
    check_model: str = "resnet50"  # determinism and CUDA graph
    check_batch: int = 32
    check_resolution: int = 224
    compile_backend: str = "inductor"
    # tests/test_properties.py skips itself where hypothesis (a test extra) is not installed.
    pytest_paths: tuple = ("tests/kernels", "tests/test_bn_add_relu.py", "tests/test_hardening.py",
                           "tests/test_module_reuse.py", "tests/test_properties.py")
    pytest_marker: str = "not interpreter and not aot"
    # Hypothesis' examples and the inductor compile tests cost minutes of JIT compilation;
    # the compile phase below covers torch.compile.
    pytest_keyword: Optional[str] = "not property and not inductor"
    compile_estimate_s: dict = field(default_factory=lambda: {"train_backward": 60.0, "eval": 30.0})

    @property
    def stage_cases(self) -> int:
        return len(self.stages) * len(self.modes)


def gpu_settings(smoke: bool, device: Optional[str] = None) -> GpuSettings:
    """The real run on ``device`` (default cuda), or the smoke run's toy sizes on the CPU."""
    if not smoke:
        return GpuSettings(smoke=False, device=device or "cuda")
    # resnet18 at 32x32 exercises every code path of resnet50 at a fraction of the time. The
    # interpreter runs a program at a time: NCHW reductions at toy sizes are hundreds of programs,
    # so the kernels phase takes channels_last only (the interpreter test suite covers NCHW).
    return GpuSettings(smoke=True, device="cpu", model="resnet18", batch=2, resolution=32, dtype="float32",
                       stages=("all", "layer1"), stage_warmup=0, stage_iters=1, kernel_dtypes=("float32",),
                       kernel_formats=("channels_last",), kernel_stages=("layer2",), kernel_warmup=0, kernel_iters=1,
                       conv1x1_shapes=SMOKE_CONV1X1, conv1x1_dtypes=("float32",), fused_conv_stages=("layer1",),
                       check_model="resnet18", check_batch=2, check_resolution=32, compile_backend="eager",
                       pytest_paths=("tests/kernels/test_bn_add_relu_kernels.py",),
                       pytest_marker="interpreter or both", pytest_keyword="float32 and nhwc",
                       compile_estimate_s={"train_backward": 10.0, "eval": 5.0})


# --------------------------------------------------------------------------- budget


class PhaseCut(Exception):
    """Raised inside a phase when its time is up; the message says what was left unmeasured."""


class Budget:
    """Deadlines per phase: the start plus the budget's share of every phase up to and including it."""

    def __init__(self, total_s: float, shares: dict, clock: Callable[[], float] = time.monotonic):
        self.total_s, self.clock, self.start = total_s, clock, clock()
        scale = total_s / sum(shares.values())
        running, self.deadlines = 0.0, {}
        for name, share in shares.items():
            running += share * scale
            self.deadlines[name] = running

    def phase(self, name: str) -> "Phase":
        return Phase(name, self.start + self.deadlines[name], self.clock)

    def elapsed(self) -> float:
        return self.clock() - self.start


@dataclass
class Phase:
    """One phase's deadline."""

    name: str
    deadline: float
    clock: Callable[[], float]

    def remaining(self) -> float:
        return max(self.deadline - self.clock(), 0.0)

    def expired(self) -> bool:
        return self.clock() >= self.deadline

    def check(self, what_is_left: str) -> None:
        """Raise :class:`PhaseCut` when the time is up."""
        if self.expired():
            raise PhaseCut(f"time budget reached; not measured: {what_is_left}")


def guarded(fn: Callable[[], dict]) -> dict:
    """``fn()``, or a failed check saying what it raised."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
        return {"passed": False, "status": "error", "error": f"{type(exc).__name__}: {exc}"[:500],
                "traceback": traceback.format_exc()[-2000:]}


def skipped(reason: str) -> dict:
    return {"passed": None, "status": "skipped", "reason": reason}


# --------------------------------------------------------------------------- the run


class GpuRun:
    """What the phases share: settings, the output folder and log, the model cache, the report."""

    def __init__(self, settings: GpuSettings, out: Optional[str], budget_s: float, log_file=None):
        from .gpu_checks import recording_backend

        self.settings, self.out, self.budget_s = settings, out, budget_s
        self.device = torch.device(settings.device)
        self.on_gpu = self.device.type == "cuda"
        self.graphs: list = []  # every torch.compile graph's call targets (recording_backend)
        self.cache = ModelCache(self.device, compile_options={
            "backend": recording_backend(settings.compile_backend, self.graphs)})
        self.compile_times: dict[tuple, float] = {}
        self.log_file = log_file
        self.report = {
            "fused_resnet_gpu": 1, "smoke": settings.smoke, "device_kind": self.device.type,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "note": CUDA_NOTE if self.on_gpu else CPU_NOTE, "budget_s": budget_s,
            "settings": dict(asdict(settings), stage_cases=settings.stage_cases),
            "phases": {}, "machine": {}, "correctness": {}, "kernels": [], "conv1x1": [], "device_aot": {}, "stages": [],
        }

    def log(self, message: str) -> None:
        print(message, flush=True)
        if self.log_file:
            self.log_file.write(message + "\n")
            self.log_file.flush()

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def in_interpreter(self, parts: list[str], phase: Phase) -> dict:
        """Run ``parts`` (see ``WORKER_PARTS``) in a child process with TRITON_INTERPRET=1; their results."""
        with tempfile.TemporaryDirectory() as tmp:
            part = os.path.join(tmp, "part.json")
            timeout = max(phase.remaining(), 5.0)
            cmd = [sys.executable, "-m", "fused_resnet", "gpu", "--smoke", "--no-progress", "--worker",
                   ",".join(parts), "--part", part, "--budget-s", f"{timeout:.0f}"]
            self.log(f"  TRITON_INTERPRET=1 {' '.join(cmd[1:])}")
            try:
                proc = subprocess.run(cmd, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True,
                                      text=True, timeout=timeout + 30)
            except subprocess.TimeoutExpired:
                return {p: {"passed": None, "status": "cut", "reason": "interpreter child ran out of time"}
                        for p in parts}
            if proc.returncode != 0 or not os.path.exists(part):
                error = {"passed": False, "status": "error", "error": (proc.stdout + proc.stderr)[-1500:]}
                return {p: error for p in parts}
            with open(part) as f:
                return json.load(f)


def phase_machine(run: GpuRun, phase: Phase) -> None:
    info = machine_info(str(run.device))
    if run.on_gpu:
        info.update(gpu_details(run.device))
    # A copy kernel's bandwidth measured here: the reference the kernels are judged against
    # beside the datasheet peak (1 GiB on a GPU, past any L2; 8 MiB in a smoke run).
    from .kernel_bench import measure_copy_bandwidth
    copy_bytes = (1 << 30) if run.on_gpu else (8 << 20)
    info["copy_bandwidth_bytes_per_s"] = measure_copy_bandwidth(run.device, copy_bytes)
    info["copy_bandwidth_bytes"] = copy_bytes
    if info.get("peak_bandwidth_bytes_per_s"):
        info["copy_fraction_of_peak"] = info["copy_bandwidth_bytes_per_s"] / info["peak_bandwidth_bytes_per_s"]
    run.report["machine"] = info
    run.log(f"  {info.get('gpu') or info['cpu']}; torch {info['torch']}, triton {info['triton']}")


def correctness_checks(run: GpuRun, phase: Phase, names: list[str]) -> dict:
    """The in-process checks ``names`` (sync_debug, determinism, ops_determinism, cuda_graph, compile_fullgraph)."""
    from .gpu_checks import (check_compile_fullgraph, check_cuda_graph, check_determinism, check_last_device,
                             check_no_host_sync, check_ops_determinism)

    s, device = run.settings, str(run.device)
    layer1 = (s.check_batch, 64, s.check_resolution // 4, s.check_resolution // 4)
    model_args = (s.check_model, s.check_batch, s.check_resolution, s.dtype, s.memory_format, device)

    def compile_fullgraph():
        fused = run.cache.model(s.model, "fused", s.dtype, s.memory_format)
        compiled = run.cache.stage(s.model, "compile_fused", "all", s.dtype, s.memory_format)
        shape = stage_input_shapes(s.model, s.batch, s.resolution)["all"]
        x = make_input(shape, "all", "train_backward", s.dtype, s.memory_format, run.device)
        result = check_compile_fullgraph(compiled, fused, run.graphs, x, s.dtype)
        result.update(model=s.model, batch=s.batch, backend=s.compile_backend)
        run.compile_times[("compile_fused", "all", "train_backward")] = result["compile_s"]
        return result

    checks = {"sync_debug": lambda: check_no_host_sync(layer1, s.dtype, device),
              "determinism": lambda: check_determinism(*model_args),
              "ops_determinism": lambda: check_ops_determinism(layer1, s.dtype, s.memory_format, device),
              "cuda_graph": lambda: check_cuda_graph(*model_args),
              "last_device": lambda: check_last_device(*model_args[:-1]),
              "compile_fullgraph": compile_fullgraph}
    results = {}
    for name in names:
        if phase.expired():
            results[name] = {"passed": None, "status": "cut", "reason": "time budget reached"}
            continue
        start = time.perf_counter()
        results[name] = guarded(checks[name])
        results[name].setdefault("seconds", time.perf_counter() - start)
        run.log(f"  {name}: {'passed' if results[name]['passed'] else results[name].get('status', 'FAILED')}")
    return results


def phase_correctness(run: GpuRun, phase: Phase) -> None:
    from .gpu_checks import run_pytest_subset

    s, c = run.settings, run.report["correctness"]
    paths = list(s.pytest_paths)
    run.report["pytest_subset"] = (("TRITON_INTERPRET=1 " if s.smoke else "") + f"pytest -m \"{s.pytest_marker}\" "
                                   + " ".join(paths) + (f" -k \"{s.pytest_keyword}\"" if s.pytest_keyword else ""))
    c["pytest"] = run_pytest_subset(paths, s.pytest_marker, s.pytest_keyword, phase.remaining() * PYTEST_SHARE,
                                    run.path("pytest.txt"), interpreter=s.smoke)
    p = c["pytest"]
    run.log(f"  pytest: {p.get('tests_passed', '-')} passed, {p.get('tests_failed', '-')} failed"
            + (f" ({p['status']})" if p.get("status") != "ok" else ""))
    if run.on_gpu:
        c.update(correctness_checks(run, phase, ["sync_debug", "determinism", "ops_determinism", "cuda_graph",
                                                 "last_device", "compile_fullgraph"]))
        return
    # Smoke: a whole model through the interpreter takes minutes, so the model-level checks run on
    # the CPU path here and the fused ops alone through the kernels in the interpreter.
    c["sync_debug"] = skipped("no CUDA")
    c.update(correctness_checks(run, phase, ["determinism"]))
    c.update(run.in_interpreter(["ops_determinism"], phase))
    c["cuda_graph"] = skipped("no CUDA")
    c.update(correctness_checks(run, phase, ["compile_fullgraph"]))


def eager_traffic_ratios() -> dict:
    """T moved by eager's sequence per (op, pass): the audit's implementation count, on the CPU."""
    from .audit import eager_traffic

    out = {}
    for op in TAIL_OPS:
        for pass_ in KERNEL_PASSES[op]:
            traffic, _ = eager_traffic(op, pass_, (2, 8, 4, 4))
            out[(op, pass_)] = (traffic.activation + traffic.extra_activation_read) / (2 * 8 * 4 * 4 * 4)
    return out


def measure_kernels(run: GpuRun, phase: Phase, into: list) -> None:
    """Fused and eager, every kernel family and pass, at each stage's first tail shape; appended to ``into``."""
    s, device = run.settings, run.device
    shapes = kernel_shapes(s.model, s.batch, s.resolution)
    stages = [st for st in shapes if s.kernel_stages is None or st in s.kernel_stages]
    eager_ratios = eager_traffic_ratios()
    todo = [(d, f, st, op, p) for d in s.kernel_dtypes for f in s.kernel_formats for st in stages
            for op in TAIL_OPS for p in KERNEL_PASSES[op]]
    for i, (dtype, memory_format, stage, op, pass_) in enumerate(todo):
        phase.check(f"{len(todo) - i} of {len(todo)} kernel cases")
        shape = shapes[stage]
        timed = {}
        for implementation in ("fused", "eager"):
            step = prepare_tail_step(op, pass_, shape, dtype, memory_format, device, implementation)
            timed[implementation] = time_kernel(step, device, s.kernel_warmup, s.kernel_iters)
            del step
        fused = kernel_result(op, pass_, stage, shape, dtype, memory_format, device, timed["fused"])
        eager = kernel_result(op, pass_, stage, shape, dtype, memory_format, device, timed["eager"],
                              traffic=eager_ratios[(op, pass_)])
        into.append({"fused": fused.to_json(), "eager": eager.to_json(),
                     "speedup_over_eager": timed["eager"] / timed["fused"]})


def measure_conv1x1_gemms(run: GpuRun, phase: Phase, into: list) -> None:
    """The 1x1-convolution GEMMs against cuDNN's sequence, every pass at every shape; appended to ``into``."""
    from fused_resnet.kernels.conv1x1_bn import RESNET50_CONV1X1

    s = run.settings
    todo = [(d, shape, p) for d in s.conv1x1_dtypes for shape, p in conv1x1_cases(s.conv1x1_shapes or RESNET50_CONV1X1)]
    for i, (dtype, shape, pass_) in enumerate(todo):
        phase.check(f"{len(todo) - i} of {len(todo)} 1x1-convolution cases")
        into.append(measure_conv1x1(shape, pass_, s.batch, dtype, run.device, s.kernel_warmup,
                                    s.kernel_iters).to_json())


def warm_kernel_cache(run: GpuRun) -> dict:
    """Compiles every specialisation the kernels phase launches (the tails at each stage's
    shape in its dtypes and formats, the 1x1 GEMMs at ResNet-50's shapes) in parallel worker
    processes before anything is timed: Triton's JIT then finds each binary in its cache
    (triton.compile and a launch share the key), where it would compile 200+ one after another."""
    from fused_resnet.kernels.aot import RealShapes, compile_all, compile_pool, real_shape_launches, unique_launches
    from fused_resnet.kernels.conv1x1_bn import RESNET50_CONV1X1, target_of

    s = run.settings
    start = time.monotonic()
    target = target_of(run.device)
    shapes = kernel_shapes(s.model, s.batch, s.resolution)
    dtypes = tuple(dict.fromkeys(getattr(torch, d) for d in s.kernel_dtypes + s.conv1x1_dtypes))
    conv = tuple((c_in, h, w, c_out, stride) for c_in, h, w, c_out, stride in (s.conv1x1_shapes or RESNET50_CONV1X1))
    real = RealShapes(tuple(tuple(shape[1:]) for shape in shapes.values()), (s.batch,), dtypes, conv1x1=conv)
    launches = unique_launches(real_shape_launches(real, target, every=False), target)
    with compile_pool() as pool:
        compile_all(launches, target, pool)
    return {"specialisations": len(launches), "seconds": round(time.monotonic() - start, 1)}


def phase_kernels(run: GpuRun, phase: Phase) -> None:
    if run.on_gpu:
        run.report["warm_compile"] = guarded(lambda: warm_kernel_cache(run))
        run.log(f"  warm compile: {run.report['warm_compile']}")
        # The tails take their share first, the 1x1 GEMMs the rest: a cut of one keeps the other's figures.
        tails = Phase(phase.name, phase.clock() + TAIL_SHARE_OF_KERNELS * phase.remaining(), phase.clock)
        try:
            cut = None
            try:
                measure_kernels(run, tails, run.report["kernels"])
            except PhaseCut as exc:
                cut = exc
            measure_conv1x1_gemms(run, phase, run.report["conv1x1"])
            if cut is not None:
                raise cut
        finally:
            torch.cuda.empty_cache()
        return
    parts = run.in_interpreter(["kernels", "conv1x1"], phase)
    cuts = []
    for name in ("kernels", "conv1x1"):
        part = parts[name]
        if "cases" not in part:  # the child failed or ran out of time
            if part.get("status") == "error":
                raise RuntimeError(part.get("error"))
            raise PhaseCut(part.get("reason"))
        run.report[name] = part["cases"]
        if part["cut"]:
            cuts.append(part["cut"])
    if cuts:
        raise PhaseCut("; ".join(cuts))


def phase_device_aot(run: GpuRun, phase: Phase) -> None:
    from .gpu_checks import jit_kernel_facts, offline_kernel_facts

    run.report["device_aot"] = guarded(jit_kernel_facts if run.on_gpu else offline_kernel_facts)
    facts = run.report["device_aot"]
    run.log(f"  {facts.get('source', facts.get('error'))}: {len(facts.get('specialisations', []))} specialisations")


def phase_stages(run: GpuRun, phase: Phase) -> None:
    s = run.settings
    shapes = stage_input_shapes(s.model, s.batch, s.resolution)
    todo = [(mode, stage) for mode in s.modes for stage in s.stages]
    for i, (mode, stage) in enumerate(todo):
        phase.check(", ".join(f"{st} {m}" for m, st in todo[i:]))
        variants, dropped = ["eager", "fused"], []
        if stage in s.fused_conv_stages:
            variants.append("fused_conv")
        # Each replayed from a CUDA graph too (skipped, "no CUDA", in a smoke run): a capture costs a few steps.
        variants += [graph for graph, base in GRAPH_VARIANTS.items() if base in variants]
        for variant in ("compile", "compile_fused"):
            known = (variant, stage, mode) in run.compile_times
            observed = [t for (_, _, m), t in run.compile_times.items() if m == mode]
            estimate = 0.0 if known else max(observed, default=s.compile_estimate_s[mode])
            (variants if phase.remaining() > estimate else dropped).append(variant)
        result = measure_case(run.cache, s.model, stage, mode, s.dtype, s.memory_format, s.batch, s.resolution,
                              variants, s.stage_warmup, s.stage_iters, shapes)
        for variant in dropped:
            result.variants[variant] = Measurement(skipped="cut: too little time budget left to compile")
        for variant in ("compile", "compile_fused"):
            m = result.variants[variant]
            if (variant, stage, mode) in run.compile_times:  # compiled earlier (the correctness phase)
                m.compile_s = run.compile_times[(variant, stage, mode)]
            elif m.compile_s is not None:
                run.compile_times[(variant, stage, mode)] = m.compile_s
        run.report["stages"].append(result.to_json())
        ips = {v: result.images_per_s(v) for v in result.variants}
        run.log(f"  {stage} {mode}: " + ", ".join(f"{v} {x:,.0f}" if x else f"{v} -" for v, x in ips.items())
                + " img/s")


def phase_report(run: GpuRun, phase: Phase) -> None:
    """Write gpu.json, summary.md and gpu.png (the chart is skipped, said so, without matplotlib)."""
    report = run.report
    report["verdict"] = verdicts(report)
    report["compile_times"] = [{"variant": v, "stage": st, "mode": m, "seconds": t}
                               for (v, st, m), t in run.compile_times.items()]
    try:
        write_chart(run.path("gpu.png"), report)
    except Exception as exc:  # noqa: BLE001 - a missing matplotlib must not lose the figures
        report["phases"]["report"]["note"] = f"no chart: {type(exc).__name__}: {exc}"[:200]


PHASE_FUNCTIONS = {"machine": phase_machine, "correctness": phase_correctness, "kernels": phase_kernels,
                   "device_aot": phase_device_aot, "stages": phase_stages, "report": phase_report}


def run_gpu(out: str, budget_s: float = DEFAULT_BUDGET_S, smoke: bool = False, device: Optional[str] = None) -> int:
    """Every phase within ``budget_s``; writes ``OUT_FILES`` into ``out`` and prints the summary.

    Exit status 1 when a phase raised or a correctness check failed, else 0 (speed goals are
    measurements, reported in the verdict, not an exit status).
    """
    # cuBLAS reads this when its first handle is made: needed for deterministic matmuls (the fc layer).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.makedirs(out, exist_ok=True)
    settings = gpu_settings(smoke, device)
    budget = Budget(budget_s, PHASE_SHARES)
    with open(os.path.join(out, "log.txt"), "w") as log_file:
        run = GpuRun(settings, out, budget_s, log_file)
        run.log(f"fused-resnet gpu: {'SMOKE run, toy sizes on the CPU' if smoke else settings.device}, "
                f"budget {budget_s:.0f} s, writing {out}/")
        for name in PHASES:
            phase = budget.phase(name)
            record = run.report["phases"][name] = {"status": "running", "deadline_s": budget.deadlines[name]}
            run.log(f"[{budget.elapsed():5.0f} s] {name} (until {budget.deadlines[name]:.0f} s)")
            start = time.perf_counter()
            try:
                PHASE_FUNCTIONS[name](run, phase)
                record["status"] = "ok"
            except PhaseCut as exc:
                record.update(status="cut", note=str(exc)[:500])
            except Exception as exc:  # noqa: BLE001 - the report must still be written
                record.update(status="error", note=f"{type(exc).__name__}: {exc}"[:500],
                              traceback=traceback.format_exc()[-3000:])
            record["elapsed_s"] = time.perf_counter() - start
            if record["status"] != "ok":
                run.log(f"  {name}: {record['status']}: {record.get('note', '')}")
        run.report["elapsed_s"] = budget.elapsed()
        if "verdict" not in run.report:
            run.report["verdict"] = verdicts(run.report)
        write_json(run.path("gpu.json"), run.report)
        summary = summary_markdown(run.report)
        with open(run.path("summary.md"), "w") as f:
            f.write(summary)
        run.log("\n" + summary)
        run.log(f"wrote {', '.join(os.path.join(out, f) for f in OUT_FILES if os.path.exists(run.path(f)))}")
    errored = any(p["status"] == "error" for p in run.report["phases"].values())
    return 1 if errored or run.report["verdict"]["correctness"]["status"] == "FAIL" else 0


# --------------------------------------------------------------------------- interpreter child


def _worker_cases(measure: Callable) -> Callable[[GpuRun, Phase], dict]:
    return lambda run, phase: _worker_measure(measure, run, phase)


def _worker_measure(measure: Callable, run: GpuRun, phase: Phase) -> dict:
    cases: list = []
    try:
        measure(run, phase, cases)
        cut = None
    except PhaseCut as exc:
        cut = str(exc)
    return {"cases": cases, "cut": cut}


WORKER_PARTS = {
    "ops_determinism": lambda run, phase: correctness_checks(run, phase, ["ops_determinism"])["ops_determinism"],
    "kernels": _worker_cases(measure_kernels),
    "conv1x1": _worker_cases(measure_conv1x1_gemms),
}


def worker_main(parts: list[str], part_path: str, budget_s: float) -> int:
    """The smoke run's child under TRITON_INTERPRET=1: run ``parts`` and write their results to ``part_path``."""
    from .traffic import interpreter_active

    if not interpreter_active():
        print("fused-resnet gpu --worker: needs TRITON_INTERPRET=1 set before triton is imported", file=sys.stderr)
        return 2
    run = GpuRun(gpu_settings(smoke=True), None, budget_s)
    phase = Budget(budget_s, {"worker": 1}).phase("worker")
    results = {}
    with contextlib.redirect_stdout(sys.stderr):
        for part in parts:
            results[part] = WORKER_PARTS[part](run, phase)
    write_json(part_path, results)
    return 0
