"""``fold_bn(model)`` against the eval-mode original.

Folding changes the arithmetic (the BatchNorm's scale is in the weight, its shift in the
bias), so results are compared relative to the output's magnitude: in float64, where
folding is exact to rounding (measured: ~3e-15 of max|y|), and in fp32, where the
folded model is as close to the original as the original is to float64 (measured:
~1.5e-6 of max|y| for resnet50, the same as fp32-original vs float64).
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn

import fused_resnet.nn as fnn
from fused_resnet.fold_bn import FoldedBatchNormAddReLU, FoldedBatchNormReLU, fold_bn
from seed_blocks import Residual, ReturningResBlk, randomize_batchnorms, resnet18

# Largest |folded - original| allowed, as a fraction of max |original output|.
RELATIVE_TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}


def assert_folded_matches(original, folded, x):
    with torch.no_grad():
        expected, actual = original(x), folded(x)
    scale = expected.abs().max().item()
    difference = (actual - expected).abs().max().item()
    assert difference <= RELATIVE_TOLERANCE[x.dtype] * scale, \
        f"folded differs by {difference:.3g} (max |y| {scale:.3g}, {x.dtype})"


def eval_model(make, dtype=torch.float64, memory_format=torch.contiguous_format):
    torch.manual_seed(0)
    return randomize_batchnorms(make()).to(dtype=dtype, memory_format=memory_format).eval()


@pytest.mark.parametrize("name,blocks", [("resnet18", 8), ("resnet50", 16)])
def test_fold_bn_torchvision_float64(name, blocks):
    original = eval_model(getattr(torchvision.models, name))
    folded = fold_bn(copy.deepcopy(original))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    report = folded.fused_resnet_report
    assert len(report.folded) == blocks + 1 and not report.skipped
    assert type(folded.bn1) is FoldedBatchNormReLU
    block = folded.layer2[0]
    assert type(block.bn2 if name == "resnet18" else block.bn3) is FoldedBatchNormAddReLU
    assert type(block.downsample[1]) is nn.Identity and block.downsample[0].bias is not None
    assert not any(m.training for m in folded.modules())
    assert_folded_matches(original, folded, torch.randn(2, 3, 64, 64, dtype=torch.float64))


def test_fold_bn_fp32_channels_last():
    original = eval_model(torchvision.models.resnet50, torch.float32, torch.channels_last)
    folded = fold_bn(copy.deepcopy(original))
    assert folded.layer1[0].conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(p.dtype == torch.float32 for p in folded.parameters())
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    assert_folded_matches(original, folded, x)


def test_fold_bn_seed_resnet18():
    original = eval_model(resnet18)
    folded = fold_bn(copy.deepcopy(original))
    assert type(folded[1][0]) is fnn.FusedResidual and type(folded[1][0].bn1) is FoldedBatchNormReLU
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert_folded_matches(original, folded, torch.rand(1, 1, 96, 96, dtype=torch.float64))


def test_fold_bn_through_a_torch_fx_rewritten_block():
    original = eval_model(lambda: nn.Sequential(ReturningResBlk(3, 8), ReturningResBlk(8, 8)))
    folded = fold_bn(copy.deepcopy(original))
    assert isinstance(folded[0], torch.fx.GraphModule)
    assert type(folded[0].bn2) is FoldedBatchNormAddReLU and type(folded[0].extra[1]) is nn.Identity
    assert_folded_matches(original, folded, torch.randn(2, 3, 6, 6, dtype=torch.float64))


class Unfoldable(nn.Module):
    """A BatchNorm after a pool, one without running statistics, one after a conv whose
    output is also used elsewhere."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.after_pool = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.batch_stats = nn.BatchNorm2d(4, track_running_stats=False)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.after_shared_conv = nn.BatchNorm2d(4)

    def forward(self, x):
        out = self.after_pool(self.pool(self.conv(x)))
        out = self.batch_stats(self.conv2(out))
        shared = self.conv3(out)
        return self.after_shared_conv(shared) + shared


def test_fold_bn_leaves_what_it_cannot_fold_and_says_why():
    original = eval_model(Unfoldable)
    folded = fold_bn(copy.deepcopy(original))
    assert [type(folded.after_pool), type(folded.batch_stats), type(folded.after_shared_conv)] == [nn.BatchNorm2d] * 3
    report = folded.fused_resnet_report
    assert "it follows AvgPool2d, not an nn.Conv2d" in report.entry("after_pool").detail
    assert "no running statistics" in report.entry("batch_stats").detail
    assert "no nn.Conv2d before it" in report.entry("after_shared_conv").detail
    assert_folded_matches(original, folded, torch.randn(2, 3, 6, 6, dtype=torch.float64))


def test_fold_bn_refuses_a_model_in_train_mode():
    model = torchvision.models.resnet18(weights=None)
    with pytest.raises(RuntimeError, match=r"fusion only for eval .*\(model\).* call model.eval\(\) first"):
        fold_bn(model)
    model.eval()
    model.layer1[0].bn1.train()
    with pytest.raises(RuntimeError, match=r"layer1\.0\.bn1 in training mode"):
        fold_bn(model)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fold_bn("resnet18")


def test_fold_bn_not_inplace_and_pickles():
    original = eval_model(lambda: nn.Sequential(Residual(3, 4, use_1x1conv=True, strides=2), Residual(4, 4)))
    folded = fold_bn(original, inplace=False)
    assert type(original[0]) is Residual and type(folded[0]) is fnn.FusedResidual
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for clone in (copy.deepcopy(folded), pickle.loads(pickle.dumps(folded))):
        assert_folded_matches(original, clone, x)


@pytest.mark.both
def test_fold_bn_tiny_model_on_both_paths():
    """The folded add + ReLU op (the Triton kernel through the interpreter) in fp32."""
    original = eval_model(lambda: nn.Sequential(Residual(3, 4, use_1x1conv=True, strides=2), Residual(4, 4)),
                          torch.float32)
    folded = fold_bn(copy.deepcopy(original))
    assert type(folded[1].bn2) is FoldedBatchNormAddReLU
    assert_folded_matches(original, folded, torch.randn(2, 3, 8, 8))
