"""The ``fused-resnet`` command: argument errors, check, bench and the demo's wiring.

Everything runs at tiny sizes on the CPU path; no test looks at a time.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from fused_resnet.tools import cli

TINY = ["--batch", "2", "--resolution", "32", "--no-progress"]
# check: 4 images at 64x64 leave layer4 16 values per channel; fewer makes training-mode
# BatchNorm so ill-conditioned that fp32 itself loses digits.
CHECK = ["--batch", "4", "--resolution", "64", "--no-progress"]


@pytest.mark.parametrize("argv,message", [
    (["check", "--model", "resnet34"], "argument --model: unknown model 'resnet34'; choose from resnet18, resnet50"),
    (["bench", "--stages", "stem,layer5"], "argument --stages: unknown stage 'layer5'"),
    (["bench", "--modes", "inference"], "argument --modes: unknown mode 'inference'"),
    (["check", "--dtype", "float64"], "argument --dtype: unknown dtype 'float64'"),
    (["bench", "--memory-format", "nhcw"], "argument --memory-format: unknown memory format 'nhcw'"),
    (["bench", "--batch", "0"], "argument --batch: must be at least 1, got 0"),
    (["audit", "--gpu", "B200"], "argument --gpu: unknown GPU 'B200'"),
    (["bench", "--device", "tpu"], "argument --device: unknown device 'tpu'"),
])
def test_bad_arguments_exit_2_naming_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_device_without_cuda_is_an_argument_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["check", "--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "fused_resnet", "bench", "--stages", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown stage 'nope'" in proc.stderr


def test_check_passes_on_the_converted_model(capsys):
    pytest.importorskip("fused_resnet.convert")
    assert cli.main(["check", "--model", "resnet18", *CHECK]) == 0
    out = capsys.readouterr().out
    assert "PASS: all" in out and "grad layer4 bn" in out and "running stats layer1" in out


def test_check_fails_and_exits_1_when_the_fused_model_differs(monkeypatch, capsys):
    def wrong_conversion(model):
        broken = copy.deepcopy(model)
        with torch.no_grad():
            broken.layer3[0].bn2.weight.mul_(1.5)
        return broken

    monkeypatch.setattr("fused_resnet.tools.check.convert_model", wrong_conversion)
    assert cli.main(["check", "--model", "resnet18", *CHECK]) == 1
    out = capsys.readouterr().out
    assert "FAIL:" in out
    rows = {line.split()[0] + " " + line.split()[1]: line for line in out.splitlines() if line.startswith("output")}
    assert rows["output (train)"].rstrip().endswith("FAIL")


def test_bench_writes_the_table_json_and_chart(tmp_path, capsys):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    assert cli.main(["bench", "--model", "resnet18", "--stages", "stem,all", "--modes", "eval", "--iters", "1",
                     "--warmup", "0", "--json", str(json_path), "--plot", str(png_path), *TINY]) == 0
    out = capsys.readouterr().out
    assert "torch.compile: skipped on the CPU" in out and "CPU figures" in out
    data = json.loads(json_path.read_text())
    assert data["device_kind"] == "cpu" and "CPU figures" in data["note"]
    assert data["settings"]["batches"] == [2] and data["settings"]["variants"] == ["eager", "fused"]
    assert {"cpu", "torch", "triton"} <= set(data["machine"])
    assert [r["stage"] for r in data["results"]] == ["stem", "all"]
    assert png_path.read_bytes()[:4] == b"\x89PNG"


def test_bench_graphs_adds_the_graph_variants_skipped_without_cuda(tmp_path, capsys):
    json_path = tmp_path / "bench.json"
    assert cli.main(["bench", "--model", "resnet18", "--stages", "stem", "--modes", "eval", "--iters", "1",
                     "--warmup", "0", "--graphs", "--json", str(json_path), *TINY]) == 0
    out = capsys.readouterr().out
    assert "graphed fused/eager" in out and "host share fused" in out
    assert "eager_graph: no CUDA" in out and "fused_graph: no CUDA" in out
    data = json.loads(json_path.read_text())
    assert data["settings"]["variants"] == ["eager", "fused", "eager_graph", "fused_graph"]
    (result,) = data["results"]
    assert result["variants"]["fused_graph"]["skipped"] == "no CUDA" and result["variants"]["fused"]["seconds"]


def test_demo_runs_check_audit_and_a_short_bench(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
    assert cli.cmd_demo(cli.build_parser().parse_args(["demo", "--out", str(tmp_path), "--no-progress"])) == 0
    assert [argv[0] for argv in calls] == ["check", "audit", "bench"]
    bench_argv = calls[2]
    assert bench_argv[bench_argv.index("--json") + 1] == str(tmp_path / "bench.json")
    assert bench_argv[bench_argv.index("--plot") + 1] == str(tmp_path / "bench.png")
    assert all("--no-progress" in argv for argv in calls)


def test_the_library_never_imports_a_tool():
    """Every module outside fused_resnet/tools/ (the entry point shim __main__ aside) is importable
    without the tools: no import statement names them, at module level or inside a function."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    library = [p for p in (root / "fused_resnet").rglob("*.py") if "tools" not in p.relative_to(root).parts
               and p.name != "__main__.py"] + list((root / "kernels").rglob("*.py"))
    offenders = []
    for path in library:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [f"{node.module or ''}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom)
                     else [])
            offenders += [f"{path.relative_to(root)}: {n}" for n in names if "tools" in n.split(".")]
    assert not offenders


def test_check_and_coverage_take_zoo_model_names():
    """`check --model` and `coverage --model` take timm:NAME / hf:resnet-N next to torchvision names,
    and refuse anything else with exit status 2 naming the argument."""
    from fused_resnet.tools.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["check", "--model", "timm:resnet50d"]).model == "timm:resnet50d"
    assert parser.parse_args(["coverage", "--model", "hf:resnet-18,resnet18"]).model == [["hf:resnet-18", "resnet18"]]
    for bad in (["check", "--model", "timm:"], ["coverage", "--model", "vgg11"]):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(bad)
        assert exit_.value.code == 2
