"""The tile plans of the 1x1-convolution GEMMs: deterministic rules of the shape, dtype,
precision and target (``gemm_tiles``, ``wgrad_plan``, ``dgrad_wgrad_plan``), the target of
a device (``target_of``: its own capability, not the current device's), tl.dot's input
precision, and ResNet-50's 1x1 convolutions, the shapes they are made for.

Every launcher looks ``target_of`` up on this module (``plans.target_of``), so that one
patch here (the launch audit's meta-tensor target) reaches them all."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget

from ..layout import PLAN_CACHE_SIZE, PLAN_PROGRAMS, cdiv, next_power_of_2


@dataclass(frozen=True)
class GemmTiles:
    """One GEMM's tiles: rows (BLOCK_M), output columns (BLOCK_N), reduction (BLOCK_K)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


# The interpreter runs tl.dot as a numpy matmul per program: small tiles keep it quick.
INTERPRETER_TILES = GemmTiles(16, 16, 16, group_m=4, num_warps=1, num_stages=1)


def _pow2_between(n: int, low: int, high: int) -> int:
    return max(low, min(high, next_power_of_2(max(n, 1))))


# The most output rows a forward / dgrad tile takes (the audit's projection needs each tile full).
GEMM_MAX_BLOCK_M = 128


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def gemm_tiles(M: int, N: int, K: int, dtype: torch.dtype, target, precision: str = "ieee",
               heavy_epilogue: bool = False, b_prologue: bool = False, fill: bool = True) -> GemmTiles:
    """The tiles of an [M, K] x [K, N] GEMM on ``target``, a deterministic rule.

    ``target``: a ``triton.backends.compiler.GPUTarget`` (backend "cuda" / "hip"), or
    None for the interpreter. Tensor-core GEMMs: 128x128 output tiles (smaller for small
    M / N, never below 16, tl.dot's minimum), 64 output columns under a heavy epilogue
    (a residual and a folded BatchNorm next to the accumulator, which would spill at
    128); the reduction tile is 128 bytes of a row (64 x 16-bit, 32 x fp32) on NVIDIA,
    half that on AMD, whose 64 KiB of LDS must hold the stages: (BLOCK_M + BLOCK_N) *
    BLOCK_K * bytes <= 32 KiB a stage. Eight warps from 128x128 up, and for a BatchNorm
    prologue on the second operand (the weight gradient's recomputed activation, which
    spills on sm_80 with four). ``fill``: where the output tiles are fewer than
    PLAN_PROGRAMS, smaller ones (down to 64) and on NVIDIA a deeper BLOCK_K for a long K
    (the weight gradient passes False: its splits of M fill the GPU instead). Two stages
    where K fits one BLOCK_K (sm_90). fp32 without TF32 on NVIDIA runs on the FMA units:
    64x64x16 tiles on eight warps, two stages (software pipelining of a prologue on the
    FMA path beyond two stages, 32-deep tiles, or one stage on sm_90a spill).
    """
    if target is None:
        return INTERPRETER_TILES
    size = dtype.itemsize
    cuda = target.backend == "cuda"
    if cuda and dtype == torch.float32 and precision == "ieee":
        return GemmTiles(_pow2_between(M, 16, 64), _pow2_between(N, 16, 64), 16, 8, 8, 2)
    block_m = _pow2_between(M, 16, GEMM_MAX_BLOCK_M)
    block_n = _pow2_between(N, 16, 64 if heavy_epilogue else 128)
    block_k = _pow2_between(K, 16, (128 if cuda else 64) // size)
    deep = False
    # A short grid (batch 32, layers 3-4) takes 64-wide tiles before it leaves SMs idle, and
    # then (NVIDIA) a reduction tile twice as deep where K is long: half the dependent steps.
    while (fill and cdiv(M, block_m) * cdiv(N, block_n) < PLAN_PROGRAMS
           and max(block_m, block_n) > 64):
        if block_m >= block_n:
            block_m //= 2
        else:
            block_n //= 2
        if cuda and max(block_m, block_n) <= 64 and K >= 8 * block_k and not deep:
            block_k, deep = 2 * block_k, True
    warps = 8 if (block_m * block_n >= 128 * 128 or b_prologue) else 4
    if cuda:
        # K in one BLOCK_K (layer1's 64 channels) on sm_90: one iteration, nothing to
        # pipeline; two stages, not four, keep the shared memory for a second program on the
        # SM (sm_80 keeps three: triton 3.6 spills 16 bytes of the dgrad with two there).
        # The deep tile: three stages, so that two programs share an SM (64x64x128 x 2 bytes x 4 would be 128 KiB).
        stages = 2 if (K <= block_k and target.arch != 80) else (3 if (target.arch == 80 or deep) else 4)
        return GemmTiles(block_m, block_n, block_k, 8, warps, stages)
    return GemmTiles(block_m, block_n, block_k, 8, warps, 2)


def wgrad_splits(M: int, N: int, K: int, tiles: GemmTiles, size: int, target,
                 programs: int = PLAN_PROGRAMS, partial_share: int = 2) -> tuple[int, int]:
    """(num_splits, rows_per_split) of the weight gradient's reduction over M.

    About ``programs`` programs in all (two per H100 SM: more only adds partials), each
    split a whole number of BLOCK_M rows, and on a GPU the fp32 partials (written and read
    once) at most 1/``partial_share`` of the operands' bytes (a half: at batch 32 an eighth
    left 56 programs for 132 SMs; PLAN_PROGRAMS bounds them at batch 256). The interpreter
    splits by rows alone, so small tests combine several splits.
    """
    out_tiles = cdiv(N, tiles.block_n) * cdiv(K, tiles.block_k)
    by_programs = max(1, programs // out_tiles)
    by_traffic = (max(1, (M * (N + K) * size) // (8 * partial_share * N * K)) if target is not None
                  else by_programs)
    by_rows = max(1, cdiv(M, tiles.block_m))
    splits = min(by_programs, by_traffic, by_rows)
    rows_per_split = cdiv(cdiv(M, splits), tiles.block_m) * tiles.block_m
    return cdiv(M, rows_per_split) if M > 0 else 1, rows_per_split


_TRITON_BEFORE_3_7 = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7)

# Programs of the one-pass backward: about two per SM of an A100 / H100; more would add
# weight-gradient partials (each program's are the whole weight) for no more bandwidth.
DGRAD_WGRAD_PROGRAMS = 256
# The most weight-gradient accumulator elements (fp32) one of its programs holds: 80 a thread on eight warps.
DGRAD_WGRAD_MAX_ACCUMULATORS = 320 * 64


def dgrad_wgrad_tiles(N: int, K: int, N2: int, dtype: torch.dtype, target, precision: str = "ieee",
                      prologue: bool = False) -> Optional[GemmTiles]:
    """Tiles of ``conv1x1_dgrad_wgrad_kernel`` for C_out = N, C_in = K (and a second
    convolution's C_out = N2, 0 for none), or None where one pass does not fit and the
    backward takes two (``conv1x1_dgrad``, then ``conv1x1_wgrad``). A deterministic rule.

    Every weight gradient sits whole in one program's accumulators: C_in <= 64, C_out
    (each) <= 256, at most DGRAD_WGRAD_MAX_ACCUMULATORS in all (ResNet-50's layer1: conv3
    64 -> 256; conv1 64 -> 64 with its downsample 64 -> 256). block_n is N's block
    (N2's: ``dgrad_wgrad_block_n2``). Only on NVIDIA sm_90 and newer, with tensor cores
    and 16-bit inputs: ptxas spills these programs on sm_80 (up to 352 bytes) and they
    spill and overflow the 64 KiB of LDS on gfx942, and fp32 (TF32) tiles small enough not
    to spill compile to mma.sync (AOT-compiled at ResNet-50's shapes). Rows: 64 a block on
    eight warps, two stages.
    """
    if K > 64 or N > 256 or N2 > 256:
        return None
    block_n, block_k = _pow2_between(N, 16, 256), _pow2_between(K, 16, 64)
    if (block_n + (dgrad_wgrad_block_n2(N2) if N2 else 0)) * block_k > DGRAD_WGRAD_MAX_ACCUMULATORS:
        return None
    if target is None:
        return GemmTiles(INTERPRETER_TILES.block_m, block_n, block_k, 1, 1, 1)
    if target.backend != "cuda" or target.arch < 90 or dtype == torch.float32:
        # fp32: without TF32 no tensor cores; with TF32 the 16- and 32-row tiles that fit
        # beside a whole-row dY tile lower to mma.sync, not wgmma, on Triton 3.6 and 3.8
        # alike (AOT, sm_90a): the two kernels instead, whose dots are wgmma.
        return None
    # Triton 3.6 gives the 256-wide prologue case (layer1's conv3) 255 registers and 8
    # bytes of spill with two stages; one stage compiles to 248 and none (AOT, sm_90a, bf16
    # and fp16 alike, re-checked after TF32 left this kernel; 3.8: 254-255 and none with either).
    stages = 1 if (prologue and block_n >= 256 and _TRITON_BEFORE_3_7) else 2
    return GemmTiles(64, block_n, block_k, 1, 8, stages)


def dgrad_wgrad_block_n2(N2: int) -> int:
    return _pow2_between(N2, 16, 256)


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def wgrad_plan(M: int, N: int, K: int, dtype: torch.dtype, target, precision: str = "ieee",
               prologue: bool = False) -> tuple[GemmTiles, int, int]:
    """(tiles, num_splits, rows_per_split) of ``conv1x1_wgrad`` for C_out = N, C_in = K
    over M rows: output tile [BLOCK_N, BLOCK_K] = (C_out, C_in), reduction over M in
    BLOCK_M rows."""
    size = dtype.itemsize
    # Whole tiles split over M where that fills the GPU (compute-bound layers 3-4 at batch
    # 256), else the short grid's smaller tiles too (batch 32).
    for fill in (False, True):
        t = gemm_tiles(N, K, M, dtype, target, precision, b_prologue=prologue, fill=fill)
        tiles = GemmTiles(t.block_k, t.block_m, t.block_n, t.group_m, t.num_warps, t.num_stages)
        splits, rows_per_split = wgrad_splits(M, N, K, tiles, size, target)
        if cdiv(N, tiles.block_n) * cdiv(K, tiles.block_k) * splits >= PLAN_PROGRAMS // 2:
            break
    return tiles, splits, rows_per_split


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def dgrad_wgrad_plan(M: int, N: int, K: int, N2: int, dtype: torch.dtype, target, precision: str = "ieee",
                     prologue: bool = False) -> Optional[tuple[GemmTiles, int, int]]:
    """(tiles, num_splits, rows_per_split) of ``conv1x1_dgrad_wgrad_kernel``, or None
    where the backward takes two passes (``dgrad_wgrad_tiles``; or nothing to compute).
    One program per split, its output tile both whole weights."""
    tiles = dgrad_wgrad_tiles(N, K, N2, dtype, target, precision, prologue)
    if tiles is None or M == 0 or K == 0:
        return None
    size = dtype.itemsize
    return (tiles, *wgrad_splits(M, N + N2, K, GemmTiles(tiles.block_m, N + N2, K), size, target,
                                 programs=DGRAD_WGRAD_PROGRAMS))


_INTERPRETER_PLAN_TARGET = None


@contextlib.contextmanager
def interpreter_plans_as(target) -> Iterator[None]:
    """Within the block, launches on CPU tensors (the interpreter) take the tiles and
    weight-gradient splits ``target`` (a ``GPUTarget``) would choose, at its default fp32
    precision (TF32 where cuDNN's default allows it); the interpreter's numerics stay its
    own. For counting the traffic of a GPU's plan (``fused-resnet audit``)."""
    global _INTERPRETER_PLAN_TARGET
    saved, _INTERPRETER_PLAN_TARGET = _INTERPRETER_PLAN_TARGET, target
    try:
        yield
    finally:
        _INTERPRETER_PLAN_TARGET = saved


def _plan(dtype: torch.dtype, allow_tf32: bool, target) -> tuple:
    """(target, precision) that choose a launch's tiles: ``target``'s own, or on the
    interpreter those of ``interpreter_plans_as``."""
    if target is None and _INTERPRETER_PLAN_TARGET is not None:
        target = _INTERPRETER_PLAN_TARGET
    return target, input_precision(dtype, allow_tf32, target)


def target_of(device: torch.device):
    """The GPUTarget of ``device`` (its own capability, not the current device's), or None
    on a CPU (the interpreter).

    The launchers take ``target=None`` as "the target of the input's device"; ahead-of-time
    compilation passes a GPUTarget instead."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return triton.runtime.driver.active.get_current_target()
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_target(index)


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int):
    """What Triton's driver reports for the current device, for device ``index``."""
    if torch.version.hip:
        arch = torch.cuda.get_device_properties(index).gcnArchName.split(":")[0]
        return GPUTarget("hip", arch, 64)
    major, minor = torch.cuda.get_device_capability(index)
    return GPUTarget("cuda", major * 10 + minor, 32)


def input_precision(dtype: torch.dtype, allow_tf32: bool, target) -> str:
    """tl.dot's input_precision: TF32 for fp32 exactly when the convolution it replaces
    would use it (``torch.backends.cudnn.allow_tf32``) and the target has it."""
    if dtype != torch.float32 or not allow_tf32 or target is None:
        return "ieee"
    if target.backend == "cuda" or target.arch == "gfx942":
        return "tf32"
    return "ieee"


# ------------------------------------------------------------------ ahead-of-time launches

# ResNet-50's 1x1 convolutions (torchvision, 224x224 input) as (C_in, H, W, C_out, stride):
# conv1 and conv3 of each stage's first and later blocks, and the downsample convolutions.
RESNET50_CONV1X1 = (
    (64, 56, 56, 64, 1), (64, 56, 56, 256, 1), (256, 56, 56, 64, 1),  # layer1: conv1, conv3 / downsample, conv1
    (256, 56, 56, 128, 1), (128, 28, 28, 512, 1), (256, 56, 56, 512, 2), (512, 28, 28, 128, 1),  # layer2
    (512, 28, 28, 256, 1), (256, 14, 14, 1024, 1), (512, 28, 28, 1024, 2), (1024, 14, 14, 256, 1),  # layer3
    (1024, 14, 14, 512, 1), (512, 7, 7, 2048, 1), (1024, 14, 14, 2048, 2), (2048, 7, 7, 512, 1),  # layer4
)
