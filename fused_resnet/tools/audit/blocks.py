"""A Bottleneck block with its 1x1 convolutions fused, convolutions included, against eager at
one small shape (needs the interpreter): every byte every launch moves, per op, and the
weight-gradient GEMMs' fp32 partials."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from ..common import DTYPES, canonical_dtype, render_table
from ..traffic import AtenTrafficMode, Launch, Traffic, aten_traffic, triton_traffic
from .report import table_value
from .tails import FusedCounters

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
        counters = FusedCounters()
        _block_pass(fused, x, dy, pass_, counters)
        kernels, around = counters.kernels, counters.around
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




def format_block_table(audits: Sequence[BlockAudit], top: int = 8) -> str:
    """Bottleneck with fused convolutions vs eager, convolutions included: MB, ratio, target, biggest movers."""
    header = ["pass", "fused MB", "eager MB impl", "fused/eager", "target", "fused launches/eager ops"]
    rows = [[a.pass_.replace("_", "+"), f"{a.fused / 1e6:.3f}", f"{a.eager_implementation / 1e6:.3f}",
             f"{a.ratio:.3f}", table_value(CONV_BLOCK_TARGETS.get(a.pass_)),
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
