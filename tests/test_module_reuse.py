"""A BatchNorm called several times before one backward: weight sharing, two views of one
batch through one backbone, frozen statistics while fine-tuning.

Eager PyTorch allows it; so must the fused ops, on both paths. The regression: on the
Triton path the forward op declared the running statistics as mutated even in eval, so
each call bumped their version while an earlier call's backward had saved them, and
backward raised autograd's "modified by an inplace operation" error.

Marked ``both``: once on the CPU path, once through the Triton kernels (interpreter).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_resnet
from reference import DEVICE, TRITON_PATH, assert_close

pytestmark = pytest.mark.both

SHAPE = (2, 6, 5, 5)


def _bn(seed: int, cls=nn.BatchNorm2d, **kwargs) -> nn.BatchNorm2d:
    """A BatchNorm with non-trivial parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    bn = cls(SHAPE[1], **kwargs)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(SHAPE[1], generator=g))
        bn.bias.copy_(torch.randn(SHAPE[1], generator=g))
        bn.running_mean.copy_(torch.randn(SHAPE[1], generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(SHAPE[1], generator=g) + 0.5)
    return bn.to(DEVICE)


def _input(seed: int, grad: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(SHAPE, generator=g) * 2 + 0.5).to(DEVICE).requires_grad_(grad)


def _f64(module: nn.Module) -> nn.Module:
    """An eager float64 twin of a (fused or plain) BatchNorm, as nn.BatchNorm2d."""
    twin = nn.BatchNorm2d(SHAPE[1], module.eps, module.momentum).to(DEVICE).double()
    twin.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in module.state_dict().items()})
    return twin.train(module.training)


def _grads(tensors) -> list[torch.Tensor]:
    return [t.grad.clone() for t in tensors]


def _check(actual: list[torch.Tensor], expected: list[torch.Tensor], names: list[str]) -> None:
    for a, e, name in zip(actual, expected, names):
        assert_close(a, e, torch.float32, name, params=name.startswith("d_w") or name.startswith("d_b"))


@pytest.mark.parametrize("cls", ["BatchNormReLU2d", "SyncBatchNormReLU2d"])
def test_bn_relu_module_called_twice_in_eval(cls):
    m = _bn(0, getattr(fused_resnet.nn, cls)).eval()
    ref = _f64(m)
    x = _input(1)
    version = m.running_var._version
    y = m(x) + m(2 * x)
    assert m.running_var._version == version, "an eval call must not bump the running statistics' version"
    y.sum().backward()

    xr = x.detach().double().requires_grad_()
    yr = F.relu(ref(xr)) + F.relu(ref(2 * xr))
    yr.sum().backward()
    assert_close(y, yr, torch.float32, "y")
    _check([x.grad, m.weight.grad, m.bias.grad], [xr.grad, ref.weight.grad, ref.bias.grad], ["dx", "d_weight", "d_bias"])


@pytest.mark.parametrize("cls", ["BatchNormAddReLU2d", "SyncBatchNormAddReLU2d"])
def test_bn_add_relu_module_called_twice_in_eval(cls):
    m = _bn(0, getattr(fused_resnet.nn, cls)).eval()
    ref = _f64(m)
    x, r = _input(1), _input(2)
    y = m(x, r) + m(2 * x, r * 0.5)
    y.sum().backward()

    xr, rr = (t.detach().double().requires_grad_() for t in (x, r))
    yr = F.relu(ref(xr) + rr) + F.relu(ref(2 * xr) + rr * 0.5)
    yr.sum().backward()
    assert_close(y, yr, torch.float32, "y")
    _check([x.grad, r.grad, m.weight.grad, m.bias.grad], [xr.grad, rr.grad, ref.weight.grad, ref.bias.grad],
           ["dx", "d_residual", "d_weight", "d_bias"])


@pytest.mark.parametrize("main_training", [False, True], ids=["both-frozen", "frozen-shortcut"])
def test_shortcut_bn_called_twice(main_training):
    """bn_add_bn_relu with a frozen shortcut BatchNorm (eval), its main BatchNorm frozen
    too or training, the block called twice before backward."""
    main = _bn(0, fused_resnet.nn.BatchNormAddReLU2d).train(main_training)
    shortcut = _bn(3).eval()
    ref_main, ref_shortcut = _f64(main), _f64(shortcut)
    x, r = _input(1), _input(2)
    y = main(x, r, shortcut) + main(0.5 * x, 2 * r, shortcut)
    y.sum().backward()

    xr, rr = (t.detach().double().requires_grad_() for t in (x, r))
    yr = (F.relu(ref_main(xr) + ref_shortcut(rr)) + F.relu(ref_main(0.5 * xr) + ref_shortcut(2 * rr)))
    yr.sum().backward()
    assert_close(y, yr, torch.float32, "y")
    _check([x.grad, r.grad, main.weight.grad, main.bias.grad, shortcut.weight.grad, shortcut.bias.grad],
           [xr.grad, rr.grad, ref_main.weight.grad, ref_main.bias.grad, ref_shortcut.weight.grad,
            ref_shortcut.bias.grad], ["dx", "d_residual", "d_weight", "d_bias", "d_weight (shortcut)",
                                      "d_bias (shortcut)"])
    assert_close(main.running_mean, ref_main.running_mean, torch.float32, "running_mean", params=True)
    assert_close(main.running_var, ref_main.running_var, torch.float32, "running_var", params=True)


def test_functional_ops_share_running_statistics_in_eval():
    """bn_relu then bn_add_relu on one set of running statistics, training=False."""
    bn = _bn(0)
    ref = _f64(bn.eval())
    x, r = _input(1), _input(2)
    w = bn.weight.detach().clone().requires_grad_()
    args = (bn.running_mean, bn.running_var, w, bn.bias.detach())
    y = fused_resnet.bn_relu(x, *args, training=False) + fused_resnet.bn_add_relu(x, r, *args, training=False)
    y.sum().backward()

    xr, rr = (t.detach().double().requires_grad_() for t in (x, r))
    yr = F.relu(ref(xr)) + F.relu(ref(xr) + rr)
    yr.sum().backward()
    assert_close(y, yr, torch.float32, "y")
    _check([x.grad, r.grad, w.grad], [xr.grad, rr.grad, ref.weight.grad], ["dx", "d_residual", "d_weight"])


def test_converted_block_shared_between_two_views():
    """A converted BasicBlock in eval (frozen statistics, trainable weights), two views."""
    import torchvision
    block = torchvision.models.resnet.BasicBlock(SHAPE[1], SHAPE[1]).to(DEVICE)
    for i, bn in enumerate((block.bn1, block.bn2)):
        bn.load_state_dict(_bn(i).state_dict())
    block.eval()
    fused = fused_resnet.FusedBasicBlock.from_block(copy.deepcopy(block)).eval()
    ref = copy.deepcopy(block).double()
    x = _input(1)
    (fused(x) * fused(x.flip(-1))).sum().backward()
    xr = x.detach().double().requires_grad_()
    (ref(xr) * ref(xr.flip(-1))).sum().backward()
    assert_close(x.grad, xr.grad, torch.float32, "dx")
    for (name, p), (_, pr) in zip(fused.named_parameters(), ref.named_parameters()):
        assert_close(p.grad, pr.grad, torch.float32, f"d_{name}", params=True)


def test_training_forward_between_eval_forward_and_its_backward():
    """An eval call, then a training call that updates the running statistics in place,
    then one backward. Eager PyTorch (and so the CPU path) silently differentiates the eval
    call with the *updated* statistics; the Triton path saves the statistics it normalised
    with and autograd's version check refuses instead of giving that different number."""
    m = _bn(0, fused_resnet.nn.BatchNormReLU2d).eval()
    eager = copy.deepcopy(m)
    x = _input(1)
    y = m(x)
    m.train()
    y2 = m(3 * x + 1)
    if TRITON_PATH:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (y.sum() + y2.sum()).backward()
        return
    (y.sum() + y2.sum()).backward()
    xe = x.detach().clone().requires_grad_()
    ye = F.relu(nn.BatchNorm2d.forward(eager, xe))
    eager.train()
    ye2 = F.relu(nn.BatchNorm2d.forward(eager, 3 * xe + 1))
    (ye.sum() + ye2.sum()).backward()
    assert torch.equal(x.grad, xe.grad)
