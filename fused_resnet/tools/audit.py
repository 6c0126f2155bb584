"""Memory-traffic audit: bytes the fused kernels move against the eager op sequence.

Nothing here needs a GPU. Bytes are counted, not assumed (the counters are
:mod:`fused_resnet.tools.traffic`):

- **Fused**: the Triton kernels run through Triton's interpreter (``TRITON_INTERPRET=1``),
  and :class:`~fused_resnet.tools.traffic.TritonTrafficCounter` records the addresses every
  masked load and store touches (masked-off lanes excluded). Each launch contributes its
  *unique* bytes read and its unique bytes written, per buffer; summed over launches.
- **Eager**: :class:`~fused_resnet.tools.traffic.AtenTrafficMode`, a ``TorchDispatchMode``,
  sees every ATen op the eager sequence dispatches and counts its inputs as read and its
  outputs (and mutated arguments) as written: the *one-pass* count. Batch norm cannot be
  one pass: in training it reads its input twice (statistics, then normalisation) and its
  backward reads grad and input twice (reductions, then the elementwise pass; in eval the
  second pass reads grad only). The *implementation* count adds those re-reads.

Activation bytes (tensors the size of the activation, T) are reported apart from per-channel
parameters, statistics and partial sums, which the traffic budget leaves out. Activation
bytes are linear in the activation size as long as the kernels' plan (``kernels/layout.py``)
does not change traffic with the shape, so they are measured at small shapes (the
interpreter is slow) and reported per T; per-stage bytes at real shapes are those ratios
times the real T: a scaling, said so wherever it is printed. Each per-stage figure states
the plans it was measured with (:class:`PlanChoice`); where the real shape's plan differs
from the small shape's in a traffic-relevant field (``TRAFFIC_PLAN_FIELDS``), the tail is
measured at a shape that gets the real shape's plan.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .common import (EAGER_BUDGET, FUSED_BUDGET, MINIMUM, OP_PASSES, PASS_LABELS, PASSES, STAGES, TAIL_OPS, DTYPES,
                     bn_tails, canonical_dtype, check_tail_case, eager_tail, fused_tail, machine_info, progress,
                     render_table, tail_case)
from .traffic import AtenOp, AtenTrafficMode, Launch, Traffic, TritonTrafficCounter, aten_traffic, triton_traffic

OPS = TAIL_OPS

# GPUs for the projection, peak DRAM bandwidth in TB/s (vendor data sheets).
PROJECTION_GPUS = {"H100": 3.35, "H200": 4.8, "A100": 2.0, "MI300X": 5.3}
PROJECTION_GPU_NAMES = {"H100": "H100 SXM", "H200": "H200", "A100": "A100 80GB", "MI300X": "MI300X"}


@dataclass
class OpAudit:
    """One op, one pass, one shape: fused (Triton kernels + ATen ops around them) and eager."""

    op: str
    pass_: str
    shape: tuple[int, ...]
    dtype: str
    channels_last: bool
    activation_bytes: int
    fused_kernels: Traffic
    fused_aten: Traffic
    eager: Traffic
    kernel_launches: list[str]
    fused_aten_ops: list[str]
    eager_ops: list[str]

    def ratio(self, nbytes: float) -> float:
        return nbytes / self.activation_bytes

    @property
    def fused_activation(self) -> int:
        return self.fused_kernels.activation + self.fused_aten.activation

    @property
    def fused_launches(self) -> int:
        return self.fused_kernels.launches + self.fused_aten.launches

    @property
    def eager_one_pass(self) -> int:
        return self.eager.activation

    @property
    def eager_implementation(self) -> int:
        return self.eager.activation + self.eager.extra_activation_read

    def figures(self) -> dict:
        """The audit's figures in units of T, for tables and JSON."""
        return {
            "fused": self.ratio(self.fused_activation),
            "fused_read": self.ratio(self.fused_kernels.activation_read + self.fused_aten.activation_read),
            "fused_written": self.ratio(self.fused_kernels.activation_written + self.fused_aten.activation_written),
            "fused_other_bytes": self.fused_kernels.other + self.fused_aten.other,
            "eager_one_pass": self.ratio(self.eager_one_pass),
            "eager_implementation": self.ratio(self.eager_implementation),
            "eager_other_bytes": self.eager.other,
            "minimum": MINIMUM[self.op][self.pass_],
            "fused_budget": FUSED_BUDGET.get(self.op, {}).get(self.pass_),
            "eager_budget": EAGER_BUDGET.get(self.op, {}).get(self.pass_),
            "fused_launches": self.fused_launches,
            "fused_kernel_launches": self.fused_kernels.launches,
            "eager_launches": self.eager.launches,
        }

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(figures=self.figures())
        return out


def _run_pass(tail: Callable, op: str, pass_: str, shape, dtype: str, channels_last: bool,
              counters: Callable[[], contextlib.AbstractContextManager]) -> None:
    """Run ``tail`` for one pass with fresh seeded tensors; only the pass itself runs inside ``counters()``."""
    case = tail_case(op, pass_, shape, dtype, "channels_last" if channels_last else "nchw")
    x = case.x_leaf.clone()  # a non-leaf, as a convolution's output is; the copy is not the tail's traffic
    if pass_.startswith("forward"):
        with counters(), torch.no_grad() if pass_ == "forward_eval" else contextlib.nullcontext():
            case.forward(tail, x)
        return
    y = case.forward(tail, x)
    dy = case.grad_output(y)
    with counters():
        torch.autograd.grad(y, case.differentiable(), dy)


def _activation_bytes(shape: Sequence[int], dtype: str) -> tuple[int, int]:
    """(T, one element per channel) in bytes for an activation of ``shape``."""
    element = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return int(np.prod(shape)) * element, shape[1] * element


def _check_case(op: str, pass_: str, dtype: str) -> str:
    """The canonical dtype name, after checking op and pass."""
    check_tail_case(op, pass_)
    return canonical_dtype(dtype)


def eager_traffic(op: str, pass_: str, shape: Sequence[int], dtype: str = "float32",
                  channels_last: bool = True) -> tuple[Traffic, list[AtenOp]]:
    """The eager op sequence's traffic in one pass, counted by :class:`AtenTrafficMode` (no interpreter needed)."""
    dtype = _check_case(op, pass_, dtype)
    mode = AtenTrafficMode()
    _run_pass(eager_tail, op, pass_, tuple(shape), dtype, channels_last, lambda: mode)
    return aten_traffic(mode.ops, _activation_bytes(shape, dtype)[0]), mode.ops


def fused_traffic(op: str, pass_: str, shape: Sequence[int], dtype: str = "float32",
                  channels_last: bool = True) -> tuple[Traffic, Traffic, list[Launch], list[AtenOp]]:
    """The fused op's traffic in one pass: (Triton kernels, ATen ops around them, launches, ATen ops).

    Needs the interpreter (see :class:`TritonTrafficCounter`).
    """
    dtype = _check_case(op, pass_, dtype)
    kernels, around = TritonTrafficCounter(), AtenTrafficMode(look_inside=("fused_resnet",))

    @contextlib.contextmanager
    def counters():
        with kernels, around:
            yield

    _run_pass(fused_tail, op, pass_, tuple(shape), dtype, channels_last, counters)
    if around.opaque:
        raise RuntimeError(f"could not look inside custom ops {around.opaque}: their ATen ops would go uncounted")
    T, per_channel = _activation_bytes(shape, dtype)
    return triton_traffic(kernels.launches, T, per_channel), aten_traffic(around.ops, T), kernels.launches, around.ops


def audit_op(op: str, pass_: str, shape: Sequence[int], dtype: str = "float32",
             channels_last: bool = True) -> OpAudit:
    """Count one op's traffic in one pass at ``shape``, fused (interpreter) and eager."""
    shape = tuple(shape)
    kernels, around, launches, around_ops = fused_traffic(op, pass_, shape, dtype, channels_last)
    eager, eager_ops = eager_traffic(op, pass_, shape, dtype, channels_last)
    dtype = _check_case(op, pass_, dtype)
    T, _ = _activation_bytes(shape, dtype)
    return OpAudit(op, pass_, shape, dtype, channels_last, T, kernels, around, eager,
                   [launch.kernel for launch in launches], [o.name for o in around_ops], [o.name for o in eager_ops])


# --------------------------------------------------------------------------- kernel plans

# Fields of the kernels' plans (kernels/layout.py) that change how many times an activation
# is read or written, not only how it is tiled. None today: every reduction plan reads each
# element once per pass and every elementwise plan touches it once, whatever its tiles and
# partial counts, so per-T ratios measured at a small shape hold at the real one. A plan
# that, say, keeps a channel on chip for a single-read kernel at small H*W names its field here.
TRAFFIC_PLAN_FIELDS: dict[str, tuple[str, ...]] = {"reduction": (), "elementwise": ()}
# The largest activation (elements) the interpreter is asked to measure when looking for a
# small shape that gets the real shape's plan.
MAX_MATCHED_ELEMENTS = 2**18


def kernel_plans(shape: Sequence[int], channels_last: bool = True) -> dict:
    """The reduction and elementwise plans the kernels choose for an activation of ``shape``."""
    from fused_resnet.kernels.layout import Layout, elementwise_plan, reduction_plan

    N, C, H, W = shape
    layout = Layout(N, C, H * W, channels_last)
    return {"reduction": asdict(reduction_plan(layout)), "elementwise": asdict(elementwise_plan(layout))}


def traffic_plan(plans: dict) -> dict:
    """The traffic-relevant part of ``plans`` (the fields named in ``TRAFFIC_PLAN_FIELDS``)."""
    return {kind: {name: plans[kind][name] for name in fields} for kind, fields in TRAFFIC_PLAN_FIELDS.items()}


def audit_shape(shape: Sequence[int], batch: int = 2, max_hw: int = 4) -> tuple[int, int, int, int]:
    """The small shape the interpreter measures for a real stage shape: its channels, a
    couple of images, and at most max_hw x max_hw pixels."""
    _, C, H, W = shape
    return (batch, C, min(H, max_hw), min(W, max_hw))


def _growing_shapes(small: Sequence[int], real: Sequence[int]):
    """Shapes from ``small`` towards ``real``: H and W doubled first (capped at the real size), then N."""
    N, C, H, W = small
    while True:
        yield (N, C, H, W)
        if (N, H, W) == tuple(real[:1]) + tuple(real[2:]):
            return
        if (H, W) != tuple(real[2:]):
            H, W = min(2 * H, real[2]), min(2 * W, real[3])
        else:
            N = min(2 * N, real[0])


@dataclass
class PlanChoice:
    """Which kernel plans one tail's per-stage figure used.

    ``basis``: ``scaled`` (measured at the small shape, whose plans differ from the real
    shape's in tiling only: the per-T ratio is the real shape's), ``real_plan`` (measured at
    the smallest shape that gets the real shape's traffic-relevant plan) or ``unmatched``
    (no shape up to ``MAX_MATCHED_ELEMENTS`` gets it: the figure is not valid for the real shape).
    """

    op: str
    real_shape: tuple[int, ...]
    measured_shape: tuple[int, ...]
    channels_last: bool
    basis: str
    real_plans: dict
    measured_plans: dict
    traffic_fields: dict

    @property
    def label(self) -> str:
        return BASIS_LABELS[self.basis]


BASIS_LABELS = {"scaled": "small-shape plan, same traffic", "real_plan": "real-shape plan",
                "unmatched": "PLAN DIFFERS: not valid"}


def plan_choice(op: str, real_shape: Sequence[int], channels_last: bool = True, max_hw: int = 4) -> PlanChoice:
    """The shape to measure ``real_shape``'s tail at, and the plans either shape gets.

    Starts from :func:`audit_shape`; when its traffic-relevant plan differs from the real
    shape's, grows it (see :func:`_growing_shapes`) until they agree, within ``MAX_MATCHED_ELEMENTS``.
    """
    real_shape = tuple(real_shape)
    real_plans = kernel_plans(real_shape, channels_last)
    wanted = traffic_plan(real_plans)
    small = audit_shape(real_shape, max_hw=max_hw)
    for shape in _growing_shapes(small, real_shape):
        if int(np.prod(shape)) > MAX_MATCHED_ELEMENTS:
            break
        plans = kernel_plans(shape, channels_last)
        if traffic_plan(plans) == wanted:
            basis = "scaled" if shape == small else "real_plan"
            return PlanChoice(op, real_shape, shape, channels_last, basis, real_plans, plans, TRAFFIC_PLAN_FIELDS)
    return PlanChoice(op, real_shape, small, channels_last, "unmatched", real_plans,
                      kernel_plans(small, channels_last), TRAFFIC_PLAN_FIELDS)


# --------------------------------------------------------------------------- ResNet stages


@dataclass
class StageTraffic:
    """One stage's BatchNorm tails in one pass at the real shapes (activation bytes, scaled)."""

    model: str
    stage: str
    pass_: str
    blocks: int
    tails: int
    fused: float
    eager_one_pass: float
    eager_implementation: float
    minimum: float
    fused_launches: int
    eager_launches: int
    fused_launches_last_block: int
    eager_launches_last_block: int
    plan_basis: str = "scaled"  # the weakest basis of its tails' figures (see PlanChoice)
    plans: list[dict] = field(default_factory=list)  # per distinct (op, real shape): its PlanChoice


def stage_traffic(model: str, batch: int, resolution: int, dtype: str, measured: dict,
                  choices: dict) -> list[StageTraffic]:
    """Per stage and pass: ratios measured per (op, measured shape) times each tail's real T, summed.

    ``choices`` maps (op, real shape) to its :class:`PlanChoice`; ``measured`` maps
    (op, measured shape, pass) to its :class:`OpAudit`.
    """
    element = torch.empty((), dtype=DTYPES[dtype]).element_size()
    tails = bn_tails(model, batch, resolution)
    order = list(BASIS_LABELS)
    out = []
    for stage in dict.fromkeys(t.stage for t in tails):
        in_stage = [t for t in tails if t.stage == stage]
        blocks = len({t.block for t in in_stage})
        stage_choices = [choices[key] for key in dict.fromkeys((t.op, tuple(t.shape)) for t in in_stage)]
        basis = max((c.basis for c in stage_choices), key=order.index)
        for pass_ in PASSES:
            sums = dict(fused=0.0, eager_one_pass=0.0, eager_implementation=0.0, minimum=0.0)
            launches = [0, 0, 0, 0]  # fused, eager: in the stage, in its last block
            for tail in in_stage:
                choice = choices[(tail.op, tuple(tail.shape))]
                a: OpAudit = measured[(tail.op, choice.measured_shape, pass_)]
                T = element * int(np.prod(tail.shape))
                f = a.figures()
                for key in sums:
                    sums[key] += f[key] * T
                last = tail.block == in_stage[-1].block
                launches = [n + d for n, d in zip(launches, (a.fused_launches, a.eager.launches,
                                                             a.fused_launches * last, a.eager.launches * last))]
            out.append(StageTraffic(model, stage, pass_, blocks, len(in_stage), **sums,
                                    fused_launches=launches[0], eager_launches=launches[1],
                                    fused_launches_last_block=launches[2], eager_launches_last_block=launches[3],
                                    plan_basis=basis, plans=[asdict(c) for c in stage_choices]))
    return out


@dataclass
class AuditConfig:
    models: list[str]
    batch: int
    resolution: int
    dtype: str
    gpu: str
    max_hw: int = 4


def run_audit(config: AuditConfig, show_progress: bool = True) -> dict:
    """Measure every op / pass (both layouts, at a reference shape) and every (op, channels)
    a stage of the chosen models uses; return all figures as a JSON-able dict."""
    reference = (2, 64, 8, 8)
    todo = [("reference", op, p, reference, cl) for op in OPS for p in OP_PASSES[op] for cl in (True, False)]
    choices: dict[tuple, PlanChoice] = {}
    for model in config.models:
        for tail in bn_tails(model, config.batch, config.resolution):
            key = (tail.op, tuple(tail.shape))
            if key not in choices:
                choices[key] = plan_choice(tail.op, tail.shape, True, config.max_hw)
    measured_shapes = dict.fromkeys((c.op, c.measured_shape) for c in choices.values())
    todo += [("stage", op, p, shape, True) for op, shape in measured_shapes for p in PASSES]
    reference_audits, stage_audits = [], {}
    for kind, op, pass_, shape, cl in progress(todo, len(todo), "audit", show_progress):
        a = audit_op(op, pass_, shape, config.dtype, cl)
        if kind == "reference":
            reference_audits.append(a)
        else:
            stage_audits[(op, tuple(shape), pass_)] = a
    stages = [s for model in config.models
              for s in stage_traffic(model, config.batch, config.resolution, config.dtype, stage_audits, choices)]
    info = machine_info("cpu")
    return {
        "fused_resnet_audit": 1,
        "note": ("Bytes counted by running the Triton kernels in Triton's interpreter (CPU) and eager ATen ops "
                 "under a TorchDispatchMode; per-stage bytes are per-T ratios measured at small shapes scaled to "
                 "the real shapes, each stage saying which kernel plans its figures used (plan_basis, plans); "
                 "projected times are bytes / peak bandwidth, a lower bound, not a measurement."),
        "traffic_plan_fields": {kind: list(fields) for kind, fields in TRAFFIC_PLAN_FIELDS.items()},
        "machine": info,
        "settings": asdict(config),
        "gpu_peak_bandwidth_bytes_per_s": PROJECTION_GPUS[config.gpu] * 1e12,
        "gpu_name": PROJECTION_GPU_NAMES[config.gpu],
        "ops": [a.to_json() for a in reference_audits],
        "stage_ops": [a.to_json() for a in stage_audits.values()],
        "stages": [asdict(s) for s in stages],
    }


# --------------------------------------------------------------------------- reports


def _t(value) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def format_op_table(data: dict) -> str:
    """Per op and pass, in units of T: fused and eager measured, beside minimum and budgets."""
    by_key = {}
    for a in data["ops"]:
        by_key[(a["op"], a["pass_"], a["channels_last"])] = a
    header = ["op", "pass", "minimum", "fused", "(NCHW)", "budget", "eager 1-pass", "eager impl", "budget",
              "eager/fused", "launches fused/eager", "fused other bytes"]
    rows, over_budget, over_minimum = [], [], []
    for op in OPS:
        for pass_ in OP_PASSES[op]:
            cl, nchw = by_key[(op, pass_, True)], by_key[(op, pass_, False)]
            f = cl["figures"]
            rows.append([op, PASS_LABELS[pass_], _t(f["minimum"]), _t(f["fused"]), _t(nchw["figures"]["fused"]),
                         _t(f["fused_budget"]), _t(f["eager_one_pass"]), _t(f["eager_implementation"]),
                         _t(f["eager_budget"]), _t(f["eager_implementation"] / f["fused"]),
                         f"{f['fused_launches']} ({f['fused_kernel_launches']} Triton) / {f['eager_launches']}",
                         f["fused_other_bytes"]])
            kernels = ", ".join(dict.fromkeys(cl["kernel_launches"]))
            if f["fused_budget"] is not None and f["fused"] > f["fused_budget"] + 1e-9:
                over_budget.append(f"{op} {PASS_LABELS[pass_]}: {f['fused']:.2f} T > budget {f['fused_budget']} T "
                                   f"({kernels})")
            elif f["fused"] > f["minimum"] + 1e-9:
                over_minimum.append(f"{op} {PASS_LABELS[pass_]}: {f['fused']:.2f} T vs minimum {f['minimum']} T")
    shape = "x".join(map(str, data["ops"][0]["shape"]))
    title = (f"Memory traffic per fused op, in T = bytes of one activation tensor (measured at {shape}, "
             f"{data['settings']['dtype']}, channels_last; NCHW beside it)")
    legend = ("minimum: least traffic without holding an activation on chip (training: statistics / gradient sums "
              "before the elementwise pass; eval: one pass). fused: unique bytes the Triton kernels load + store "
              "(interpreter, masked lanes excluded), plus any ATen op around them. eager 1-pass: each ATen op reads "
              "its inputs and writes its outputs once; eager impl: plus batch norm's second pass (training forward "
              "re-reads x; backward re-reads grad and, in training, x). Budgets: the design figures. launches: Triton "
              "launches + ATen ops around them (fused) / ATen ops (eager; on a GPU one ATen op may launch several "
              "kernels). other bytes: per-channel parameters, statistics and partial sums (not in T). "
              "eager/fused: eager impl / fused.")
    text = [title, render_table(header, rows), legend]
    text.append("Over the design budget: " + ("; ".join(over_budget) if over_budget
                                                else "none (every budgeted fused op measured within its budget)"))
    if over_minimum:
        text.append("Above the minimum (no budget set): " + "; ".join(over_minimum) + ". The interpreter executes "
                    "every load, including loads a compiled kernel drops as dead, so these are upper bounds.")
    return "\n".join(text)


def format_stage_table(data: dict) -> str:
    """Per model, stage and pass at the real shapes: MB moved, launches, projected time on a GPU."""
    peak = data["gpu_peak_bandwidth_bytes_per_s"]
    s = data["settings"]
    header = ["model", "stage", "pass", "blocks", "fused MB", "eager MB 1-pass", "eager MB impl", "minimum MB",
              "eager/fused", "launches/block fused/eager", f"proj. us fused/eager ({data['gpu_name']})", "kernel plan"]
    rows = []
    for st in data["stages"]:
        rows.append([st["model"], st["stage"], PASS_LABELS[st["pass_"]], st["blocks"], f"{st['fused'] / 1e6:.1f}",
                     f"{st['eager_one_pass'] / 1e6:.1f}", f"{st['eager_implementation'] / 1e6:.1f}",
                     f"{st['minimum'] / 1e6:.1f}", f"{st['eager_implementation'] / st['fused']:.2f}",
                     f"{st['fused_launches_last_block']} / {st['eager_launches_last_block']}",
                     f"{st['fused'] / peak * 1e6:.0f} / {st['eager_implementation'] / peak * 1e6:.0f}",
                     BASIS_LABELS[st.get("plan_basis", "scaled")]])
    title = (f"BatchNorm/add/ReLU traffic per ResNet stage at batch {s['batch']}, {s['resolution']}x{s['resolution']}, "
             f"{s['dtype']} (activation bytes only; convolutions excluded, identical in both)")
    legend = (f"Per-T ratios measured in the interpreter at (2, C, <={s['max_hw']}, <={s['max_hw']}) for every "
              f"(op, channels) of the stage, scaled to the real shapes analytically (activation bytes are linear in "
              f"the activation size). PROJECTION, not a measurement: proj. us = bytes / peak bandwidth of "
              f"{data['gpu_name']} ({peak / 1e12:.2f} TB/s), a lower bound on the tails' time. kernel plan: the "
              f"reduction / elementwise plans (kernels/layout.py) the figures were measured with; "
              f"'{BASIS_LABELS['scaled']}': the small shape's plans differ from the real shape's in tiling only "
              f"(traffic-relevant plan fields: {_plan_fields(data)}), so the ratios hold at the real shape; "
              f"'{BASIS_LABELS['real_plan']}': measured at a larger shape that gets the real shape's plan. Both "
              f"plans of every tail are in the JSON (stages[].plans).")
    return "\n".join([title, render_table(header, rows), legend])


def _plan_fields(data: dict) -> str:
    fields = [f"{kind}.{name}" for kind, names in data.get("traffic_plan_fields", {}).items() for name in names]
    return ", ".join(fields) or "none"


def format_audit(data: dict) -> str:
    return format_op_table(data) + "\n\n" + format_stage_table(data)


def run_in_interpreter(argv: Sequence[str]) -> int:
    """Re-run ``fused-resnet <argv>`` in a child process with TRITON_INTERPRET=1.

    The kernels can only be counted through the interpreter, which triton picks at import time.
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.call([sys.executable, "-m", "fused_resnet", *argv], env=env)


# --------------------------------------------------------------------------- blocks, convolutions included

# Forward+backward traffic targets of FusedConvBottleneck against eager (issue 11), fused / eager impl.
CONV_BLOCK_TARGETS = {"forward": 0.45, "forward_backward": 0.58}


@dataclass
class BlockAudit:
    """One block, one pass, convolutions included: every byte every launch moves, per op."""

    pass_: str
    shape: tuple[int, ...]
    dtype: str
    fused_kernels: Traffic
    fused_aten: Traffic
    eager: Traffic
    fused_breakdown: dict  # kernel or ATen op name -> bytes read + written, summed over its launches
    eager_breakdown: dict
    weight_grad_gemms: list = field(default_factory=list)  # see weight_grad_gemms()

    @property
    def fused(self) -> int:
        return _all_bytes(self.fused_kernels) + _all_bytes(self.fused_aten)

    @property
    def eager_implementation(self) -> int:
        return _all_bytes(self.eager) + self.eager.extra_activation_read

    @property
    def ratio(self) -> float:
        return self.fused / self.eager_implementation

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(fused=self.fused, eager_implementation=self.eager_implementation, ratio=self.ratio,
                   target=CONV_BLOCK_TARGETS.get(self.pass_))
        return out


def _all_bytes(t: Traffic) -> int:
    return t.activation + t.other


def _breakdown(names_and_bytes) -> dict:
    out: dict[str, int] = {}
    for name, n in names_and_bytes:
        out[name] = out.get(name, 0) + n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _block_pass(block: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, pass_: str, counters) -> None:
    """Run ``block`` for ``pass_`` ("forward" or "forward_backward") with its work inside ``counters()``."""
    leaf = x.detach().clone().requires_grad_(pass_ == "forward_backward")
    with counters():
        y = block(leaf)
        if pass_ == "forward_backward":
            torch.autograd.grad(y, [leaf, *block.parameters()], dy)


def _check_positive_ints(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def audit_conv_bottleneck(inplanes: int = 64, planes: int = 64, shape_hw: int = 8, batch: int = 1,
                          dtype: str = "float32", downsample: bool = True) -> list[BlockAudit]:
    """torchvision's Bottleneck(inplanes, planes) in training against ``FusedConvBottleneck.from_block``,
    convolutions included, forward and forward+backward, at one small shape (needs the
    interpreter); see :func:`audit_conv_block`. At such shapes the weights weigh as much
    as the activations: :func:`project_conv_block` gives the figure at a real shape.
    """
    from torch import nn
    from torchvision.models.resnet import Bottleneck

    _check_positive_ints(inplanes=inplanes, planes=planes, shape_hw=shape_hw, batch=batch)
    dtype = canonical_dtype(dtype)
    if not downsample and inplanes != planes * 4:
        raise ValueError(f"inplanes must be planes * 4 = {planes * 4} without a downsample, got {inplanes}")
    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)) \
        if downsample else None
    return audit_conv_block(Bottleneck(inplanes, planes, downsample=ds), batch, shape_hw, dtype)


def audit_conv_block(block: torch.nn.Module, batch: int, shape_hw: int, dtype: str = "float32") -> list[BlockAudit]:
    """A torchvision Bottleneck ``block`` (copied, not changed) in training against its
    ``FusedConvBottleneck.from_block`` twin, on a batch x C x shape_hw x shape_hw
    channels_last input, forward and forward+backward (needs the interpreter).

    Every tensor counts (weights and statistics too): the fused side is its Triton launches'
    unique bytes plus the ATen ops around them (conv2's 3x3 among them); eager is every ATen
    op's inputs + outputs plus batch norm's second passes. Tiles and weight-gradient splits
    are the interpreter's own unless inside ``interpreter_plans_as``.
    """
    import copy

    from fused_resnet.nn.blocks import FusedConvBottleneck

    dtype = canonical_dtype(dtype)
    eager = copy.deepcopy(block).to(DTYPES[dtype], memory_format=torch.channels_last).train()
    fused = FusedConvBottleneck.from_block(copy.deepcopy(eager))
    inplanes, out_channels = eager.conv1.in_channels, eager.conv3.out_channels
    out_hw = (shape_hw - 1) // eager.conv2.stride[0] + 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, inplanes, shape_hw, shape_hw, generator=g).to(DTYPES[dtype])
    x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(batch, out_channels, out_hw, out_hw, generator=g).to(DTYPES[dtype])
    dy = dy.contiguous(memory_format=torch.channels_last)
    out = []
    for pass_ in CONV_BLOCK_TARGETS:
        kernels, around = TritonTrafficCounter(), AtenTrafficMode(look_inside=("fused_resnet",))

        @contextlib.contextmanager
        def counters():
            with kernels, around:
                yield

        _block_pass(fused, x, dy, pass_, counters)
        if around.opaque:
            raise RuntimeError(f"could not look inside custom ops {around.opaque}: their ATen ops would go uncounted")
        mode = AtenTrafficMode()
        _block_pass(eager, x, dy, pass_, lambda: mode)
        fused_breakdown = _breakdown(
            [(launch.kernel, sum(b.read + b.written for b in launch.buffers)) for launch in kernels.launches]
            + [(op.name, sum(op.reads) + sum(op.writes)) for op in around.ops])
        eager_breakdown = _breakdown([(op.name, sum(op.reads) + sum(op.writes) + sum(op.extra_reads))
                                      for op in mode.ops])
        # Threshold 0: in this view every tensor counts, and every batch norm's second pass with it.
        out.append(BlockAudit(pass_, tuple(x.shape), dtype, triton_traffic(kernels.launches, 0, 0),
                              aten_traffic(around.ops, 0), aten_traffic(mode.ops, 0), fused_breakdown,
                              eager_breakdown, weight_grad_gemms(kernels.launches)))
    return out


# The GPU target whose tile plan each projection GPU's figures use.
PLAN_TARGETS = {"H100": "sm_90a", "H200": "sm_90a", "A100": "sm_80", "MI300X": "gfx942"}
# Kernels that write fp32 weight-gradient partials, one [C_out, C_in] (and [C_out] bias) per split.
_WEIGHT_GRAD_KERNELS = ("conv1x1_wgrad_kernel", "conv1x1_dgrad_wgrad_kernel")


def weight_grad_gemms(launches: Sequence[Launch]) -> list[dict]:
    """The weight-gradient GEMMs among ``launches``: each one's rows, channels, prologue,
    bias gradients and splits, enough to re-plan its partials for other rows."""
    out = []
    for launch in launches:
        if launch.kernel in _WEIGHT_GRAD_KERNELS:
            a = launch.scalars
            out.append({"kernel": launch.kernel, "M": a["M"], "N": a["N"], "K": a["K"],
                        "N2": a["N2"] if a.get("SECOND") else 0, "prologue": bool(a["PROLOGUE"]),
                        "bias": bool(a.get("BIAS_GRAD")), "bias2": bool(a.get("BIAS_GRAD2")),
                        "splits": -(-a["M"] // a["rows_per_split"])})
    return out


def weight_grad_partial_bytes(gemms: Sequence[dict], dtype: str, rows_scale: float = 1.0, target=None) -> int:
    """Bytes of the fp32 weight-gradient partials of ``gemms`` (written by the GEMM, read
    by ``split_sum_kernel``): as launched, or (``target``) with the splits the launchers
    plan there (``wgrad_plan`` / ``dgrad_wgrad_plan``, cuDNN's TF32 setting) for
    ``rows_scale`` times the rows."""
    from fused_resnet.conv1x1_bn import allow_tf32
    from fused_resnet.kernels.conv1x1_bn import dgrad_wgrad_plan, input_precision, wgrad_plan

    torch_dtype = DTYPES[canonical_dtype(dtype)]
    precision = input_precision(torch_dtype, allow_tf32(torch_dtype), target)
    total = 0
    for g in gemms:
        splits = g["splits"]
        if target is not None:
            rows = max(1, round(g["M"] * rows_scale))
            if g["kernel"] == "conv1x1_wgrad_kernel":
                splits = wgrad_plan(rows, g["N"], g["K"], torch_dtype, target, precision, g["prologue"])[1]
            else:
                splits = dgrad_wgrad_plan(rows, g["N"], g["K"], g["N2"], torch_dtype, target, precision,
                                          g["prologue"])[1]
        per_split = (g["N"] + g["N2"]) * g["K"] + g["N"] * g["bias"] + g["N2"] * g["bias2"]
        total += 2 * 4 * splits * per_split
    return total


@dataclass
class ProjectedBlockAudit:
    """One block, one pass, convolutions included, at a real shape: bytes linear in the
    batch between two measured batches (taken with the GPU's tile plan), the fused
    side's weight-gradient partials at the real shape's splits."""

    pass_: str
    real_shape: tuple[int, ...]
    measured_shapes: tuple[tuple[int, ...], ...]
    dtype: str
    plan: str
    fused: float
    eager_implementation: float
    weight_grad_partials: float  # part of ``fused``
    fused_breakdown: dict  # op -> bytes at the real shape (weight-gradient partials apart)
    eager_breakdown: dict

    @property
    def ratio(self) -> float:
        return self.fused / self.eager_implementation

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(ratio=self.ratio, target=CONV_BLOCK_TARGETS.get(self.pass_))
        return out


def project_conv_block(block: torch.nn.Module, batch: int, shape_hw: int, dtype: str = "float32",
                       plan: str = "sm_90a", measured_hw: int = 8) -> list[ProjectedBlockAudit]:
    """``block`` (a torchvision Bottleneck) at batch x C x shape_hw x shape_hw, convolutions
    included, forward and forward+backward, as the ``plan`` target's tiles would move it.

    Measured by :func:`audit_conv_block` at measured_hw x measured_hw with the target's
    tile plan (``interpreter_plans_as``), at two batches whose output fills the largest
    row tile (``GEMM_MAX_BLOCK_M`` rows) at least once: every buffer then scales with the
    batch (the activations, the per-tile statistics partials) or not at all (weights,
    per-channel vectors), so each op's bytes are a line through the two, evaluated at the real
    shape's pixel count. The weight-gradient partials are fixed per split count instead:
    they are taken out of the line and added back at the splits the launchers plan for
    the real rows (:func:`weight_grad_partial_bytes`). The BatchNorm tails' reduction
    partials, one per program at these sizes, scale here but not on a GPU: their bytes
    are overstated (a conservative figure)."""
    from fused_resnet.kernels.aot import TARGETS
    from fused_resnet.kernels.conv1x1_bn import GEMM_MAX_BLOCK_M, interpreter_plans_as

    _check_positive_ints(batch=batch, shape_hw=shape_hw, measured_hw=measured_hw)
    if plan not in TARGETS:
        raise ValueError(f"plan must be one of {sorted(TARGETS)}, got {plan!r}")
    dtype = canonical_dtype(dtype)
    target = TARGETS[plan]
    stride = block.conv2.stride[0]
    out_pixels = ((measured_hw - 1) // stride + 1) ** 2
    first = -(-GEMM_MAX_BLOCK_M // out_pixels)
    measured = []
    with interpreter_plans_as(target):
        for b in (first, 2 * first):
            measured.append((b, audit_conv_block(block, b, measured_hw, dtype)))
    (b1, lo), (b2, hi) = measured
    # The real shape in measured images: the same pixels per image ratio for every buffer.
    images = batch * shape_hw * shape_hw / (measured_hw * measured_hw)
    out = []
    for a1, a2 in zip(lo, hi):
        def line(v1: float, v2: float) -> float:
            return v1 + (v2 - v1) * (images - b1) / (b2 - b1)

        p1, p2 = (weight_grad_partial_bytes(a.weight_grad_gemms, dtype) for a in (a1, a2))
        fused = line(a1.fused - p1, a2.fused - p2)
        eager = line(a1.eager_implementation, a2.eager_implementation)
        partials = float(weight_grad_partial_bytes(a2.weight_grad_gemms, dtype, images / b2, target))
        fused_breakdown = {name: line(a1.fused_breakdown.get(name, 0), n) for name, n in a2.fused_breakdown.items()}
        eager_breakdown = {name: line(a1.eager_breakdown.get(name, 0), n) for name, n in a2.eager_breakdown.items()}
        fused_breakdown["weight-gradient partials (real splits)"] = partials - line(p1, p2)
        out.append(ProjectedBlockAudit(a2.pass_, (batch, block.conv1.in_channels, shape_hw, shape_hw),
                                       (a1.shape, a2.shape), dtype, plan, fused + partials, eager, partials,
                                       dict(sorted(fused_breakdown.items(), key=lambda kv: -kv[1])),
                                       eager_breakdown))
    return out


@dataclass
class StageConvTraffic:
    """One stage of a Bottleneck ResNet, one pass, convolutions included, at the real
    shapes: the sum of its blocks' :class:`ProjectedBlockAudit` figures."""

    model: str
    stage: str
    pass_: str
    blocks: int
    fused: float
    eager_implementation: float

    @property
    def ratio(self) -> float:
        return self.fused / self.eager_implementation

    def to_json(self) -> dict:
        return asdict(self) | {"ratio": self.ratio}


def project_conv_stages(model: str = "resnet50", batch: int = 256, resolution: int = 224, dtype: str = "float32",
                        plan: str = "sm_90a", show_progress: bool = False
                        ) -> tuple[list[StageConvTraffic], dict[tuple, list[ProjectedBlockAudit]]]:
    """Per stage of torchvision's ``model`` (Bottleneck blocks) in training, convolutions
    included, fused (``convert(model, fuse_convolutions=True)``) against eager: each
    distinct block (input channels, stride, downsample) projected once by
    :func:`project_conv_block` at its real input shape. Returns the stages and, per
    distinct block, its projection."""
    from torchvision.models.resnet import Bottleneck

    from .common import _meta_resnet, require

    _check_positive_ints(batch=batch, resolution=resolution)
    torchvision = require("torchvision", "building the ResNet")
    meta = _meta_resnet(model)
    if not isinstance(meta.layer1[0], Bottleneck):
        raise ValueError(f"model must be built of Bottleneck blocks (1x1 convolutions to fuse), not {model!r}")
    shapes: dict[str, tuple] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: shapes.__setitem__(name, tuple(inp[0].shape)))
             for name, m in meta.named_modules() if isinstance(m, Bottleneck)]
    meta(torch.empty(batch, 3, resolution, resolution, device="meta"))
    for h in hooks:
        h.remove()
    torch.manual_seed(0)
    real = getattr(torchvision.models, model)(weights=None)
    blocks = [(name, m) for name, m in real.named_modules() if isinstance(m, Bottleneck)]
    keys = {name: (shapes[name], m.conv2.stride[0], m.downsample is not None) for name, m in blocks}
    distinct = {}
    for name, m in progress(blocks, len(blocks), "conv audit", show_progress):
        key = keys[name]
        if key not in distinct:
            distinct[key] = project_conv_block(m, batch, key[0][2], dtype, plan)
    stages = []
    for stage in STAGES[1:-1]:
        in_stage = [keys[name] for name, _ in blocks if name.startswith(stage + ".")]
        for i, pass_ in enumerate(CONV_BLOCK_TARGETS):
            stages.append(StageConvTraffic(model, stage, pass_, len(in_stage),
                                           sum(distinct[k][i].fused for k in in_stage),
                                           sum(distinct[k][i].eager_implementation for k in in_stage)))
    return stages, distinct


def format_conv_tables(stages: Sequence[StageConvTraffic], blocks: dict) -> str:
    """The per-stage and per-distinct-block tables of :func:`project_conv_stages`, with the
    targets and each block's biggest fused movers."""
    header = ["stage", "pass", "blocks", "fused GB", "eager GB impl", "fused/eager"]
    rows = [[s.stage, s.pass_.replace("_", "+"), str(s.blocks), f"{s.fused / 1e9:.2f}",
             f"{s.eager_implementation / 1e9:.2f}", f"{s.ratio:.3f}"] for s in stages]
    first = next(iter(blocks.values()))[0]
    text = [f"{stages[0].model}, convolutions included (training, batch {first.real_shape[0]}, {first.dtype}, "
            f"channels_last, {first.plan}'s tile plan): convert(fuse_convolutions=True) vs eager",
            render_table(header, rows), "",
            "Per distinct block (input shape, stride, downsample), targets for Bottleneck(64, 64) + downsample:"]
    header = ["block input", "stride", "downsample", "pass", "fused/eager", "target"]
    rows = []
    for (shape, stride, ds), audits in blocks.items():
        rows += [["x".join(map(str, shape)), str(stride), "yes" if ds else "no", a.pass_.replace("_", "+"),
                  f"{a.ratio:.3f}", _t(CONV_BLOCK_TARGETS.get(a.pass_)) if ds and shape[1] == 64 else "-"]
                 for a in audits]
    text.append(render_table(header, rows))
    text.append("Projected from two measured batches at 8x8 (interpreter, the plan target's tiles): bytes of "
                "every buffer, weights and partials included; eager impl: each ATen op's inputs + outputs + batch "
                "norm's second passes. A count of bytes, not a time.")
    return "\n".join(text)


def format_block_table(audits: Sequence[BlockAudit], top: int = 8) -> str:
    """Bottleneck with fused convolutions vs eager, convolutions included: MB, ratio, target, biggest movers."""
    header = ["pass", "fused MB", "eager MB impl", "fused/eager", "target", "fused launches/eager ops"]
    rows = [[a.pass_.replace("_", "+"), f"{a.fused / 1e6:.3f}", f"{a.eager_implementation / 1e6:.3f}",
             f"{a.ratio:.3f}", _t(CONV_BLOCK_TARGETS.get(a.pass_)),
             f"{a.fused_kernels.launches + a.fused_aten.launches} / {a.eager.launches}"] for a in audits]
    shape = "x".join(map(str, audits[0].shape))
    text = [f"Bottleneck, convolutions included (training, input {shape}, {audits[0].dtype}, channels_last): "
            f"FusedConvBottleneck.from_block vs eager", render_table(header, rows)]
    for a in audits:
        for side, breakdown in (("fused", a.fused_breakdown), ("eager", a.eager_breakdown)):
            movers = ", ".join(f"{name} {n / 1e6:.3f}" for name, n in list(breakdown.items())[:top])
            text.append(f"{a.pass_.replace('_', '+')} {side} MB by op: {movers}")
    text.append("Every tensor counts (weights, statistics, partials too); fused: unique bytes per Triton launch "
                "(interpreter) + ATen ops around them; eager impl: each ATen op's inputs + outputs + batch norm's "
                "second passes.")
    return "\n".join(text)
