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

from .common import (CPU_NOTE, DTYPES, activation_bytes, bn_tails, eager_tail, format_figure, fused_design_traffic,
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


def measure_copy_bandwidth(device, nbytes: int, warmup: int = 3, iters: int = 20) -> float:
    """Bytes per second a device-to-device copy of ``nbytes`` moves (read + write), timed
    like every kernel here: what the DRAM really gives, the reference beside the datasheet."""
    device = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.int32, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = time_kernel(lambda: dst.copy_(src), device, warmup, iters)
    return 2 * src.nbytes / seconds


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


# --------------------------------------------------------------------------- 1x1-convolution GEMMs

# What each timed pass of a 1x1 convolution computes (the fused GEMM vs cuDNN + the ops it replaces):
# forward_stats: conv + the following BatchNorm's batch statistics (conv1, downsample);
# forward_prologue_stats: relu(bn(x)) into the conv + statistics (conv3); eval: conv + bn + relu;
# dgrad / wgrad: the convolution's input / weight gradient; backward: both (one pass over dy and x where
# the one-pass kernel's rule has tiles for the GPU, the two kernels one after the other elsewhere).
CONV1X1_PASSES = ("forward_stats", "forward_prologue_stats", "eval", "dgrad", "wgrad", "backward")
# Toy 1x1 convolutions (C_in, H, W, C_out, stride) for the smoke run through the interpreter.
SMOKE_CONV1X1 = ((16, 4, 4, 16, 1), (16, 4, 4, 32, 2))


def conv1x1_work(shape: Sequence[int], batch: int, pass_: str, dtype: str) -> tuple[int, int]:
    """(FLOPs, minimum bytes) of one pass: 2*M*C_in*C_out and one read of every operand plus one
    write of the result (per-channel vectors and fp32 partials left out)."""
    C_in, H, W, C_out, stride = shape
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    M, size = batch * Ho * Wo, torch.empty((), dtype=DTYPES[dtype]).element_size()
    weight, a, y = C_in * C_out, M * C_in, M * C_out
    dx = batch * H * W * C_in  # dgrad writes the whole input, zeros where a stride skips
    elements = {"dgrad": y + weight + dx, "wgrad": y + a + weight,
                "backward": y + a + 2 * weight + dx}.get(pass_, a + weight + y)
    gemms = 2 if pass_ == "backward" else 1
    return gemms * 2 * M * C_in * C_out, elements * size


def prepare_conv1x1_step(pass_: str, shape: Sequence[int], batch: int, dtype: str, device: torch.device,
                         implementation: str = "fused", seed: int = 0) -> Callable[[], None]:
    """One pass of one 1x1 convolution (channels_last): the Triton GEMM (``fused``) or cuDNN's
    convolution plus the PyTorch ops the GEMM's prologue / epilogue replace (``cudnn``)."""
    from fused_resnet.conv1x1_bn import allow_tf32
    from fused_resnet.kernels.bn_add_relu import ChannelNorm
    from fused_resnet.kernels.conv1x1_bn import (conv1x1_dgrad, conv1x1_dgrad_wgrad, conv1x1_forward,
                                                 conv1x1_stats_finalize, conv1x1_wgrad)

    if implementation not in ("fused", "cudnn"):
        raise ValueError(f"unknown implementation '{implementation}'; choose from fused, cudnn")
    if pass_ not in CONV1X1_PASSES:
        raise ValueError(f"unknown pass '{pass_}'; choose from {', '.join(CONV1X1_PASSES)}")
    C_in, H, W, C_out, stride = shape
    device, torch_dtype = torch.device(device), DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1

    def nhwc(*size, scale=1.0):
        t = torch.randn(*size, generator=g) * scale
        return t.to(device=device, dtype=torch_dtype).contiguous(memory_format=torch.channels_last)

    def vec(C, low=0.5, high=1.5):
        return (torch.rand(C, generator=g) * (high - low) + low).to(device)

    x, dy = nhwc(batch, C_in, H, W), nhwc(batch, C_out, Ho, Wo)
    w = (torch.randn(C_out, C_in, 1, 1, generator=g) / C_in ** 0.5).to(device=device, dtype=torch_dtype)
    in_norm = ChannelNorm(vec(C_in, -0.1, 0.1), vec(C_in), vec(C_in), vec(C_in, -0.1, 0.1))
    # Eval's ChannelNorm carries the running variance in its invstd slot (the kernel's FROM_VAR).
    out_norm = ChannelNorm(vec(C_out, -0.1, 0.1), vec(C_out), vec(C_out), vec(C_out, -0.1, 0.1))
    running = (torch.zeros(C_out, device=device), torch.ones(C_out, device=device),
               torch.zeros((), dtype=torch.long, device=device))
    M = batch * Ho * Wo
    # cuDNN's default for fp32 convolutions is TF32; the GEMM matches it so both do the same math.
    tf32 = allow_tf32(torch_dtype)
    conv = torch.nn.functional.conv2d
    if stride > 1 and pass_ == "forward_prologue_stats":
        raise ValueError("forward_prologue_stats is conv3's pass: stride 1 only")

    if implementation == "fused":
        if pass_ in ("forward_stats", "forward_prologue_stats"):
            prologue = in_norm if pass_ == "forward_prologue_stats" else None

            def step():
                _, partials, rows = conv1x1_forward(x, w, None, stride, prologue, stats=True, allow_tf32=tf32)
                conv1x1_stats_finalize(partials, M, rows, *running, 0.1, 1e-5)
        elif pass_ == "eval":
            def step():
                conv1x1_forward(x, w, None, stride, eval_norm=out_norm, eval_eps=1e-5, relu=True, allow_tf32=tf32)
        elif pass_ == "dgrad":
            def step():
                conv1x1_dgrad(dy, w, x, stride, allow_tf32=tf32)
        elif pass_ == "wgrad":
            def step():
                conv1x1_wgrad(dy, x, w, stride, allow_tf32=tf32)
        else:
            def step():
                conv1x1_dgrad_wgrad(dy, w, x, stride, allow_tf32=tf32)
        return step

    def bn_relu_input():
        scale = in_norm.invstd * in_norm.weight
        shift = in_norm.bias - in_norm.mean * scale
        return torch.relu(x * scale.view(1, -1, 1, 1).to(torch_dtype) + shift.view(1, -1, 1, 1).to(torch_dtype))

    def stats(y):
        torch.var_mean(y, dim=(0, 2, 3), correction=0)

    if pass_ == "forward_stats":
        def step():
            stats(conv(x, w, None, stride))
    elif pass_ == "forward_prologue_stats":
        def step():
            stats(conv(bn_relu_input(), w, None, stride))
    elif pass_ == "eval":
        def step():
            y = conv(x, w, None, stride)
            torch.relu_(torch.nn.functional.batch_norm(y, out_norm.mean, out_norm.invstd, out_norm.weight,
                                                       out_norm.bias, False, 0.0, 1e-5))
    else:
        mask = [pass_ in ("dgrad", "backward"), pass_ in ("wgrad", "backward"), False]

        def step():
            torch.ops.aten.convolution_backward(dy, x, w, None, [stride, stride], [0, 0], [1, 1], False,
                                                [0, 0], 1, mask)

    def no_grad_step():
        with torch.no_grad():
            step()
    return no_grad_step


@dataclass
class Conv1x1Result:
    """One pass of one 1x1 convolution: the fused GEMM next to cuDNN's sequence for the same work."""

    pass_: str
    shape: list[int]  # C_in, H, W, C_out, stride
    batch: int
    dtype: str
    flops: int
    bytes_moved: int
    fused_s: float
    cudnn_s: float

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(speedup_over_cudnn=self.cudnn_s / self.fused_s,
                   fused_tflop_per_s=self.flops / self.fused_s / 1e12,
                   cudnn_tflop_per_s=self.flops / self.cudnn_s / 1e12,
                   fused_gb_per_s=self.bytes_moved / self.fused_s / 1e9,
                   cudnn_gb_per_s=self.bytes_moved / self.cudnn_s / 1e9)
        return out


def conv1x1_cases(shapes: Sequence[Sequence[int]]) -> list[tuple[tuple, str]]:
    """(shape, pass) pairs: every pass at every shape, conv3's prologue pass only at stride 1."""
    return [(tuple(shape), p) for shape in shapes for p in CONV1X1_PASSES
            if not (p == "forward_prologue_stats" and shape[4] > 1)]


def measure_conv1x1(shape: Sequence[int], pass_: str, batch: int, dtype: str, device: torch.device,
                    warmup: int, iters: int) -> Conv1x1Result:
    """The fused GEMM and cuDNN's sequence for one pass, each timed by :func:`time_kernel`."""
    timed = {}
    for implementation in ("fused", "cudnn"):
        step = prepare_conv1x1_step(pass_, shape, batch, dtype, device, implementation)
        timed[implementation] = time_kernel(step, device, warmup, iters)
        del step
    flops, moved = conv1x1_work(shape, batch, pass_, dtype)
    return Conv1x1Result(pass_, list(shape), batch, dtype, flops, moved, timed["fused"], timed["cudnn"])
