"""Property tests: random shapes, dtypes, layouts and settings against float64 F.batch_norm.

hypothesis is a test extra: without it this file fails to import (a broken environment,
not a reason to skip). `make gpu` does not collect it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_resnet
from fused_resnet import backend
from reference import DEVICE, assert_close, f64
from test_hardening import bn_args

SETTINGS = settings(max_examples=12 if backend.INTERPRET else 40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.both
@SETTINGS
@given(
    n=st.integers(1, 3), c=st.integers(1, 9), h=st.integers(1, 6), w=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    layout=st.sampled_from(["nchw", "nhwc", "sliced"]),
    training=st.booleans(), affine=st.booleans(), residual=st.booleans(),
)
def test_property_matches_float64_reference(n, c, h, w, dtype, layout, training, affine, residual):
    if training and n * h * w == 1:
        return
    x = torch.randn(n, c, h, w + (1 if layout == "sliced" else 0)).to(DEVICE, dtype)
    if layout == "sliced":
        x = x[..., 1:]
    elif layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    r = torch.randn(n, c, h, w).to(DEVICE, dtype) if residual else None
    args = bn_args(c)
    if not affine:
        args["weight"] = args["bias"] = None
    rm, rv = args["running_mean"].clone(), args["running_var"].clone()
    kwargs = dict(running_mean=rm, running_var=rv, weight=args["weight"], bias=args["bias"], training=training)
    y = fused_resnet.bn_add_relu(x, r, **kwargs) if residual else fused_resnet.bn_relu(x, **kwargs)
    dy = torch.randn_like(y)
    y.backward(dy)

    x64 = f64(x, True)
    pre = F.batch_norm(x64, f64(args["running_mean"]), f64(args["running_var"]), f64(args["weight"]),
                       f64(args["bias"]), training)
    if residual:
        pre = pre + f64(r)
    pre.backward(torch.where(y > 0, dy, 0).double())
    assert_close(y, torch.relu(pre), dtype, "y")
    assert_close(x.grad, x64.grad, dtype, "dx")
