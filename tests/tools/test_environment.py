"""The test environment itself: every test extra is installed (a missing one is a failure, not a
skip), and the command line run from the checkout never imports the checkout's top-level
``kernels/`` as a module named ``kernels`` (Hugging Face's ``kernels`` package, which
transformers imports, is installed beside it)."""
from __future__ import annotations

import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

CHECKOUT = pathlib.Path(__file__).resolve().parents[2]


def _extras_requirements(*extras: str) -> list[str]:
    names = []
    for requirement in importlib.metadata.requires("fused-resnet") or []:
        name, _, marker = requirement.partition(";")
        if any(re.search(rf"extra\s*==\s*['\"]{extra}['\"]", marker) for extra in extras):
            names.append(re.split(r"[<>=!~\[ ]", name.strip(), maxsplit=1)[0])
    return names


def test_every_test_and_bench_extra_is_installed():
    names = _extras_requirements("test", "bench")
    assert {"pytest", "timm", "transformers", "torchvision", "onnxruntime"} <= set(names)
    missing = []
    for name in names:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    assert not missing, f"test extras not installed: {missing}; run make test (it installs constraints/newest.txt)"


def _user_env() -> dict:
    """The environment of a user's shell: nothing that keeps the working directory off sys.path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH", "TRITON_INTERPRET")}


def _run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=CHECKOUT, env={**_user_env(), **env}, capture_output=True, text=True,
                          timeout=300)


def test_hugging_face_kernels_is_installed_and_is_not_ours():
    proc = _run([sys.executable, "-P", "-c", "import kernels; print(kernels.__file__)"])
    assert proc.returncode == 0, proc.stderr
    assert pathlib.Path(proc.stdout.strip()).parent != CHECKOUT / "kernels", proc.stdout


def _fused_resnet(how: str) -> list[str]:
    if how == "console script":
        return [shutil.which("fused-resnet", path=os.path.dirname(sys.executable))]
    return [sys.executable, "-m", "fused_resnet"]


@pytest.mark.parametrize("how", ["console script", "python -m"])
def test_coverage_from_the_checkout_builds_transformers_models(how):
    proc = _run([*_fused_resnet(how), "coverage", "--model", "hf:resnet-18", "--no-progress"], TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| hf:resnet-18 | 2x3x32x32 | 17 / 17 | 0 / 0 |" in proc.stdout


def test_check_from_the_checkout_builds_transformers_models():
    proc = _run([*_fused_resnet("console script"), "check", "--model", "hf:resnet-18", "--batch", "2",
                 "--resolution", "32", "--no-progress"])
    assert proc.returncode == 0 and "PASS" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
