"""The 1x1-convolution GEMMs (issue 11), CUDA only: each fused GEMM pass against cuDNN's
convolution plus the BatchNorm/ReLU ops it replaces at ResNet-50's 1x1 shapes, and the
ResNet-50 stages' train step and eval with ``fuse_convolutions`` on and off (bf16, channels_last).

Without CUDA every case is skipped: on the CPU the GEMMs would run in Triton's interpreter,
which says nothing about their speed.
"""
from __future__ import annotations

import statistics

import pytest
import torch

from fused_resnet.tools import bench, common, kernel_bench

try:
    from fused_resnet.kernels.conv1x1_bn import RESNET50_CONV1X1
except ImportError:  # the kernels need triton; without it nothing here runs anyway
    RESNET50_CONV1X1 = ()

GEMM_DTYPES = ("bfloat16", "float32")
CONV_STAGES = ("layer1", "layer2", "layer3", "layer4")
GEMM_CASES = [(d, shape, p, impl) for d in GEMM_DTYPES for shape, p in kernel_bench.conv1x1_cases(RESNET50_CONV1X1)
              for impl in ("fused", "cudnn")]


def _require_cuda(suite) -> None:
    if torch.device(suite.device).type != "cuda":
        pytest.skip("1x1-convolution GEMM benchmarks are CUDA only")


@pytest.mark.parametrize("case", GEMM_CASES, ids=["-".join(map(str, (d, "x".join(map(str, s)), p, i)))
                                                  for d, s, p, i in GEMM_CASES])
def test_conv1x1_gemm(case, suite, timed, request):
    _require_cuda(suite)
    dtype, shape, pass_, implementation = case
    batch = suite.batches[-1]
    step = kernel_bench.prepare_conv1x1_step(pass_, shape, batch, dtype, suite.device, implementation)
    flops, moved = kernel_bench.conv1x1_work(shape, batch, pass_, dtype)
    seconds = timed(step, f"conv1x1 {pass_} {'x'.join(map(str, shape))} {dtype} batch {batch}", pass_=pass_,
                    shape=list(shape), dtype=dtype, batch=batch, implementation=implementation, flops=flops,
                    bytes_moved=moved)
    if seconds:
        median = statistics.median(seconds)
        request.node.user_properties += [("tflop_per_s", flops / median / 1e12), ("gb_per_s", moved / median / 1e9)]
        request.config._fused_resnet_conv1x1.setdefault((pass_, tuple(shape), batch, dtype), {})[implementation] = median


@pytest.mark.parametrize("mode", ["train_backward", "eval"])
@pytest.mark.parametrize("stage", CONV_STAGES)
@pytest.mark.parametrize("variant", ["fused", "fused_conv"])
def test_stage_fuse_convolutions(variant, stage, mode, suite, model_cache, timed, request):
    _require_cuda(suite)
    if stage not in suite.stages or mode not in suite.modes:
        pytest.skip("stage or mode not chosen (--bench-stages / --bench-modes)")
    model, dtype, fmt, batch = "resnet50", "bfloat16", "channels_last", suite.batches[-1]
    shape = common.stage_input_shapes(model, batch, suite.resolution)[stage]
    x = bench.make_input(shape, stage, mode, dtype, fmt, model_cache.device, suite.seed)
    try:
        step = bench.prepare_step(model_cache.stage(model, variant, stage, dtype, fmt), x, mode)
    except common.MissingDependency as exc:
        pytest.skip(str(exc))
    group = f"{model} {stage} {bench.MODE_LABELS[mode]} {dtype} {fmt} batch {batch} (fuse_convolutions)"
    seconds = timed(step, group, model=model, stage=stage, mode=mode, dtype=dtype, memory_format=fmt, batch=batch,
                    input_shape=list(shape), variant=variant)
    if seconds:
        key = (model, stage, mode, dtype, fmt, batch, suite.resolution, tuple(shape))
        request.config._fused_resnet_cases.setdefault(key, {})[variant] = seconds
