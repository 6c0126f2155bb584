"""Bottleneck blocks and ResNet stages with the 1x1 convolutions fused, convolutions included,
projected to real shapes from two measured batches with a GPU target's tile plan."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..common import STAGES, canonical_dtype, progress, render_table
from .blocks import CONV_BLOCK_TARGETS, _check_positive_ints, audit_conv_block, weight_grad_partial_bytes
from .report import table_value

# The GPU target whose tile plan each projection GPU's figures use.
PLAN_TARGETS = {"H100": "sm_90a", "H200": "sm_90a", "A100": "sm_80", "MI300X": "gfx942"}


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

    from ..common import _meta_resnet, require

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
                  f"{a.ratio:.3f}", table_value(CONV_BLOCK_TARGETS.get(a.pass_)) if ds and shape[1] == 64 else "-"]
                 for a in audits]
    text.append(render_table(header, rows))
    text.append("Projected from two measured batches at 8x8 (interpreter, the plan target's tiles): bytes of "
                "every buffer, weights and partials included; eager impl: each ATen op's inputs + outputs + batch "
                "norm's second passes. A count of bytes, not a time.")
    return "\n".join(text)


