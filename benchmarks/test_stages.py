"""Per-stage timings of torchvision ResNets: eager, fused and torch.compile, one benchmark each.

pytest-benchmark groups the variants of a case together; the end-of-run table puts them
side by side as images/s with fused's speedups (see conftest.py).
"""
from __future__ import annotations

import pytest

from fused_resnet.tools import bench, common


def test_stage(stage_case, suite, model_cache, timed, request):
    model, dtype, fmt, batch, stage, mode, variant = stage_case
    shape = common.stage_input_shapes(model, batch, suite.resolution)[stage]
    x = bench.make_input(shape, stage, mode, dtype, fmt, model_cache.device, suite.seed)
    try:
        step = bench.prepare_step(model_cache.stage(model, variant, stage, dtype, fmt), x, mode)
        if variant == "compile":
            step()  # compile before timing, and report a compiler failure as a skip
    except common.MissingDependency as exc:
        pytest.skip(str(exc))
    except Exception as exc:  # noqa: BLE001 - torch.compile's failures vary by platform
        if variant != "compile":
            raise
        pytest.skip(f"torch.compile failed: {type(exc).__name__}: {exc}"[:300])
    group = f"{model} {stage} {bench.MODE_LABELS[mode]} {dtype} {fmt} batch {batch}"
    seconds = timed(step, group, model=model, stage=stage, mode=mode, dtype=dtype, memory_format=fmt,
                    batch=batch, input_shape=list(shape), variant=variant)
    if seconds:
        key = (model, stage, mode, dtype, fmt, batch, suite.resolution, tuple(shape))
        request.config._fused_resnet_cases.setdefault(key, {})[variant] = seconds
