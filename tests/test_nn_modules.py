"""The fused modules against the torch.nn / torchvision / d2l modules they replace.

On the PyTorch CPU path the fused ops run ATen's own kernels, so every result must be
bitwise the original's. Tests marked ``both`` run again through the Triton interpreter
(TRITON_INTERPRET=1), where they are compared under the fp32 tolerances of
``reference.py`` (the kernels reduce in another order).
"""
from __future__ import annotations

import copy
import functools
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv

from fused_resnet.nn import BatchNormAddReLU2d, BatchNormReLU2d, FusedBasicBlock, FusedBottleneck, FusedResidual
from fused_resnet.nn.batchnorm import plain_batchnorm
from reference import PARAM_TOLERANCES
from seed_blocks import (
    ResBlkStride,
    Residual,
    ResidualConv3x3Shortcut,
    assert_results_match,
    forward_backward,
    randomize_batchnorms,
)

# Through the Triton interpreter, max|fused - eager| / max|eager| per tensor (outputs,
# gradients, running statistics). Measured: up to ~3e-7; the fp32 parity bound of
# reference.py's per-channel sums (1e-5) leaves a margin.
INTERPRETER_TOLERANCE = PARAM_TOLERANCES[torch.float32][1]


def assert_match(actual: dict, expected: dict, triton_path: bool) -> None:
    """Bitwise on the PyTorch path; within INTERPRETER_TOLERANCE through the Triton kernels."""
    assert_results_match(actual, expected, INTERPRETER_TOLERANCE if triton_path else 0.0)


class Eager(nn.Module):
    """relu(bn(x) (+ residual_bn(r) or r)): what the fused BatchNorms must compute."""

    def __init__(self, bn: nn.BatchNorm2d, residual_bn=None, add: bool = False):
        super().__init__()
        self.bn, self.residual_bn, self.add = bn, residual_bn, add

    def forward(self, x, r=None):
        out = self.bn(x)
        if self.add:
            out = out + (r if self.residual_bn is None else self.residual_bn(r))
        return F.relu(out)


class Fused(nn.Module):
    """Calls a fused BatchNorm the way the blocks do."""

    def __init__(self, bn, residual_bn=None):
        super().__init__()
        self.bn, self.residual_bn = bn, residual_bn

    def forward(self, x, r=None):
        if r is None:
            return self.bn(x)
        if self.residual_bn is None:
            return self.bn(x, r)
        return self.bn(x, r, residual_bn=self.residual_bn)


class TwoInputs(nn.Module):
    """Feeds (x, residual) to ``inner``; the residual is a parameter so its gradient is compared."""

    def __init__(self, inner, residual):
        super().__init__()
        self.inner = inner
        self.residual = nn.Parameter(residual)

    def forward(self, x):
        return self.inner(x, self.residual)


BN_CONFIGS = {
    "default": {},
    "momentum_none": {"momentum": None},
    "no_affine": {"affine": False},
    "no_running_stats": {"track_running_stats": False},
    "eps_momentum": {"eps": 1e-3, "momentum": 0.3},
}
SHAPE = (2, 3, 4, 4)


def make_bn(config: dict, seed: int) -> nn.BatchNorm2d:
    return randomize_batchnorms(nn.BatchNorm2d(SHAPE[1], **config), seed)


def compare_steps(original: nn.Module, fused: nn.Module, training: bool, triton_path: bool, steps: int = 2):
    """Two steps (momentum=None averages over batches), each compared in full."""
    original.train(training)
    fused.train(training)
    for step in range(steps):
        x = torch.randn(SHAPE) * 2 + 0.5
        assert_match(forward_backward(fused, x, seed=step), forward_backward(original, x, seed=step), triton_path)


@pytest.mark.both
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config", BN_CONFIGS.values(), ids=BN_CONFIGS.keys())
def test_batchnorm_relu_matches_batchnorm_then_relu(config, training, triton_path):
    bn = make_bn(config, 0)
    compare_steps(Eager(bn), Fused(BatchNormReLU2d.from_batchnorm(copy.deepcopy(bn))), training, triton_path)


@pytest.mark.both
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config", BN_CONFIGS.values(), ids=BN_CONFIGS.keys())
def test_batchnorm_add_relu_matches_batchnorm_add_relu(config, training, triton_path):
    bn, residual = make_bn(config, 0), torch.randn(SHAPE)
    original = TwoInputs(Eager(bn, add=True), residual)
    fused = TwoInputs(Fused(BatchNormAddReLU2d.from_batchnorm(copy.deepcopy(bn))), residual)
    compare_steps(original, fused, training, triton_path)


# The shortcut's BatchNorm keeps its own mode and hyper-parameters (a frozen shortcut BN).
RESIDUAL_BN_CASES = {
    "same": ({}, None),
    "residual_frozen": ({"momentum": None}, False),
    "residual_no_running_stats": ({"track_running_stats": False, "eps": 1e-3}, None),
    "residual_no_affine": ({"affine": False, "momentum": 0.5}, None),
}


@pytest.mark.both
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", RESIDUAL_BN_CASES.values(), ids=RESIDUAL_BN_CASES.keys())
def test_batchnorm_add_relu_with_residual_bn_matches_two_batchnorms(case, training, triton_path):
    residual_config, residual_training = case
    bn, residual_bn, residual = make_bn({}, 0), make_bn(residual_config, 1), torch.randn(SHAPE)
    original = TwoInputs(Eager(bn, residual_bn, add=True), residual)
    fused = TwoInputs(Fused(BatchNormAddReLU2d.from_batchnorm(copy.deepcopy(bn)), copy.deepcopy(residual_bn)),
                      residual)
    original.train(training)
    fused.train(training)
    if residual_training is not None:
        original.inner.residual_bn.train(residual_training)
        fused.inner.residual_bn.train(residual_training)
    for step in range(2):
        x = torch.randn(SHAPE) * 2 + 0.5
        assert_match(forward_backward(fused, x, seed=step), forward_backward(original, x, seed=step), triton_path)


@pytest.mark.parametrize("cls", [BatchNormReLU2d, BatchNormAddReLU2d])
def test_fused_batchnorm_is_a_batchnorm2d_with_its_constructor_and_state(cls):
    kwargs = dict(eps=1e-3, momentum=None, affine=True, track_running_stats=True, dtype=torch.float64)
    fused, bn = cls(5, **kwargs), nn.BatchNorm2d(5, **kwargs)
    assert isinstance(fused, nn.BatchNorm2d)
    assert fused.state_dict().keys() == bn.state_dict().keys()
    assert all(fused.state_dict()[k].dtype == v.dtype for k, v in bn.state_dict().items())
    assert repr(fused).replace(cls.__name__, "BatchNorm2d") == repr(bn)
    fused.load_state_dict(randomize_batchnorms(bn).state_dict())
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in bn.state_dict().items())


def test_from_batchnorm_shares_parameters_buffers_and_mode():
    bn = randomize_batchnorms(nn.BatchNorm2d(4, momentum=0.2)).eval()
    fused = BatchNormReLU2d.from_batchnorm(bn)
    assert fused.weight is bn.weight and fused.bias is bn.bias
    assert fused.running_mean is bn.running_mean and fused.num_batches_tracked is bn.num_batches_tracked
    assert not fused.training and fused.momentum == 0.2
    # Own containers: registering on one does not reach the other.
    fused.register_buffer("extra", torch.zeros(1))
    assert "extra" not in bn._buffers
    with pytest.raises(TypeError, match="bn must be an nn.BatchNorm2d"):
        BatchNormReLU2d.from_batchnorm(nn.LayerNorm(4))


def test_plain_batchnorm_of_a_subclass_shares_its_state_and_computes_batchnorm2d():
    class WithSubmodule(nn.BatchNorm2d):  # timm's BatchNormAct2d without activation: same math, extra children
        def __init__(self, c):
            super().__init__(c)
            self.act = nn.Identity()

    bn = randomize_batchnorms(WithSubmodule(3))
    plain = plain_batchnorm(bn)
    assert type(plain) is nn.BatchNorm2d and plain.weight is bn.weight and plain.running_var is bn.running_var
    assert type(plain.act) is nn.Identity and list(plain.state_dict()) == list(bn.state_dict())
    x = torch.randn(SHAPE)
    assert torch.equal(plain(x), nn.BatchNorm2d.forward(copy.deepcopy(bn), x))
    with pytest.raises(TypeError, match="bn must be an nn.BatchNorm2d"):
        plain_batchnorm(nn.LayerNorm(3))


def test_fused_batchnorm_checks_input_dims_like_batchnorm2d():
    for module, args in ((BatchNormReLU2d(3), ()), (BatchNormAddReLU2d(3), (torch.randn(2, 3, 4),))):
        with pytest.raises(ValueError, match="expected 4D input"):
            module(torch.randn(2, 3, 4), *args)


def test_batchnorm_add_relu_broadcasts_like_eager():
    bn = randomize_batchnorms(nn.BatchNorm2d(3))
    fused = BatchNormAddReLU2d.from_batchnorm(copy.deepcopy(bn))
    x = torch.randn(SHAPE)
    for residual in (torch.randn(3, 1, 1), torch.randn(SHAPE, dtype=torch.float64)):
        expected = F.relu(bn(x) + residual)
        actual = fused(x, residual)
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)


def test_residual_bn_must_be_a_batchnorm_and_a_hooked_one_runs_its_forward():
    fused, x, r = BatchNormAddReLU2d(3), torch.randn(SHAPE), torch.randn(SHAPE)
    with pytest.raises(TypeError, match="residual_bn must be"):
        fused(x, r, residual_bn=nn.Identity())
    residual_bn, calls = nn.BatchNorm2d(3), []
    residual_bn.register_forward_hook(lambda *args: calls.append(1))
    reference = copy.deepcopy(fused)
    expected = F.relu(nn.BatchNorm2d.forward(reference, x) + nn.BatchNorm2d(3)(r))
    assert torch.equal(fused(x, r, residual_bn=residual_bn), expected) and calls == [1]


def test_fused_batchnorm_pickles_and_deep_copies():
    bn = BatchNormAddReLU2d.from_batchnorm(randomize_batchnorms(nn.BatchNorm2d(3))).eval()
    x, r = torch.randn(SHAPE), torch.randn(SHAPE)
    for clone in (copy.deepcopy(bn), pickle.loads(pickle.dumps(bn))):
        assert type(clone) is BatchNormAddReLU2d and torch.equal(clone(x, r), bn(x, r))


# ------------------------------------------------------------------------------ blocks


def downsample(inplanes, planes, stride, norm_layer=nn.BatchNorm2d):
    return nn.Sequential(tv.conv1x1(inplanes, planes, stride), norm_layer(planes))


def group_norm(channels):
    return nn.GroupNorm(2, channels)


# name: (torchvision class, fused class, constructor args, downsample (inplanes, planes, stride) or None)
BLOCK_CASES = {
    "basic": (tv.BasicBlock, FusedBasicBlock, dict(inplanes=8, planes=8), None),
    "basic_stride2_downsample": (tv.BasicBlock, FusedBasicBlock, dict(inplanes=8, planes=16, stride=2), (8, 16, 2)),
    "basic_norm_layer_eps": (tv.BasicBlock, FusedBasicBlock,
                             dict(inplanes=8, planes=8, norm_layer=functools.partial(nn.BatchNorm2d, eps=1e-3,
                                                                                      momentum=0.3)), None),
    "basic_group_norm": (tv.BasicBlock, FusedBasicBlock, dict(inplanes=8, planes=8, norm_layer=group_norm), None),
    "bottleneck": (tv.Bottleneck, FusedBottleneck, dict(inplanes=32, planes=8), None),
    "bottleneck_stride2_downsample": (tv.Bottleneck, FusedBottleneck, dict(inplanes=16, planes=8, stride=2),
                                      (16, 32, 2)),
    "bottleneck_resnext": (tv.Bottleneck, FusedBottleneck, dict(inplanes=32, planes=8, groups=4, base_width=8),
                           None),
    "bottleneck_dilation": (tv.Bottleneck, FusedBottleneck, dict(inplanes=32, planes=8, dilation=2), None),
    "bottleneck_group_norm": (tv.Bottleneck, FusedBottleneck,
                              dict(inplanes=16, planes=8, stride=2, norm_layer=group_norm), (16, 32, 2)),
}


def build_block_pair(case):
    """(torchvision block, fused block built by its own constructor, loaded from the former)."""
    tv_class, fused_class, kwargs, ds = case
    norm_layer = kwargs.get("norm_layer", nn.BatchNorm2d)
    make_ds = (lambda: downsample(*ds, norm_layer=norm_layer)) if ds else (lambda: None)
    original = randomize_batchnorms(tv_class(downsample=make_ds(), **kwargs))
    fused = fused_class(downsample=make_ds(), **kwargs)
    assert [(k, v.shape) for k, v in fused.state_dict().items()] == \
        [(k, v.shape) for k, v in original.state_dict().items()]
    fused.load_state_dict(original.state_dict())
    return original, fused


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", BLOCK_CASES.values(), ids=BLOCK_CASES.keys())
def test_fused_block_loads_and_matches_torchvision_block(case, training):
    original, fused = build_block_pair(case)
    in_channels = case[2]["inplanes"]
    original.train(training)
    fused.train(training)
    for step in range(2):
        x = torch.randn(2, in_channels, 8, 8)
        assert_results_match(forward_backward(fused, x, step), forward_backward(original, x, step))


@pytest.mark.both
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fused_basic_block_with_shortcut_batchnorm(training, channels_last, triton_path):
    """The dual-BN tail relu(bn2(c2) + bn_d(c_d)), through the block, on both paths."""
    original, fused = build_block_pair(BLOCK_CASES["basic_stride2_downsample"])
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    original.to(memory_format=memory_format).train(training)
    fused.to(memory_format=memory_format).train(training)
    x = torch.randn(2, 8, 6, 6).to(memory_format=memory_format)
    assert_match(forward_backward(fused, x), forward_backward(original, x), triton_path)


def test_fused_blocks_reject_what_torchvision_rejects():
    with pytest.raises(ValueError, match="BasicBlock only supports groups=1 and base_width=64"):
        FusedBasicBlock(8, 8, groups=2)
    with pytest.raises(NotImplementedError, match="Dilation > 1 not supported in BasicBlock"):
        FusedBasicBlock(8, 8, dilation=2)
    assert FusedBasicBlock.expansion == tv.BasicBlock.expansion
    assert FusedBottleneck.expansion == tv.Bottleneck.expansion


def test_fused_block_norms_are_fused_and_custom_norms_kept():
    block = FusedBottleneck(16, 4, stride=2, downsample=downsample(16, 16, 2))
    assert [type(block.bn1), type(block.bn2), type(block.bn3)] == [BatchNormReLU2d, BatchNormReLU2d,
                                                                   BatchNormAddReLU2d]
    assert type(block.downsample[1]) is nn.BatchNorm2d  # fused into bn3's op, not replaced
    assert block.conv_norm_pairs() == [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"),
                                       ("downsample.0", "downsample.1")]
    assert type(FusedBasicBlock(8, 8, norm_layer=group_norm).bn2) is nn.GroupNorm


def test_torchvision_resnet_accepts_fused_blocks():
    """``ResNet(FusedBottleneck, ...)`` loads a ``ResNet(Bottleneck, ...)`` checkpoint and matches it."""
    original = randomize_batchnorms(tv.ResNet(tv.Bottleneck, [1, 1, 1, 1], num_classes=10))
    fused = tv.ResNet(FusedBottleneck, [1, 1, 1, 1], num_classes=10)
    fused.load_state_dict(original.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert_results_match(forward_backward(fused, x), forward_backward(original, x))


def test_from_block_keeps_the_blocks_modules_parameters_and_modes():
    block = randomize_batchnorms(tv.BasicBlock(8, 16, stride=2, downsample=downsample(8, 16, 2)))
    block.bn1.eval()  # a frozen BatchNorm in a training block stays frozen
    reference = copy.deepcopy(block)
    parameters = dict(block.named_parameters())
    fused = FusedBasicBlock.from_block(block)
    assert all(p is parameters[name] for name, p in fused.named_parameters())
    assert fused.conv1 is block.conv1 and fused.downsample is block.downsample
    assert fused.stride == 2 and fused.training and not fused.bn1.training and fused.bn2.training
    assert list(fused.state_dict()) == list(block.state_dict())
    x = torch.randn(2, 8, 8, 8)
    assert_results_match(forward_backward(fused, x), forward_backward(reference, x))


def test_from_block_refuses_a_block_that_computes_something_else():
    with pytest.raises(ValueError, match="a ReLU comes before the add"):
        FusedBasicBlock.from_block(ResBlkStride(4, 8))
    with pytest.raises(ValueError, match="stages"):
        FusedBottleneck.from_block(tv.BasicBlock(8, 8))
    with pytest.raises(TypeError, match="block must be an nn.Module"):
        FusedResidual.from_block("block")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("args", [(3, 3), (3, 6, True, 2), (4, 4, True, 1)], ids=["identity", "1x1_stride2",
                                                                                 "1x1"])
def test_fused_residual_matches_the_d2l_residual(args, training):
    original = randomize_batchnorms(Residual(*args))
    fused = FusedResidual(*args)
    assert list(fused.state_dict()) == list(original.state_dict())
    fused.load_state_dict(original.state_dict())
    original.train(training)
    fused.train(training)
    x = torch.randn(2, args[0], 6, 6)
    assert_results_match(forward_backward(fused, x), forward_backward(original, x))


def test_fused_residual_from_the_3x3_shortcut_variant_keeps_its_conv3():
    original = randomize_batchnorms(ResidualConv3x3Shortcut(3, 6, use_1x1conv=True, strides=2))
    reference = copy.deepcopy(original)
    fused = FusedResidual.from_block(original)
    assert fused.conv3.kernel_size == (3, 3)
    x = torch.randn(2, 3, 6, 6)
    assert_results_match(forward_backward(fused, x), forward_backward(reference, x))
