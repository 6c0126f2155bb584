"""Frozen BatchNorm (torchvision's FrozenBatchNorm2d, timm's FrozenBatchNormAct2d) fused (issue 19).

A frozen BatchNorm is ``x * scale + bias`` from buffers in a model that trains: the fused
modules compute it as an eval-mode BatchNorm with gradients for the input and the residual
only. On the CPU path: the original's bits, forward and backward; on the Triton path
(interpreter): within fp32 tolerance of a float64 copy. Marked ``both``.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet.nn.frozen_batchnorm import fused_frozen_batchnorm, is_frozen_batchnorm
from reference import DEVICE, TRITON_PATH, assert_close

torchvision = pytest.importorskip("torchvision")
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

pytestmark = pytest.mark.both

SHAPE = (2, 4, 5, 5)


def _randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every frozen BatchNorm of ``module`` with buffers off their init."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if is_frozen_batchnorm(m):
            c = m.weight.numel()
            m.weight.copy_(torch.randn(c, generator=g))
            m.bias.copy_(torch.randn(c, generator=g))
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return module.to(DEVICE)


def _input(seed: int, shape=SHAPE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(DEVICE).requires_grad_()


def _forward_backward(fn, inputs, seed=5):
    y = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    y.backward(torch.randn(y.shape, generator=g).to(y))
    return [y.detach()] + [t.grad for t in inputs]


def _compare(fused_fn, original_fn, inputs):
    """Fused vs original: bitwise on the CPU path, else within fp32 tolerance of float64."""
    fused = _forward_backward(fused_fn, [t.detach().clone().requires_grad_() for t in inputs])
    if TRITON_PATH:
        expected = _forward_backward(original_fn, [t.detach().double().requires_grad_() for t in inputs])
        for name, a, e in zip(["y", "dx", "dr"], fused, expected):
            assert_close(a, e, torch.float32, name)
    else:
        expected = _forward_backward(original_fn, [t.detach().clone().requires_grad_() for t in inputs])
        for name, a, e in zip(["y", "dx", "dr"], fused, expected):
            assert torch.equal(a, e), name


def _f64(module):
    return copy.deepcopy(module).double() if TRITON_PATH else module


def test_frozen_bn_relu_module():
    bn = _randomized(FrozenBatchNorm2d(SHAPE[1])).train()
    fused = fused_frozen_batchnorm(bn)
    assert isinstance(fused, FrozenBatchNorm2d) and type(fused).__name__ == "FrozenBatchNormReLU2d"
    assert list(fused.state_dict()) == list(bn.state_dict()) and fused.weight is bn.weight
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    reference = _f64(bn)
    _compare(fused, lambda x: torch.relu(reference(x)), [_input(1)])
    assert all(torch.equal(before[k], v) for k, v in fused.state_dict().items()), "a frozen BatchNorm never changes"
    assert all(b.grad is None for b in fused.buffers())


def test_fused_frozen_batchnorm_shares_tensors_not_containers():
    """Built as ``rebuilt_as`` builds the fused BatchNorm2d (one helper): the same buffer
    tensors and hooks, in containers of its own, so later edits of one do not reach the other."""
    bn = FrozenBatchNorm2d(SHAPE[1])
    hook = bn.register_forward_hook(lambda *args: None)
    fused = fused_frozen_batchnorm(bn, add=True)
    assert all(fused._buffers[k] is v for k, v in bn._buffers.items())
    assert list(fused._forward_hooks) == [hook.id] and fused._forward_hooks is not bn._forward_hooks
    fused.register_buffer("extra", torch.zeros(1))
    hook.remove()
    assert "extra" not in bn._buffers and list(fused._forward_hooks) == [hook.id] and not bn._forward_hooks


@pytest.mark.parametrize("shortcut_bn", [False, True], ids=["residual", "residual_bn"])
def test_frozen_bn_add_relu_module(shortcut_bn):
    bn = _randomized(FrozenBatchNorm2d(SHAPE[1]), seed=0)
    r_bn = _randomized(FrozenBatchNorm2d(SHAPE[1]), seed=1)
    fused = fused_frozen_batchnorm(bn, add=True)
    reference, r_reference = _f64(bn), _f64(r_bn)
    if shortcut_bn:
        _compare(lambda x, r: fused(x, r, r_bn), lambda x, r: torch.relu(reference(x) + r_reference(r)),
                 [_input(1), _input(2)])
    else:
        _compare(fused, lambda x, r: torch.relu(reference(x) + r), [_input(1), _input(2)])


def test_fused_frozen_class_pickles_and_loads_a_checkpoint():
    bn = _randomized(FrozenBatchNorm2d(SHAPE[1]))
    fused = fused_frozen_batchnorm(bn, add=True)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(fused)
    fresh = fused_frozen_batchnorm(FrozenBatchNorm2d(SHAPE[1]))
    fresh.load_state_dict({**bn.state_dict(), "num_batches_tracked": torch.tensor(3)})  # the original's rule
    assert torch.equal(fresh.running_var, bn.running_var)
    with pytest.raises(TypeError, match="module must be"):
        fused_frozen_batchnorm(nn.BatchNorm2d(4))


def _frozen_resnet():
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16, norm_layer=FrozenBatchNorm2d)
    return _randomized(model)


def _train_step(model, x):
    y = model(x)
    g = torch.Generator().manual_seed(3)
    y.backward(torch.randn(y.shape, generator=g).to(y))
    return {"y": y.detach(), "dx": x.grad, **{n: p.grad for n, p in model.named_parameters()}}


def test_convert_fuses_every_tail_of_a_frozen_resnet():
    original = _frozen_resnet().train()
    converted = fused_resnet.convert(copy.deepcopy(original))
    report = converted.fused_resnet_report
    assert not report.skipped and len(report.fused) == 5, str(report)
    assert list(converted.state_dict()) == list(original.state_dict())
    assert isinstance(converted.layer1[0].bn2, FrozenBatchNorm2d)
    x = _input(0, (2, 3, 32, 32))
    fused = _train_step(converted, x.detach().clone().requires_grad_())
    if TRITON_PATH:
        expected = _train_step(copy.deepcopy(original).double(), x.detach().double().requires_grad_())
        for key, want in expected.items():
            scale = want.abs().max().item()
            assert (fused[key].double() - want).abs().max().item() <= 1e-4 * scale, key
    else:
        expected = _train_step(original, x.detach().clone().requires_grad_())
        for key, want in expected.items():
            assert torch.equal(fused[key], want), key


def _timm_frozen_act(act):
    norm_act = pytest.importorskip("timm.layers.norm_act")
    return norm_act.FrozenBatchNormAct2d(SHAPE[1], act_layer=act, apply_act=act is not None)


class _ActTail(nn.Module):
    """timm's frozen BatchNorm + act on one path, a frozen BatchNorm without act before an add."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = _timm_frozen_act(nn.ReLU)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = _timm_frozen_act(None)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn2(self.conv2(self.bn1(self.conv1(x)))) + x)


def test_timm_frozen_batchnorm_act():
    torch.manual_seed(0)
    original = _randomized(_ActTail()).train()
    converted = fused_resnet.convert(copy.deepcopy(original))
    report = converted.fused_resnet_report
    assert report.entry("bn1").detail == ("FrozenBatchNormAct2d -> FrozenBatchNormActReLU2d "
                                          "(its act, a ReLU, fused)"), str(report)
    assert "bn2 -> FrozenBatchNormActAddReLU2d" in report.entry("").detail, str(report)
    x = _input(0)
    fused = _train_step(converted, x.detach().clone().requires_grad_())
    reference = copy.deepcopy(original).double() if TRITON_PATH else original
    expected = _train_step(reference, x.detach().clone().to(next(reference.parameters()).dtype).requires_grad_())
    for key, want in expected.items():
        if TRITON_PATH:
            assert_close(fused[key], want, torch.float32, key, params=key != "y" and key != "dx")
        else:
            assert torch.equal(fused[key], want), key


def test_a_frozen_batchnorm_with_another_activation_is_left_and_says_why():
    module = nn.Sequential(nn.Conv2d(4, 4, 1), _timm_frozen_act(nn.SiLU))
    converted = fused_resnet.convert(_randomized(module))
    assert converted.fused_resnet_report.entry("1").detail.startswith("its act is SiLU"), \
        str(converted.fused_resnet_report)


class _MixedShortcut(nn.Module):
    """A trainable BatchNorm on the main path, a frozen one on the shortcut: one is fused into the op."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.down = nn.Conv2d(4, 4, 1, bias=False)
        self.down_bn = FrozenBatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + self.down_bn(self.down(x)))


def test_trainable_and_frozen_batchnorms_on_one_add():
    torch.manual_seed(0)
    original = _randomized(_MixedShortcut()).train()
    converted = fused_resnet.convert(copy.deepcopy(original))
    detail = converted.fused_resnet_report.entry("").detail
    assert "bn -> BatchNormAddReLU2d)" in detail, detail
    assert type(converted.down_bn) is FrozenBatchNorm2d
    if not TRITON_PATH:
        x = _input(0)
        fused = _train_step(converted, x.detach().clone().requires_grad_())
        expected = _train_step(original, x.detach().clone().requires_grad_())
        for key, want in expected.items():
            assert torch.equal(fused[key], want), key


def test_fused_frozen_batchnorm_called_twice_before_one_backward():
    """Two views of one batch through one frozen backbone: the buffers are read-only, so the
    first call's saved tensors stay valid (as with the original)."""
    bn = _randomized(FrozenBatchNorm2d(SHAPE[1]))
    fused = fused_frozen_batchnorm(bn, add=True).train()
    reference = _f64(bn)
    _compare(lambda x, r: fused(x, r) + fused(2 * x, r),
             lambda x, r: torch.relu(reference(x) + r) + torch.relu(reference(2 * x) + r), [_input(1), _input(2)])


def test_coverage_counter_sees_frozen_batchnorm_tails():
    """``fused-resnet coverage`` counts a frozen BatchNorm (``x * scale + bias``) as a batch_norm."""
    from fused_resnet.tools.coverage import count_tails

    model = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    count = count_tails(model, torch.randn(2, 3, 32, 32), training=True)
    assert (count.bn_relu, count.bn_add_relu, count.bn_add_bn_relu, count.add_relu) == (9, 5, 3, 0), count.places
