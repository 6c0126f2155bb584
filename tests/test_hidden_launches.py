"""On the Triton path the ops launch their own kernels and nothing else (issue 18).

The launch audit counts Triton launches only; an ATen op the library calls on the side
(a copy into another layout, zero-filled gradients autograd materialises, the eval
backward's rsqrt of the running variance) is a GPU launch it does not see, at full size for an activation. Here every op runs
its forward and backward on the Triton path with the Triton launches stubbed
(``tools/host_time``), under ``torch.profiler``, and may call only ATen's allocations and
views: a test that fails names the op and where it appeared.
"""
from __future__ import annotations

import collections

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fused_resnet
from fused_resnet.conv1x1_bn import OutputStats, conv1x1_bn_relu, conv1x1_pair
from fused_resnet.tools.host_time import triton_path_with_stubbed_launches

C = 8
# Allocations and views: no kernel runs for any of them.
ALLOCATIONS_AND_VIEWS = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
                         "aten::new_empty_strided", "aten::as_strided", "aten::select", "aten::expand",
                         "aten::view", "aten::alias", "aten::detach", "aten::slice", "aten::unsqueeze"}


def aten_ops(fn, inputs) -> collections.Counter:
    """ATen ops ``fn()`` and its backward call (the output's gradient made beforehand)."""
    fn()  # first calls compile plans, import lazily
    out = fn()
    grad = torch.ones_like(out)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
        if out.requires_grad:
            torch.autograd.grad(out, inputs, grad)
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


def tensor(memory_format=torch.contiguous_format):
    return torch.randn(2, C, 4, 4).contiguous(memory_format=memory_format).requires_grad_()


def buffers():
    return torch.zeros(C), torch.ones(C), torch.zeros((), dtype=torch.long)


def params():
    return torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)


def bn_cases(memory_format, training):
    x, r = tensor(memory_format), tensor(memory_format)
    (rm, rv, nbt), (w, b), (r_rm, r_rv, r_nbt), (rw, rb) = buffers(), params(), buffers(), params()
    return {
        "bn_relu": (lambda: fused_resnet.bn_relu(x, rm, rv, w, b, training, num_batches_tracked=nbt), (x, w, b)),
        "bn_add_relu": (lambda: fused_resnet.bn_add_relu(x, r, rm, rv, w, b, training, num_batches_tracked=nbt),
                        (x, r, w, b)),
        "bn_add_bn_relu": (lambda: fused_resnet.bn_add_bn_relu(
            x, r, rm, rv, w, b, r_rm, r_rv, rw, rb, training, num_batches_tracked=nbt, r_num_batches_tracked=r_nbt),
            (x, r, w, b, rw, rb)),
        "add_relu": (lambda: fused_resnet.add_relu(x, r), (x, r)),
    }


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("op", ["bn_relu", "bn_add_relu", "bn_add_bn_relu", "add_relu"])
def test_batchnorm_ops_launch_only_their_kernels(op, memory_format, training):
    with triton_path_with_stubbed_launches():
        fn, inputs = bn_cases(memory_format, training)[op]
        ops = aten_ops(fn, inputs)
    assert set(ops) <= ALLOCATIONS_AND_VIEWS, f"{op}: {dict(ops)}"


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_conv1x1_bn_relu_launches_only_its_kernels(training):
    """Before: the GEMM's output allocated NCHW and copied channels_last (aten::contiguous,
    clone, copy_), autograd zero-filled the two statistics' gradients (aten::zeros), and the
    eval backward took invstd from ATen (aten::add, aten::rsqrt; the BatchNorm ops' too)."""
    x = tensor(torch.channels_last)
    weight = torch.randn(C, C, 1, 1, requires_grad=True)
    (rm, rv, nbt), (w, b) = buffers(), params()
    with triton_path_with_stubbed_launches():
        ops = aten_ops(lambda: conv1x1_bn_relu(x, weight, None, rm, rv, w, b, training, num_batches_tracked=nbt),
                       (x, weight, w, b))
    assert set(ops) <= ALLOCATIONS_AND_VIEWS, dict(ops)


def test_conv1x1_pair_with_one_output_unused():
    """The pair's backward when one output gets no gradient (autograd passes None, not zeros,
    since the Function does not materialise them): one zero-filled gradient for it, nothing more."""
    x = tensor(torch.channels_last)
    weights = [torch.randn(C, C, 1, 1, requires_grad=True) for _ in range(2)]
    stats = [OutputStats(*buffers(), 0.1, 1e-5) for _ in range(2)]
    with triton_path_with_stubbed_launches():
        ops = aten_ops(lambda: conv1x1_pair(x, weights[0], None, stats[0], weights[1], None, 2, stats[1])[0],
                       (x, *weights))
    assert set(ops) <= ALLOCATIONS_AND_VIEWS | {"aten::zero_"}, dict(ops)
    # The unused y2's gradient, and the stride-2 dgrad's output, zero-filled where the stride
    # skips pixels (a memset of x's size: a known pass the launch audit does not count).
    assert ops["aten::zero_"] == 2


@pytest.mark.both
@pytest.mark.skipif(not fused_resnet.backend.INTERPRET and not torch.cuda.is_available(),
                    reason="runs the kernels: the interpreter or a GPU")
def test_conv1x1_pair_unused_output_gradient_is_zero():
    """Through the kernels: leaving y2 out of the loss gives the gradients of a loss that
    multiplies it by zero, bit for bit."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, C, 4, 4, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weights = [torch.randn(C, C, 1, 1, generator=g).to(device).requires_grad_() for _ in range(2)]

    def grads(use_second):
        stats = [OutputStats(torch.zeros(C, device=device), torch.ones(C, device=device), None, 0.1, 1e-5)
                 for _ in range(2)]
        y, _, _, y2, _, _ = conv1x1_pair(x, weights[0], None, stats[0], weights[1], None, 2, stats[1])
        loss = y.square().sum() + (y2.sum() * 0 if use_second else 0)
        return torch.autograd.grad(loss, (x, *weights), allow_unused=True)

    without, with_zero = grads(False), grads(True)
    assert torch.equal(without[0], with_zero[0]) and torch.equal(without[1], with_zero[1])
    assert without[2] is None or torch.equal(without[2], torch.zeros_like(weights[1]))
