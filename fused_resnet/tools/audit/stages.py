"""The tail audit's run: every op and pass at a reference shape, every (op, channels) of the
chosen models' stages, and the per-stage figures at the real shapes (ratios scaled)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Sequence

from ..common import OP_PASSES, PASSES, activation_bytes, bn_tails, lookup_peak_bandwidth, machine_info, progress
from .plans import BASIS_LABELS, TRAFFIC_PLAN_FIELDS, PlanChoice, plan_choice
from .tails import OPS, OpAudit, audit_op

# GPUs for the projection, by the name their peak DRAM bandwidth is listed under in common.PEAK_BANDWIDTH_TBPS.
PROJECTION_GPU_NAMES = {"H100": "H100 SXM", "H200": "H200", "A100": "A100 80GB", "MI300X": "MI300X"}
# Peak DRAM bandwidth in TB/s (vendor data sheets).
PROJECTION_GPUS = {gpu: lookup_peak_bandwidth(name) / 1e12 for gpu, name in PROJECTION_GPU_NAMES.items()}


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
                T = activation_bytes(tail.shape, dtype)
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



def run_in_interpreter(argv: Sequence[str]) -> int:
    """Re-run ``fused-resnet <argv>`` in a child process with TRITON_INTERPRET=1.

    The kernels can only be counted through the interpreter, which triton picks at import time.
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.call([sys.executable, "-m", "fused_resnet", *argv], env=env)
