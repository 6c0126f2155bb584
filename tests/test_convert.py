"""``convert(model)`` against the original model: torchvision ResNets, the seeds' blocks and
ResNet-18, blocks that must be left alone, and the generic torch.fx rewrite.

Every comparison deep-copies the original first (convert works in place) and runs both
on the same input. On the PyTorch CPU path the fused ops call ATen's own kernels in the
same order as eager PyTorch, so outputs, every gradient and every buffer must be
*bitwise* the original's, in fp32 and in bf16. Through the Triton interpreter (one
tiny resnet18, marked ``interpreter``) they are compared under stated tolerances.
"""
from __future__ import annotations

import copy
import functools
import io
import pickle
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import resnet as tv

import fused_resnet.nn as fnn
from fused_resnet.convert import ConversionReport, convert
from seed_blocks import (
    ResBlk,
    ResBlkStride,
    Residual,
    ReturningResBlk,
    ResidualConv3x3Shortcut,
    assert_results_match,
    forward_backward,
    randomize_batchnorms,
    residual_block,
    resnet18,
)

TORCHVISION_MODELS = ["resnet18", "resnet34", "resnet50", "resnext50_32x4d",
                      # the same Bottleneck as resnet50 at twice the width: make test-zoo's (half a minute)
                      pytest.param("wide_resnet50_2", marks=pytest.mark.zoo)]
# Blocks per model: (replaced blocks, blocks with a downsample).
BLOCK_COUNTS = {"resnet18": (8, 3), "resnet34": (16, 3), "resnet50": (16, 4), "resnext50_32x4d": (16, 4),
                "wide_resnet50_2": (16, 4)}
INPUT = (2, 3, 64, 64)
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@functools.lru_cache(maxsize=1)
def _pristine(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorms(getattr(torchvision.models, name)(weights=None))


def torchvision_pair(name, dtype=torch.float32, memory_format=torch.contiguous_format, training=True):
    """(original, converted): the same seeded weights; the original is an untouched deep copy."""
    original = copy.deepcopy(_pristine(name)).to(dtype=dtype, memory_format=memory_format).train(training)
    return original, convert(copy.deepcopy(original))


def image(shape=INPUT, dtype=torch.float32, memory_format=torch.contiguous_format, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype=dtype, memory_format=memory_format)


def assert_same_model_results(original, converted, x, steps=1):
    for step in range(steps):
        assert_results_match(forward_backward(converted, x, step), forward_backward(original, x, step))


# ---------------------------------------------------------------------- torchvision ResNets


def assert_converted_structure(name, converted):
    """Every block replaced by its twin, the stem fused, nothing skipped, the report says so."""
    blocks, downsampled = BLOCK_COUNTS[name]
    report = converted.fused_resnet_report
    assert isinstance(report, ConversionReport)
    assert len(report.replaced) == blocks and len(report.fused) == 1 and not report.skipped
    assert sum("shortcut BatchNorm fused" in entry.detail for entry in report.replaced) == downsampled
    twin = fnn.FusedBasicBlock if name in ("resnet18", "resnet34") else fnn.FusedBottleneck
    assert all(type(block) is twin for layer in (converted.layer1, converted.layer4) for block in layer)
    assert type(converted) is tv.ResNet and type(converted.bn1) is fnn.BatchNormReLU2d
    assert type(converted.relu) is nn.Identity
    # The only plain BatchNorm2d left are the shortcuts', fused into their block's last op.
    assert all(module_name.endswith("downsample.1") for module_name, m in converted.named_modules()
               if type(m) is nn.BatchNorm2d)


def train_then_eval(original, converted, dtype, memory_format, steps):
    """``steps`` SGD steps, each compared in full (output, input and parameter gradients,
    running statistics), then the state_dicts, then an eval-mode forward / backward."""
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
                  for m in (original, converted)]
    for step in range(steps):
        x = image(dtype=dtype, memory_format=memory_format, seed=step)
        assert_results_match(forward_backward(converted, x, step), forward_backward(original, x, step))
        for optimizer in optimizers:
            optimizer.step()
    expected, actual = original.state_dict(), converted.state_dict()
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key
    assert int(converted.layer1[0].bn1.num_batches_tracked) == steps
    original.eval()
    converted.eval()
    x = image(dtype=dtype, memory_format=memory_format, seed=steps)
    assert_results_match(forward_backward(converted, x), forward_backward(original, x))


@pytest.mark.parametrize("memory_format", FORMATS.values(), ids=FORMATS.keys())
@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_resnet_fp32_bitwise(name, memory_format):
    """3 optimiser steps in NCHW (1 in channels_last, which shares all but the layout)."""
    original, converted = torchvision_pair(name, memory_format=memory_format)
    assert_converted_structure(name, converted)
    steps = 3 if memory_format == torch.contiguous_format else 1
    train_then_eval(original, converted, torch.float32, memory_format, steps)


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_resnet_bf16_bitwise(name):
    original, converted = torchvision_pair(name, dtype=torch.bfloat16, memory_format=torch.channels_last)
    train_then_eval(original, converted, torch.bfloat16, torch.channels_last, steps=1)


@pytest.mark.interpreter
def _float64(results: dict) -> dict:
    return {key: t.double() if t is not None and t.is_floating_point() else t for key, t in results.items()}


def test_resnet18_through_the_triton_interpreter():
    """resnet18 with every tail on the Triton kernels, against the same model in float64
    (eager PyTorch): a training step (output, every gradient, running statistics), then
    eval. channels_last keeps the interpreter fast; 64x64 keeps 2x2 pixels in layer4 (at
    1x1 a batch of 2 gives BatchNorms of 2 values, ill-conditioned enough that eager fp32
    itself is 3e-2 off float64).

    Not against eager fp32: its rounding depends on the thread count, and a pre-activation
    within fp32 rounding of 0 can fall on either side of the ReLU. With OMP_NUM_THREADS=1,
    eager fp32 computes one element of layer2.0's last ReLU input as 0.0 where float64 has
    1.2e-6 (max 6.8): that element's gradient is dropped, and eager's input gradient is
    6.7e-3 off float64 (layer2.0.bn2.bias.grad 2.2e-2); with 2 threads it is 1.0e-5."""
    original, converted = torchvision_pair("resnet18", memory_format=torch.channels_last)
    reference = copy.deepcopy(original).double()
    x = image(memory_format=torch.channels_last)
    # fp32 error growth: a dot product of K terms is typically sqrt(K) u off (u = 2^-24; Higham's
    # rule of thumb for rounding errors that do not all line up), K <= 3*3*512 here, over ~40
    # convolutions and BatchNorms forward and backward: 40 * sqrt(4608) * 6e-8 = 1.6e-4.
    # Measured, max|fused - float64| / max|float64| over every tensor, the same at 1 and 2
    # threads: train 2.6e-5 (output 4.0e-6, input gradient 9.5e-6), eval 2.2e-6.
    tolerance = 40 * 4608 ** 0.5 * 2.0 ** -24
    assert_results_match(_float64(forward_backward(converted, x)), forward_backward(reference, x.double()),
                         tolerance=tolerance)
    reference.eval()
    converted.eval()
    assert_results_match(_float64(forward_backward(converted, x)), forward_backward(reference, x.double()),
                         tolerance=tolerance)


# ------------------------------------------------------------------------ what is kept


def test_convert_keeps_parameters_mode_device_dtype_and_memory_format():
    model = _pristine("resnet18")
    model = copy.deepcopy(model).to(dtype=torch.float64, memory_format=torch.channels_last).eval()
    parameters, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    converted = convert(model)
    assert converted is model
    assert all(p is parameters[name] for name, p in converted.named_parameters())
    assert all(b is buffers[name] for name, b in converted.named_buffers())
    assert not any(m.training for m in converted.modules())
    assert converted.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in converted.parameters())


def test_convert_not_inplace_leaves_the_original_untouched():
    model = copy.deepcopy(_pristine("resnet18"))
    converted = convert(model, inplace=False)
    assert converted is not model and type(model.layer1[0]) is tv.BasicBlock
    assert not hasattr(model, "fused_resnet_report")
    assert type(converted.layer1[0]) is fnn.FusedBasicBlock


def test_convert_is_idempotent():
    original, converted = torchvision_pair("resnet18")
    again = convert(converted)
    assert again is converted and len(again.fused_resnet_report) == 0
    assert_same_model_results(original, again, image())


def test_verbose_prints_the_report(capsys):
    model = convert(copy.deepcopy(_pristine("resnet18")), verbose=True)
    printed = capsys.readouterr().out
    assert printed.strip() == str(model.fused_resnet_report).strip()
    assert "fused-resnet: 8 replaced, 1 fused" in printed
    assert "layer2.0  replaced  BasicBlock -> FusedBasicBlock (shortcut BatchNorm fused)" in printed


def test_state_dict_round_trips_both_ways():
    original, converted = torchvision_pair("resnet50", training=False)
    # original -> converted: a torchvision checkpoint loads unchanged (strict).
    fresh_converted = convert(torchvision.models.resnet50(weights=None).eval())
    fresh_converted.load_state_dict(original.state_dict())
    # converted -> original.
    fresh_original = torchvision.models.resnet50(weights=None).eval()
    fresh_original.load_state_dict(converted.state_dict())
    x = image()
    with torch.no_grad():
        expected = original(x)
        assert torch.equal(fresh_converted(x), expected) and torch.equal(fresh_original(x), expected)


def test_deepcopy_and_pickle_of_a_converted_model():
    original, converted = torchvision_pair("resnet18", training=False)
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    clones = [copy.deepcopy(converted), pickle.loads(pickle.dumps(converted)), torch.load(buffer, weights_only=False)]
    x = image()
    with torch.no_grad():
        expected = original(x)
        for clone in clones:
            assert type(clone.layer2[0]) is fnn.FusedBasicBlock
            assert len(clone.fused_resnet_report) == len(converted.fused_resnet_report)
            assert torch.equal(clone(x), expected)


# ---------------------------------------------------------------------------- the seeds


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("block", [
    lambda: Residual(3, 3),
    lambda: Residual(3, 6, use_1x1conv=True, strides=2),
    lambda: ResidualConv3x3Shortcut(3, 6, use_1x1conv=True, strides=2),
    lambda: ResidualConv3x3Shortcut(6, 6),
    lambda: residual_block(3, 6),
], ids=["residual", "residual_1x1_stride2", "residual_3x3_shortcut_stride2", "residual_relu_module", "note002"])
def test_seed_blocks_become_fused_residual(block, training):
    original = randomize_batchnorms(block()).train(training)
    converted = convert(copy.deepcopy(original))
    assert type(converted) is fnn.FusedResidual
    assert converted.fused_resnet_report.entry("").action == "replaced"
    assert list(converted.state_dict()) == list(original.state_dict())
    assert_same_model_results(original, converted, torch.randn(2, original.conv1.in_channels, 6, 6))


@pytest.mark.parametrize("residual,size", [(Residual, 96), (Residual, 224), (ResidualConv3x3Shortcut, 96)],
                         ids=["note001-96", "note001-224", "note003-96"])
def test_seed_resnet18(residual, size):
    """The 1-channel ResNet-18 of the notes, 10 classes, on the notes' 1x1xHxW input:
    two training steps, then eval."""
    torch.manual_seed(0)
    original = randomize_batchnorms(resnet18(residual))
    converted = convert(copy.deepcopy(original))
    report = converted.fused_resnet_report
    assert len(report.replaced) == 8 and report.entry("0.1").action == "fused" and not report.skipped
    assert type(converted[0][1]) is fnn.BatchNormReLU2d and type(converted[0][2]) is nn.Identity
    x = torch.rand(1, 1, size, size)
    assert_same_model_results(original, converted, x, steps=2)
    original.eval()
    converted.eval()
    with torch.no_grad():
        out = converted(x)
        assert out.shape == (1, 10) and torch.equal(out, original(x))


# ----------------------------------------------------------------- blocks left alone


class PreActBlock(nn.Module):
    """Pre-activation: relu(bn) before each conv, and nothing after the add."""

    def __init__(self, channels):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + x


class BatchNormUsedTwice(tv.BasicBlock):
    """bn2's output feeds the add and the shortcut: it cannot be fused away."""

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x + out.mean()))


class DataDependentBlock(tv.BasicBlock):
    """Python control flow on a tensor value: torch.fx cannot trace it."""

    def forward(self, x):
        out = super().forward(x)
        return out if out.sum() > 0 else -out


class TrainingBranchBlock(tv.BasicBlock):
    """A forward that branches on self.training: a traced graph would freeze one branch."""

    def forward(self, x):
        out = super().forward(x)
        return F.dropout(out, 0.5, self.training)


class HookedBlock(tv.BasicBlock):
    pass


class InplaceIntoInputBlock(tv.BasicBlock):
    """``x += out`` writes into the caller's tensor: a fused block would not."""

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        x += out
        return self.relu(x)


def hooked_block(channels):
    block = HookedBlock(channels, channels)
    block.register_forward_hook(lambda module, args, out: None)
    return block


# Blocks whose forward cannot be proven to compute what a rewrite would: nothing in them changes.
LEFT_ALONE = {
    "relu_before_add": (lambda: ResBlkStride(8, 8), "a ReLU comes before the add"),
    "no_return": (lambda: ResBlk(8, 8), "returns None"),
    "untraceable": (lambda: DataDependentBlock(8, 8), "torch.fx cannot trace"),
    "training_branch": (lambda: TrainingBranchBlock(8, 8), "depends on self.training"),
    "hooks": (lambda: hooked_block(8), "has hooks"),
}
# Blocks with one unprovable tail: it stays (the BatchNorm named keeps its class, the report says
# why), the provable pairs around it are fused.
PARTLY_FUSED = {
    "pre_activation": (lambda: PreActBlock(8), None, None),
    "bn_used_twice": (lambda: BatchNormUsedTwice(8, 8), "bn2", "its output is read 2 times"),
    "inplace_into_input": (lambda: InplaceIntoInputBlock(8, 8), "bn2", "writes in place"),
}


class Holder(nn.Module):
    """A stem (fused) before the block under test, and a head after it."""

    def __init__(self, block):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.block = block

    def forward(self, x):
        out = self.block(self.relu(self.bn(self.conv(x))))
        return out if out is None else out.mean((2, 3))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", LEFT_ALONE.values(), ids=LEFT_ALONE.keys())
def test_blocks_that_must_be_left_alone(case, training, capsys):
    make_block, reason = case
    torch.manual_seed(0)
    original = randomize_batchnorms(Holder(make_block())).train(training)
    converted = convert(copy.deepcopy(original))
    block_type = type(original.block)
    assert type(converted.block) is block_type
    assert [type(m) for m in converted.block.modules()] == [type(m) for m in original.block.modules()]
    assert type(converted.bn) is fnn.BatchNormReLU2d  # the rest of the model is still converted
    entries = [e for e in converted.fused_resnet_report.skipped if e.name.startswith("block")]
    assert entries and all(reason in e.detail for e in entries), [str(e) for e in entries]
    capsys.readouterr()  # ResBlkStride prints while traced: nothing of it may leak
    assert_same_model_results(original, converted, torch.randn(2, 3, 6, 6))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", PARTLY_FUSED.values(), ids=PARTLY_FUSED.keys())
def test_unprovable_tails_stay_and_the_rest_is_fused(case, training):
    make_block, trapped, reason = case
    torch.manual_seed(0)
    original = randomize_batchnorms(Holder(make_block())).train(training)
    converted = convert(copy.deepcopy(original))
    report = converted.fused_resnet_report
    assert not isinstance(converted.block, fnn.FusedBasicBlock)
    assert isinstance(converted.block, torch.fx.GraphModule)  # its forward is rewritten around the trap
    assert type(converted.block.bn1) is fnn.BatchNormReLU2d
    assert list(converted.state_dict()) == list(original.state_dict())
    if trapped is None:
        assert type(converted.block.bn2) is fnn.BatchNormReLU2d and not report.skipped
    else:
        assert type(converted.block.get_submodule(trapped)) is nn.BatchNorm2d
        entry = report.entry(f"block.{trapped}")
        assert entry.action == "skipped" and reason in entry.detail, str(entry)
    x = torch.randn(2, 3, 6, 6)
    if isinstance(original.block, InplaceIntoInputBlock):
        # `x += out` writes into the stem's output: the rewritten forward must replay that write.
        with torch.no_grad():
            assert torch.equal(converted(x.clone()), original(x.clone()))
            stems = [torch.relu(m.bn(m.conv(x))) if m is original else m.bn(m.conv(x)) for m in (original, converted)]
            block_inputs = [s.clone() for s in stems]
            original.block(block_inputs[0])
            converted.block(block_inputs[1])
            assert torch.equal(block_inputs[0], block_inputs[1]) and not torch.equal(block_inputs[0], stems[0])
        return
    assert_same_model_results(original, converted, x)


def test_tracing_prints_nothing(capsys):
    convert(Holder(ResBlkStride(8, 8)))
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------- generic torch.fx rewrite


class TimmStyleBlock(nn.Module):
    """timm's BasicBlock layout: Identity drop_block / aa, separate act modules, None se."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.drop_block = nn.Identity()
        self.act1 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = None
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = None

    def forward(self, x):
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.drop_block(x)
        x = self.act1(x)
        x = self.aa(x)
        x = self.conv2(x)
        x = self.bn2(x)
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act2(x)
        return x


class FunctionalStem(nn.Module):
    """A stem whose ReLU is functional: its forward is rewritten, not its modules swapped."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head_bn = nn.BatchNorm2d(8)

    def forward(self, x):
        stem = F.relu(self.bn(self.conv(x)), inplace=True)
        return self.head_bn(stem).mean((2, 3))  # head_bn feeds no ReLU: it stays


def test_same_block_under_other_names_is_rewritten_with_fx():
    torch.manual_seed(0)
    original = randomize_batchnorms(nn.Sequential(ReturningResBlk(3, 8), ReturningResBlk(8, 8)))
    converted = convert(copy.deepcopy(original))
    assert all(isinstance(block, torch.fx.GraphModule) for block in converted)
    assert type(converted[0].bn1) is fnn.BatchNormReLU2d and type(converted[0].bn2) is fnn.BatchNormAddReLU2d
    assert type(converted[0].extra[1]) is nn.BatchNorm2d
    assert list(converted.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3, 6, 6)
    assert_same_model_results(original, converted, x)
    clone = pickle.loads(pickle.dumps(converted))
    assert list(clone.state_dict()) == list(original.state_dict())
    assert_same_model_results(original, clone, x)


def test_timm_style_block_becomes_fused_basic_block():
    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
    original = randomize_batchnorms(nn.Sequential(TimmStyleBlock(4, 8, 2, ds), TimmStyleBlock(8, 8)))
    converted = convert(copy.deepcopy(original))
    assert [type(block) for block in converted] == [fnn.FusedBasicBlock, fnn.FusedBasicBlock]
    assert_same_model_results(original, converted, torch.randn(2, 4, 8, 8))


def test_functional_relu_stem_is_rewritten_with_fx():
    original = randomize_batchnorms(FunctionalStem())
    converted = convert(copy.deepcopy(original))
    assert isinstance(converted, torch.fx.GraphModule) and type(converted.bn) is fnn.BatchNormReLU2d
    assert type(converted.head_bn) is nn.BatchNorm2d
    assert "not a ReLU" in converted.fused_resnet_report.entry("head_bn").detail
    assert list(converted.state_dict()) == list(original.state_dict())
    for training in (True, False):
        original.train(training)
        converted.train(training)
        assert_same_model_results(original, converted, torch.randn(2, 3, 5, 5))


def test_shared_batchnorm_is_left_alone():
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), bn, nn.ReLU(), nn.Conv2d(3, 3, 1), bn, nn.ReLU())
    converted = convert(copy.deepcopy(model))
    assert [type(m) for m in converted] == [type(m) for m in model]
    assert "more than one place" in converted.fused_resnet_report.entry("1").detail


class ReachesIntoChild(nn.Module):
    """Calls ``seq[1]`` (a BatchNorm) directly as well as ``seq`` as a whole."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())

    def forward(self, x):
        return self.seq[1](x) + self.seq(x)


class UnregisteredModule(nn.Module):
    """Keeps its ReLU in a Python list: torch.fx cannot trace the call."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.hidden = [nn.ReLU()]

    def forward(self, x):
        return self.hidden[0](self.bn(x))


class WritesAttribute(nn.Module):
    """Stores its input: tracing would store a proxy."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        self.last_input = x
        return F.relu(self.bn(x))


class AppendsToAList(nn.Module):
    """Keeps what its BatchNorm computed: a fused BatchNorm would hand it the ReLU's output."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.seen = []

    def forward(self, x):
        y = self.bn(x)
        self.seen.append(y)
        return F.relu(y)


class NoGradInside(nn.Module):
    """A grad-mode switch torch.fx does not record: a rewritten forward would lose it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        with torch.no_grad():
            y = self.conv(x)
        return F.relu(self.bn(y))


@pytest.mark.parametrize("make,bn_name,reason", [
    (ReachesIntoChild, "seq.1", "more than one place"),
    (UnregisteredModule, "bn", "torch.fx cannot trace"),
    (WritesAttribute, "bn", "writes module attributes"),
    (AppendsToAList, "bn", "writes module attributes"),
    (NoGradInside, "bn", "changes the grad mode"),
], ids=["reaches_into_child", "unregistered_module", "writes_attribute", "appends_to_a_list", "no_grad_inside"])
def test_batchnorm_next_to_a_relu_left_alone_when_unprovable(make, bn_name, reason):
    original = randomize_batchnorms(make())
    converted = convert(copy.deepcopy(original))
    assert type(converted.get_submodule(bn_name)) is nn.BatchNorm2d
    entry = converted.fused_resnet_report.entry(bn_name)
    assert entry.action == "skipped" and reason in entry.detail, entry
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(converted(x), original(x))
    assert not hasattr(converted, "last_input") or isinstance(converted.last_input, torch.Tensor)


def test_convert_rejects_a_non_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        convert(lambda x: x)


class _HookedIdentityBlock(nn.Module):
    """A torchvision-named block with an nn.Identity slot (timm's drop_block) on its main path."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.drop_block = nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = None

    def forward(self, x):
        out = self.relu(self.drop_block(self.bn1(self.conv1(x))))
        return self.relu(self.bn2(self.conv2(out)) + x)


class _UnusedDownsampleBlock(nn.Module):
    """Registers a downsample that its forward leaves unused (use_proj=False)."""

    def __init__(self, c=4, use_proj=False):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.downsample = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.use_proj = use_proj

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (self.downsample(x) if self.use_proj else x))


def test_hooked_identity_on_the_main_path_keeps_its_hook():
    """A hook on an nn.Identity between BatchNorm and ReLU must still run and still count."""
    calls = []
    original = _HookedIdentityBlock()
    original.drop_block.register_forward_hook(lambda module, args, out: (calls.append(1), out + 1.0)[1])
    converted = convert(copy.deepcopy(original))
    x = image((2, 4, 6, 6))
    expected = original(x)
    calls.clear()
    assert torch.equal(converted(x), expected) and calls == [1]


def test_unused_downsample_is_not_applied_by_a_twin():
    original = _UnusedDownsampleBlock()
    converted = convert(copy.deepcopy(original))
    assert not isinstance(converted, fnn.FusedBasicBlock)
    x = image((2, 4, 6, 6))
    assert torch.equal(converted(x), original(x))
    assert int(converted.downsample[1].num_batches_tracked) == 0
    with pytest.raises(ValueError):
        fnn.FusedBasicBlock.from_block(_UnusedDownsampleBlock())


# -------------------------------------------------- tails across module boundaries (issue 10)


class ConvLayer(nn.Module):
    """transformers' ResNetConvLayer: conv, BatchNorm, activation (nn.Identity for a block's last)."""

    def __init__(self, cin, cout, act=True):
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.normalization = nn.BatchNorm2d(cout)
        self.activation = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        return self.activation(self.normalization(self.convolution(x)))


class ShortCut(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, 1, bias=False)
        self.normalization = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.normalization(self.convolution(x))


class CrossModuleBlock(nn.Module):
    """transformers' ResNetBasicLayer: the last BatchNorm in a child's child, the add and ReLU here."""

    def __init__(self, cin, cout):
        super().__init__()
        self.shortcut = ShortCut(cin, cout) if cin != cout else nn.Identity()
        self.layer = nn.Sequential(ConvLayer(cin, cout), ConvLayer(cout, cout, act=False))
        self.activation = nn.ReLU()

    def forward(self, hidden_state):
        residual = hidden_state
        hidden_state = self.layer(hidden_state)
        residual = self.shortcut(residual)
        hidden_state += residual
        return self.activation(hidden_state)


class RegNetLikeBlock(nn.Module):
    """torchvision's ResBottleneckBlock: ``activation(x + f(x))``, f's last BatchNorm in a Sequential."""

    def __init__(self, cin, cout):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)) if cin != cout else None
        self.f = nn.Sequential(OrderedDict(
            a=nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)),
            c=nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))))
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


class Gate(nn.Module):
    """A squeeze-excitation gate: reads its input twice."""

    def forward(self, x):
        return x * torch.sigmoid(x.mean((2, 3), keepdim=True))


class GatedBlock(nn.Module):
    """timm's SE Bottleneck: a gate between the last BatchNorm and the add."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.act1 = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.se = Gate()
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
                           if cin != cout else None)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.se(self.bn2(self.conv2(x)))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act2(x)


class DropPathLike(nn.Module):
    """timm's DropPath: a no-op at probability 0, in train and eval."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        return F.dropout(x, self.p, True)


class Res2NetLike(nn.Module):
    """timm's Bottle2neck: BatchNorms in a ModuleList used in a loop, one ReLU module shared by all."""

    def __init__(self, c=8, scale=2):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c * scale, 1, bias=False), nn.BatchNorm2d(c * scale)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(scale))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(scale))
        self.conv3, self.bn3 = nn.Conv2d(c * scale, c, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.width = c

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        spx = torch.split(out, self.width, 1)
        spo = []
        sp = spx[0]  # unused, as timm's
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = spx[i] if i == 0 else sp + spx[i]
            spo.append(self.relu(bn(conv(sp))))
        out = self.bn3(self.conv3(torch.cat(spo, 1)))
        out += x
        return self.relu(out)


def _converted_pair(make, shape, training=True):
    torch.manual_seed(0)
    original = randomize_batchnorms(make()).train(training)
    model = copy.deepcopy(original)
    parameters = dict(model.named_parameters())
    converted = convert(model)
    # The same Parameter objects, the same names and state_dict keys.
    assert all(p is parameters[name] for name, p in converted.named_parameters())
    assert [n for n, _ in converted.named_modules()] == [n for n, _ in original.named_modules()]
    assert list(converted.state_dict()) == list(original.state_dict())
    return original, converted, image(shape)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels", [(4, 8), (8, 8)], ids=["shortcut_bn", "identity"])
def test_tail_across_module_boundaries_transformers_style(channels, training):
    original, converted, x = _converted_pair(lambda: nn.Sequential(CrossModuleBlock(*channels)), (2, channels[0], 6, 6),
                                             training)
    block = converted[0]
    assert isinstance(block, torch.fx.GraphModule) and type(original[0]).__name__ == type(block).__name__
    assert type(block.layer[0].normalization) is fnn.BatchNormReLU2d and type(block.layer[0].activation) is nn.Identity
    assert type(block.layer[1].normalization) is fnn.BatchNormAddReLU2d
    if channels[0] != channels[1]:  # the shortcut's BatchNorm is fused into the same op, and stays a BatchNorm2d
        assert type(block.shortcut.normalization) is nn.BatchNorm2d
        assert "with shortcut BatchNorm 'shortcut.normalization'" in converted.fused_resnet_report.entry("0").detail
    assert not converted.fused_resnet_report.skipped
    assert_same_model_results(original, converted, x, steps=2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels", [(4, 8), (8, 8)], ids=["proj", "identity"])
def test_tail_across_module_boundaries_torchvision_regnet_style(channels, training):
    original, converted, x = _converted_pair(lambda: RegNetLikeBlock(*channels), (2, channels[0], 6, 6), training)
    assert isinstance(converted, torch.fx.GraphModule)  # the root's own forward holds the add
    assert type(converted.f.a[1]) is fnn.BatchNormReLU2d and type(converted.f.c[1]) is fnn.BatchNormAddReLU2d
    assert channels[0] == channels[1] or type(converted.proj[1]) is nn.BatchNorm2d
    assert not converted.fused_resnet_report.skipped
    assert_same_model_results(original, converted, x, steps=2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels", [(4, 8), (8, 8)], ids=["shortcut_bn_is_the_fused_one", "add_relu"])
def test_gate_between_the_batchnorm_and_the_add(channels, training):
    original, converted, x = _converted_pair(lambda: nn.Sequential(GatedBlock(*channels)), (2, channels[0], 6, 6),
                                             training)
    block, report = converted[0], converted.fused_resnet_report
    assert type(block.bn1) is fnn.BatchNormReLU2d
    assert type(block.bn2) is nn.BatchNorm2d and "read 2 times" in report.entry("0.bn2").detail
    if block.downsample is not None:  # the shortcut's BatchNorm takes the gate's output as its residual
        assert type(block.downsample[1]) is fnn.BatchNormAddReLU2d
    else:
        assert "add_relu" in report.entry("0").detail
    assert_same_model_results(original, converted, x, steps=2)


class TailVariants(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + x)`` written each way a forward writes it."""

    def __init__(self, add, relu, between):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.between = between
        self.add, self.relu_kind = add, relu

    def apply_relu(self, t):
        return {"module": self.relu, "relu_": torch.relu_, "F.relu_inplace": lambda v: F.relu(v, inplace=True),
                "method": lambda v: v.relu(), "F.relu": F.relu}[self.relu_kind](t)

    def forward(self, x):
        out = self.apply_relu(self.between(self.bn1(self.conv1(x))))
        out = self.between(self.bn2(self.conv2(out)))
        if self.add == "iadd":
            out += x
        elif self.add == "add_":
            out = out.add_(x)
        elif self.add == "torch.add":
            out = torch.add(x, out)
        else:
            out = x + out
        return self.apply_relu(out)


@pytest.mark.parametrize("between", [nn.Identity, lambda: nn.Dropout(0.0), DropPathLike],
                         ids=["identity", "dropout0", "droppath0"])
@pytest.mark.parametrize("add,relu", [("iadd", "module"), ("add_", "relu_"), ("torch.add", "F.relu_inplace"),
                                      ("operator", "method"), ("iadd", "F.relu")])
def test_every_way_of_writing_the_tail(add, relu, between):
    for training in (True, False):
        original, converted, x = _converted_pair(lambda: TailVariants(add, relu, between()), (2, 4, 5, 5), training)
        assert type(converted.bn1) is fnn.BatchNormReLU2d and type(converted.bn2) is fnn.BatchNormAddReLU2d, \
            str(converted.fused_resnet_report)
        assert_same_model_results(original, converted, x)


def test_dropout_with_a_probability_is_not_a_no_op():
    original, converted, x = _converted_pair(lambda: TailVariants("iadd", "module", nn.Dropout(0.5)), (2, 4, 5, 5))
    assert type(converted.bn1) is nn.BatchNorm2d and type(converted.bn2) is nn.BatchNorm2d
    assert "Dropout" in converted.fused_resnet_report.entry("bn1").detail
    assert_same_model_results(original, converted, x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorms_in_a_module_list_loop_with_a_shared_relu(training):
    original, converted, x = _converted_pair(Res2NetLike, (2, 8, 5, 5), training)
    assert isinstance(converted, torch.fx.GraphModule)
    assert type(converted.bn1) is fnn.BatchNormReLU2d and all(type(bn) is fnn.BatchNormReLU2d for bn in converted.bns)
    assert type(converted.bn3) is fnn.BatchNormAddReLU2d and type(converted.relu) is nn.ReLU
    assert not converted.fused_resnet_report.skipped
    assert_same_model_results(original, converted, x, steps=2)


class SumReadTwice(nn.Module):
    """The add's output feeds the ReLU and the return: the ReLU's input is used elsewhere."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        s = self.bn(self.conv(x)) + x
        return F.relu(s) + s


class InputChangesBeforeTheAdd(nn.Module):
    """The BatchNorm's input is written in place after the BatchNorm reads it and before the add:
    a BatchNorm moved to the add would read the new values."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.inplace_relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv(x)
        b = self.bn(y)
        z = self.inplace_relu(y)
        return F.relu(b + z)


@pytest.mark.parametrize("make,reason", [
    (SumReadTwice, "is read 2 times"),
    (InputChangesBeforeTheAdd, "could change before the moved BatchNorm reads it"),
], ids=["sum_read_twice", "input_changes_before_the_add"])
def test_tails_that_must_stay_unfused(make, reason):
    for training in (True, False):
        original, converted, x = _converted_pair(make, (2, 4, 5, 5), training)
        assert type(converted.bn) is nn.BatchNorm2d
        assert reason in converted.fused_resnet_report.entry("bn").detail, str(converted.fused_resnet_report)
        if make is InputChangesBeforeTheAdd:  # its in-place write breaks autograd: compare forwards
            with torch.no_grad():
                assert torch.equal(converted(x), original(x))
            continue
        assert_same_model_results(original, converted, x)


class ScaledStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x, scale):
        return F.relu(self.bn(self.conv(x))) * scale


class CallsWithAConstant(nn.Module):
    """Calls its child with a Python number: the child's own trace (a placeholder for ``scale``) is
    not what this call computes, so the rewrite happens here, with the child inlined."""

    def __init__(self):
        super().__init__()
        self.stem = ScaledStem()

    def forward(self, x):
        return self.stem(x, 2.0)


def test_a_child_called_with_python_values_is_rewritten_in_its_caller():
    original, converted, x = _converted_pair(CallsWithAConstant, (2, 3, 5, 5))
    assert isinstance(converted, torch.fx.GraphModule) and type(converted.stem) is ScaledStem
    assert type(converted.stem.bn) is fnn.BatchNormReLU2d
    assert_same_model_results(original, converted, x)


def test_a_rewritten_forward_keeps_an_inplace_add_after_pickling():
    """An unfused ``x += out`` into the block's input stays in place in the GraphModule, and after
    a pickle round trip (which re-traces the generated code)."""
    original, converted, x = _converted_pair(lambda: InplaceIntoInputBlock(4, 4), (2, 4, 5, 5))
    assert isinstance(converted, torch.fx.GraphModule)
    results = []
    with torch.no_grad():
        for model in (original, converted, pickle.loads(pickle.dumps(converted))):
            given = x.clone()
            results.append((model(given), given))
    assert not torch.equal(results[0][1], x)  # the block wrote into its input
    for out, given in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(given, results[0][1])


def test_fold_bn_after_a_cross_module_rewrite():
    from fused_resnet.fold_bn import fold_bn

    torch.manual_seed(0)
    original = randomize_batchnorms(nn.Sequential(CrossModuleBlock(4, 8), CrossModuleBlock(8, 8))).double().eval()
    folded = fold_bn(copy.deepcopy(original))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules()), str(
        folded.fused_resnet_report)
    x = image((2, 4, 6, 6)).double()
    with torch.no_grad():
        expected, actual = original(x), folded(x)
    assert (actual - expected).abs().max() <= 1e-12 * expected.abs().max()


# ------------------------------------------------------------------------ timm's BatchNormAct2d


def _norm_act(**kwargs):
    from timm.layers import norm_act
    return norm_act.BatchNormAct2d(4, **kwargs)


class NormActBlock(nn.Module):
    """timm's ConvNormAct stages: BatchNormAct2d with a ReLU, then one without activation, add, ReLU."""

    def __init__(self, first_act=nn.ReLU):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), _norm_act(act_layer=first_act)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), _norm_act(apply_act=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn2(self.conv2(self.bn1(self.conv1(x)))) + x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_timm_batchnorm_act(training):
    original, converted, x = _converted_pair(NormActBlock, (2, 4, 5, 5), training)
    assert type(converted.bn1) is fnn.BatchNormReLU2d and type(converted.bn2) is fnn.BatchNormAddReLU2d
    assert type(converted.bn1.act) is nn.ReLU  # still registered: the module tree is the original's
    assert converted.fused_resnet_report.entry("bn1").detail.startswith("BatchNormAct2d -> BatchNormReLU2d")
    assert_same_model_results(original, converted, x, steps=2)


def test_timm_batchnorm_act_with_another_activation_is_left_and_says_why():
    original, converted, x = _converted_pair(lambda: NormActBlock(first_act=nn.SiLU), (2, 4, 5, 5))
    assert type(converted.bn1).__name__ == "BatchNormAct2d"
    assert "its activation is SiLU, not a ReLU" in converted.fused_resnet_report.entry("bn1").detail
    assert type(converted.bn2) is fnn.BatchNormAddReLU2d
    assert_same_model_results(original, converted, x)


@pytest.mark.parametrize("memory_format", FORMATS.values(), ids=FORMATS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cross_module_rewrites_keep_dtype_and_memory_format(dtype, memory_format):
    def make():
        return nn.Sequential(CrossModuleBlock(4, 8), RegNetLikeBlock(8, 8), GatedBlock(8, 8), Res2NetLike(8))

    torch.manual_seed(0)
    original = randomize_batchnorms(make()).to(dtype=dtype, memory_format=memory_format)
    converted = convert(copy.deepcopy(original))
    assert all(p.dtype == dtype for p in converted.parameters())
    x = image((2, 4, 6, 6), dtype=dtype, memory_format=memory_format)
    assert_same_model_results(original, converted, x)
    with torch.no_grad():
        assert converted.eval()(x).is_contiguous(memory_format=memory_format)


def test_cross_module_rewrites_compile_without_graph_breaks():
    torch.manual_seed(0)
    converted = convert(randomize_batchnorms(nn.Sequential(CrossModuleBlock(4, 8), RegNetLikeBlock(8, 8),
                                                           GatedBlock(8, 8)))).eval()
    x = image((2, 4, 6, 6))
    compiled = torch.compile(converted, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), converted(x))
