"""Per-stage benchmarks of torchvision ResNets: eager PyTorch, the fused model, torch.compile.

One piece of code builds the stages and times them, shared by ``fused-resnet bench``,
``fused-resnet gpu`` and the pytest-benchmark suite in ``benchmarks/``:

- :class:`ModelCache` builds each (model, variant, dtype, memory format) once, with the
  same seeded weights for every variant, and hands out stages of it (stage shapes and
  modules come from :mod:`fused_resnet.tools.common`);
- :func:`prepare_step` turns (stage, mode) into a zero-argument step, timed by
  :func:`~fused_resnet.tools.common.time_steps` (CUDA events on a GPU, ``time.perf_counter``
  on the CPU);
- :func:`run_bench` measures eager, fused and compile side by side for every case, and
  :func:`format_table`, :func:`report`, :func:`write_plot` report it;
- the ``*_graph`` variants replay the same step from a CUDA graph (:func:`capture_cuda_graph`):
  no host time, so :func:`host_share` tells how much of the plain step the host took.

The fused ops alone (GB/s) are :mod:`fused_resnet.tools.kernel_bench`.
"""
from __future__ import annotations

import datetime
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from .common import (CPU_NOTE, CUDA_NOTE, DTYPES, MEMORY_FORMATS, STAGES, MissingDependency, convert_model,
                     device_banner, format_figure, progress, render_table, require, stage_input_shapes, stage_module,
                     synchronize, time_steps, torchvision_resnet)

if TYPE_CHECKING:
    from .kernel_bench import KernelResult

# eval: inference forward (no_grad); train: training-mode forward that records the
# autograd graph; train_backward: that forward plus the backward to input and weights.
MODES = ("eval", "train", "train_backward")
MODE_LABELS = {"eval": "fwd eval", "train": "fwd train", "train_backward": "fwd+bwd"}
VARIANTS = ("eager", "fused", "compile")
# compile_fused: torch.compile of the fused model (fullgraph: the fused ops are single graph nodes).
COMPILE_VARIANTS = {"compile": "eager", "compile_fused": "fused"}
# fused_conv: fused with fuse_convolutions (the Bottlenecks' 1x1 convolutions as Triton GEMMs).
PLAIN_VARIANTS = VARIANTS + ("compile_fused", "fused_conv")
# The same step as the base variant, captured once in a CUDA graph and replayed: the GPU's time alone.
GRAPH_VARIANTS = {"eager_graph": "eager", "fused_graph": "fused", "fused_conv_graph": "fused_conv"}
ALL_VARIANTS = PLAIN_VARIANTS + tuple(GRAPH_VARIANTS)
# Calls of a step on a side stream before its capture (torch.cuda.graphs' own examples run 3):
# cuDNN/cuBLAS handles, Triton's JIT and lazy buffers are set up outside the capture.
GRAPH_WARMUP = 3


# --------------------------------------------------------------------------- building models


class ModelCache:
    """Models built once per (model, variant, dtype, memory format, device).

    Every variant starts from the same seeded weights; ``compile`` wraps stages of the
    eager model with ``torch.compile``, ``compile_fused`` stages of the fused model (with
    ``fullgraph=True``). One compiled module per stage, reused across modes and batch
    sizes so each guard set compiles once. ``compile_options`` go to every
    ``torch.compile`` call (``backend=...``).
    """

    def __init__(self, device: torch.device, seed: int = 0, compile_options: Optional[dict] = None):
        self.device = torch.device(device)
        self.seed = seed
        self.compile_options = dict(compile_options or {})
        self._models: dict[tuple, nn.Module] = {}
        self._compiled: dict[tuple, nn.Module] = {}

    def model(self, name: str, variant: str, dtype: str, memory_format: str) -> nn.Module:
        """The whole network of ``variant`` ('eager', 'fused' or 'fused_conv') on the cache's device."""
        key = (name, variant, dtype, memory_format)
        if key not in self._models:
            if variant == "eager":
                model = torchvision_resnet(name, self.seed)
            elif variant in ("fused", "fused_conv"):
                model = convert_model(torchvision_resnet(name, self.seed), fuse_convolutions=variant == "fused_conv")
            else:
                raise ValueError(f"unknown model variant '{variant}'; choose from eager, fused, fused_conv")
            model = model.to(device=self.device, dtype=DTYPES[dtype], memory_format=MEMORY_FORMATS[memory_format])
            self._models[key] = model
        return self._models[key]

    def stage(self, name: str, variant: str, stage: str, dtype: str, memory_format: str) -> nn.Module:
        """The module that runs ``stage`` for ``variant`` ('eager', 'fused', 'compile' or 'compile_fused')."""
        if variant not in COMPILE_VARIANTS:
            return stage_module(self.model(name, variant, dtype, memory_format), stage)
        key = (name, variant, stage, dtype, memory_format)
        if key not in self._compiled:
            base = COMPILE_VARIANTS[variant]
            options = dict(self.compile_options, **({"fullgraph": True} if base == "fused" else {}))
            self._compiled[key] = torch.compile(stage_module(self.model(name, base, dtype, memory_format), stage),
                                                **options)
        return self._compiled[key]


# --------------------------------------------------------------------------- steps


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


def graphs_unavailable(device: torch.device) -> Optional[str]:
    """Why ``device`` cannot replay CUDA graphs, or None when it can."""
    return None if torch.device(device).type == "cuda" else "no CUDA"


def capture_cuda_graph(step: Callable[[], object], warmup: int = GRAPH_WARMUP, pool=None):
    """``step`` called ``warmup`` times on a side stream, then once captured in a ``torch.cuda.CUDAGraph``,
    as torch.cuda.graphs documents; returns (graph, what the captured call returned).

    Every tensor ``step`` reads must stay where it is (static inputs, parameters, BatchNorm
    buffers: their in-place updates are captured too). The returned tensors live in the
    graph's memory pool, rewritten by each ``graph.replay()``. ``pool`` (a
    ``torch.cuda.graph_pool_handle()``) lets graphs replayed one after another share memory.
    """
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool):
            out = step()
    except BaseException:
        # torch.cuda.graph's exit skips restoring the stream when capture_end raises.
        torch.cuda.set_stream(current)
        raise
    return graph, out


def host_share(plain_per_s: Optional[float], graph_per_s: Optional[float]) -> Optional[float]:
    """1 - graph time / plain time, from the two rates: the share of the plain step the GPU spent
    waiting on the host (Python, dispatch, launches). Negative when the graph ran slower (noise)."""
    if not plain_per_s or not graph_per_s:
        return None
    return 1.0 - plain_per_s / graph_per_s


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
    compile_s: Optional[float] = None  # compile variants: the first call (compilation and one step)
    capture_s: Optional[float] = None  # graph variants: the side-stream warm-up and the capture

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
        out["speedup_fused_over_eager_graphed"] = self.speedup("fused_graph", "eager_graph")
        out["host_share"] = self.host_shares()
        return out

    def host_shares(self) -> dict[str, Optional[float]]:
        """base variant -> :func:`host_share` of its step, for each graph variant this case ran."""
        return {base: host_share(self.images_per_s(base), self.images_per_s(graph))
                for graph, base in GRAPH_VARIANTS.items() if graph in self.variants}


def prepare_variant(cache: ModelCache, variant: str, model: str, stage: str, dtype: str, memory_format: str,
                    x: torch.Tensor, mode: str, pool=None) -> tuple[Callable[[], None], dict]:
    """The step :func:`time_steps` times for ``variant``, and its set-up time: a compile variant's
    first call (compilation and one step) as ``compile_s``, a graph variant's warm-up and capture
    as ``capture_s``; nothing for the plain variants."""
    base = GRAPH_VARIANTS.get(variant)
    step = prepare_step(cache.stage(model, base or variant, stage, dtype, memory_format), x, mode)
    if variant not in COMPILE_VARIANTS and base is None:
        return step, {}
    synchronize(cache.device)
    start = time.perf_counter()
    if base is None:
        step()  # compile now, timed apart: a compiler failure is reported, not raised mid-timing
    else:
        step = capture_cuda_graph(step, pool=pool)[0].replay
    synchronize(cache.device)
    return step, {"compile_s" if base is None else "capture_s": time.perf_counter() - start}


def measure_case(cache: ModelCache, model: str, stage: str, mode: str, dtype: str, memory_format: str,
                 batch: int, resolution: int, variants: Iterable[str], warmup: int, iters: int,
                 shapes: Optional[dict] = None) -> CaseResult:
    """Time every variant of one case on the same input, in turns (see :func:`time_steps`).

    A graph variant runs its base variant's step on the same module and input, captured once
    and replayed; the case's graphs share one memory pool (replayed in capture order, never at
    once, and nothing they return is kept). A compiler or capture failure is that variant's
    ``skipped`` text; the other variants are still measured.
    """
    shape = (shapes or stage_input_shapes(model, batch, resolution))[stage]
    x = make_input(shape, stage, mode, dtype, memory_format, cache.device, cache.seed)
    no_graphs = graphs_unavailable(cache.device)
    graphed = not no_graphs and any(v in GRAPH_VARIANTS for v in variants)
    pool = torch.cuda.graph_pool_handle() if graphed else None
    measured, steps, setup = {}, {}, {}
    for variant in variants:
        if variant in GRAPH_VARIANTS and no_graphs:
            measured[variant] = Measurement(skipped=no_graphs)
            continue
        try:
            steps[variant], setup[variant] = prepare_variant(cache, variant, model, stage, dtype, memory_format, x,
                                                             mode, pool)
        except MissingDependency as exc:
            measured[variant] = Measurement(skipped=str(exc))
        except Exception as exc:  # noqa: BLE001 - a compiler or capture failure must not hide the other variants
            what = ("torch.compile" if variant in COMPILE_VARIANTS
                    else "CUDA graph capture" if variant in GRAPH_VARIANTS else None)
            if what is None:
                raise
            measured[variant] = Measurement(skipped=f"{what} failed: {type(exc).__name__}: {exc}"[:300])
    for variant, seconds in time_steps(steps, cache.device, warmup, iters).items():
        measured[variant] = Measurement(seconds, **setup[variant])
    if graphed:
        steps.clear()  # the graphs: their memory goes back to the driver, not kept for the next case
        torch.cuda.empty_cache()
    ordered = {v: measured[v] for v in variants}
    return CaseResult(model, stage, mode, dtype, memory_format, batch, resolution, list(shape), ordered)


def cases(config: BenchConfig) -> list[tuple]:
    """(model, dtype, memory_format, batch, stage, mode) for every case of ``config``."""
    return [(m, d, f, b, s, mode) for m in config.models for d in config.dtypes for f in config.memory_formats
            for b in config.batches for s in config.stages for mode in config.modes]


def run_bench(config: BenchConfig, show_progress: bool = True) -> list[CaseResult]:
    """Measure every case of ``config``; variants side by side within each case."""
    if config.threads:
        torch.set_num_threads(config.threads)
    cache = ModelCache(torch.device(config.device), config.seed)
    todo = cases(config)
    results = []
    shapes = {}
    for model, dtype, memory_format, batch, stage, mode in progress(todo, len(todo), "bench", show_progress):
        key = (model, batch, config.resolution)
        if key not in shapes:
            shapes[key] = stage_input_shapes(model, batch, config.resolution)
        results.append(measure_case(cache, model, stage, mode, dtype, memory_format, batch, config.resolution,
                                    config.variants, config.warmup, config.iters, shapes[key]))
    return results


def format_table(results: Sequence[CaseResult], info: dict) -> str:
    """Images/s per stage for each variant, and fused's speedup over eager and compile."""
    header = ["model", "stage", "mode", "dtype", "format", "batch", "input", "eager img/s", "fused img/s",
              "compile img/s", "fused/eager", "fused/compile"]
    # With graph variants (--graphs): fused/eager both replayed, and the host's share of each plain step.
    graphs = any("fused_graph" in r.variants for r in results)
    if graphs:
        header += ["graphed fused/eager", "host share eager", "host share fused"]
    rows = []
    for r in results:
        rows.append([r.model, r.stage, MODE_LABELS[r.mode], r.dtype, r.memory_format, r.batch,
                     "x".join(map(str, r.input_shape[1:])),
                     format_figure(r.images_per_s("eager"), ",.0f"), format_figure(r.images_per_s("fused"), ",.0f"),
                     format_figure(r.images_per_s("compile"), ",.0f"),
                     format_figure(r.speedup("fused", "eager"), ".2f"),
                     format_figure(r.speedup("fused", "compile"), ".2f")])
        if graphs:
            shares = r.host_shares()
            rows[-1] += [format_figure(r.speedup("fused_graph", "eager_graph"), ".2f")] + [
                format_figure(shares.get(base), ".0%") for base in ("eager", "fused")]
    notes = sorted({f"{name}: {m.skipped}" for r in results for name, m in r.variants.items() if m.skipped})
    text = [device_banner(info), render_table(header, rows)]
    if notes:
        text.append("Skipped: " + "; ".join(notes))
    return "\n".join(text)


def report(results: Sequence[CaseResult], info: dict, config: BenchConfig,
           kernels: Sequence["KernelResult"] = ()) -> dict:
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


# A graph variant in the light shade of its base variant's colour.
VARIANT_COLORS = {"eager": "#7f7f7f", "fused": "#1f77b4", "compile": "#ff7f0e", "compile_fused": "#2ca02c",
                  "fused_conv": "#9467bd", "eager_graph": "#c7c7c7", "fused_graph": "#aec7e8",
                  "fused_conv_graph": "#c5b0d5"}


def plot_stage_panel(ax, group: Sequence[CaseResult], title: str) -> None:
    """One panel of images/s per stage (log scale), a bar per variant that was measured."""
    variants = [v for v in ALL_VARIANTS if any(r.images_per_s(v) for r in group)]
    width = 0.8 / max(len(variants), 1)
    for i, v in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(group))]
        ax.bar(xs, [r.images_per_s(v) or 0 for r in group], width, label=v, color=VARIANT_COLORS[v])
    ax.set_xticks(range(len(group)), [r.stage for r in group])
    ax.set_yscale("log")
    ax.set_ylabel("images/s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)


def stage_panels(results: Sequence[CaseResult]) -> dict[tuple, list[CaseResult]]:
    """Results grouped by (model, mode, dtype, format, batch): one chart panel each."""
    panels: dict[tuple, list[CaseResult]] = {}
    for r in results:
        panels.setdefault((r.model, r.mode, r.dtype, r.memory_format, r.batch), []).append(r)
    return panels


def panel_title(key: tuple) -> str:
    model, mode, dtype, memory_format, batch = key
    return f"{model} {MODE_LABELS[mode]} {dtype} {memory_format} batch {batch}"


def write_plot(path: str, results: Sequence[CaseResult], info: dict) -> None:
    """A PNG of images/s per stage: one panel per (model, mode, dtype, format, batch), a bar per variant."""
    matplotlib = require("matplotlib", "writing the --plot chart")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = stage_panels(results)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (key, group) in zip(axes.flat, panels.items()):
        plot_stage_panel(ax, group, panel_title(key))
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
