"""``fused-resnet gpu``: the verdict logic and the budget (pure functions), and a smoke run at toy
sizes on the CPU that writes every file. No test looks at a time."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from fused_resnet.tools import bench, gpu, gpu_checks, gpu_report, kernel_bench
from fused_resnet.tools.gpu_report import FAIL, NOT_JUDGED, NOT_MEASURED, PASS


def kernel(fraction, op="bn_relu", pass_="forward_train", stage="layer1"):
    fused = {"op": op, "pass_": pass_, "stage": stage, "dtype": "bfloat16", "memory_format": "channels_last",
             "fraction_of_peak": fraction, "gb_per_s": 1000.0}
    return {"fused": fused, "eager": dict(fused, gb_per_s=600.0), "speedup_over_eager": 1.5}


def stage_case(stage, mode="train_backward", **images_per_s):
    return {"stage": stage, "mode": mode, "variants": {v: {"images_per_s": x} for v, x in images_per_s.items()}}


# --------------------------------------------------------------------------- verdicts


def test_judge_and_combine():
    assert gpu_report.judge(0.85, 0.85) == PASS and gpu_report.judge(0.8499, 0.85) == FAIL
    assert gpu_report.judge(None, 0.85) == NOT_MEASURED
    assert gpu_report.combine([PASS, NOT_MEASURED]) == PASS
    assert gpu_report.combine([PASS, FAIL, NOT_MEASURED]) == FAIL
    assert gpu_report.combine([NOT_MEASURED]) == gpu_report.combine([]) == NOT_MEASURED


def test_kernel_bandwidth_needs_every_case_at_85_percent():
    passing = gpu_report.kernel_bandwidth_verdict([kernel(0.9), kernel(0.86)], judged=True)
    assert passing["status"] == PASS and passing["passing"] == 2 and passing["min_fraction"] == 0.86
    failing = gpu_report.kernel_bandwidth_verdict([kernel(0.9), kernel(0.6, stage="layer4"), kernel(None)], True)
    assert failing["status"] == FAIL and failing["passing"] == 1 and failing["judged_cases"] == 2
    assert failing["worst"] == ["bn_relu fwd train layer4 bfloat16 channels_last: 60%"]
    assert gpu_report.kernel_bandwidth_verdict([kernel(None)], True)["status"] == NOT_MEASURED
    assert gpu_report.kernel_bandwidth_verdict([kernel(0.1)], False, "smoke")["status"] == NOT_JUDGED


def test_stage_speedups_take_the_faster_fused_variant_against_compile():
    s = gpu_report.stage_speedups(stage_case("layer1", eager=100, fused=110, compile=130, compile_fused=140))
    assert s["fused_over_eager"] == pytest.approx(1.1) and s["eager_status"] == FAIL
    assert s["best_fused_variant"] == "compile_fused"
    assert s["best_fused_over_compile"] == pytest.approx(140 / 130) and s["compile_status"] == PASS
    cut = gpu_report.stage_speedups(stage_case("layer2", eager=100, fused=120, compile=None, compile_fused=None))
    assert cut["eager_status"] == PASS and cut["compile_status"] == NOT_MEASURED


def test_stages_verdict_fails_on_one_stage_below_the_goal():
    cases = [stage_case("all", eager=100, fused=120, compile=110, compile_fused=115),
             stage_case("layer1", eager=100, fused=110, compile=100, compile_fused=None)]
    v = gpu_report.stages_verdict(cases, planned=12, judged=True)
    vs_eager, vs_compile = v["stages_vs_eager"], v["stages_vs_compile"]
    assert vs_eager["status"] == FAIL and vs_eager["failing"] == ["layer1 fwd+bwd: 1.10x"]
    assert vs_eager["faster"] == 2  # below the goal, yet faster than eager
    assert vs_compile["status"] == PASS and vs_compile["passing"] == 2 and vs_compile["planned_cases"] == 12
    # No graph variant measured: the graphed verdict says so rather than passing.
    assert v["stages_vs_eager_graphed"]["status"] == NOT_MEASURED and v["stages_vs_eager_graphed"]["judged_cases"] == 0
    assert gpu_report.stages_verdict(cases, 12, judged=False, reason="smoke")["stages_vs_eager"]["status"] == NOT_JUDGED


def test_host_share_is_one_minus_graph_time_over_plain_time():
    # 100 img/s plain, 400 img/s replayed: the plain step took 4x the GPU's time, 75% of it host.
    assert bench.host_share(100.0, 400.0) == pytest.approx(0.75)
    assert bench.host_share(100.0, 100.0) == 0.0
    assert bench.host_share(100.0, 80.0) == pytest.approx(-0.25)  # the replay slower: said, not hidden
    assert bench.host_share(None, 400.0) is None and bench.host_share(100.0, None) is None


def test_graphed_verdict_judges_fused_against_eager_without_host_time():
    # layer4 eval: fused 1.3x eager plain (eager's host time is larger), only 1.05x from graphs.
    cases = [stage_case("layer4", "eval", eager=1000, fused=1300, eager_graph=2000, fused_graph=2100,
                        fused_conv=1200, fused_conv_graph=2400),
             stage_case("layer1", eager=100, fused=130, eager_graph=110, fused_graph=150)]
    s = gpu_report.stage_speedups(cases[0])
    assert s["fused_over_eager"] == pytest.approx(1.3) and s["eager_status"] == PASS
    assert s["fused_over_eager_graphed"] == pytest.approx(1.05) and s["graphed_status"] == FAIL
    assert s["host_share"] == pytest.approx({"eager": 0.5, "fused": 1 - 1300 / 2100, "fused_conv": 0.5})
    v = gpu_report.stages_verdict(cases, planned=2, judged=True)["stages_vs_eager_graphed"]
    assert v["status"] == FAIL and v["judged_cases"] == 2 and v["passing"] == 1 and v["faster"] == 2
    assert v["failing"] == ["layer4 fwd eval: 1.05x"] and v["min_ratio"] == pytest.approx(1.05)
    assert v["median_host_share"]["eager"] == pytest.approx((0.5 + 1 - 100 / 110) / 2)
    assert v["median_host_share"]["fused_conv"] == pytest.approx(0.5)  # only measured at layer4
    assert v["goal"] == "fused >= 1.15x eager per stage, both replayed from CUDA graphs (no host time)"
    detail = gpu_report._verdict_detail("stages_vs_eager_graphed", v)
    assert "1 of 2 measured cases" in detail and "faster at all (> 1x) in 2" in detail
    assert "host share (median): eager 30%" in detail and "below: layer4 fwd eval: 1.05x" in detail


def test_graph_section_of_the_summary():
    with_graphs = stage_case("layer4", "eval", eager=1000, fused=1300, eager_graph=2000, fused_graph=2100)
    with_graphs["variants"]["fused_conv_graph"] = {"images_per_s": None, "skipped": "CUDA graph capture failed: X"}
    lines = gpu_report._graph_section([with_graphs])
    header = next(line for line in lines if line.startswith("| stage"))
    assert header.split(" | ")[2:5] == ["eager img/s", "eager_graph img/s", "eager host share"]
    row = next(line for line in lines if line.startswith("| layer4"))
    assert row == "| layer4 | fwd eval | 1,000 | 2,000 | 50% | 1,300 | 2,100 | 38% | - | - | - | 1.30 | 1.05 |"
    assert lines[-1] == "Not measured: fused_conv_graph: CUDA graph capture failed: X"
    assert gpu_report._graph_section([stage_case("all", eager=1, fused=2)]) == []  # older reports: no section


def test_conv1x1_verdict_says_yes_or_no_per_stage():
    gemms = [{"shape": [64, 56, 56, 256, 1], "fused_s": 1.0, "cudnn_s": 3.0},
             {"shape": [256, 56, 56, 64, 1], "fused_s": 1.0, "cudnn_s": 1.0},
             {"shape": [512, 28, 28, 1024, 2], "fused_s": 2.0, "cudnn_s": 1.0}]
    stages = [stage_case("layer1", fused=100.0, fused_conv=120.0), stage_case("layer1", "eval", fused=100, fused_conv=101),
              stage_case("layer3", fused=100.0, fused_conv=90.0), stage_case("all", fused=100.0)]
    v = gpu_report.conv1x1_verdict(gemms, stages, judged=True)
    assert v["per_stage"]["layer1"] == {"gemm_speedup_over_cudnn": 2.0, "train_backward_over_fused": 1.2,
                                        "eval_over_fused": 1.01, "faster": True}
    assert v["per_stage"]["layer3"]["gemm_speedup_over_cudnn"] == 0.5 and v["per_stage"]["layer3"]["faster"] is False
    assert v["line"] == "fused GEMM path faster than cuDNN + today's kernels: layer1 yes, layer3 no"
    assert v["status"] == FAIL
    assert gpu_report.conv1x1_verdict([], [], judged=False, reason="smoke")["status"] == NOT_JUDGED


def test_correctness_counts_what_ran_and_lists_what_did_not():
    checks = {"pytest": {"passed": True}, "sync_debug": gpu.skipped("no CUDA"), "determinism": {"passed": True}}
    verdict = gpu_report.correctness_verdict(checks)
    assert verdict["status"] == PASS and verdict["not_run"] == {"sync_debug": "no CUDA"}
    checks["cuda_graph"] = {"passed": False}
    assert gpu_report.correctness_verdict(checks)["failed"] == ["cuda_graph"]
    assert gpu_report.correctness_verdict({"x": gpu.skipped("no CUDA")})["status"] == NOT_MEASURED


def test_a_raising_check_is_a_failed_check():
    result = gpu.guarded(lambda: 1 / 0)
    assert result["passed"] is False and result["status"] == "error" and "ZeroDivisionError" in result["error"]


# --------------------------------------------------------------------------- budget


def test_budget_deadlines_are_cumulative_shares_of_the_total():
    now = [100.0]
    budget = gpu.Budget(60, {"a": 1, "b": 2, "c": 3}, clock=lambda: now[0])
    assert budget.deadlines == {"a": 10, "b": 30, "c": 60}
    b = budget.phase("b")
    now[0] = 105.0  # phase a finished early: b has its own share and a's rest
    assert b.remaining() == pytest.approx(25) and not b.expired()
    now[0] = 131.0
    assert b.expired() and b.remaining() == 0
    with pytest.raises(gpu.PhaseCut, match="not measured: layer3"):
        b.check("layer3")


def test_default_shares_fill_the_default_budget():
    assert sum(gpu.PHASE_SHARES.values()) == gpu.DEFAULT_BUDGET_S
    assert tuple(gpu.PHASE_SHARES) == gpu.PHASES


def test_a_phase_out_of_time_is_cut_saying_what_it_left(tmp_path):
    run = gpu.GpuRun(gpu.gpu_settings(smoke=True), str(tmp_path), 10)
    expired = gpu.Phase("stages", deadline=0.0, clock=lambda: 1.0)
    with pytest.raises(gpu.PhaseCut, match="all train_backward, layer1 train_backward, all eval"):
        gpu.phase_stages(run, expired)
    assert run.report["stages"] == []


def test_pytest_output_is_counted_even_when_cut_short():
    text = "\n".join(["tests/a.py::test_x[float32-nchw] PASSED    [ 10%]",
                      "tests/a.py::test_y FAILED                [ 20%]",
                      "tests/b.py::test_z SKIPPED (needs a GPU) [ 30%]",
                      "FAILED tests/a.py::test_y - AssertionError"])
    counts = gpu_checks.parse_pytest_output(text)
    assert (counts["tests_passed"], counts["tests_failed"], counts["tests_skipped"]) == (1, 1, 1)
    assert counts["failures"] == ["tests/a.py::test_y"]


# --------------------------------------------------------------------------- the smoke run


def test_smoke_run_writes_every_file_and_figure(tmp_path):
    """The whole command at toy sizes on the CPU, as `make gpu SMOKE=1` runs it.

    `make test` runs `make gpu SMOKE=1` itself first and names its folder in
    FUSED_RESNET_GPU_SMOKE_OUT; this test then checks that folder instead of a second run."""
    made = os.environ.get("FUSED_RESNET_GPU_SMOKE_OUT")
    if made:
        out = pathlib.Path(made)
        printed = (out / "summary.md").read_text()
    else:
        out = tmp_path / "gpu-results"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-m", "fused_resnet", "gpu", "--smoke", "--out", str(out),
                               "--budget-s", "400"], capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        printed = proc.stdout
    files = sorted(os.listdir(out))
    assert files == sorted(gpu.OUT_FILES) and len(files) <= 8
    assert all(os.path.isfile(out / f) for f in files)  # no subfolder
    data = json.loads((out / "gpu.json").read_text())
    assert data["smoke"] is True and data["device_kind"] == "cpu"
    assert list(data["phases"]) == list(gpu.PHASES)
    assert {p["status"] for p in data["phases"].values()} <= {"ok", "cut"}
    assert {"cpu", "torch", "triton", "python"} <= set(data["machine"])
    # The measured copy bandwidth, the reference beside the datasheet (a CPU figure here).
    assert data["machine"]["copy_bandwidth_bytes_per_s"] > 0
    c = data["correctness"]
    assert c["pytest"]["passed"] is True and c["pytest"]["tests_passed"] > 0 and c["pytest"]["interpreter"]
    assert c["sync_debug"]["status"] == c["cuda_graph"]["status"] == "skipped"
    assert c["sync_debug"]["reason"] == "no CUDA"
    assert c["determinism"]["passed"] and c["determinism"]["bitwise_equal"]
    assert c["ops_determinism"]["passed"] and c["ops_determinism"]["path"] == "Triton kernels in the interpreter"
    assert c["compile_fullgraph"]["passed"] and c["compile_fullgraph"]["compile_s"] > 0
    assert data["device_aot"]["passed"] and data["device_aot"]["specialisations"][0]["spills"] == 0
    kernels = data["kernels"]
    assert {(k["fused"]["op"], k["fused"]["pass_"]) for k in kernels} == {
        (op, p) for op, passes in gpu.KERNEL_PASSES.items() for p in passes}
    assert {(k["fused"]["dtype"], k["fused"]["memory_format"], k["fused"]["stage"]) for k in kernels} == {
        ("float32", "channels_last", "layer2")}
    assert all(k["fused"]["gb_per_s"] > 0 and k["eager"]["bytes_moved"] > 0 for k in kernels)
    gemms = data["conv1x1"]
    assert {(tuple(g["shape"]), g["pass_"]) for g in gemms} == set(kernel_bench.conv1x1_cases(kernel_bench.SMOKE_CONV1X1))
    assert {g["dtype"] for g in gemms} == {"float32"} and all(g["batch"] == 2 for g in gemms)
    for g in gemms:
        assert g["fused_s"] > 0 and g["cudnn_s"] > 0 and g["flops"] > 0 and g["bytes_moved"] > 0
        assert g["speedup_over_cudnn"] == pytest.approx(g["cudnn_s"] / g["fused_s"])
        assert g["fused_tflop_per_s"] > 0 and g["fused_gb_per_s"] > 0 and g["cudnn_gb_per_s"] > 0
    stages = {(s["stage"], s["mode"]): s for s in data["stages"]}
    assert set(stages[("layer1", "train_backward")]["variants"]) >= {"eager", "fused", "fused_conv"}
    assert "fused_conv" not in stages[("all", "eval")]["variants"]
    conv = data["verdict"]["conv1x1"]
    assert conv["line"].startswith("fused GEMM path faster than cuDNN + today's kernels: layer1 ")
    assert "train_backward_over_fused" in conv["per_stage"]["layer1"]
    assert set(stages) == {(st, m) for st in ("all", "layer1") for m in ("train_backward", "eval")}
    assert set(stages[("all", "eval")]["variants"]) == {"eager", "fused", "compile", "compile_fused",
                                                        "eager_graph", "fused_graph"}
    # The CUDA-graph variants: skipped with the reason, in gpu.json, the verdict and summary.md.
    layer1 = stages[("layer1", "train_backward")]
    for graph in ("eager_graph", "fused_graph", "fused_conv_graph"):
        assert layer1["variants"][graph]["skipped"] == "no CUDA" and layer1["variants"][graph]["images_per_s"] is None
    assert layer1["host_share"] == {"eager": None, "fused": None, "fused_conv": None}
    assert layer1["speedup_fused_over_eager_graphed"] is None
    graphed = data["verdict"]["stages_vs_eager_graphed"]
    assert graphed["judged_cases"] == 0 and graphed["planned_cases"] == 4
    assert stages[("all", "train_backward")]["variants"]["compile_fused"]["compile_s"] > 0
    assert {v["status"] for k, v in data["verdict"].items() if k != "correctness"} == {NOT_JUDGED}
    assert data["verdict"]["correctness"]["status"] == PASS
    summary = (out / "summary.md").read_text()
    assert "## 1x1-convolution GEMMs vs cuDNN" in summary and "fused GEMM path faster than" in summary
    assert "## Verdict" in summary and "Smoke run" in summary and "| pytest | yes |" in summary
    assert "### The same steps replayed from CUDA graphs" in summary and "eager_graph: no CUDA" in summary
    assert "both replayed from CUDA graphs (no host time) | **not judged** |" in summary
    assert (out / "gpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Verdict" in printed  # the summary is printed at the end


def test_warm_compile_covers_the_tails_and_the_gemms(monkeypatch):
    """On a GPU the kernels phase first compiles, in parallel, every specialisation it will
    launch (recorded on meta tensors); here with sm_90a's plan and the compile stubbed."""
    import contextlib

    from fused_resnet.kernels import aot, conv1x1_bn

    compiled = []
    monkeypatch.setattr(conv1x1_bn, "target_of", lambda device: aot.TARGETS["sm_90a"])
    monkeypatch.setattr(aot, "compile_pool", contextlib.nullcontext)
    monkeypatch.setattr(aot, "compile_all", lambda launches, target, pool: compiled.extend(launches))

    class Run:
        settings = gpu.gpu_settings(False, "cpu")
        device = "cpu"

    out = gpu.warm_kernel_cache(Run())
    names = {launch.name for launch in compiled}
    assert out["specialisations"] == len(compiled) > 100
    assert {"bn_stats_partial_kernel", "bn_add_relu_backward_dx_kernel", "conv1x1_forward_kernel",
            "conv1x1_wgrad_kernel"} <= names
