"""TorchScript of a converted model: ``torch.jit.script`` and ``torch.jit.trace``.

Scripted, the fused modules and blocks run their eager sequence (``F.batch_norm``, the
add, ``torch.relu``) on every path, so a scripted converted model computes *bitwise* what
the original computes eagerly: outputs, every gradient, running statistics, in train and
eval. ``torch.jit.trace`` records the fused ops themselves (custom ops on the Triton path),
as before; traced, the model gives the converted model's own numbers.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv

import fused_resnet
from fused_resnet.export import standard_ops
from fused_resnet.nn import SyncBatchNormReLU2d, convert_sync_batchnorm
from reference import TRITON_PATH
from seed_blocks import Residual, assert_results_match, forward_backward, randomize_batchnorms

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script / trace are deprecated

MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "bottleneck_downsample": lambda: tv.Bottleneck(
        16, 4, stride=2, downsample=nn.Sequential(nn.Conv2d(16, 16, 1, 2, bias=False), nn.BatchNorm2d(16))),
    "d2l_residual": lambda: Residual(16, 8, use_1x1conv=True, strides=2),
    "d2l_residual_identity": lambda: Residual(16, 16),
    # torchvision RegNet: convert rewrites its blocks with torch.fx, the shortcut's BatchNorm
    # passed to the fused module as an argument, and a Sequential still holding that module.
    "regnet_x_400mf": lambda: torchvision.models.regnet_x_400mf(num_classes=10),
}


def pair(name):
    torch.manual_seed(0)
    original = randomize_batchnorms(MODELS[name]())
    return original, fused_resnet.convert(copy.deepcopy(original))


def example(name):
    return torch.randn(2, 3, 32, 32) if name in ("resnet18", "regnet_x_400mf") else torch.randn(2, 16, 8, 8)


@pytest.mark.parametrize("name", list(MODELS))
def test_script_is_the_eager_original_bitwise(name):
    original, converted = pair(name)
    scripted = torch.jit.script(converted)
    x = example(name)
    for training in (True, False):
        original.train(training)
        scripted.train(training)
        assert_results_match(forward_backward(scripted, x), forward_backward(original, x))
    # Scripting leaves the converted model itself as it was: still fused.
    assert any(isinstance(m, fused_resnet.BatchNormAddReLU2d) for m in converted.modules())


class SqueezeExcitation(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class SEBlock(nn.Module):
    """``relu(se(bn(conv(x))) + x)``: the add reads the SE's output, not a BatchNorm's, so
    convert's torch.fx rewrite fuses a bare ``add_relu`` (as in timm's seresnext26d_32x4d)."""

    def __init__(self, channels=8):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.se = SqueezeExcitation(channels)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.se(self.bn(self.conv(x))) + x)


@pytest.mark.both
def test_script_of_a_bare_add_relu_tail():
    """Scripted, the fused ``add_relu`` is ``torch.relu(a + b)``: outputs bitwise the eager
    converted model's; gradients bitwise the scripted original's (TorchScript's executor
    differentiates the SE's ops itself after its profiling runs, in a different order than
    eager autograd, for the unconverted model as well)."""
    torch.manual_seed(0)
    original = randomize_batchnorms(SEBlock())
    converted = fused_resnet.convert(copy.deepcopy(original))
    assert "fused_add_relu" in converted.code
    scripted, scripted_original = torch.jit.script(copy.deepcopy(converted)), torch.jit.script(original)
    x = torch.randn(2, 8, 5, 5)
    for training in (True, False, True):
        for m in (converted, scripted, scripted_original):
            m.train(training)
        result = forward_backward(scripted, x)
        assert_results_match(result, forward_backward(scripted_original, x))
        assert torch.equal(result["output"], forward_backward(converted, x)["output"])


@pytest.mark.interpreter
def test_script_on_the_triton_path_runs_the_eager_sequence():
    """Under the interpreter too the scripted block is the eager original, bitwise (the
    converted block itself runs the kernels: equal to it within fp32 tolerance)."""
    original, converted = pair("bottleneck_downsample")
    scripted = torch.jit.script(copy.deepcopy(converted))
    x = example("bottleneck_downsample")
    for training in (True, False):
        for m in (original, converted, scripted):
            m.train(training)
        expected = forward_backward(original, x)
        assert_results_match(forward_backward(scripted, x), expected)
        assert_results_match(forward_backward(converted, x), expected, tolerance=1e-5)


@pytest.mark.both
def test_trace_keeps_working():
    original, converted = pair("bottleneck_downsample")
    x = example("bottleneck_downsample")
    converted.eval()
    traced = torch.jit.trace(converted, (x,))
    graph = str(traced.inlined_graph)
    # The Triton path records the fused op's autograd Function, the CPU path ATen's sequence.
    assert ("BnAddReLUFunction" in graph) == TRITON_PATH and ("aten::batch_norm" in graph) != TRITON_PATH
    with torch.no_grad():
        torch.testing.assert_close(traced(x), converted(x), atol=0, rtol=0)
        torch.testing.assert_close(traced(x), original.eval()(x), atol=1e-5, rtol=1e-5)
    # Inside standard_ops() a trace holds ATen's ops on every path (so torch.jit.save can store it).
    with standard_ops():
        traced = torch.jit.trace(converted, (x,))
    graph = str(traced.inlined_graph)
    assert "aten::batch_norm" in graph and "BnAddReLUFunction" not in graph
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(buffer)(x), original(x), atol=0, rtol=0)


def test_scripted_sync_modules_refuse_training_and_run_eval():
    """TorchScript cannot run the collectives: a scripted fused SyncBatchNorm says so in
    training rather than silently use local statistics; in eval it is the plain module."""
    original, converted = pair("bottleneck_downsample")
    model = convert_sync_batchnorm(converted)
    assert any(isinstance(m, SyncBatchNormReLU2d) for m in model.modules())
    scripted = torch.jit.script(model)
    x = example("bottleneck_downsample")
    with pytest.raises(Exception, match="cannot synchronise statistics in training"):
        scripted.train()(x)
    with torch.no_grad():
        assert torch.equal(scripted.eval()(x), original.eval()(x))
