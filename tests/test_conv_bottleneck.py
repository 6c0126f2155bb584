"""FusedConvBottleneck (1x1 convolutions as GEMMs with their BatchNorms fused) against
torchvision's Bottleneck: float64 parity next to eager in the same dtype, running
statistics, eval, state_dict, fall-backs, determinism and the tensors saved for backward.

Marked ``both``: on the PyTorch CPU path the block is FusedBottleneck (eager's own ops);
in the TRITON_INTERPRET=1 process the GEMM kernels run on channels_last CPU tensors.
Shapes fit no tile: 20 -> 6 -> 24 channels, a 6x6 map (M = 72 at conv1, 18 after the
stride-2 3x3 and downsample).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from fused_resnet import backend
from fused_resnet.nn.blocks import FusedBottleneck, FusedConvBottleneck
from reference import DEVICE, saved_bytes
from test_conv1x1_bn import bf16_casts_round_to_nearest, check

N, C_IN, PLANES, HW = 2, 20, 6, 6


@pytest.fixture(autouse=True)
def _bf16_rounding():
    with bf16_casts_round_to_nearest():
        yield


def make_block(downsample, seed=0) -> Bottleneck:
    """``downsample``: False (identity shortcut), True (stride 2, as layer2.0) or "stride1"
    (a 1x1 downsample of stride 1, as layer1.0)."""
    torch.manual_seed(seed)
    stride = 2 if downsample is True else 1
    inplanes = C_IN if downsample else PLANES * 4
    ds = nn.Sequential(nn.Conv2d(inplanes, PLANES * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(PLANES * 4)) \
        if downsample else None
    block = Bottleneck(inplanes, PLANES, stride=stride, downsample=ds)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    return block


def sides(downsample, dtype):
    """(fused, eager, float64) copies of one block."""
    block = make_block(downsample)
    fused = FusedConvBottleneck.from_block(copy.deepcopy(block)).to(DEVICE, dtype)
    eager = copy.deepcopy(block).to(DEVICE, dtype)
    ref = copy.deepcopy(block).double()
    for m in (fused, eager):
        m.to(memory_format=torch.channels_last)
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.float()  # parameters and statistics in fp32, as under mixed precision
    return fused, eager, ref


def inputs(downsample, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    C = C_IN if downsample else PLANES * 4
    x = torch.randn(N, C, HW, HW, generator=g).to(dtype).double()
    out_hw = HW // 2 if downsample is True else HW
    dy = torch.randn(N, PLANES * 4, out_hw, out_hw, generator=g).to(dtype).double()
    return x, dy


def run(block, x64, dy64, dtype):
    x = x64.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = block(x)
    y.backward(dy64.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last))
    grads = {"dx": x.grad, **{name: p.grad.clone() for name, p in block.named_parameters()}}
    block.zero_grad(set_to_none=True)
    return y, grads


@pytest.mark.both
@pytest.mark.parametrize("downsample", [True, "stride1", False], ids=["downsample", "downsample_stride1", "identity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_training_parity(downsample, dtype):
    """Training steps (two for the stride-2 downsample in fp32, else one): output, the
    input's and every parameter's gradient, and every running statistic, fp32 within 4x
    eager's error against float64, bf16 no worse than eager (``test_conv1x1_bn.check``).
    A stride-1 downsample takes x's gradient as one GEMM over conv1 and the downsample."""
    if backend.INTERPRET and dtype == torch.bfloat16 and downsample is not True:
        pytest.skip("interpreter time: bf16 runs the stride-2 downsample block only")
    fused, eager, ref = sides(downsample, dtype)
    for step in range(2 if (dtype == torch.float32 and downsample is True) else 1):
        x64, dy64 = inputs(downsample, dtype, step)
        y, g = run(fused, x64, dy64, dtype)
        ye, ge = run(eager, x64, dy64, dtype)
        y64, g64 = run(ref, x64, dy64, torch.float64)
        assert y.shape == y64.shape and y.is_contiguous(memory_format=torch.channels_last)
        check(f"step {step} y", y, ye, y64, dtype)
        for key in g64:
            check(f"step {step} {key}", g[key], ge[key], g64[key], dtype)
        for (name, b), (_, be), (_, b64) in zip(fused.named_buffers(), eager.named_buffers(), ref.named_buffers()):
            if name.endswith("num_batches_tracked"):
                assert int(b) == int(b64) == step + 1
            else:
                check(f"step {step} {name}", b, be, b64, dtype)


@pytest.mark.both
@pytest.mark.parametrize("downsample", [True, False], ids=["downsample", "identity"])
def test_eval_parity(downsample):
    """Eval without gradients (three GEMM kernels and cuDNN's 3x3 on the Triton path)."""
    fused, eager, ref = sides(downsample, torch.float32)
    for m in (fused, eager, ref):
        m.eval()
    x64, _ = inputs(downsample, torch.float32, 3)
    with torch.no_grad():
        x = x64.to(DEVICE, torch.float32).contiguous(memory_format=torch.channels_last)
        check("eval y", fused(x), eager(x), ref(x64), torch.float32)


@pytest.mark.both
def test_bitwise_reproducible():
    outs = []
    for _ in range(2):
        fused, _, _ = sides(True, torch.float32)
        x64, dy64 = inputs(True, torch.float32, 4)
        y, g = run(fused, x64, dy64, torch.float32)
        outs.append([y, *g.values(), *fused.buffers()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.both
def test_nchw_input_takes_the_fused_bottleneck_path():
    """An NCHW input is FusedBottleneck's forward exactly (the GEMMs need channels_last)."""
    fused, _, _ = sides(True, torch.float32)
    plain = FusedBottleneck.from_block(copy.deepcopy(fused), verify=False)
    x64, _ = inputs(True, torch.float32, 5)
    x = x64.to(DEVICE, torch.float32)
    assert torch.equal(fused(x), plain(x))


def test_same_modules_state_dict_and_torchvision_round_trip():
    block = make_block(True)
    fused = FusedConvBottleneck.from_block(block)
    assert isinstance(fused, FusedBottleneck)
    assert list(fused.state_dict()) == list(block.state_dict())
    assert all(a is b for a, b in zip(fused.parameters(), block.parameters()))
    fresh = Bottleneck(C_IN, PLANES, stride=2, downsample=copy.deepcopy(block.downsample))
    fresh.load_state_dict(fused.state_dict())
    built = FusedConvBottleneck(C_IN, PLANES, stride=2, downsample=copy.deepcopy(block.downsample))
    built.load_state_dict(block.state_dict())


@pytest.mark.both
def test_saves_no_more_than_eager():
    """Activation memory of a training step: relu(bn2(y2)) is never saved (conv3 recomputes
    it), so the block saves one activation less than torchvision's."""
    fused, eager, _ = sides(True, torch.float32)
    x64, _ = inputs(True, torch.float32, 6)
    x = x64.to(DEVICE, torch.float32).contiguous(memory_format=torch.channels_last).requires_grad_()
    fused_bytes, eager_bytes = saved_bytes(fused, x), saved_bytes(eager, x)
    assert fused_bytes <= eager_bytes
    if backend.INTERPRET:
        a2 = N * PLANES * (HW // 2) ** 2 * 4
        assert fused_bytes <= eager_bytes - a2, (fused_bytes, eager_bytes)
