"""The eager shortcut past the torch.library dispatcher (issue 18, item 10) and the host-time tool.

No test asserts a time: ``python -m fused_resnet.tools.host_time`` prints the figures.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_resnet
from fused_resnet import backend
from fused_resnet.tools import host_time
from reference import DEVICE, TRITON_PATH

C = 3


def bn_buffers():
    return torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE), torch.zeros((), dtype=torch.long,
                                                                                  device=DEVICE)


@pytest.mark.both
@pytest.mark.skipif(not TRITON_PATH, reason="the CPU path is eager's own sequence, no op")
def test_eager_call_bumps_the_versions_the_dispatcher_would():
    """Training writes the running statistics (version + 1 each, as through the op); eval does not."""
    rm, rv, nbt = bn_buffers()
    x = torch.randn(2, C, 3, 3, device=DEVICE, requires_grad=True)
    versions = [t._version for t in (rm, rv, nbt)]
    fused_resnet.bn_relu(x, rm, rv, training=True, num_batches_tracked=nbt).sum().backward()
    assert [t._version for t in (rm, rv, nbt)] == [v + 1 for v in versions]
    versions = [t._version for t in (rm, rv, nbt)]
    with torch.no_grad():
        fused_resnet.bn_relu(x, rm, rv, training=False)
    assert [t._version for t in (rm, rv, nbt)] == versions


@pytest.mark.both
@pytest.mark.skipif(not TRITON_PATH, reason="the CPU path is eager's own sequence, no op")
def test_eager_calls_skip_the_dispatcher_and_traced_calls_do_not(monkeypatch):
    calls = []
    original = backend.call_op

    def spy(op, implementation, args, mutated=()):
        calls.append(backend.eager_call(args[0]))
        return original(op, implementation, args, mutated)

    monkeypatch.setattr(backend, "call_op", spy)
    rm, rv, _ = bn_buffers()
    x = torch.randn(2, C, 3, 3, device=DEVICE)
    fn = lambda t: fused_resnet.bn_relu(t, rm, rv, training=False)  # noqa: E731
    eager = fn(x)
    assert calls == [True]
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    calls.clear()
    torch.testing.assert_close(compiled(x), eager)
    assert calls and not any(calls)
    calls.clear()
    with torch.no_grad():  # no autograd Function either: only the op records the call in the trace
        traced = torch.jit.trace(fn, (x,), check_trace=False)
    assert calls and not any(calls)
    y = torch.randn_like(x)
    torch.testing.assert_close(traced(y), fn(y))


def test_host_time_tool_measures_every_case():
    rows = host_time.measure(repeats=3)
    assert [r["case"] for r in rows] == list(host_time.cases())
    assert all(r["fused_host_us"] > 0 and r["eager_us"] > 0 for r in rows)
    assert backend.use_triton.__module__ == "fused_resnet.backend"  # the stubs are undone


@pytest.mark.both
@pytest.mark.skipif(not TRITON_PATH, reason="the CPU path is eager's own sequence, no op")
@pytest.mark.parametrize("training", [False, True])
def test_backward_through_the_op_after_an_eager_forward(training):
    """An eager forward keeps None where the op returns an empty statistic (eval: all four; training:
    the residual's). A backward under a dispatch mode goes through the op, which takes them as
    undefined tensors, and gives eager's gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    rm, rv, nbt = bn_buffers()
    rm.uniform_(-1, 1), rv.uniform_(0.5, 2)
    rm0, rv0 = rm.clone(), rv.clone()
    w = torch.rand(C, device=DEVICE, requires_grad=True)
    b = torch.rand(C, device=DEVICE, requires_grad=True)
    x = torch.randn(2, C, 3, 3, device=DEVICE, requires_grad=True)
    y = fused_resnet.bn_relu(x, rm, rv, w, b, training=training, num_batches_tracked=nbt)
    dy = torch.randn_like(y)
    with RecordOps() as mode:
        grads = torch.autograd.grad(y, (x, w, b), dy)
    assert "fused_resnet.bn_add_relu_backward.default" in mode.ops

    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = torch.relu(F.batch_norm(leaves[0], rm0.double(), rv0.double(), leaves[1], leaves[2], training))
    ref_grads = torch.autograd.grad(ref, leaves, dy.double())
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)  # fp32 kernels vs float64


@pytest.mark.both
@pytest.mark.skipif(not TRITON_PATH, reason="the CPU path is eager's own sequence, no op")
def test_eager_call_under_inference_mode_updates_inference_buffers():
    """Buffers made under inference_mode have no version counter: the eager call's bump leaves them
    alone (as the dispatcher does) and the running statistics are still updated as F.batch_norm's."""
    with torch.inference_mode():
        rm, rv, nbt = bn_buffers()
        x = torch.randn(4, C, 3, 3, device=DEVICE)
        y = fused_resnet.bn_relu(x, rm, rv, training=True, num_batches_tracked=nbt)
    ref_rm, ref_rv = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
    ref = torch.relu(F.batch_norm(x, ref_rm, ref_rv, training=True))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rm, ref_rm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, ref_rv, rtol=1e-5, atol=1e-6)
    assert nbt.item() == 1
