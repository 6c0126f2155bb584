"""The CUDA-graph variants of the stage benchmark (eager_graph, fused_graph, fused_conv_graph).

Without a GPU: skipped with the reason; with the capture faked (a "graph" that replays the
step), that each graph variant times its base variant's module on the same input, that the
case's graphs share one pool, and that a capture failure is the variant's skip text while
the others are measured. With a GPU: the capture helper itself. No test looks at a time.
"""
from __future__ import annotations

import pytest
import torch

from fused_resnet.tools import bench

CASE = dict(model="resnet18", stage="layer1", mode="eval", dtype="float32", memory_format="channels_last", batch=2,
            resolution=32, warmup=0, iters=2)


def measure(cache, variants):
    return bench.measure_case(cache, variants=variants, **CASE)


def test_graph_variants_are_skipped_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks a machine without CUDA")
    result = measure(bench.ModelCache(torch.device("cpu")), ["eager", "fused", "eager_graph", "fused_graph"])
    assert list(result.variants) == ["eager", "fused", "eager_graph", "fused_graph"]
    for graph in ("eager_graph", "fused_graph"):
        assert result.variants[graph].skipped == "no CUDA" and result.variants[graph].seconds == []
    assert result.images_per_s("eager") > 0 and result.images_per_s("fused") > 0
    data = result.to_json()
    assert data["host_share"] == {"eager": None, "fused": None}
    assert data["speedup_fused_over_eager_graphed"] is None


def test_every_variant_has_a_chart_colour_and_a_graph_variant_a_plain_base():
    assert set(bench.VARIANT_COLORS) == set(bench.ALL_VARIANTS)
    assert set(bench.GRAPH_VARIANTS.values()) <= set(bench.PLAIN_VARIANTS)


class FakeGraph:
    """Replays the captured step by calling it: the orchestration without a GPU."""

    def __init__(self, step):
        self.replay = step


@pytest.fixture
def fake_graphs(monkeypatch):
    """Graphs 'available' on the CPU; the capture calls recorded as (pool, warm-up)."""
    captures = []

    def capture(step, warmup=bench.GRAPH_WARMUP, pool=None):
        for _ in range(warmup + 1):
            step()
        captures.append(pool)
        return FakeGraph(step), None

    monkeypatch.setattr(bench, "graphs_unavailable", lambda device: None)
    monkeypatch.setattr(bench, "capture_cuda_graph", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool", 1))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return captures


def calls_of(module: torch.nn.Module) -> list[int]:
    count = [0]
    module.register_forward_hook(lambda *args: count.__setitem__(0, count[0] + 1))
    return count


def test_a_graph_variant_replays_its_base_variants_step(fake_graphs):
    cache = bench.ModelCache(torch.device("cpu"))
    fused_calls = calls_of(cache.stage("resnet18", "fused", "layer1", "float32", "channels_last"))
    eager_calls = calls_of(cache.stage("resnet18", "eager", "layer1", "float32", "channels_last"))
    result = measure(cache, ["eager", "fused", "eager_graph", "fused_graph"])
    assert fake_graphs == [("pool", 1), ("pool", 1)]  # one pool for the case's graphs
    # Each module: 2 timed plain calls + (3 warm-up + 1 capture + 2 timed replays) for its graph.
    assert eager_calls[0] == fused_calls[0] == 2 + bench.GRAPH_WARMUP + 1 + 2
    for graph in ("eager_graph", "fused_graph"):
        m = result.variants[graph]
        assert m.skipped is None and len(m.seconds) == 2 and m.capture_s > 0 and m.compile_s is None
    assert result.variants["eager"].capture_s is None
    data = result.to_json()
    assert set(data["host_share"]) == {"eager", "fused"}
    assert data["host_share"]["fused"] == pytest.approx(bench.host_share(result.images_per_s("fused"),
                                                                         result.images_per_s("fused_graph")))
    assert data["speedup_fused_over_eager_graphed"] == pytest.approx(result.speedup("fused_graph", "eager_graph"))


def test_a_failed_capture_keeps_the_other_figures(fake_graphs, monkeypatch):
    capture = bench.capture_cuda_graph

    def failing_for_fused(step, warmup=bench.GRAPH_WARMUP, pool=None):
        if len(fake_graphs) == 1:  # the second capture: fused_graph's
            raise RuntimeError("operation not permitted when stream is capturing")
        return capture(step, warmup, pool)

    monkeypatch.setattr(bench, "capture_cuda_graph", failing_for_fused)
    result = measure(bench.ModelCache(torch.device("cpu")), ["eager", "fused", "eager_graph", "fused_graph"])
    assert result.variants["fused_graph"].skipped == (
        "CUDA graph capture failed: RuntimeError: operation not permitted when stream is capturing")
    assert all(result.images_per_s(v) > 0 for v in ("eager", "fused", "eager_graph"))
    assert result.to_json()["host_share"]["fused"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_capture_cuda_graph_replays_in_place_updates():
    counter = torch.zeros((), device="cuda")
    graph, out = bench.capture_cuda_graph(lambda: counter.add_(1) * 2)
    torch.cuda.synchronize()
    assert counter.item() == bench.GRAPH_WARMUP  # the warm-up ran, the capture did not
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert counter.item() == bench.GRAPH_WARMUP + 2 and out.item() == 2 * counter.item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_failed_capture_leaves_the_callers_stream_current():
    counter = torch.zeros((), device="cuda")
    before = torch.cuda.current_stream()
    with pytest.raises(RuntimeError):
        bench.capture_cuda_graph(lambda: counter.item(), warmup=0)  # a host sync cannot be captured
    assert torch.cuda.current_stream() == before
