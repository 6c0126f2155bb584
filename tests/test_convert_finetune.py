"""Fine-tuning check (issue 19): torchvision's Faster R-CNN on a frozen-BatchNorm ResNet-50
backbone, as torchvision builds it when a backbone checkpoint is given (nothing downloaded),
converted: every backbone tail fused, and one training step gives the original's losses and
gradients bitwise on the CPU path. Through the interpreter (``zoo``: the kernels see a whole
ResNet-50): the backbone's features and gradients within tolerance of a float64 copy.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fused_resnet

torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import FasterRCNN  # noqa: E402
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

from reference import TRITON_PATH  # noqa: E402

SIZE = 64
F64_TOLERANCE = 1e-4


def _detector() -> FasterRCNN:
    """fasterrcnn_resnet50_fpn's construction with a backbone checkpoint: FrozenBatchNorm2d, 3 trainable layers."""
    torch.manual_seed(0)
    backbone = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    g = torch.Generator().manual_seed(0)
    for m in backbone.modules():
        if isinstance(m, FrozenBatchNorm2d):  # a checkpoint's statistics, not the init's
            c = m.weight.numel()
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return FasterRCNN(_resnet_fpn_extractor(backbone, 3), num_classes=3, min_size=SIZE, max_size=SIZE)


def _batch():
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 60.0, 30.0]]),
                "labels": torch.tensor([1, 2])} for _ in range(2)]
    return images, targets


def _training_step(model, images, targets) -> dict:
    model.train()
    torch.manual_seed(2)  # the samplers draw proposals at random
    losses = model(images, targets)
    sum(losses.values()).backward()
    result = {f"loss {k}": v.detach() for k, v in losses.items()}
    result.update({f"grad {n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
    return result


@pytest.mark.skipif(TRITON_PATH, reason="bitwise is the CPU path's promise; the interpreter's check is the zoo's")
def test_faster_rcnn_with_a_frozen_backbone_fine_tunes_bitwise():
    original = _detector()
    converted = fused_resnet.convert(copy.deepcopy(original))
    report = converted.fused_resnet_report
    # The stem's BatchNorm + ReLU and the 16 Bottlenecks (all 53 frozen BatchNorms), nothing left.
    assert not report.skipped and len(report.fused) == 17, str(report)
    assert list(converted.state_dict()) == list(original.state_dict())
    images, targets = _batch()
    expected = _training_step(original, images, targets)
    fused = _training_step(converted, images, targets)
    assert expected.keys() == fused.keys() and len(expected) > 4
    for key, want in expected.items():
        assert torch.equal(fused[key], want), key


@pytest.mark.zoo
@pytest.mark.interpreter
def test_frozen_backbone_through_the_interpreter_is_close_to_float64():
    backbone = _detector().backbone
    converted = fused_resnet.convert(copy.deepcopy(backbone)).train()
    reference = copy.deepcopy(backbone).double().train()
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))

    def step(model, x):
        x = x.clone().requires_grad_()
        features = model(x)
        sum(f.sum() for f in features.values()).backward()
        out = {f"feature {k}": f.detach() for k, f in features.items()}
        out.update({f"grad {n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
        out["dx"] = x.grad
        return out

    fused, want = step(converted, x), step(reference, x.double())
    for key, expected in want.items():
        scale = expected.abs().max().item()
        assert (fused[key].double() - expected).abs().max().item() <= F64_TOLERANCE * scale, key
