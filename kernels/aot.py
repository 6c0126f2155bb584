"""Ahead-of-time compilation of the kernels for GPU targets, on a machine without a GPU.

Which launches: ``record_launches`` intercepts ``kernel[grid](...)`` calls made by the
launchers and keeps their arguments instead of running anything. Each kernel family has
one function in ``LAUNCH_FAMILIES`` that yields the launches its launchers make over a
``RealShapes`` (real activation shapes, every batch size, dtype and memory format) on a
target (the GEMMs' tiles depend on it), in
the configurations a converted model uses or, with ``every``, in every configuration the
ops accept. The tensors are ``meta`` tensors: nothing is allocated or read, and their
data pointer (0) is 16-byte aligned like every allocation the ops launch on.
``per_activation`` runs a family at one layout per ``layout_signature`` (the layouts that
specialise every kernel alike), so 256 batch sizes cost a few layouts per shape.

What they compile to: ``specialize`` specialises a launch exactly as a real launch would
(Triton's own argument binder: dtypes, integers == 1 and divisible by 16, 16-byte pointer
alignment) and ``compile_launch`` compiles it for a ``GPUTarget``: PTX and cubin for
NVIDIA, AMDGCN and hsaco for AMD. ``resource_usage`` reads registers, spills and shared
memory from the binary; ``compile_all`` does it for many launches in worker processes.

This leans on Triton's launch internals (``create_function_from_signature``,
``JITFunction._pack_args``); it is tested against the triton version the project pins.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import json
import multiprocessing
import os
import re
import resource
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature, native_specialize_impl

from .layout import Layout, elementwise_plan, layout_of, reduction_plan

TARGETS = {
    "sm_80": GPUTarget("cuda", 80, 32),
    "sm_90a": GPUTarget("cuda", 90, 32),
    "gfx942": GPUTarget("hip", "gfx942", 64),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The most shared memory one block may ask for on each target (CUDA's opt-in maximum per
# block: A100 163 KiB, H100/H200 227 KiB; MI300X's LDS: 64 KiB).
SHARED_MEMORY_LIMITS = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024, "gfx942": 64 * 1024}


@dataclass
class Launch:
    """One intercepted ``kernel[grid](*args, **kwargs)``."""

    kernel: JITFunction
    args: tuple
    kwargs: dict
    grid: Any

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def describe(self) -> str:
        """Name, constexprs and integer arguments: enough to find the shape that launched it."""
        ints = {k: v for k, v in self.bound_arguments().items() if isinstance(v, int) or hasattr(v, "dtype")}
        ints = {k: (str(v.dtype).removeprefix("torch.") if hasattr(v, "dtype") else v) for k, v in ints.items()}
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in ints.items())})"

    def bound_arguments(self) -> dict:
        """Parameter name -> value, as the kernel binds them."""
        return dict(zip(self.kernel.arg_names, self.args)) | {k: v for k, v in self.kwargs.items()
                                                              if k in self.kernel.arg_names}


@dataclass
class Recording:
    launches: list[Launch] = field(default_factory=list)


@contextlib.contextmanager
def record_launches() -> Iterator[Recording]:
    """Within the block, kernel launches are recorded instead of run."""
    recording = Recording()
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        recording.launches.append(Launch(self, args, dict(kwargs), grid))

    JITFunction.run = record
    try:
        yield recording
    finally:
        JITFunction.run = original


# ------------------------------------------------------------------ what the ops launch


def meta_activation(N: int, C: int, H: int, W: int, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """A dense activation of that shape on the meta device: shape, strides, dtype, no data."""
    x = torch.empty((N, C, H, W), dtype=dtype, device="meta")
    return x.to(memory_format=torch.channels_last) if channels_last else x


@dataclass(frozen=True)
class RealShapes:
    """Where the ops run, at every batch size in ``batch_sizes``, in every dtype of
    ``dtypes`` and both memory formats: ``activations``, the (C, H, W) the BatchNorm /
    add / ReLU tails see; ``conv1x1``, the (C_in, H, W, C_out, stride) of the 1x1
    convolutions (groups 1, no padding) for a family that needs a weight too, at
    ``conv1x1_batch_sizes`` (default ``batch_sizes``: recording the GEMMs at each of
    256 batch sizes takes about 40 s a target)."""

    activations: tuple[tuple[int, int, int], ...]
    batch_sizes: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...] = DTYPES
    conv1x1: tuple[tuple[int, int, int, int, int], ...] = ()
    conv1x1_batch_sizes: Optional[tuple[int, ...]] = None


def layout_integers(layout: Layout) -> dict[str, Any]:
    """Every number the launchers derive from a layout: its sizes and strides and the
    fields of the elementwise and reduction plans (tile sizes, partition)."""
    values = {"N": layout.N, "C": layout.C, "HW": layout.HW, "numel": layout.numel}
    values |= dict(zip(("stride_n", "stride_c", "stride_hw"), layout.strides))
    values |= {f"elementwise.{k}": v for k, v in dataclasses.asdict(elementwise_plan(layout)).items()}
    values |= {f"reduction.{k}": v for k, v in dataclasses.asdict(reduction_plan(layout)).items()}
    values |= {f"statistics.{k}": v for k, v in dataclasses.asdict(reduction_plan(layout, sums=2)).items()}
    return values


# Plan fields the launchers pass as constexprs: they enter a signature by value.
TILE_FIELDS = ("elementwise.channel_is_col", "elementwise.block_rows", "elementwise.block_cols",
               "reduction.block_c", "reduction.block_hw", "statistics.block_c", "statistics.block_hw")


def layout_signature(layout: Layout) -> tuple:
    """Two layouts with the same signature specialise every kernel alike: tile sizes by
    value, every other integer by Triton's own specialisation of it (== 1, divisible by
    16, 32 or 64 bits). Exact as long as the launchers pass no other integer to a kernel,
    which ``per_activation`` checks on every launch."""
    return tuple((name, value if name in TILE_FIELDS else native_specialize_impl(BaseBackend, value, False, True, True))
                 for name, value in layout_integers(layout).items())


@functools.lru_cache(maxsize=None)
def representative_layouts(activations: tuple, batch_sizes: tuple) -> tuple[tuple[int, int, int, int, bool], ...]:
    """(N, C, H, W, channels_last) of the smallest batch of each layout signature, over
    every (C, H, W) in ``activations``, every batch size and both memory formats."""
    first = {}
    for N in sorted(set(batch_sizes)):
        for C, H, W in sorted(set(activations)):
            for channels_last in (False, True):
                x = meta_activation(N, C, H, W, torch.float32, channels_last)
                first.setdefault(layout_signature(layout_of(x)), (N, C, H, W, channels_last))
    return tuple(first.values())


def foreign_integers(launch: Launch, known: set) -> dict[str, int]:
    """Integer arguments (not constexpr) of ``launch`` that are not in ``known``."""
    constexprs = {p.name for p in launch.kernel.params if p.is_constexpr}
    return {k: v for k, v in launch.bound_arguments().items()
            if k not in constexprs and isinstance(v, int) and not isinstance(v, bool) and v not in known}


# (shapes, every, target) -> launches; the target matters where a family's tiles depend on it.
Family = Callable[[RealShapes, bool, GPUTarget], Iterator[Launch]]


def per_activation(launches_on: Callable[[torch.Tensor, Layout, bool], Iterable[Launch]]) -> Family:
    """A family from ``launches_on(x, layout, every)``, the launches on one activation:
    run at one layout of each signature (``representative_layouts``) in every dtype.
    Raises if a launch passes an integer that is not one of ``layout_integers``."""

    @functools.wraps(launches_on)
    def family(shapes: RealShapes, every: bool, target: GPUTarget) -> Iterator[Launch]:
        for N, C, H, W, channels_last in representative_layouts(tuple(shapes.activations), tuple(shapes.batch_sizes)):
            for dtype in shapes.dtypes:
                x = meta_activation(N, C, H, W, dtype, channels_last)
                layout = layout_of(x)
                known = set(layout_integers(layout).values())
                for launch in launches_on(x, layout, every):
                    foreign = foreign_integers(launch, known)
                    if foreign:
                        raise AssertionError(f"{launch.name} takes {foreign}, not derived by layout_integers: "
                                             "add it there, or layout_signature merges layouts it must not")
                    yield launch

    return family


def _param_dtypes(x: torch.Tensor) -> tuple:
    # Parameters and statistics in fp32, or in the activation dtype (a model cast whole with .to()).
    return tuple(dict.fromkeys((torch.float32, x.dtype)))


@per_activation
def add_relu_launches(x: torch.Tensor, layout: Layout, every: bool) -> Iterator[Launch]:
    """``add_relu`` (the tail of a block after ``fold_bn``) forward and backward."""
    from .add_relu import add_relu_backward, add_relu_forward

    with record_launches() as rec:
        add_relu_forward(x, x)
        add_relu_backward(x, x)
    yield from rec.launches


@per_activation
def bn_stats_launches(x: torch.Tensor, layout: Layout, every: bool) -> Iterator[Launch]:
    """Batch statistics as ``nn.BatchNorm2d`` asks for them (running statistics in each
    parameter dtype, a counter, momentum 0.1); ``every`` adds momentum None, no counter
    (a functional call), no running statistics, and SyncBatchNorm's moments."""
    from .bn_stats import bn_stats

    C = layout.C
    with record_launches() as rec:
        for dtype in _param_dtypes(x):
            rm, rv = torch.empty(C, dtype=dtype, device=x.device), torch.empty(C, dtype=dtype, device=x.device)
            counter = torch.empty((), dtype=torch.long, device=x.device)
            bn_stats(x, layout, rm, rv, counter, 0.1, 1e-5)
            if every:
                bn_stats(x, layout, rm, rv, counter, None, 1e-5)
                bn_stats(x, layout, rm, rv, None, 0.1, 1e-5)
        if every:
            bn_stats(x, layout, None, None, None, 0.1, 1e-5)
            bn_stats(x, layout, None, None, None, None, 1e-5, return_var=True)
    yield from rec.launches


@per_activation
def bn_add_relu_launches(x: torch.Tensor, layout: Layout, every: bool) -> Iterator[Launch]:
    """Forward and backward of bn_relu / bn_add_relu / bn_add_bn_relu as the modules of a
    converted ResNet run them: each residual mode, train and eval, affine, parameters in
    each dtype, their gradients wanted. ``every`` adds affine off, one BatchNorm frozen next
    to one training (bn_add_bn_relu), no parameter gradients, and the fp32 running
    statistics the SyncBatchNorm ops hand over."""
    from .bn_add_relu import (RESIDUAL_ADD, RESIDUAL_BN, RESIDUAL_NONE, ChannelNorm, bn_add_relu_backward,
                              bn_add_relu_forward)

    C = layout.C

    def vector(dtype):
        return torch.empty(C, dtype=dtype, device=x.device)

    batch_stats = vector(torch.float32), vector(torch.float32)  # what bn_stats returns
    with record_launches() as rec:
        for dtype in _param_dtypes(x):
            for affine in ((True, False) if every else (True,)):
                w = vector(dtype) if affine else None
                batch = ChannelNorm(*batch_stats, w, w)
                # Eval, forward and backward: running mean and variance (FROM_VAR). Each backward
                # norm comes with its var_eps (None: an invstd; SyncBatchNorm's eval hands over fp32 ones).
                running = ChannelNorm(vector(dtype), vector(dtype), w, w)
                forward = {True: batch, False: running}
                backward = {True: ((batch, None),), False: ((running, 1e-5),)}
                if every:
                    backward[False] += ((batch, None),)
                for mode in (RESIDUAL_NONE, RESIDUAL_ADD, RESIDUAL_BN):
                    r = x if mode != RESIDUAL_NONE else None
                    modes = [(False, False), (True, True)]
                    if every and mode == RESIDUAL_BN:
                        modes += [(True, False), (False, True)]
                    for training, r_training in modes:
                        r_norm = forward[r_training] if mode == RESIDUAL_BN else None
                        bn_add_relu_forward(x, layout, forward[training], 1e-5, not training, r, r_norm, 1e-5,
                                            not r_training)
                        for norm, var_eps in backward[training]:
                            for r_norm, r_var_eps in (backward[r_training] if mode == RESIDUAL_BN else ((None, None),)):
                                for need_param_grads in ((True, False) if every else (True,)):
                                    bn_add_relu_backward(x, x, x, layout, norm, training, mode, need_param_grads,
                                                         r, r_norm, r_training, var_eps, r_var_eps)
    yield from rec.launches


def conv1x1_launches(shapes: RealShapes, every: bool, target: GPUTarget) -> Iterator[Launch]:
    """The launches a FusedConvBottleneck makes at ``shapes.conv1x1`` on ``target`` (its
    tiles depend on it), at each batch size (M = N * H * W moves tiles and splits): in
    training the forward with statistics (conv1, downsample) or prologue + statistics
    (conv3), their dgrad (conv1's also with the downsample's gradient added or in its
    reduction) / wgrad and finalize passes, and both gradients in one pass
    (``conv1x1_dgrad_wgrad``; conv1's with its downsample's, 4x its channels, where that
    fits); in eval the folded-BatchNorm epilogues (conv1 with ReLU, downsample without,
    conv3 with the prologue, residual and ReLU). fp32 with TF32 on (cuDNN's default) and,
    with ``every``, off."""
    from .bn_add_relu import ChannelNorm
    from .conv1x1_bn import (conv1x1_dgrad, conv1x1_dgrad_wgrad, conv1x1_forward, conv1x1_prologue_backward,
                             conv1x1_stats_finalize, conv1x1_wgrad)

    def meta(*shape, dtype, nhwc=True):
        t = torch.empty(shape, dtype=dtype, device="meta")
        return t.contiguous(memory_format=torch.channels_last) if nhwc else t

    def vec(C):
        return meta(C, dtype=torch.float32, nhwc=False)

    batch_sizes = shapes.batch_sizes if shapes.conv1x1_batch_sizes is None else shapes.conv1x1_batch_sizes
    for N in batch_sizes:
        for C_in, H, W, C_out, stride in shapes.conv1x1:
            for dtype in shapes.dtypes:
                x = meta(N, C_in, H, W, dtype=dtype)
                w = meta(C_out, C_in, 1, 1, dtype=dtype, nhwc=False)
                Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
                dy = meta(N, C_out, Ho, Wo, dtype=dtype)
                norm = ChannelNorm(vec(C_in), vec(C_in), vec(C_in), vec(C_in))
                eval_norm = ChannelNorm(vec(C_out), vec(C_out), vec(C_out), vec(C_out))
                counter = meta(dtype=torch.long, nhwc=False)
                prologues = (None,) if stride > 1 else (None, norm)
                for tf32 in ((True, False) if (dtype == torch.float32 and every) else (True,)):
                    with record_launches() as rec:
                        for prologue in prologues:
                            y, partials, rows = conv1x1_forward(x, w, None, stride, prologue, stats=True,
                                                                allow_tf32=tf32, target=target)
                            conv1x1_stats_finalize(partials, N * Ho * Wo, rows, vec(C_out), vec(C_out), counter,
                                                   0.1, 1e-5)
                            g, sums = conv1x1_dgrad(dy, w, x, stride, prologue, allow_tf32=tf32, target=target)
                            if prologue is None and stride == 1:
                                # conv1 of a block with a downsample: x's gradient with the
                                # downsample's added (stride 2) or in the same GEMM (stride 1),
                                # with both weights' gradients where one pass fits (the
                                # downsample has 4x conv1's channels).
                                conv1x1_dgrad(dy, w, x, 1, add=x, allow_tf32=tf32, target=target)
                                conv1x1_dgrad(dy, w, x, 1, second=(dy, w), allow_tf32=tf32, target=target)
                                wide = (meta(N, 4 * C_out, Ho, Wo, dtype=dtype), meta(4 * C_out, C_in, 1, 1,
                                                                                     dtype=dtype, nhwc=False))
                                conv1x1_dgrad_wgrad(dy, w, x, 1, second=wide, allow_tf32=tf32, target=target)
                            if prologue is not None:
                                conv1x1_prologue_backward(g, sums, x, prologue, True, True, True)
                            conv1x1_wgrad(dy, x, w, stride, prologue, allow_tf32=tf32, target=target)
                            # Both gradients, as a block's training backward asks: one pass where it fits.
                            conv1x1_dgrad_wgrad(dy, w, x, stride, prologue, allow_tf32=tf32, target=target)
                            # Eval: conv1 (+ bn + relu), downsample (+ bn), conv3 (prologue + bn + residual + relu).
                            conv1x1_forward(x, w, None, stride, prologue, eval_norm=eval_norm, eval_eps=1e-5,
                                            residual=dy if prologue is not None else None, relu=stride == 1,
                                            allow_tf32=tf32, target=target)
                    yield from rec.launches


# One function per kernel family: (shapes, every, target) -> the launches the ops make there.
LAUNCH_FAMILIES: list[Family] = [add_relu_launches, bn_stats_launches, bn_add_relu_launches, conv1x1_launches]


def real_shape_launches(shapes: RealShapes, target: GPUTarget, every: bool = True, families=None) -> Iterator[Launch]:
    """The launches of every family over ``shapes`` on ``target`` (nothing runs)."""
    for family in (LAUNCH_FAMILIES if families is None else families):
        yield from family(shapes, every, target)


def launches_of_every_kernel(target: GPUTarget = TARGETS["sm_90a"]) -> list[Launch]:
    """Every configuration of every family at one small activation (2, 8, 4, 4) and one
    small 1x1 convolution (8 -> 16 channels on 4x4, stride 1 and 2)."""
    shapes = RealShapes(((8, 4, 4),), (2,), conv1x1=((8, 4, 4, 16, 1), (8, 4, 4, 16, 2)))
    return list(real_shape_launches(shapes, target))


# ------------------------------------------------------------------ specialise and compile


_BACKENDS: dict = {}
_BINDERS: dict = {}


def _backend(target: GPUTarget):
    key = (target.backend, target.arch, target.warp_size)
    if key not in _BACKENDS:
        _BACKENDS[key] = make_backend(target)
    return _BACKENDS[key]


def _bind(launch: Launch, target: GPUTarget):
    backend = _backend(target)
    key = (id(launch.kernel), target.backend, target.arch)
    if key not in _BINDERS:
        _BINDERS[key] = (launch.kernel, create_function_from_signature(launch.kernel.signature,
                                                                        launch.kernel.params, backend))
    return backend, _BINDERS[key][1](*launch.args, **launch.kwargs)


def specialize(launch: Launch, target: GPUTarget):
    """(ASTSource, options) that a real launch of ``launch`` on ``target`` would compile."""
    backend, (bound_args, specialization, options) = _bind(launch, target)
    options, signature, constexprs, attrs = launch.kernel._pack_args(
        backend, launch.kwargs, bound_args, specialization, options)
    return ASTSource(launch.kernel, signature, constexprs, attrs), options


def specialization_key(launch: Launch, target: GPUTarget) -> tuple:
    """Two launches with the same key compile to the same binary: what the JIT's own
    cache key holds (every argument's type and specialisation, constexpr values, options)."""
    _, (_, specialization, options) = _bind(launch, target)
    return launch.name, tuple(specialization), tuple(sorted(options.items()))


def unique_launches(launches: Iterable[Launch], target: GPUTarget) -> list[Launch]:
    """One launch per specialisation key, in first-seen order."""
    unique = {}
    for launch in launches:
        unique.setdefault(specialization_key(launch, target), launch)
    return list(unique.values())


def compile_launch(launch: Launch, target: GPUTarget):
    src, options = specialize(launch, target)
    return triton.compile(src, target=target, options=options.__dict__)


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


# The matrix instructions a tl.dot lowers to on the tensor cores (Hopper's asynchronous
# warpgroup MMA, Ampere's warp MMA, CDNA's MFMA); a dot that misses them ran on the FMA units.
TENSOR_CORE_INSTRUCTIONS = {"ptx": ("wgmma.mma_async", "mma.sync"), "amdgcn": ("v_mfma",)}


def tensor_core_instructions(asm: dict) -> int:
    """How many tensor-core matrix instructions the kernel's PTX / AMDGCN holds."""
    text_key = "ptx" if "ptx" in asm else "amdgcn"
    text = asm[text_key]
    return sum(text.count(op) for op in TENSOR_CORE_INSTRUCTIONS[text_key])


# Hopper's warpgroup MMA: on sm_90a every tensor-core dot should lower to it, not to mma.sync.
WGMMA_INSTRUCTION = "wgmma.mma_async"
# What a software-pipelined loop's loads become in TTGIR (cp.async or TMA into shared memory).
PIPELINED_LOADS = ("async_copy_global_to_local", "async_tma_copy_global_to_local")


def _measure(compiled) -> dict:
    """Registers, spills, the binary's own (static) shared memory, its tensor-core
    instructions (wgmma apart) and whether a loop's loads were software-pipelined."""
    asm = compiled.asm
    ttgir = asm.get("ttgir", "")
    return _registers_and_spills(asm) | {"tensor_core_instructions": tensor_core_instructions(asm),
                                         "wgmma_instructions": asm.get("ptx", "").count(WGMMA_INSTRUCTION),
                                         "pipelined": any(op in ttgir for op in PIPELINED_LOADS)}


def _registers_and_spills(asm: dict) -> dict:
    if "cubin" in asm:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(asm["cubin"])
            out = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True,
                                 text=True, check=True).stdout
        fields = dict(re.findall(r"(\w+):(\d+)", out.split("Function", 1)[-1]))
        stack, local = int(fields["STACK"]), int(fields["LOCAL"])
        return {"registers": int(fields["REG"]), "spills": stack + local, "stack_bytes": stack,
                "local_bytes": local, "static_shared_bytes": int(fields["SHARED"])}
    text = asm["amdgcn"]

    def first(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    scratch = first(r"\.private_segment_fixed_size:\s+(\d+)")
    return {"registers": first(r"\.vgpr_count:\s+(\d+)"),
            "spills": first(r"\.vgpr_spill_count:\s+(\d+)") + first(r"\.sgpr_spill_count:\s+(\d+)") + scratch,
            "stack_bytes": scratch, "local_bytes": 0, "static_shared_bytes": first(r"\.group_segment_fixed_size:\s+(\d+)")}


# v2: shared_bytes is what the launch asks for; v3: tensor_core_instructions; v4: wgmma, pipelined
_USAGE_FILE = "fused_resnet_resource_usage_v4.json"


def resource_usage(compiled) -> dict:
    """Registers, spills and shared memory of a compiled kernel, read from its binary
    (kept next to it in Triton's cache, so a warm run does not read it again).

    ``spills`` is 0 for a kernel that spills nothing. NVIDIA: the stack frame plus local
    memory of ``cuobjdump --dump-resource-usage`` (ptxas -v's "bytes stack frame"; these
    kernels call no function and have no local array, so both hold only spilled registers).
    AMD: .vgpr_spill_count + .sgpr_spill_count + the private (scratch) segment.
    ``shared_bytes`` is the shared memory (LDS) the launch asks for (Triton's
    ``metadata.shared``, what ``SHARED_MEMORY_LIMITS`` bounds); ``static_shared_bytes`` what
    the binary declares itself (sm_90a: 1 KiB the driver reserves, whatever the kernel).
    ``tensor_core_instructions``: :func:`tensor_core_instructions` of its assembly, of which
    ``wgmma_instructions`` Hopper's; ``pipelined``: a loop's loads go through shared memory
    asynchronously (Triton's software pipeliner ran), read from its TTGIR.
    """
    from triton.runtime.cache import get_cache_manager

    cache = get_cache_manager(compiled.hash)
    path = cache.get_file(_USAGE_FILE)
    if path is not None:
        with open(path) as f:
            return json.load(f)
    usage = _measure(compiled) | {"shared_bytes": compiled.metadata.shared}
    cache.put(json.dumps(usage), _USAGE_FILE, binary=False)
    return usage


@dataclass(frozen=True)
class CompileJob:
    """A specialised launch in a form another process can take (no tensors, no functions)."""

    module: str
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    target: GPUTarget


def compile_job(launch: Launch, target: GPUTarget) -> CompileJob:
    src, options = specialize(launch, target)
    return CompileJob(launch.kernel.fn.__module__, launch.name, src.signature, src.constants, src.attrs,
                      dict(options.__dict__), target)


def _cpu_seconds() -> float:
    # This process and its finished subprocesses (ptxas, cuobjdump).
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run_compile_job(job: CompileJob) -> dict:
    """Compile ``job`` and return its resource usage and the CPU seconds it took; fails
    on a compile error or a missing binary."""
    start = _cpu_seconds()
    kernel = getattr(importlib.import_module(job.module), job.kernel)
    compiled = triton.compile(ASTSource(kernel, job.signature, job.constexprs, job.attrs), target=job.target,
                              options=job.options)
    binary = "cubin" if job.target.backend == "cuda" else "hsaco"
    if not compiled.asm.get(binary):
        raise RuntimeError(f"{job.kernel}: no {binary} for {job.target}")
    return resource_usage(compiled) | {"cpu_seconds": _cpu_seconds() - start}


def compile_pool(workers: Optional[int] = None) -> concurrent.futures.ProcessPoolExecutor:
    """Worker processes for ``compile_all``, started with spawn: a forked copy of a process
    that already ran Triton's compiler (its LLVM / MLIR threads) is not safe to compile in."""
    workers = workers or len(os.sched_getaffinity(0))
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def compile_all(launches: Iterable[Launch], target: GPUTarget,
                pool: Optional[concurrent.futures.Executor] = None) -> list[tuple[Launch, dict]]:
    """(launch, resource usage) for each launch, compiled for ``target`` in ``pool``
    (in this process without one)."""
    launches = list(launches)
    jobs = [compile_job(launch, target) for launch in launches]
    if pool is None:
        usages = map(run_compile_job, jobs)
    else:
        usages = pool.map(run_compile_job, jobs, chunksize=4)
    return list(zip(launches, usages))


def usage_table(results: Iterable[tuple[Launch, dict]]) -> dict[str, dict]:
    """Per kernel: variants compiled, most registers, most spill bytes, most shared bytes."""
    table: dict[str, dict] = {}
    for launch, usage in results:
        row = table.setdefault(launch.name, {"variants": 0, "max_registers": 0, "max_spills": 0,
                                             "max_shared_bytes": 0})
        row["variants"] += 1
        row["max_registers"] = max(row["max_registers"], usage["registers"])
        row["max_spills"] = max(row["max_spills"], usage["spills"])
        row["max_shared_bytes"] = max(row["max_shared_bytes"], usage["shared_bytes"])
    return dict(sorted(table.items()))
