"""convert(model, fuse_convolutions=True) and FusedBottleneck.from_block(fuse_convolutions=True):
Bottleneck blocks become FusedConvBottleneck and the converted model computes what the
original computed (train and eval, channels_last), keeps its state_dict, and saves no more
for backward than eager.

Marked ``both``: on the PyTorch CPU path FusedConvBottleneck runs FusedBottleneck's path
(eager's ops: bitwise equal to the unconverted model); in the TRITON_INTERPRET=1 process
its 1x1 GEMMs run on channels_last CPU tensors (fp32 tolerance below). Shapes are tiny and
fit no tile: 8 -> 4 -> 16 channels, 6x6 maps.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

import fused_resnet
from fused_resnet import backend
from fused_resnet.nn.blocks import FusedBottleneck, FusedConvBottleneck
from reference import DEVICE, TRITON_PATH, saved_bytes

# fp32 bound of the GEMM path against eager fp32: different summation orders over K <= 16
# channels and the batch, through three BatchNorms; eager vs float64 is ~1e-6 here.
ATOL, RTOL = 1e-4, 1e-4


def downsample(inplanes, planes, stride):
    return nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4))


def make_model(seed=0) -> nn.Module:
    """A ResNet-50-shaped model at toy width: stem, layer1.0 (stride-1 downsample),
    layer1.1 (identity), layer2.0 (stride-2 downsample), head."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Sequential(Bottleneck(8, 4, downsample=downsample(8, 4, 1)), Bottleneck(16, 4)),
        nn.Sequential(Bottleneck(16, 4, stride=2, downsample=downsample(16, 4, 2))),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    return model.to(DEVICE).to(memory_format=torch.channels_last)


def blocks_of(model, cls):
    return [name for name, m in model.named_modules() if type(m) is cls]


def compare(actual, expected, name):
    if TRITON_PATH:
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")
    else:
        assert torch.equal(actual, expected), f"{name}: not bitwise equal on the CPU path"


def step(model, x, dy):
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(dy)
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.both
def test_blocks_become_conv_bottlenecks():
    model = make_model()
    converted = fused_resnet.convert(copy.deepcopy(model), fuse_convolutions=True)
    assert len(blocks_of(converted, FusedConvBottleneck)) == 3
    assert blocks_of(converted, FusedBottleneck) == []
    report = str(converted.fused_resnet_report)
    assert report.count("FusedConvBottleneck") == 3 and "NCHW" in report and "CPU path" in report


@pytest.mark.both
def test_default_is_unchanged():
    converted = fused_resnet.convert(make_model())
    assert blocks_of(converted, FusedConvBottleneck) == []
    assert len(blocks_of(converted, FusedBottleneck)) == 3


@pytest.mark.both
@pytest.mark.parametrize("bad", [1, None, "yes"])
def test_bad_keyword_type(bad):
    with pytest.raises(TypeError, match="fuse_convolutions"):
        fused_resnet.convert(make_model(), fuse_convolutions=bad)
    with pytest.raises(TypeError, match="fuse_convolutions"):
        FusedBottleneck.from_block(Bottleneck(16, 4), fuse_convolutions=bad)


@pytest.mark.both
def test_from_block_returns_conv_bottleneck_sharing_tensors():
    block = Bottleneck(8, 4, downsample=downsample(8, 4, 1))
    fused = FusedBottleneck.from_block(block, fuse_convolutions=True)
    assert type(fused) is FusedConvBottleneck
    assert type(FusedBottleneck.from_block(block)) is FusedBottleneck
    assert all(a is b for a, b in zip(fused.parameters(), block.parameters()))
    assert list(fused.state_dict()) == list(block.state_dict())
    # A grouped 3x3 (ResNeXt) is still accepted: only the 1x1 convolutions decide the run-time path.
    grouped = Bottleneck(16, 4, groups=2, base_width=32)
    assert type(FusedBottleneck.from_block(grouped, fuse_convolutions=True)) is FusedConvBottleneck


@pytest.mark.both
def test_train_steps_match_unconverted():
    eager = make_model()
    fused = fused_resnet.convert(copy.deepcopy(eager), fuse_convolutions=True)
    gen = torch.Generator().manual_seed(1)
    for i in range(2):
        x = torch.randn(2, 3, 6, 6, generator=gen).to(DEVICE).contiguous(memory_format=torch.channels_last)
        dy = torch.randn(2, 5, generator=gen).to(DEVICE)
        for m in (eager, fused):
            m.zero_grad(set_to_none=True)
        out_e, dx_e, grads_e = step(eager, x, dy)
        out_f, dx_f, grads_f = step(fused, x, dy)
        compare(out_f, out_e, f"step {i} output")
        compare(dx_f, dx_e, f"step {i} input gradient")
        for name, g in grads_e.items():
            compare(grads_f[name], g, f"step {i} {name}.grad")
    for (name, b_e), b_f in zip(eager.named_buffers(), fused.buffers()):
        compare(b_f.to(b_e.dtype), b_e, f"buffer {name}")


@pytest.mark.both
def test_eval_matches_unconverted():
    eager = make_model().eval()
    fused = fused_resnet.convert(copy.deepcopy(eager), fuse_convolutions=True)
    assert not fused.training
    x = torch.randn(2, 3, 6, 6).to(DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        compare(fused(x), eager(x), "eval output")


@pytest.mark.both
def test_state_dict_round_trips():
    model = make_model()
    converted = fused_resnet.convert(copy.deepcopy(model), fuse_convolutions=True)
    assert list(converted.state_dict()) == list(model.state_dict())
    fresh = make_model(seed=3)
    fresh.load_state_dict(converted.state_dict())
    for (name, a), b in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.both
def test_converted_model_saves_no_more_than_eager():
    """Activation memory of a training step, counted over the whole converted model."""
    eager = make_model()
    fused = fused_resnet.convert(copy.deepcopy(eager), fuse_convolutions=True)
    x = torch.randn(2, 3, 6, 6).to(DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_()
    fused_bytes, eager_bytes = saved_bytes(fused, x), saved_bytes(eager, x)
    path = "interpreter" if backend.INTERPRET else DEVICE
    print(f"saved for backward ({path}, fp32, batch 2, 6x6): fused {fused_bytes} B, eager {eager_bytes} B")
    assert fused_bytes <= eager_bytes
