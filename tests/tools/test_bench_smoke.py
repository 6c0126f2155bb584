"""The benchmark code runs, at tiny sizes; no test here looks at a time.

Covers ``fused_resnet.tools.bench`` and ``common`` (stage construction, timing in turns,
reports), ``kernel_bench`` and a smoke run of the pytest-benchmark suite in ``benchmarks/``.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_resnet.tools import bench, common, kernel_bench

ROOT = Path(__file__).resolve().parents[2]


def test_stage_input_shapes_are_the_real_activations():
    shapes = common.stage_input_shapes("resnet50", 2, 224)
    assert shapes == {"all": (2, 3, 224, 224), "stem": (2, 3, 224, 224), "layer1": (2, 64, 56, 56),
                      "layer2": (2, 256, 56, 56), "layer3": (2, 512, 28, 28), "layer4": (2, 1024, 14, 14)}


@pytest.mark.parametrize("model,tails,shortcut_bns", [("resnet18", 1 + 8 * 2, 3), ("resnet50", 1 + 16 * 3, 4)])
def test_bn_tails_cover_every_batchnorm(model, tails, shortcut_bns):
    found = common.bn_tails(model, 2, 64)
    assert len(found) == tails
    assert sum(t.op == "bn_add_bn_relu" for t in found) == shortcut_bns
    assert found[0] == common.Tail("stem", -1, "bn_relu", (2, 64, 32, 32))


def test_unknown_names_are_rejected_with_the_choices():
    with pytest.raises(ValueError, match="unknown stage 'layer5'; choose from stem"):
        common.stage_module(torch.nn.Module(), "layer5")
    with pytest.raises(ValueError, match="unknown model 'resnet34'"):
        common.stage_input_shapes("resnet34", 1, 32)
    with pytest.raises(ValueError, match="unknown dtype 'fp64'"):
        common.canonical_dtype("fp64")
    assert common.canonical_memory_format("NHWC") == "channels_last"


def test_time_steps_takes_turns_and_times_every_call():
    calls = []
    times = common.time_steps({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "cpu", 1, 3)
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


@pytest.mark.parametrize("name,tbps", [("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0),
                                       ("NVIDIA H200", 4.8), ("NVIDIA A100-SXM4-80GB", 2.0),
                                       ("AMD Instinct MI300X", 5.3), ("Some Future GPU", None)])
def test_peak_bandwidth_table(name, tbps):
    found = common.lookup_peak_bandwidth(name)
    assert found == (None if tbps is None else pytest.approx(tbps * 1e12))


def test_run_bench_reports_cpu_figures_as_cpu_figures(tmp_path):
    config = bench.BenchConfig(models=["resnet18"], stages=["stem", "all"], modes=["eval", "train_backward"],
                               dtypes=["float32"], memory_formats=["channels_last"], batches=[2], resolution=32,
                               device="cpu", variants=["eager", "fused"], warmup=0, iters=1)
    results = bench.run_bench(config, show_progress=False)
    assert [(r.stage, r.mode) for r in results] == [("stem", "eval"), ("stem", "train_backward"),
                                                    ("all", "eval"), ("all", "train_backward")]
    assert all(r.images_per_s("eager") > 0 for r in results)
    info = common.machine_info("cpu")
    table = bench.format_table(results, info)
    assert common.CPU_NOTE in table and "GPU:" not in table
    data = bench.report(results, info, config)
    assert data["device_kind"] == "cpu" and data["note"] == common.CPU_NOTE
    assert data["machine"]["torch"] == torch.__version__
    common.write_json(str(tmp_path / "b.json"), data)
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["input_shape"] == [2, 3, 32, 32]
    bench.write_plot(str(tmp_path / "b.png"), results, info)
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_suite_smoke_run(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "benchmarks"), "--bench-smoke",
         "--bench-stages", "stem,layer4", "--bench-modes", "eval,train_backward", "--bench-json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "images/s per stage, side by side" in proc.stdout and common.CPU_NOTE in proc.stdout
    data = json.loads(out.read_text())
    assert data["device_kind"] == "cpu"
    assert {(r["stage"], r["mode"]) for r in data["results"]} == {
        ("stem", "eval"), ("stem", "train_backward"), ("layer4", "eval"), ("layer4", "train_backward")}
    assert data["kernels"], "the fused-op GB/s benchmarks ran"


@pytest.mark.parametrize("op,pass_", [(op, p) for op in common.TAIL_OPS for p in common.OP_PASSES[op]
                                      if not p.startswith("backward_eval") or op == "add_relu"])
@pytest.mark.parametrize("implementation", ["fused", "eager"])
def test_tail_steps_run_alone_and_report_the_design_bytes(op, pass_, implementation):
    shape = (2, 8, 4, 4)
    step = kernel_bench.prepare_tail_step(op, pass_, shape, "float32", "channels_last", "cpu", implementation)
    seconds = kernel_bench.time_kernel(step, "cpu", 0, 2)
    result = kernel_bench.kernel_result(op, pass_, "layer1", shape, "float32", "channels_last", "cpu", seconds)
    T = 2 * 8 * 4 * 4 * 4
    assert result.activation_bytes == T
    assert result.bytes_moved == common.fused_design_traffic(op, pass_) * T
    assert result.peak_bytes_per_s is None and result.to_json()["fraction_of_peak"] is None


def test_design_traffic_is_the_budget_else_the_minimum():
    assert common.fused_design_traffic("bn_relu", "backward_train") == 5
    assert common.fused_design_traffic("bn_add_bn_relu", "backward_train") == common.MINIMUM["bn_add_bn_relu"][
        "backward_train"] == 8
    assert common.fused_design_traffic("add_relu", "forward_eval") == 3
    with pytest.raises(ValueError, match="op 'add_relu' has no pass 'forward_train'"):
        common.fused_design_traffic("add_relu", "forward_train")


def test_conv1x1_work_counts_the_gemm_and_one_pass_over_each_operand():
    # conv3 of layer1 at batch 2: M = 2*56*56 rows, K = 64, N = 256, bf16.
    flops, moved = kernel_bench.conv1x1_work((64, 56, 56, 256, 1), 2, "forward_stats", "bfloat16")
    M = 2 * 56 * 56
    assert flops == 2 * M * 64 * 256 and moved == 2 * (M * 64 + 64 * 256 + M * 256)
    # A stride-2 dgrad writes the whole input (zeros at the skipped pixels), reads dy of the sampled ones.
    _, moved = kernel_bench.conv1x1_work((256, 56, 56, 512, 2), 1, "dgrad", "float32")
    assert moved == 4 * (28 * 28 * 512 + 256 * 512 + 56 * 56 * 256)
    # Both gradients together read dy and x once, write dx and dw once, and do the two GEMMs.
    flops, moved = kernel_bench.conv1x1_work((64, 56, 56, 256, 1), 2, "backward", "bfloat16")
    assert flops == 2 * 2 * M * 64 * 256 and moved == 2 * (M * 256 + M * 64 + 2 * 64 * 256 + M * 64)
    assert [p for s, p in kernel_bench.conv1x1_cases([(8, 4, 4, 8, 2)])] == ["forward_stats", "eval", "dgrad",
                                                                              "wgrad", "backward"]


def test_conv1x1_steps_reject_unknown_names():
    with pytest.raises(ValueError, match="unknown implementation 'cublas'; choose from fused, cudnn"):
        kernel_bench.prepare_conv1x1_step("dgrad", (8, 4, 4, 8, 1), 1, "float32", "cpu", "cublas")
    with pytest.raises(ValueError, match="unknown pass 'bwd'"):
        kernel_bench.prepare_conv1x1_step("bwd", (8, 4, 4, 8, 1), 1, "float32", "cpu")
    with pytest.raises(ValueError, match="stride 1 only"):
        kernel_bench.prepare_conv1x1_step("forward_prologue_stats", (8, 4, 4, 8, 2), 1, "float32", "cpu")


@pytest.mark.parametrize("pass_", kernel_bench.CONV1X1_PASSES)
def test_conv1x1_cudnn_steps_run_on_the_cpu(pass_):
    kernel_bench.prepare_conv1x1_step(pass_, (8, 4, 4, 16, 1), 2, "float32", "cpu", "cudnn")()


def test_fused_conv_variant_converts_bottlenecks_and_computes_what_fused_does():
    from fused_resnet.nn.blocks import FusedConvBottleneck

    cache = bench.ModelCache(torch.device("cpu"))
    fused_conv = cache.model("resnet50", "fused_conv", "float32", "channels_last").eval()
    fused = cache.model("resnet50", "fused", "float32", "channels_last").eval()
    assert all(type(b) is FusedConvBottleneck for layer in ("layer1", "layer4") for b in getattr(fused_conv, layer))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fused_conv(x), fused(x), rtol=0, atol=0)  # CPU: both take the same ATen path
