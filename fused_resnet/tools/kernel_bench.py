"""The fused ops alone (no convolution) at ResNet stage shapes: achieved GB/s against the
device's peak DRAM bandwidth, and eager PyTorch's own sequence for the same tail.

Bytes are the design traffic (:func:`~fused_resnet.tools.common.fused_design_traffic`, the
figures ``fused-resnet audit`` counts) times T; per-channel parameters and partial sums are
left out, so GB/s is a slight underestimate. On a GPU the L2 cache is flushed before every
timed call, so the bytes come from DRAM, as they would at these sizes inside a network.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch

from .common import (CPU_NOTE, activation_bytes, bn_tails, eager_tail, format_figure, fused_design_traffic,
                     fused_tail, peak_bandwidth, progress, render_table, tail_case, time_step)

KERNEL_OPS = ("bn_relu", "bn_add_relu")
KERNEL_PASSES = ("forward_train", "forward_eval", "backward_train")
# At least this much is written between timed calls to push the previous call's data out of L2.
L2_FLUSH_BYTES = 256 * 2**20


def prepare_tail_step(op: str, pass_: str, shape: Sequence[int], dtype: str, memory_format: str,
                      device: torch.device, implementation: str = "fused") -> Callable[[], None]:
    """One pass of one tail alone on a stage-shaped activation: the fused op, or eager's sequence.

    Forward passes run under ``no_grad``; a backward pass is the autograd backward of one
    recorded forward, repeated (``retain_graph``).
    """
    tails = {"fused": fused_tail, "eager": eager_tail}
    if implementation not in tails:
        raise ValueError(f"unknown implementation '{implementation}'; choose from fused, eager")
    case = tail_case(op, pass_, shape, dtype, memory_format, device)
    tail = tails[implementation]
    if pass_.startswith("forward"):
        # Detached, not cloned: a copy inside the step would be timed too (eager add_relu adds into x).
        x, r = case.x_leaf.detach(), case.r.detach()

        def step():
            with torch.no_grad():
                tail(op, x, r, case.norms)
        return step
    y = case.forward(tail)
    dy, inputs = case.grad_output(y), case.differentiable()

    def step():
        torch.autograd.grad(y, inputs, dy, retain_graph=True)
    return step


def prepare_kernel_step(op: str, pass_: str, shape: Sequence[int], dtype: str, memory_format: str,
                        device: torch.device) -> Callable[[], None]:
    """One call of the fused functional op alone (no convolution) on a stage-shaped activation."""
    return prepare_tail_step(op, pass_, shape, dtype, memory_format, device, "fused")


def time_kernel(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call of ``step``.

    CUDA: CUDA events around each call, with ``L2_FLUSH_BYTES`` (or twice the L2 size) zeroed
    before it; CPU: ``time.perf_counter``.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return statistics.median(time_step(step, device, warmup, iters))
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
    flush = torch.empty(max(L2_FLUSH_BYTES, 2 * l2) // 4, dtype=torch.int32, device=device)
    for _ in range(warmup):
        step()
    pairs = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) / 1e3 for s, e in pairs)


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

    @property
    def fraction_of_peak(self) -> Optional[float]:
        return self.bytes_per_s / self.peak_bytes_per_s if self.peak_bytes_per_s else None

    def to_json(self) -> dict:
        out = asdict(self)
        out["gb_per_s"] = self.bytes_per_s / 1e9
        out["fraction_of_peak"] = self.fraction_of_peak
        return out


def kernel_shapes(model: str, batch: int, resolution: int) -> dict[str, tuple[int, int, int, int]]:
    """Per stage, the activation of its first BatchNorm tail: the shape the fused ops are timed at."""
    shapes = {}
    for tail in bn_tails(model, batch, resolution):
        shapes.setdefault(tail.stage, tail.shape)
    return shapes


def kernel_result(op: str, pass_: str, stage: str, shape: Sequence[int], dtype: str, memory_format: str,
                  device: torch.device, seconds: float, traffic: Optional[float] = None) -> KernelResult:
    """Bandwidth of one timed pass: ``traffic`` (T; default the fused design traffic) x T / seconds."""
    T = activation_bytes(shape, dtype)
    traffic = fused_design_traffic(op, pass_) if traffic is None else traffic
    return KernelResult(op, pass_, stage, list(shape), dtype, memory_format, T, round(traffic * T), seconds,
                        peak_bandwidth(device)[0])


def run_kernel_bench(model: str, batch: int, resolution: int, dtype: str, memory_format: str, device: str,
                     warmup: int, iters: int, show_progress: bool = True) -> list[KernelResult]:
    """GB/s of the fused ops alone at each stage's first BatchNorm tail shape."""
    device = torch.device(device)
    shapes = kernel_shapes(model, batch, resolution)
    todo = [(op, p, s) for s in shapes for op in KERNEL_OPS for p in KERNEL_PASSES]
    results = []
    for op, pass_, stage in progress(todo, len(todo), "kernels", show_progress):
        step = prepare_kernel_step(op, pass_, shapes[stage], dtype, memory_format, device)
        seconds = time_kernel(step, device, warmup, iters)
        results.append(kernel_result(op, pass_, stage, shapes[stage], dtype, memory_format, device, seconds))
    return results


def format_kernel_table(results: Sequence[KernelResult], info: dict) -> str:
    """GB/s of the fused ops alone and the fraction of the device's peak bandwidth."""
    header = ["op", "pass", "stage", "shape", "dtype", "MB moved", "time us", "GB/s", "% of peak"]
    rows = [[r.op, r.pass_, r.stage, "x".join(map(str, r.shape)), r.dtype, f"{r.bytes_moved / 1e6:.1f}",
             f"{r.median_s * 1e6:.1f}", f"{r.bytes_per_s / 1e9:.1f}",
             format_figure(r.fraction_of_peak * 100 if r.peak_bytes_per_s else None, ".0f")]
            for r in results]
    if info["device_kind"] == "cuda":
        title = (f"Fused kernels alone, GB/s against the peak of {info['gpu']} "
                 f"({format_figure((info.get('peak_bandwidth_bytes_per_s') or 0) / 1e12 or None, '.2f')} TB/s, "
                 f"{info.get('peak_bandwidth_source')}); bytes = audited activation traffic")
    else:
        title = ("Fused ops alone on the CPU path (ATen composite, not the Triton kernels): effective GB/s "
                 "= audited fused-kernel bytes / CPU time. " + CPU_NOTE)
    return title + "\n" + render_table(header, rows)
