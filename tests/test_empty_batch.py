"""An empty batch (N=0), training and eval, forward and backward, every op and module, both
paths (issue 18, item 2): what eager ``nn.BatchNorm2d`` + ReLU does on this torch. The output
is empty, the running statistics stay as they are, ``num_batches_tracked``
still counts the batch in training, input gradients are empty, weight and bias gradients zero.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fused_resnet
from fused_resnet import sync_batchnorm as sync_module
from fused_resnet.conv1x1_bn import bn_relu_conv1x1, conv1x1_bn_relu
from fused_resnet.nn import BatchNormAddReLU2d, BatchNormReLU2d, FusedConvBottleneck

C = 4


def empty_input(C=C, channels_last=False):
    x = torch.randn(0, C, 5, 5)
    return (x.to(memory_format=torch.channels_last) if channels_last else x).requires_grad_()


def statistics(bn) -> list[torch.Tensor]:
    return [bn.running_mean, bn.running_var, bn.num_batches_tracked]


def assert_like_eager(fused_bn, eager_bn, y, y_eager, x, x_eager):
    assert y.shape == y_eager.shape
    for a, b in zip(statistics(fused_bn), statistics(eager_bn)):
        assert torch.equal(a, b), (a, b)
    assert x.grad is not None and x.grad.shape == x.shape
    for p, q in ((fused_bn.weight, eager_bn.weight), (fused_bn.bias, eager_bn.bias)):
        assert torch.equal(p.grad, q.grad) and not p.grad.any()


def eager_bn(C=C, momentum=0.1):
    bn = nn.BatchNorm2d(C, momentum=momentum)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return bn


def run_eager(bn, x, residual=None, residual_bn=None):
    y = bn(x)
    if residual is not None:
        y = y + (residual if residual_bn is None else residual_bn(residual))
    return torch.relu(y)


@pytest.mark.both
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("tail", ["bn_relu", "bn_add_relu", "bn_add_bn_relu"])
def test_batchnorm_modules_on_an_empty_batch_match_eager(tail, training, momentum, channels_last):
    ref = eager_bn(momentum=momentum).train(training)
    fused = (BatchNormReLU2d if tail == "bn_relu" else BatchNormAddReLU2d).from_batchnorm(copy.deepcopy(ref))
    fused.train(training)
    x, x_ref = empty_input(channels_last=channels_last), empty_input(channels_last=channels_last)
    r, r_ref = empty_input(channels_last=channels_last), empty_input(channels_last=channels_last)
    ref_r = eager_bn(momentum=momentum).train(training)
    fused_r = copy.deepcopy(ref_r)
    if tail == "bn_relu":
        y, y_ref = fused(x), run_eager(ref, x_ref)
    elif tail == "bn_add_relu":
        y, y_ref = fused(x, r), run_eager(ref, x_ref, r_ref)
    else:
        y, y_ref = fused(x, r, residual_bn=fused_r), run_eager(ref, x_ref, r_ref, ref_r)
    y.sum().backward()
    y_ref.sum().backward()
    assert_like_eager(fused, ref, y, y_ref, x, x_ref)
    if tail == "bn_add_bn_relu":
        assert_like_eager(fused_r, ref_r, y, y_ref, r, r_ref)
    elif tail == "bn_add_relu":
        assert r.grad is not None and r.grad.shape == r.shape


@pytest.mark.both
def test_add_relu_on_an_empty_batch():
    a, b = empty_input(), empty_input()
    y = fused_resnet.add_relu(a, b)
    y.sum().backward()
    assert y.shape == a.shape and a.grad.shape == a.shape and b.grad.shape == b.shape


@pytest.mark.both
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_gemm_ops_on_an_empty_batch_match_eager(training, grad):
    """conv1x1_bn_relu and bn_relu_conv1x1 (the GEMM path takes channels_last inputs)."""
    conv = nn.Conv2d(8, C, 1, bias=True)
    for fused_op in ("conv1x1_bn_relu", "bn_relu_conv1x1"):
        bn_channels = C if fused_op == "conv1x1_bn_relu" else 8
        ref = eager_bn(bn_channels).train(training)
        fused_bn, fused_conv = copy.deepcopy(ref), copy.deepcopy(conv)
        x, x_ref = empty_input(8, True), empty_input(8, True)
        with torch.set_grad_enabled(grad):
            args = (fused_bn.running_mean, fused_bn.running_var, fused_bn.weight, fused_bn.bias, training,
                    fused_bn.momentum, fused_bn.eps)
            if fused_op == "conv1x1_bn_relu":
                y = conv1x1_bn_relu(x, fused_conv.weight, fused_conv.bias, *args,
                                    num_batches_tracked=fused_bn.num_batches_tracked)
                y_ref = torch.relu(ref(conv(x_ref)))
            else:
                y = bn_relu_conv1x1(x, *args, fused_conv.weight, fused_conv.bias,
                                    num_batches_tracked=fused_bn.num_batches_tracked)
                y_ref = conv(torch.relu(ref(x_ref)))
        for a, b in zip(statistics(fused_bn), statistics(ref)):
            assert torch.equal(a, b), (fused_op, a, b)
        assert y.shape == y_ref.shape
        if grad:
            y.sum().backward()
            y_ref.sum().backward()
            assert x.grad.shape == x.shape
            for p, q in ((fused_conv.weight, conv.weight), (fused_conv.bias, conv.bias), (fused_bn.weight, ref.weight)):
                assert torch.equal(p.grad, q.grad) and not p.grad.any(), fused_op
            conv.zero_grad()


@pytest.mark.both
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_conv_bottleneck_on_an_empty_batch_matches_torchvision(training):
    from torchvision.models.resnet import Bottleneck

    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
    ref = Bottleneck(8, 4, downsample=downsample).train(training)
    fused = FusedConvBottleneck.from_block(copy.deepcopy(ref)).train(training)
    x, x_ref = empty_input(8, True), empty_input(8, True)
    with torch.set_grad_enabled(training):
        y, y_ref = fused(x), ref(x_ref)
    assert y.shape == y_ref.shape == (0, 16, 5, 5)
    if training:
        y.sum().backward()
        y_ref.sum().backward()
        assert x.grad.shape == x.shape
        for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad), name
    for (name, a), b in zip(fused.named_buffers(), ref.buffers()):
        assert torch.equal(a, b), name


@pytest.mark.both
def test_sync_op_with_an_empty_rank_joins_both_collectives(monkeypatch):
    """An empty local batch still takes part in the all_gather (count 0) and the all_reduce,
    so the other ranks do not hang (a world of two, the collectives stood in for)."""
    calls = []
    monkeypatch.setattr(sync_module, "sync_world_size", lambda group=None: 2)

    def all_gather(parts, t, group=None):
        calls.append("all_gather")
        parts[0].copy_(t)
        parts[1].copy_(t)
        parts[1][0] = 3.0  # the other rank: three values per channel, mean 0, variance 1
        parts[1][1:].view(2, -1)[1] = 1.0
        parts[1][1:].view(2, -1)[0] = 0.0

    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: calls.append("all_reduce"))
    bn = eager_bn()
    x = empty_input()
    y = fused_resnet.sync_bn_relu(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True,
                                  num_batches_tracked=bn.num_batches_tracked)
    y.sum().backward()
    assert calls == ["all_gather", "all_reduce"]
    assert y.shape == x.shape and x.grad.shape == x.shape and not bn.weight.grad.any()
    assert int(bn.num_batches_tracked) == 1 and torch.isfinite(bn.running_var).all()
