"""What the tools share: names, model and stage building, the BatchNorm tails, traffic budgets,
timing, the machine and its peak bandwidth, and table / JSON / progress output.

Nothing here is the library: the tools (``cli``, ``check``, ``bench``, ``kernel_bench``,
``audit``, ``gpu``) import it, and the library never imports a tool. torchvision and tqdm are
imported lazily: the library itself needs only torch and triton.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

MODELS = ("resnet18", "resnet50")
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "all")
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


# --------------------------------------------------------------------------- models and stages


def torchvision_resnet(name: str, seed: int = 0) -> nn.Module:
    """A randomly initialised torchvision ResNet (``weights=None``: nothing is downloaded)."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose from {', '.join(MODELS)}")
    torchvision = require("torchvision", "building torchvision ResNets")
    torch.manual_seed(seed)
    return getattr(torchvision.models, name)(weights=None)


def convert_model(model: nn.Module, fuse_convolutions: bool = False) -> nn.Module:
    """The fused model: ``fused_resnet.convert.convert`` on a copy of ``model``; with
    ``fuse_convolutions`` its Bottlenecks' 1x1 convolutions are the Triton GEMMs too."""
    try:
        from fused_resnet.convert import convert
    except ImportError as exc:
        raise MissingDependency(f"fused_resnet.convert is not available ({exc})") from exc
    return convert(copy.deepcopy(model), inplace=True, fuse_convolutions=fuse_convolutions)


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


# --------------------------------------------------------------------------- the tails themselves

TAIL_OPS = ("bn_relu", "bn_add_relu", "bn_add_bn_relu", "add_relu")
PASSES = ("forward_train", "forward_eval", "backward_train", "backward_eval")
PASS_LABELS = {"forward_train": "fwd train", "forward_eval": "fwd eval",
               "backward_train": "bwd train", "backward_eval": "bwd eval"}
# add_relu has no BatchNorm: train and eval are the same op, audited once.
OP_PASSES = {op: PASSES for op in TAIL_OPS[:-1]} | {"add_relu": ("forward_eval", "backward_eval")}


class TailNorms:
    """The BatchNorms of one tail, as in a torchvision block: ``bn`` on the main path and
    ``bn_r`` on the shortcut (used by ``bn_add_bn_relu``)."""

    def __init__(self, C: int, dtype: torch.dtype, device: torch.device = torch.device("cpu")):
        self.bn = nn.BatchNorm2d(C).to(device=device, dtype=dtype)
        self.bn_r = nn.BatchNorm2d(C).to(device=device, dtype=dtype)
        with torch.no_grad():
            for bn in (self.bn, self.bn_r):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)

    def train(self, training: bool) -> None:
        self.bn.train(training)
        self.bn_r.train(training)

    def params(self, op: str) -> list[torch.Tensor]:
        bns = {"bn_relu": [self.bn], "bn_add_relu": [self.bn], "bn_add_bn_relu": [self.bn, self.bn_r]}
        return [p for bn in bns.get(op, []) for p in (bn.weight, bn.bias)]


def eager_tail(op: str, x: torch.Tensor, r: torch.Tensor, norms: TailNorms) -> torch.Tensor:
    """The tail as torchvision's blocks write it: ``bn``, ``out += identity``, in-place ReLU.

    ``x`` must not be a leaf (``add_relu`` adds into it, as into a convolution's output).
    """
    if op == "bn_relu":
        return torch.relu_(norms.bn(x))
    out = x if op == "add_relu" else norms.bn(x)
    out += norms.bn_r(r) if op == "bn_add_bn_relu" else r
    return torch.relu_(out)


def fused_tail(op: str, x: torch.Tensor, r: torch.Tensor, norms: TailNorms) -> torch.Tensor:
    """The same tail through the fused functional ops, with nn.BatchNorm2d's bookkeeping."""
    from fused_resnet import functional as F

    bn, bn_r = norms.bn, norms.bn_r
    if op == "add_relu":
        return F.add_relu(x, r)
    stats = (bn.running_mean, bn.running_var)
    common = dict(training=bn.training, momentum=bn.momentum, eps=bn.eps, num_batches_tracked=bn.num_batches_tracked)
    if op == "bn_relu":
        return F.bn_relu(x, *stats, bn.weight, bn.bias, **common)
    if op == "bn_add_relu":
        return F.bn_add_relu(x, r, *stats, bn.weight, bn.bias, **common)
    return F.bn_add_bn_relu(x, r, *stats, bn.weight, bn.bias, bn_r.running_mean, bn_r.running_var,
                            bn_r.weight, bn_r.bias, r_momentum=bn_r.momentum, r_eps=bn_r.eps,
                            r_num_batches_tracked=bn_r.num_batches_tracked, **common)


@dataclass
class TailCase:
    """Seeded inputs of one tail in one pass: the activation ``x_leaf``, the shortcut ``r``
    (both requiring grad) and the tail's BatchNorms, in the pass's train / eval mode."""

    op: str
    pass_: str
    x_leaf: torch.Tensor
    r: torch.Tensor
    norms: TailNorms
    generator: torch.Generator
    memory_format: str

    def forward(self, tail: Callable, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``tail`` (:func:`eager_tail` or :func:`fused_tail`) on ``x``, by default a non-leaf
        copy of ``x_leaf``, as a convolution's output is."""
        return tail(self.op, self.x_leaf.clone() if x is None else x, self.r, self.norms)

    def differentiable(self) -> list[torch.Tensor]:
        """What the backward pass differentiates: x, the shortcut (unless bn_relu), the BatchNorms' affine."""
        return [self.x_leaf] + ([] if self.op == "bn_relu" else [self.r]) + self.norms.params(self.op)

    def grad_output(self, y: torch.Tensor) -> torch.Tensor:
        """A seeded upstream gradient in y's shape, dtype and memory format."""
        return torch.randn(y.shape, generator=self.generator, device=y.device).to(
            dtype=y.dtype, memory_format=MEMORY_FORMATS[self.memory_format])


def tail_case(op: str, pass_: str, shape: Sequence[int], dtype: str, memory_format: str,
              device: torch.device = torch.device("cpu"), seed: int = 0) -> TailCase:
    """The seeded inputs of ``op`` in ``pass_`` at ``shape``; random numbers are drawn on ``device``."""
    check_tail_case(op, pass_)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    x_leaf, r = (torch.randn(tuple(shape), generator=gen, device=device)
                 .to(dtype=DTYPES[dtype], memory_format=MEMORY_FORMATS[memory_format]).requires_grad_()
                 for _ in range(2))
    torch.manual_seed(seed)
    norms = TailNorms(shape[1], DTYPES[dtype], device)
    norms.train(pass_.endswith("train"))
    return TailCase(op, pass_, x_leaf, r, norms, gen, memory_format)


def check_tail_case(op: str, pass_: str) -> None:
    """ValueError naming the choices for an unknown op or a pass the op does not have."""
    if op not in TAIL_OPS:
        raise ValueError(f"unknown op '{op}'; choose from {', '.join(TAIL_OPS)}")
    if pass_ not in OP_PASSES[op]:
        raise ValueError(f"op '{op}' has no pass '{pass_}'; choose from {', '.join(OP_PASSES[op])}")


# --------------------------------------------------------------------------- traffic by design

# Traffic in units of T (bytes of one activation tensor).
# The least any implementation moves without keeping a whole activation on chip: training
# needs the statistics before normalising and the gradient sums before dx (two passes over
# x, and over dy and x); eval is one pass. In training the ReLU mask can be recomputed
# from the saved inputs (bn_relu, bn_add_bn_relu), where bn_add_relu, whose residual is
# not saved, reads the saved output.
MINIMUM = {
    "bn_relu": {"forward_train": 3, "forward_eval": 2, "backward_train": 5, "backward_eval": 4},
    "bn_add_relu": {"forward_train": 4, "forward_eval": 3, "backward_train": 7, "backward_eval": 5},
    "bn_add_bn_relu": {"forward_train": 5, "forward_eval": 3, "backward_train": 8, "backward_eval": 6},
    "add_relu": {"forward_eval": 3, "backward_eval": 3},
}
# What the fused kernels move by design (issue 2 budgeted 7T for the bn_relu backward,
# which reads y; recomputing the mask from x brought it to 5T), and what eager PyTorch
# was expected to move.
FUSED_BUDGET = {
    "bn_relu": {"forward_train": 3, "forward_eval": 2, "backward_train": 5},
    "bn_add_relu": {"forward_train": 4, "forward_eval": 3, "backward_train": 7},
}
EAGER_BUDGET = {
    "bn_relu": {"forward_train": 5, "forward_eval": 4, "backward_train": 8},
    "bn_add_relu": {"forward_train": 8, "forward_eval": 7, "backward_train": 8},
}


def fused_design_traffic(op: str, pass_: str) -> float:
    """T the fused kernels move in one pass by design: the budget where one is set, else the
    minimum (which the audit measures the unbudgeted forward and training passes at)."""
    check_tail_case(op, pass_)
    return FUSED_BUDGET.get(op, {}).get(pass_, MINIMUM[op][pass_])


def activation_bytes(shape: Sequence[int], dtype: str) -> int:
    """T: the bytes of one activation of ``shape`` in ``dtype``."""
    return torch.empty((), dtype=DTYPES[dtype]).element_size() * int(torch.Size(shape).numel())


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
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


# --------------------------------------------------------------------------- the machine

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


def gpu_details(device: torch.device) -> dict:
    """What the driver tells of a CUDA device beyond ``machine_info``: SMs, memory, driver, clocks.

    Clocks and the driver version come from ``nvidia-smi`` where it is installed; a field
    that cannot be read is left out rather than guessed.
    """
    device = torch.device(device)
    props = torch.cuda.get_device_properties(device)
    out = {"sm_count": props.multi_processor_count, "memory_bytes": props.total_memory,
           "compute_capability": f"{props.major}.{props.minor}"}
    for name in ("memory_bus_width", "memory_clock_rate", "L2_cache_size", "clock_rate",
                 "shared_memory_per_block_optin"):
        if getattr(props, name, None):
            out[name] = getattr(props, name)
    fields = ("driver_version", "clocks.max.sm", "clocks.max.memory", "clocks.sm", "power.limit")
    try:
        proc = subprocess.run(["nvidia-smi", f"--id={device.index or 0}", f"--query-gpu={','.join(fields)}",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if proc.returncode == 0 and proc.stdout.strip():
            values = [v.strip() for v in proc.stdout.strip().splitlines()[0].split(",")]
            out.update({f"nvidia_smi.{k}": v for k, v in zip(fields, values) if v and "N/A" not in v})
    except (OSError, subprocess.SubprocessError):
        out["nvidia_smi"] = "not available"
    return out


def device_banner(info: dict) -> str:
    """One line saying what ran where; CPU runs say that their figures are CPU figures."""
    versions = f"torch {info['torch']}, triton {info['triton']}"
    if info["device_kind"] == "cuda":
        return f"GPU: {info['gpu']} ({versions}). {CUDA_NOTE}"
    threads = info["torch_threads"]
    return f"CPU: {info['cpu']}, {threads} thread{'s' if threads != 1 else ''} ({versions}). {CPU_NOTE}"


# --------------------------------------------------------------------------- output


def format_figure(value: Optional[float], spec: str) -> str:
    """``value`` formatted with ``spec``, '-' for a missing figure."""
    return "-" if value is None else format(value, spec)


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: columns padded to their widest cell, numbers right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def write_json(path: str, data: dict) -> None:
    """Write ``data`` as indented JSON, creating the parent folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def progress(iterable, total: int, desc: str, enabled: bool = True):
    """A tqdm progress bar on stderr when tqdm is installed and ``enabled``; else the iterable."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
