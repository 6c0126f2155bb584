"""Per-stage benchmarks of torchvision ResNets: eager PyTorch, the fused model, torch.compile.

One piece of code builds the stages and times them, shared by ``fused-resnet bench`` and the
pytest-benchmark suite in ``benchmarks/``:

- :func:`stage_input_shapes` and :func:`bn_tails` read a model's structure from a forward
  pass on the ``meta`` device (no memory, no download);
- :class:`ModelCache` builds each (model, variant, dtype, memory format) once, with the
  same seeded weights for every variant, and hands out stages of it;
- :func:`prepare_step` turns (stage, mode) into a zero-argument step, :func:`time_step`
  times it with CUDA events on a GPU and ``time.perf_counter`` on the CPU;
- :func:`run_bench` measures eager, fused and compile side by side for every case, and
  :func:`format_table`, :func:`write_json`, :func:`write_plot` report it.

torchvision, matplotlib and tqdm are imported lazily: the library itself needs only torch
and triton.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

MODELS = ("resnet18", "resnet50")
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "all")
# eval: inference forward (no_grad); train: training-mode forward that records the
# autograd graph; train_backward: that forward plus the backward to input and weights.
MODES = ("eval", "train", "train_backward")
MODE_LABELS = {"eval": "fwd eval", "train": "fwd train", "train_backward": "fwd+bwd"}
VARIANTS = ("eager", "fused", "compile")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
MEMORY_FORMAT_ALIASES = {"contiguous": "nchw", "nhwc": "channels_last", "cl": "channels_last"}

CPU_NOTE = ("CPU figures: measured on the CPU path (ATen composite ops, small shapes); "
            "they say nothing about GPU speed.")
CUDA_NOTE = "GPU figures: CUDA-event timing after warm-up, median of the timed iterations."


class MissingDependency(RuntimeError):
    """An optional package (torchvision, matplotlib, tqdm) that this command needs is missing."""


def require(module: str, purpose: str):
    """Import an optional dependency, or fail with the pip command that installs it."""
    try:
        return __import__(module)
    except ImportError as exc:
        raise MissingDependency(
            f"{purpose} needs the '{module}' package, which is not installed: "
            f"pip install 'fused-resnet[bench]' (or pip install {module})") from exc


def canonical_dtype(name: str) -> str:
    """'bf16' -> 'bfloat16'; raises ValueError naming the choices for an unknown dtype."""
    name = DTYPE_ALIASES.get(name.lower(), name.lower())
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}'; choose from {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)})")
    return name


def canonical_memory_format(name: str) -> str:
    """'nhwc' -> 'channels_last'; raises ValueError naming the choices for an unknown one."""
    name = MEMORY_FORMAT_ALIASES.get(name.lower(), name.lower())
    if name not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory format '{name}'; choose from {', '.join(MEMORY_FORMATS)}")
    return name


# --------------------------------------------------------------------------- model structure


def torchvision_resnet(name: str, seed: int = 0) -> nn.Module:
    """A randomly initialised torchvision ResNet (``weights=None``: nothing is downloaded)."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose from {', '.join(MODELS)}")
    torchvision = require("torchvision", "building torchvision ResNets")
    torch.manual_seed(seed)
    return getattr(torchvision.models, name)(weights=None)


def stage_module(model: nn.Module, stage: str) -> nn.Module:
    """The submodule of a torchvision ResNet (eager or converted) that computes ``stage``.

    stem = conv1 + bn1 + relu + maxpool; layer1..layer4; all = the whole network.
    """
    if stage == "all":
        return model
    if stage == "stem":
        return nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    if stage in STAGES:
        return getattr(model, stage)
    raise ValueError(f"unknown stage '{stage}'; choose from {', '.join(STAGES)}")


def _meta_resnet(name: str) -> nn.Module:
    torchvision = require("torchvision", "reading the ResNet structure")
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose from {', '.join(MODELS)}")
    with torch.device("meta"):
        return getattr(torchvision.models, name)(weights=None)


def stage_input_shapes(model_name: str, batch: int, resolution: int) -> dict[str, tuple[int, ...]]:
    """The real activation shape entering each stage, for a batch of resolution x resolution images."""
    model = _meta_resnet(model_name)
    x = torch.empty(batch, 3, resolution, resolution, device="meta")
    shapes = {"all": tuple(x.shape)}
    for stage in STAGES[:-1]:
        shapes[stage] = tuple(x.shape)
        x = stage_module(model, stage)(x)
    return shapes


@dataclass(frozen=True)
class Tail:
    """One BatchNorm / add / ReLU tail of a ResNet: the part fused-resnet fuses.

    ``op`` is the fused op that replaces it (``bn_relu``, ``bn_add_relu``, ``bn_add_bn_relu``),
    ``shape`` the activation it normalises, ``block`` its block (-1 for the stem).
    """

    stage: str
    block: int
    op: str
    shape: tuple[int, int, int, int]


def bn_tails(model_name: str, batch: int, resolution: int) -> list[Tail]:
    """Every BatchNorm tail of a torchvision ResNet with its real activation shape.

    Shapes come from forward hooks on a ``meta``-device model. In a block, every BatchNorm
    but the last is followed by a ReLU; the last is added to the shortcut (itself a
    BatchNorm when the block has a ``downsample``) before the ReLU.
    """
    model = _meta_resnet(model_name)
    shapes: dict[nn.Module, tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: shapes.__setitem__(mod, tuple(inp[0].shape)))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model(torch.empty(batch, 3, resolution, resolution, device="meta"))
    for h in hooks:
        h.remove()
    tails = [Tail("stem", -1, "bn_relu", shapes[model.bn1])]
    for stage in STAGES[1:-1]:
        for index, block in enumerate(getattr(model, stage)):
            norms = [m for _, m in block.named_children() if isinstance(m, nn.BatchNorm2d)]
            tails += [Tail(stage, index, "bn_relu", shapes[m]) for m in norms[:-1]]
            op = "bn_add_bn_relu" if block.downsample is not None else "bn_add_relu"
            tails.append(Tail(stage, index, op, shapes[norms[-1]]))
    return tails


# --------------------------------------------------------------------------- building models


def convert_model(model: nn.Module) -> nn.Module:
    """The fused model: ``fused_resnet.convert.convert`` on a copy of ``model``."""
    try:
        from fused_resnet.convert import convert
    except ImportError as exc:
        raise MissingDependency(f"fused_resnet.convert is not available ({exc})") from exc
    return convert(copy.deepcopy(model), inplace=True)


class ModelCache:
    """Models built once per (model, variant, dtype, memory format, device).

    Every variant starts from the same seeded weights; ``compile`` wraps stages of the
    eager model with ``torch.compile`` (one compiled module per stage, reused across
    modes and batch sizes so each guard set compiles once).
    """

    def __init__(self, device: torch.device, seed: int = 0):
        self.device = torch.device(device)
        self.seed = seed
        self._models: dict[tuple, nn.Module] = {}
        self._compiled: dict[tuple, nn.Module] = {}

    def model(self, name: str, variant: str, dtype: str, memory_format: str) -> nn.Module:
        """The whole network of ``variant`` ('eager' or 'fused') on the cache's device."""
        key = (name, variant, dtype, memory_format)
        if key not in self._models:
            if variant == "eager":
                model = torchvision_resnet(name, self.seed)
            elif variant == "fused":
                model = convert_model(torchvision_resnet(name, self.seed))
            else:
                raise ValueError(f"unknown model variant '{variant}'; choose from eager, fused")
            model = model.to(device=self.device, dtype=DTYPES[dtype], memory_format=MEMORY_FORMATS[memory_format])
            self._models[key] = model
        return self._models[key]

    def stage(self, name: str, variant: str, stage: str, dtype: str, memory_format: str) -> nn.Module:
        """The module that runs ``stage`` for ``variant`` ('eager', 'fused' or 'compile')."""
        if variant != "compile":
            return stage_module(self.model(name, variant, dtype, memory_format), stage)
        key = (name, stage, dtype, memory_format)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(stage_module(self.model(name, "eager", dtype, memory_format), stage))
        return self._compiled[key]


# --------------------------------------------------------------------------- timing


def prepare_step(module: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """A zero-argument function running one ``mode`` step of ``module`` on ``x``.

    ``train_backward`` takes gradients with ``torch.autograd.grad`` (of the input too, as
    inside a network, unless the stage is the first) so no ``.grad`` accumulates across steps.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}'; choose from {', '.join(MODES)}")
    module.train(mode != "eval")
    if mode == "eval":
        def step():
            with torch.no_grad():
                module(x)
        return step
    if mode == "train":
        def step():
            module(x)
        return step
    params = [p for p in module.parameters() if p.requires_grad]
    inputs = ([x] if x.requires_grad else []) + params
    with torch.no_grad():
        # The output's shape from the eager module: a compiled one would compile a no_grad graph for it.
        grad_out = torch.randn_like(getattr(module, "_orig_mod", module)(x))

    def step():
        torch.autograd.grad(module(x), inputs, grad_out)
    return step


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds per call of ``step``, one figure per timed call, after ``warmup`` calls."""
    return time_steps({"step": step}, device, warmup, iters)["step"]


def time_steps(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int,
               iters: int) -> dict[str, list[float]]:
    """Seconds per call of each step, timed in turns (a, b, a, b, ...) after ``warmup`` calls each.

    Taking turns exposes every step to the same background load and clock state, so their
    ratio means something even on a busy machine. CUDA: a pair of CUDA events around each
    call, read after one synchronize at the end. CPU: ``time.perf_counter`` around each call.
    """
    device = torch.device(device)
    for step in steps.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    if device.type == "cuda":
        events = {name: [] for name in steps}
        for _ in range(iters):
            for name, step in steps.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                events[name].append((start, end))
        torch.cuda.synchronize(device)
        return {name: [s.elapsed_time(e) / 1e3 for s, e in pairs] for name, pairs in events.items()}
    times = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def make_input(shape: Sequence[int], stage: str, mode: str, dtype: str, memory_format: str,
               device: torch.device, seed: int = 0) -> torch.Tensor:
    """A random activation of the stage's real input shape; it needs a gradient in
    ``train_backward`` unless it is the network's image input (stem / all)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=DTYPES[dtype],
                                             memory_format=MEMORY_FORMATS[memory_format])
    if stage not in ("stem", "all"):
        # Stage inputs are ReLU outputs: non-negative, as the real activations are.
        x = x.relu_()
    return x.requires_grad_(mode == "train_backward" and stage not in ("stem", "all"))


# --------------------------------------------------------------------------- the suite


@dataclass
class BenchConfig:
    """What ``run_bench`` measures; lists are crossed with each other."""

    models: list[str]
    stages: list[str]
    modes: list[str]
    dtypes: list[str]
    memory_formats: list[str]
    batches: list[int]
    resolution: int
    device: str
    variants: list[str]
    warmup: int
    iters: int
    threads: Optional[int] = None  # CPU threads for torch (None: leave torch's setting)
    seed: int = 0


def default_config(device: Optional[str] = None) -> BenchConfig:
    """Defaults that fit the device: realistic shapes on a GPU, small ones on the CPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda":
        return BenchConfig(models=["resnet50"], stages=list(STAGES), modes=list(MODES), dtypes=["bfloat16"],
                           memory_formats=["channels_last"], batches=[256], resolution=224, device=device,
                           variants=list(VARIANTS), warmup=10, iters=30)
    # torch.compile needs minutes of C++ compilation per stage on a CPU: off unless asked.
    # One thread: at these small shapes extra threads mostly wait on each other, and on a
    # shared machine a descheduled thread stalls every op by a scheduler tick.
    return BenchConfig(models=["resnet18"], stages=list(STAGES), modes=list(MODES), dtypes=["float32"],
                       memory_formats=["channels_last"], batches=[8], resolution=64, device=device,
                       variants=["eager", "fused"], warmup=2, iters=10, threads=1)


@dataclass
class Measurement:
    """The timings of one variant on one case, or why it was skipped."""

    seconds: list[float] = field(default_factory=list)
    skipped: Optional[str] = None

    @property
    def median_s(self) -> Optional[float]:
        return statistics.median(self.seconds) if self.seconds else None


@dataclass
class CaseResult:
    """Eager, fused and compile measured side by side on one (model, stage, mode, ...) case."""

    model: str
    stage: str
    mode: str
    dtype: str
    memory_format: str
    batch: int
    resolution: int
    input_shape: list[int]
    variants: dict[str, Measurement]

    def images_per_s(self, variant: str) -> Optional[float]:
        m = self.variants.get(variant)
        return self.batch / m.median_s if m is not None and m.median_s else None

    def speedup(self, variant: str, baseline: str) -> Optional[float]:
        """How many times faster ``variant`` ran than ``baseline`` (images/s ratio)."""
        a, b = self.images_per_s(variant), self.images_per_s(baseline)
        return a / b if a and b else None

    def to_json(self) -> dict:
        out = asdict(self)
        for name, m in self.variants.items():
            out["variants"][name].update(median_s=m.median_s, images_per_s=self.images_per_s(name))
        out["speedup_fused_over_eager"] = self.speedup("fused", "eager")
        out["speedup_fused_over_compile"] = self.speedup("fused", "compile")
        return out


def measure_case(cache: ModelCache, model: str, stage: str, mode: str, dtype: str, memory_format: str,
                 batch: int, resolution: int, variants: Iterable[str], warmup: int, iters: int,
                 shapes: Optional[dict] = None) -> CaseResult:
    """Time every variant of one case on the same input, in turns (see :func:`time_steps`)."""
    shape = (shapes or stage_input_shapes(model, batch, resolution))[stage]
    x = make_input(shape, stage, mode, dtype, memory_format, cache.device, cache.seed)
    measured, steps = {}, {}
    for variant in variants:
        try:
            step = prepare_step(cache.stage(model, variant, stage, dtype, memory_format), x, mode)
            if variant == "compile":
                step()  # compile now: a compiler failure is reported, not raised mid-timing
            steps[variant] = step
        except MissingDependency as exc:
            measured[variant] = Measurement(skipped=str(exc))
        except Exception as exc:  # noqa: BLE001 - a compiler failure must not hide the other variants
            if variant != "compile":
                raise
            measured[variant] = Measurement(skipped=f"torch.compile failed: {type(exc).__name__}: {exc}"[:300])
    for variant, seconds in time_steps(steps, cache.device, warmup, iters).items():
        measured[variant] = Measurement(seconds)
    ordered = {v: measured[v] for v in variants}
    return CaseResult(model, stage, mode, dtype, memory_format, batch, resolution, list(shape), ordered)


def cases(config: BenchConfig) -> list[tuple]:
    """(model, dtype, memory_format, batch, stage, mode) for every case of ``config``."""
    return [(m, d, f, b, s, mode) for m in config.models for d in config.dtypes for f in config.memory_formats
            for b in config.batches for s in config.stages for mode in config.modes]


def progress(iterable, total: int, desc: str, enabled: bool = True):
    """A tqdm progress bar on stderr when tqdm is installed and ``enabled``; else the iterable."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def run_bench(config: BenchConfig, show_progress: bool = True) -> list[CaseResult]:
    """Measure every case of ``config``; variants side by side within each case."""
    if config.threads:
        torch.set_num_threads(config.threads)
    cache = ModelCache(torch.device(config.device), config.seed)
    todo = cases(config)
    results = []
    shapes = {}
    for model, dtype, fmt, batch, stage, mode in progress(todo, len(todo), "bench", show_progress):
        key = (model, batch, config.resolution)
        if key not in shapes:
            shapes[key] = stage_input_shapes(model, batch, config.resolution)
        results.append(measure_case(cache, model, stage, mode, dtype, fmt, batch, config.resolution,
                                    config.variants, config.warmup, config.iters, shapes[key]))
    return results


# --------------------------------------------------------------------------- the fused kernels alone

KERNEL_OPS = ("bn_relu", "bn_add_relu")
KERNEL_PASSES = ("forward_train", "forward_eval", "backward_train")


def prepare_kernel_step(op: str, pass_: str, shape: Sequence[int], dtype: str, memory_format: str,
                        device: torch.device) -> Callable[[], None]:
    """One call of the fused functional op alone (no convolution) on a stage-shaped activation."""
    import fused_resnet

    gen = torch.Generator().manual_seed(0)

    def activation():
        return torch.randn(shape, generator=gen).to(device=device, dtype=DTYPES[dtype],
                                                    memory_format=MEMORY_FORMATS[memory_format])

    C = shape[1]
    training = pass_ != "forward_eval"
    x, residual = activation(), activation()
    running_mean, running_var = torch.zeros(C, device=device), torch.ones(C, device=device)
    weight, bias = torch.ones(C, device=device), torch.zeros(C, device=device)

    def forward():
        if op == "bn_relu":
            return fused_resnet.bn_relu(x, running_mean, running_var, weight, bias, training)
        return fused_resnet.bn_add_relu(x, residual, running_mean, running_var, weight, bias, training)

    if pass_ != "backward_train":
        def step():
            with torch.no_grad():
                forward()
        return step
    for t in (x, residual, weight, bias):
        t.requires_grad_()
    y = forward()
    dy = torch.randn_like(y)
    inputs = [x, weight, bias] + ([residual] if op == "bn_add_relu" else [])

    def step():
        torch.autograd.grad(y, inputs, dy, retain_graph=True)
    return step


@dataclass
class KernelResult:
    """Achieved bandwidth of one fused op at one stage shape."""

    op: str
    pass_: str
    stage: str
    shape: list[int]
    dtype: str
    memory_format: str
    activation_bytes: int
    bytes_moved: int
    median_s: float
    peak_bytes_per_s: Optional[float]

    @property
    def bytes_per_s(self) -> float:
        return self.bytes_moved / self.median_s

    def to_json(self) -> dict:
        out = asdict(self)
        out["gb_per_s"] = self.bytes_per_s / 1e9
        out["fraction_of_peak"] = self.bytes_per_s / self.peak_bytes_per_s if self.peak_bytes_per_s else None
        return out


def kernel_shapes(model: str, batch: int, resolution: int) -> dict[str, tuple[int, int, int, int]]:
    """Per stage, the activation of its first BatchNorm tail: the shape the fused ops are timed at."""
    shapes = {}
    for tail in bn_tails(model, batch, resolution):
        shapes.setdefault(tail.stage, tail.shape)
    return shapes


def kernel_result(op: str, pass_: str, stage: str, shape: Sequence[int], dtype: str, memory_format: str,
                  device: torch.device, seconds: float) -> KernelResult:
    """Bandwidth of one timed fused op: audited activation bytes / seconds.

    Bytes are the fused kernels' activation traffic as audited (``fused_resnet.audit``:
    the design figures, which the interpreter count reproduces); per-channel parameters
    and partial sums are left out, so the figure is a slight underestimate.
    """
    from .audit import FUSED_BUDGET

    T = torch.empty((), dtype=DTYPES[dtype]).element_size() * int(torch.Size(shape).numel())
    return KernelResult(op, pass_, stage, list(shape), dtype, memory_format, T, round(FUSED_BUDGET[op][pass_] * T),
                        seconds, peak_bandwidth(device)[0])


def run_kernel_bench(model: str, batch: int, resolution: int, dtype: str, memory_format: str, device: str,
                     warmup: int, iters: int, show_progress: bool = True) -> list[KernelResult]:
    """GB/s of the fused ops alone at each stage's first BatchNorm tail shape."""
    device = torch.device(device)
    shapes = kernel_shapes(model, batch, resolution)
    todo = [(op, p, s) for s in shapes for op in KERNEL_OPS for p in KERNEL_PASSES]
    results = []
    for op, pass_, stage in progress(todo, len(todo), "kernels", show_progress):
        step = prepare_kernel_step(op, pass_, shapes[stage], dtype, memory_format, device)
        seconds = statistics.median(time_step(step, device, warmup, iters))
        results.append(kernel_result(op, pass_, stage, shapes[stage], dtype, memory_format, device, seconds))
    return results


# --------------------------------------------------------------------------- machine and reports

# Peak DRAM bandwidth (TB/s) of GPUs by name, most specific first (vendor data sheets).
PEAK_BANDWIDTH_TBPS = (
    ("H200", 4.8),
    ("H100 PCIe", 2.0),
    ("H100 NVL", 3.9),
    ("H100", 3.35),  # SXM5, HBM3
    ("A100 80GB PCIe", 1.935),
    ("A100-SXM4-80GB", 2.0),
    ("A100 80GB", 2.0),
    ("A100", 1.555),  # 40GB
    ("MI300X", 5.3),
    ("L40S", 0.864),
    ("A10G", 0.6),
    ("L4", 0.3),
    ("RTX 4090", 1.008),
    ("V100", 0.9),
    ("T4", 0.32),
)


def lookup_peak_bandwidth(name: str) -> Optional[float]:
    """Bytes/s of the first entry of ``PEAK_BANDWIDTH_TBPS`` whose key is in ``name`` (case-insensitive)."""
    for key, tbps in PEAK_BANDWIDTH_TBPS:
        if key.lower() in name.lower():
            return tbps * 1e12
    return None


def peak_bandwidth(device: torch.device) -> tuple[Optional[float], str]:
    """(bytes/s, where the figure comes from) for a GPU; (None, reason) on a CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, "no peak bandwidth on the CPU path"
    name = torch.cuda.get_device_name(device)
    known = lookup_peak_bandwidth(name)
    if known:
        return known, f"data sheet ({name})"
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        # Double data rate: two transfers per memory clock.
        return 2 * clock_khz * 1e3 * bus_bits / 8, f"memory clock x bus width ({name})"
    return None, f"unknown for {name}"


def cpu_model_name() -> str:
    """The CPU's marketing name where the OS tells it, else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    """The machine, library versions and device kind, for JSON reports and table headers."""
    import triton

    device = torch.device(device)
    info = {
        "device_kind": device.type,
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        peak, source = peak_bandwidth(device)
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda or torch.version.hip,
                    peak_bandwidth_bytes_per_s=peak, peak_bandwidth_source=source)
    return info


def device_banner(info: dict) -> str:
    """One line saying what ran where; CPU runs say that their figures are CPU figures."""
    versions = f"torch {info['torch']}, triton {info['triton']}"
    if info["device_kind"] == "cuda":
        return f"GPU: {info['gpu']} ({versions}). {CUDA_NOTE}"
    threads = info["torch_threads"]
    return f"CPU: {info['cpu']}, {threads} thread{'s' if threads != 1 else ''} ({versions}). {CPU_NOTE}"


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: columns padded to their widest cell, numbers right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_table(results: Sequence[CaseResult], info: dict) -> str:
    """Images/s per stage for each variant, and fused's speedup over eager and compile."""
    header = ["model", "stage", "mode", "dtype", "format", "batch", "input", "eager img/s", "fused img/s",
              "compile img/s", "fused/eager", "fused/compile"]
    rows = []
    for r in results:
        rows.append([r.model, r.stage, MODE_LABELS[r.mode], r.dtype, r.memory_format, r.batch,
                     "x".join(map(str, r.input_shape[1:])),
                     _fmt(r.images_per_s("eager"), ",.0f"), _fmt(r.images_per_s("fused"), ",.0f"),
                     _fmt(r.images_per_s("compile"), ",.0f"),
                     _fmt(r.speedup("fused", "eager"), ".2f"), _fmt(r.speedup("fused", "compile"), ".2f")])
    notes = sorted({f"{name}: {m.skipped}" for r in results for name, m in r.variants.items() if m.skipped})
    text = [device_banner(info), render_table(header, rows)]
    if notes:
        text.append("Skipped: " + "; ".join(notes))
    return "\n".join(text)


def format_kernel_table(results: Sequence[KernelResult], info: dict) -> str:
    """GB/s of the fused ops alone and the fraction of the device's peak bandwidth."""
    header = ["op", "pass", "stage", "shape", "dtype", "MB moved", "time us", "GB/s", "% of peak"]
    rows = [[r.op, r.pass_, r.stage, "x".join(map(str, r.shape)), r.dtype, f"{r.bytes_moved / 1e6:.1f}",
             f"{r.median_s * 1e6:.1f}", f"{r.bytes_per_s / 1e9:.1f}",
             _fmt(r.bytes_per_s / r.peak_bytes_per_s * 100 if r.peak_bytes_per_s else None, ".0f")]
            for r in results]
    if info["device_kind"] == "cuda":
        title = (f"Fused kernels alone, GB/s against the peak of {info['gpu']} "
                 f"({_fmt((info.get('peak_bandwidth_bytes_per_s') or 0) / 1e12 or None, '.2f')} TB/s, "
                 f"{info.get('peak_bandwidth_source')}); bytes = audited activation traffic")
    else:
        title = ("Fused ops alone on the CPU path (ATen composite, not the Triton kernels): effective GB/s "
                 "= audited fused-kernel bytes / CPU time. " + CPU_NOTE)
    return title + "\n" + render_table(header, rows)


def report(results: Sequence[CaseResult], info: dict, config: BenchConfig,
           kernels: Sequence[KernelResult] = ()) -> dict:
    """Everything measured, with the machine, versions and settings, as one JSON-able dict."""
    return {
        "fused_resnet_bench": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_kind": info["device_kind"],
        "note": CPU_NOTE if info["device_kind"] == "cpu" else CUDA_NOTE,
        "machine": info,
        "settings": asdict(config),
        "results": [r.to_json() for r in results],
        "kernels": [k.to_json() for k in kernels],
    }


def write_json(path: str, data: dict) -> None:
    """Write ``data`` as indented JSON, creating the parent folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def write_plot(path: str, results: Sequence[CaseResult], info: dict) -> None:
    """A PNG of images/s per stage: one panel per (model, mode, dtype, format, batch), a bar per variant."""
    matplotlib = require("matplotlib", "writing the --plot chart")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list[CaseResult]] = {}
    for r in results:
        panels.setdefault((r.model, r.mode, r.dtype, r.memory_format, r.batch), []).append(r)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    colors = {"eager": "#7f7f7f", "fused": "#1f77b4", "compile": "#ff7f0e"}
    for ax, (key, group) in zip(axes.flat, panels.items()):
        model, mode, dtype, fmt, batch = key
        variants = [v for v in VARIANTS if any(r.images_per_s(v) for r in group)]
        width = 0.8 / max(len(variants), 1)
        for i, v in enumerate(variants):
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(group))]
            ax.bar(xs, [r.images_per_s(v) or 0 for r in group], width, label=v, color=colors[v])
        ax.set_xticks(range(len(group)), [r.stage for r in group])
        ax.set_yscale("log")
        ax.set_ylabel("images/s")
        ax.set_title(f"{model} {MODE_LABELS[mode]} {dtype} {fmt} batch {batch}", fontsize=9)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    where = (f"GPU: {info['gpu']}" if info["device_kind"] == "cuda"
             else f"CPU figures (CPU path, small shapes): {info['cpu']}")
    missing = [v for v in VARIANTS if not any(r.images_per_s(v) for r in results)]
    note = f" ({', '.join(missing)} not measured)" if missing else ""
    fig.suptitle(f"fused-resnet images/s per stage - {where}{note}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
