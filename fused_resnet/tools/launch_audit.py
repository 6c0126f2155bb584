"""Launch audit: every Triton launch a converted ResNet makes, projected on an H100 plan.

Nothing runs and nothing is allocated. The model (converted, and the eager original beside
it) runs on ``meta`` tensors; :class:`LaunchRecorder`, a ``TorchDispatchMode``, runs each
``fused_resnet::`` custom op's own Python implementation with the launchers' plan of a
GPU target (``kernels/aot.py``'s ``record_launches`` keeps each ``kernel[grid](...)``
instead of running it) and records every other ATen op with its bytes and FLOPs.

Per launch, from its grid and bound arguments (:data:`KERNEL_MODELS`): programs, bytes
moved *by design* (each tensor argument read or written once, whole; the per-channel
shift a finalize samples from an activation counted as C elements), FLOPs of its dots,
the longest chain of dependent loop iterations in one program (``depth``) and whether
that loop is software-pipelined (``num_stages`` > 1 on a loop Triton pipelines). From
these a **projection** (not a measurement) on :data:`H100`:

- bandwidth bound: bytes / DRAM bandwidth; compute bound: FLOPs / tensor-core peak;
  their maximum is the roofline bound;
- a grid of fewer programs than SMs reaches only programs / SMs of either;
- serial bound (Little's law): each wave of resident programs waits ``depth`` times a
  DRAM latency, divided by the loads a pipelined loop keeps in flight (``num_stages``);
- projected time = the largest of the three.

ATen ops (eager's whole sequence; in the fused model the convolutions and copies around
the kernels) are projected at their roofline bound, a cuDNN-class ideal, stated so.
:func:`launch_problems` is the check: a launch that touches more than
``SMALL_LAUNCH_BYTES`` runs at least one program per SM, and its projected time is at most
``SLACK`` times its roofline bound plus one DRAM latency (what any launch pays).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .traffic import _ALLOCATIONS, _WRITE_ONLY_SELF, _bound_args, _custom_op_impl, _extra_reads, _tensors

STAGE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4", "head")
SMALL_LAUNCH_BYTES = 256 * 1024
SLACK = 1.25


@dataclass(frozen=True)
class DeviceModel:
    """The figures a projection uses (vendor data sheets; latency an assumption, stated)."""

    name: str
    sms: int
    dram_tb_s: float
    # Dense tensor-core (or FMA for "ieee" fp32) peaks, TFLOP/s, by dot input precision.
    peak_tflops: dict
    latency_us: float  # one dependent DRAM round trip under load
    warps_per_sm: int = 64
    shared_bytes: int = 227 * 1024  # per SM, what one block may ask for
    registers: int = 65536  # per SM
    # Registers a thread of a dot kernel is assumed to use besides two per accumulator
    # element it holds (128x128 on eight warps: 64 + 128 = 192; the AOT test reads 100-255).
    dot_base_registers: int = 64
    target: str = "sm_90a"


H100 = DeviceModel("H100 SXM (HBM3)", 132, 3.35, {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "ieee": 67.0}, 0.8)


# ------------------------------------------------------------------ per-kernel models


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


@dataclass(frozen=True)
class KernelModel:
    """How to read one kernel's launch: its dependent loop depth and dot FLOPs from its
    bound arguments, whether its loop is one Triton software-pipelines, and the tensor
    arguments it only samples (element count from the arguments instead of the tensor)."""

    depth: Callable[[dict], int] = lambda a: 1
    flops: Callable[[dict], int] = lambda a: 0
    dot_loop: bool = False  # a tl.dot loop: Triton pipelines it with num_stages > 1
    range_stages: Optional[str] = None  # constexpr holding tl.range(..., num_stages=) of the loop, if any
    sampled: dict = field(default_factory=dict)  # argument -> elements read, from the bound arguments
    # Elements of the operand tiles one pipeline stage holds in shared memory, and of the
    # fp32 accumulators a program holds in registers (dot kernels).
    stage_elements: Callable[[dict], int] = lambda a: 0
    accumulator_elements: Callable[[dict], int] = lambda a: 0


def _second(a: dict, key: str) -> int:
    return a[key] if a.get("SECOND") else 0


KERNEL_MODELS: dict[str, KernelModel] = {
    "bn_stats_partial_kernel": KernelModel(depth=lambda a: a["rows_per_program"] * a["blocks_per_span"]),
    "bn_add_relu_backward_reduce_kernel": KernelModel(depth=lambda a: a["rows_per_program"] * a["blocks_per_span"]),
    "bn_stats_finalize_kernel": KernelModel(depth=lambda a: _cdiv(a["num_partials"], a["BLOCK_P"]),
                                            sampled={"x_ptr": lambda a: a["C"]}),
    "bn_add_relu_backward_finalize_kernel": KernelModel(depth=lambda a: _cdiv(a["num_partials"], a["BLOCK_P"])),
    "conv1x1_stats_merge_kernel": KernelModel(depth=lambda a: _cdiv(min(a["tiles_per_group"], a["num_tiles"]),
                                                                    a["BLOCK_P"])),
    "split_sum_kernel": KernelModel(depth=lambda a: _cdiv(min(a["rows_per_group"], a["num_rows"]), a["BLOCK_R"])),
    "conv1x1_forward_kernel": KernelModel(depth=lambda a: _cdiv(a["K"], a["BLOCK_K"]),
                                          flops=lambda a: 2 * a["M"] * a["N"] * a["K"], dot_loop=True,
                                          stage_elements=lambda a: (a["BLOCK_M"] + a["BLOCK_N"]) * a["BLOCK_K"],
                                          accumulator_elements=lambda a: a["BLOCK_M"] * a["BLOCK_N"]),
    "conv1x1_dgrad_kernel": KernelModel(
        depth=lambda a: _cdiv(a["N"], a["BLOCK_N"]) + _cdiv(_second(a, "N2"), a["BLOCK_N"]),
        flops=lambda a: 2 * a["M"] * a["K"] * (a["N"] + _second(a, "N2")), dot_loop=True,
        stage_elements=lambda a: (a["BLOCK_M"] + a["BLOCK_K"]) * a["BLOCK_N"],
        accumulator_elements=lambda a: a["BLOCK_M"] * a["BLOCK_K"]),
    "conv1x1_wgrad_kernel": KernelModel(depth=lambda a: _cdiv(a["rows_per_split"], a["BLOCK_M"]),
                                        flops=lambda a: 2 * a["M"] * a["N"] * a["K"], dot_loop=True,
                                        stage_elements=lambda a: (a["BLOCK_N"] + a["BLOCK_K"]) * a["BLOCK_M"],
                                        accumulator_elements=lambda a: a["BLOCK_N"] * a["BLOCK_K"]),
    "conv1x1_dgrad_wgrad_kernel": KernelModel(
        depth=lambda a: _cdiv(a["rows_per_split"], a["BLOCK_M"]),
        flops=lambda a: 4 * a["M"] * a["K"] * (a["N"] + _second(a, "N2")), dot_loop=True,
        stage_elements=lambda a: (a["BLOCK_N"] + a["BLOCK_K"] + _second(a, "BLOCK_N2")) * a["BLOCK_M"],
        accumulator_elements=lambda a: (a["BLOCK_M"] + a["BLOCK_N"] + _second(a, "BLOCK_N2")) * a["BLOCK_K"]),
}


# ------------------------------------------------------------------ one launch


@dataclass
class LaunchFigures:
    """One recorded launch, read and projected (times in microseconds, projections)."""

    kernel: str
    stage: str
    programs: int
    bytes: int
    flops: int
    depth: int
    pipelined: bool
    num_stages: int
    num_warps: int
    precision: str
    shared_bytes: int = 0
    accumulators: int = 0
    bandwidth_us: float = 0.0
    compute_us: float = 0.0
    serial_us: float = 0.0
    projected_us: float = 0.0

    @property
    def roofline_us(self) -> float:
        return max(self.bandwidth_us, self.compute_us)


def _precision(a: dict) -> str:
    precision = a.get("INPUT_PRECISION", "ieee")
    if precision != "ieee":
        return precision
    dtypes = {str(v.dtype) for v in a.values() if isinstance(v, torch.Tensor) and v.dim() >= 2}
    for dtype, name in (("torch.bfloat16", "bf16"), ("torch.float16", "fp16")):
        if dtype in dtypes:
            return name
    return "ieee"


def launch_bytes(launch, model: KernelModel, args: dict) -> int:
    """Bytes by design: each distinct tensor argument once, whole (sampled ones by count)."""
    seen, total = set(), 0
    for name, value in args.items():
        if not isinstance(value, torch.Tensor) or id(value) in seen:
            continue
        seen.add(id(value))
        if name in model.sampled:
            total += model.sampled[name](args) * value.element_size()
        else:
            total += value.numel() * value.element_size()
    return total


def project(fig: LaunchFigures, device: DeviceModel) -> LaunchFigures:
    """Fills the projected times of ``fig`` on ``device`` (see the module docstring)."""
    fill = min(1.0, fig.programs / device.sms) if fig.programs else 1.0
    fig.bandwidth_us = fig.bytes / (device.dram_tb_s * 1e6)
    fig.compute_us = fig.flops / (device.peak_tflops[fig.precision] * 1e6) if fig.flops else 0.0
    per_sm = device.warps_per_sm // fig.num_warps
    if fig.flops:  # a dot kernel: its pipeline stages in shared memory and its registers bound it too
        threads = 32 * fig.num_warps
        registers = min(255, device.dot_base_registers + 2 * _cdiv(fig.accumulators, threads))
        per_sm = min(per_sm, device.shared_bytes // max(fig.shared_bytes, 1), device.registers // (threads * registers))
    resident = device.sms * max(1, per_sm)
    waves = _cdiv(max(fig.programs, 1), resident)
    in_flight = fig.num_stages if fig.pipelined else 1
    fig.serial_us = waves * fig.depth * device.latency_us / in_flight
    fig.projected_us = max(fig.bandwidth_us / fill, fig.compute_us / fill, fig.serial_us)
    return fig


def read_launch(launch, stage: str, device: DeviceModel) -> LaunchFigures:
    """The figures of one ``kernels.aot.Launch``."""
    model = KERNEL_MODELS.get(launch.name, KernelModel())
    args = launch.bound_arguments()
    grid = launch.grid if isinstance(launch.grid, tuple) else (launch.grid,)
    stages_key = model.range_stages
    num_stages = int(args.get(stages_key, 1)) if stages_key else int(launch.kwargs.get("num_stages", 3))
    pipelined = (model.dot_loop or stages_key is not None) and num_stages > 1
    fig = LaunchFigures(launch.name, stage, math.prod(int(g) for g in grid), launch_bytes(launch, model, args),
                        int(model.flops(args)), int(model.depth(args)), pipelined, num_stages,
                        int(launch.kwargs.get("num_warps", 4)), _precision(args))
    if model.dot_loop:
        fig.shared_bytes = num_stages * model.stage_elements(args) * _operand_size(args)
        fig.accumulators = int(model.accumulator_elements(args))
    return project(fig, device)


def _operand_size(args: dict) -> int:
    return 2 if _precision(args) in ("bf16", "fp16") else 4


# ------------------------------------------------------------------ recording a model


@dataclass
class AtenFigures:
    """One ATen op outside the kernels, projected at its roofline bound."""

    op: str
    stage: str
    bytes: int
    flops: int
    projected_us: float = 0.0


def _aten_flops(func, args, kwargs, out) -> int:
    counter = flop_registry.get(func._overloadpacket)
    if counter is None:
        return 0
    return int(counter(*args, **kwargs, out_val=out))


def _as_channels_last(out):
    """Meta kernels return NCHW where cuDNN returns channels_last (a convolution and its
    gradients of channels_last tensors): restride fresh 4-D outputs as a GPU lays them out."""
    if isinstance(out, (tuple, list)):
        return type(out)(_as_channels_last(o) for o in out)
    if isinstance(out, torch.Tensor) and out.dim() == 4 and out.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out


class LaunchRecorder(TorchDispatchMode):
    """Records Triton launches (inside ``fused_resnet::`` ops) and ATen ops, per stage."""

    def __init__(self, device: DeviceModel, eager_precision: str, channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        self.device = device
        self.eager_precision = eager_precision
        self.stage = "stem"
        self.launches: list[LaunchFigures] = []
        self.aten: list[AtenFigures] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from fused_resnet.kernels.aot import record_launches

        kwargs = kwargs or {}
        if func.namespace == "fused_resnet":
            impl = _custom_op_impl(func)
            with record_launches() as rec:
                with self:
                    out = impl(*args, **kwargs)
            self.launches += [read_launch(launch, self.stage, self.device) for launch in rec.launches]
            return out
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if func.is_view or name in _ALLOCATIONS:
            return out
        if self.channels_last and not any(r.alias_info for r in func._schema.returns):
            out = _as_channels_last(out)
        values = _bound_args(func, args, kwargs)
        written = [v for v, a in zip(values, func._schema.arguments) if a.alias_info is not None
                   and a.alias_info.is_write]
        read = values[1:] if name in _WRITE_ONLY_SELF else values
        nbytes = sum(t.nbytes for t in _tensors(read)) + sum(t.nbytes for t in _tensors([written, out]))
        nbytes += sum(_extra_reads(name, values))
        flops = _aten_flops(func, args, kwargs, out)
        precision = self.eager_precision
        us = max(nbytes / (self.device.dram_tb_s * 1e6), flops / (self.device.peak_tflops[precision] * 1e6))
        self.aten.append(AtenFigures(name, self.stage, nbytes, flops, us))
        return out


@contextlib.contextmanager
def plans_of(device: DeviceModel) -> Iterator[None]:
    """Meta tensors take the Triton path with ``device``'s launch plans."""
    from fused_resnet import backend
    from fused_resnet.kernels.aot import TARGETS
    from fused_resnet.kernels.conv1x1_bn import plans as conv1x1_plans  # where every launcher looks target_of up

    target = TARGETS[device.target]
    use_triton, target_of, autocast = backend.use_triton, conv1x1_plans.target_of, torch.is_autocast_enabled
    backend.use_triton = lambda t: (t.device.type == "meta" and t.dtype != torch.float64) or use_triton(t)
    conv1x1_plans.target_of = lambda dev: target if torch.device(dev).type == "meta" else target_of(dev)
    # autocast has no meta device type (and is off in the audit)
    torch.is_autocast_enabled = lambda *a: False if a and str(a[0]) == "meta" else autocast(*a)
    try:
        yield
    finally:
        backend.use_triton, conv1x1_plans.target_of, torch.is_autocast_enabled = use_triton, target_of, autocast


def _stage_hooks(model: torch.nn.Module, recorder: LaunchRecorder) -> list:
    """Forward and backward pre-hooks that set the recorder's stage (torchvision ResNet names)."""
    owners = {"conv1": "stem", "maxpool": "stem", "layer1": "layer1", "layer2": "layer2", "layer3": "layer3",
              "layer4": "layer4", "avgpool": "head", "fc": "head"}
    handles = []
    for child, stage in owners.items():
        module = getattr(model, child, None)
        if module is None:
            continue

        def enter(*_, stage=stage):
            recorder.stage = stage

        handles.append(module.register_forward_pre_hook(enter))
        if child != "conv1":  # the stem's backward starts at the maxpool's
            handles.append(module.register_full_backward_pre_hook(enter))
    return handles


@dataclass(frozen=True)
class AuditCase:
    batch: int
    dtype: str  # "bfloat16" (channels_last) or "float32" (NCHW)
    fuse_convolutions: bool
    training: bool
    resolution: int = 224
    model: str = "resnet50"

    @property
    def channels_last(self) -> bool:
        return self.dtype != "float32"

    @property
    def label(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        return (f"{self.model} batch {self.batch} {self.dtype} {layout} "
                f"fuse_convolutions={'on' if self.fuse_convolutions else 'off'} {'train' if self.training else 'eval'}")


def _model(case: AuditCase, fused: bool) -> torch.nn.Module:
    import torchvision

    import fused_resnet

    torch.manual_seed(0)
    model = getattr(torchvision.models, case.model)()
    if fused:
        model = fused_resnet.convert(model, fuse_convolutions=case.fuse_convolutions)
    model = model.to(device="meta", dtype=getattr(torch, case.dtype))
    if case.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train(case.training)


def record(case: AuditCase, fused: bool, device: DeviceModel = H100) -> LaunchRecorder:
    """One training step (forward, loss = sum of the logits, backward; no optimizer) or one
    eval forward of ``case`` on meta tensors: the fused model's launches, or eager's ops."""
    model = _model(case, fused)
    x = torch.empty(case.batch, 3, case.resolution, case.resolution, device="meta", dtype=getattr(torch, case.dtype))
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    recorder = LaunchRecorder(device, "tf32" if case.dtype == "float32" else "bf16", case.channels_last)
    handles = _stage_hooks(model, recorder)
    try:
        with plans_of(device), recorder:
            if case.training:
                model(x).sum().backward()
            else:
                with torch.no_grad():
                    model(x)
    finally:
        for handle in handles:
            handle.remove()
    return recorder


# ------------------------------------------------------------------ checks and tables


def launch_problems(launches: Sequence[LaunchFigures], device: DeviceModel = H100) -> list[str]:
    """What the audit rejects: an under-filled grid or a launch far off its roofline bound."""
    problems = []
    for fig in launches:
        if fig.bytes <= SMALL_LAUNCH_BYTES:
            continue
        where = f"{fig.stage} {fig.kernel}: {fig.bytes / 1e6:.2f} MB"
        if fig.programs < device.sms:
            problems.append(f"{where} in {fig.programs} programs (< {device.sms} SMs)")
        if fig.projected_us > SLACK * fig.roofline_us + device.latency_us:
            problems.append(f"{where}: projected {fig.projected_us:.1f} us > {SLACK} x roofline "
                            f"{fig.roofline_us:.1f} us + {device.latency_us} us (depth {fig.depth}, "
                            f"{'pipelined' if fig.pipelined else 'not pipelined'})")
    return problems


@dataclass
class CaseAudit:
    case: AuditCase
    launches: list[LaunchFigures]
    fused_aten: list[AtenFigures]
    eager: list[AtenFigures]

    def stage_times(self) -> dict[str, dict[str, float]]:
        """Per stage: projected microseconds of the fused model (kernels + ATen ops) and eager."""
        out = {s: {"kernels": 0.0, "fused_aten": 0.0, "eager": 0.0, "launches": 0} for s in STAGE_NAMES}
        for fig in self.launches:
            out[fig.stage]["kernels"] += fig.projected_us
            out[fig.stage]["launches"] += 1
        for op in self.fused_aten:
            out[op.stage]["fused_aten"] += op.projected_us
        for op in self.eager:
            out[op.stage]["eager"] += op.projected_us
        return out

    def problems(self, device: DeviceModel = H100) -> list[str]:
        return launch_problems(self.launches, device)

    def to_json(self) -> dict:
        return {"case": asdict(self.case), "stages": self.stage_times(), "problems": self.problems(),
                "launches": [asdict(f) for f in self.launches]}


def audit_case(case: AuditCase, device: DeviceModel = H100) -> CaseAudit:
    fused = record(case, True, device)
    eager = record(case, False, device)
    return CaseAudit(case, fused.launches, fused.aten, eager.aten)


def all_cases(batches: Sequence[int] = (32, 256), resolution: int = 224) -> list[AuditCase]:
    return [AuditCase(batch, dtype, fuse, training, resolution)
            for batch in batches for dtype in ("bfloat16", "float32") for fuse in (True, False)
            for training in (True, False)]


def kernel_summary(audits: Sequence[CaseAudit]) -> list[dict]:
    """Per kernel over ``audits``: launches, fewest programs, the worst launch by
    projected / roofline among those over SMALL_LAUNCH_BYTES."""
    rows: dict[str, dict] = {}
    for audit in audits:
        for fig in audit.launches:
            row = rows.setdefault(fig.kernel, {"kernel": fig.kernel, "launches": 0, "fewest_programs": fig.programs,
                                               "fewest_programs_bytes": fig.bytes, "worst_ratio": 0.0,
                                               "worst": "", "max_depth": 0})
            row["launches"] += 1
            row["max_depth"] = max(row["max_depth"], fig.depth)
            if fig.bytes > SMALL_LAUNCH_BYTES and fig.programs < row["fewest_programs"]:
                row["fewest_programs"], row["fewest_programs_bytes"] = fig.programs, fig.bytes
            if fig.bytes > SMALL_LAUNCH_BYTES and fig.roofline_us > 0:
                ratio = fig.projected_us / fig.roofline_us
                if ratio > row["worst_ratio"]:
                    row["worst_ratio"] = ratio
                    row["worst"] = (f"{fig.programs} programs, {fig.bytes / 1e6:.1f} MB, depth {fig.depth}"
                                    f"{' pipelined' if fig.pipelined else ''}: {fig.projected_us:.1f} us / "
                                    f"{fig.roofline_us:.1f} us ({audit.case.batch}, {audit.case.dtype})")
    return sorted(rows.values(), key=lambda r: r["kernel"])


def format_kernel_table(audits: Sequence[CaseAudit]) -> str:
    lines = ["| kernel | launches | fewest programs (> 256 KB) | deepest loop | worst launch: projected / roofline |",
             "| --- | --- | --- | --- | --- |"]
    for row in kernel_summary(audits):
        lines.append(f"| `{row['kernel']}` | {row['launches']} | {row['fewest_programs']} over "
                     f"{row['fewest_programs_bytes'] / 1e6:.2f} MB | {row['max_depth']} | "
                     f"{row['worst_ratio']:.2f}x: {row['worst']} |")
    return "\n".join(lines)


def format_stage_table(audits: Sequence[CaseAudit]) -> str:
    lines = ["| case | stage | launches | fused kernels us | fused ATen us | fused total us | eager us | fused / eager |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for audit in audits:
        for stage, t in audit.stage_times().items():
            if stage not in ("layer1", "layer2", "layer3", "layer4"):
                continue
            total = t["kernels"] + t["fused_aten"]
            lines.append(f"| {audit.case.label} | {stage} | {t['launches']} | {t['kernels']:.0f} | "
                         f"{t['fused_aten']:.0f} | {total:.0f} | {t['eager']:.0f} | "
                         f"{total / t['eager'] if t['eager'] else float('nan'):.2f} |")
    return "\n".join(lines)


def format_problem_counts(audits: Sequence[CaseAudit], device: DeviceModel = H100) -> str:
    """Launches that fail the check, per kernel and stage, over every case."""
    counts: dict[tuple[str, str], int] = {}
    for audit in audits:
        for fig in audit.launches:
            if launch_problems([fig], device):
                counts[fig.kernel, fig.stage] = counts.get((fig.kernel, fig.stage), 0) + 1
    lines = ["| kernel | stage | launches failing the check |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | {s} | {n} |" for (k, s), n in sorted(counts.items())]
    return "\n".join(lines)


def format_launch_audit(audits: Sequence[CaseAudit], device: DeviceModel = H100) -> str:
    problems = [f"{a.case.label}: {p}" for a in audits for p in a.problems(device)]
    head = (f"Launch audit on {device.name}'s plan ({device.target}, {device.sms} SMs): a PROJECTION, not a "
            f"measurement. DRAM {device.dram_tb_s} TB/s, tensor-core peaks {device.peak_tflops} TFLOP/s, "
            f"{device.latency_us} us a dependent DRAM round trip; ATen ops at their roofline bound.")
    return "\n\n".join([head, format_kernel_table(audits), format_stage_table(audits), format_problem_counts(audits, device),
                        f"{len(problems)} launch problem(s)" + ("" if not problems else ":\n" + "\n".join(
                            f"- {p}" for p in problems[:60]) + ("\n- ..." if len(problems) > 60 else ""))])
