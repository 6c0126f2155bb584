"""The fused ops alone (no convolution) at each stage's shape: achieved GB/s against the
device's peak memory bandwidth. On the CPU they run the ATen composite and say so."""
from __future__ import annotations

import statistics

from fused_resnet.tools import kernel_bench


def test_fused_op(kernel_case, suite, timed, request):
    model, dtype, fmt, batch, stage, op, pass_ = kernel_case
    shape = kernel_bench.kernel_shapes(model, batch, suite.resolution)[stage]
    step = kernel_bench.prepare_kernel_step(op, pass_, shape, dtype, fmt, suite.device)
    seconds = timed(step, f"fused ops {model} {stage} {dtype} {fmt} batch {batch}", model=model, stage=stage,
                    op=op, pass_=pass_, shape=list(shape), dtype=dtype, memory_format=fmt)
    if seconds:
        result = kernel_bench.kernel_result(op, pass_, stage, shape, dtype, fmt, suite.device,
                                            statistics.median(seconds))
        request.node.user_properties.append(("gb_per_s", result.bytes_per_s / 1e9))
        request.config._fused_resnet_kernels.append(result)
