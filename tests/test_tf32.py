"""The fused GEMMs' fp32 precision follows cuDNN's convolution setting (issue 18, item 3).

torch 2.9+ has ``torch.backends.cudnn.conv.fp32_precision``; once it is set, reading the
legacy ``torch.backends.cudnn.allow_tf32`` raises, so the GEMM path must read the new one
(where this torch has it), only for fp32 inputs, and when the op runs: a compiled graph
must not bake in the value it saw while tracing.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from fused_resnet.conv1x1_bn import ops as gemm
from fused_resnet.nn import FusedConvBottleneck
from reference import DEVICE, TRITON_PATH

NEW_API = getattr(torch.backends.cudnn, "conv", None) is not None


@contextlib.contextmanager
def cudnn_conv_precision(value: str):
    saved = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = value
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision = saved


def bottleneck_and_input(dtype=torch.float32):
    block = FusedConvBottleneck(16, 4).to(DEVICE, dtype)
    x = torch.randn(2, 16, 3, 3, device=DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return block, x


@pytest.mark.skipif(not NEW_API, reason="this torch has no torch.backends.cudnn.conv.fp32_precision")
@pytest.mark.parametrize("value,tf32", [("tf32", True), ("ieee", False)])
def test_allow_tf32_reads_the_convolution_precision(value, tf32):
    with cudnn_conv_precision(value):
        assert gemm.allow_tf32(torch.float32) is tf32
        assert gemm.allow_tf32(torch.bfloat16) is False
        assert gemm.allow_tf32(torch.float16) is False


@pytest.mark.skipif(not NEW_API, reason="this torch has no torch.backends.cudnn.conv.fp32_precision")
def test_none_inherits_from_the_cudnn_and_generic_settings():
    """'none' takes cuDNN's, then the generic setting (the getter resolves it); TF32 only on 'tf32'."""
    saved = (torch.backends.fp32_precision, torch.backends.cudnn.fp32_precision)
    try:
        with cudnn_conv_precision("none"):
            torch.backends.cudnn.fp32_precision = "tf32"
            assert gemm.allow_tf32(torch.float32)
            torch.backends.cudnn.fp32_precision = "none"
            torch.backends.fp32_precision = "ieee"
            assert not gemm.allow_tf32(torch.float32)
    finally:
        torch.backends.fp32_precision, torch.backends.cudnn.fp32_precision = saved


@pytest.mark.both
@pytest.mark.skipif(not NEW_API, reason="this torch has no torch.backends.cudnn.conv.fp32_precision")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_conv_bottleneck_runs_with_the_new_api_set(dtype):
    """Was: RuntimeError 'PyTorch is checking whether allow_tf32 is enabled for cuDNN without a
    specific operator name' on every forward, bf16 included."""
    block, x = bottleneck_and_input(dtype)
    with cudnn_conv_precision("ieee"):
        y = block(x.requires_grad_())
        y.sum().backward()
        with torch.no_grad():
            block.eval()(x)
    assert torch.isfinite(y).all() and x.grad is not None


@pytest.mark.both
@pytest.mark.skipif(not (NEW_API and TRITON_PATH), reason="the GEMMs run on the Triton path")
def test_compiled_graph_reads_the_precision_when_it_runs(monkeypatch):
    """Compiled once, called with TF32 on then off: each call's GEMMs take that call's setting."""
    seen = []
    launch = gemm.conv1x1_forward

    def spy(*args, allow_tf32, **kwargs):
        seen.append(allow_tf32)
        return launch(*args, allow_tf32=allow_tf32, **kwargs)

    monkeypatch.setattr(gemm, "conv1x1_forward", spy)
    block, x = bottleneck_and_input()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    for value in ("tf32", "ieee", "tf32"):
        with cudnn_conv_precision(value):
            seen.clear()
            y = compiled(x)
            assert seen and set(seen) == {value == "tf32"}, (value, seen)
    torch.testing.assert_close(y, block(x))
