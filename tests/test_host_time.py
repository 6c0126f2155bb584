"""The eager shortcut past the torch.library dispatcher (issue 18, item 10) and the host-time tool.

No test asserts a time: ``python -m fused_resnet.tools.host_time`` prints the figures.
"""
from __future__ import annotations

import pytest
import torch

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
