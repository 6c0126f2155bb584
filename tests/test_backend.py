"""Which path a tensor takes, and the packages that path needs."""
from __future__ import annotations

import numpy
import pytest
import torch
import triton

from fused_resnet import backend


@pytest.fixture
def versions(monkeypatch):
    """Set the installed triton / numpy versions backend sees."""
    def set_versions(triton_version: str, numpy_version: str) -> None:
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(numpy, "__version__", numpy_version)
        backend.interpreter_incompatibility.cache_clear()

    yield set_versions
    backend.interpreter_incompatibility.cache_clear()


@pytest.mark.parametrize("triton_version, numpy_version, compatible", [
    ("3.6.0", "2.2.6", True),
    ("3.6.0", "2.3.0", False),
    ("3.6.0", "2.5.0", False),
    ("3.7.0", "2.5.0", True),
    ("3.8.0", "2.4.6", True),
])
def test_interpreter_incompatibility(versions, triton_version, numpy_version, compatible):
    versions(triton_version, numpy_version)
    problem = backend.interpreter_incompatibility()
    assert (problem is None) == compatible
    if problem:
        assert "numpy < 2.3" in problem and numpy_version in problem and triton_version in problem


def test_interpreter_path_refuses_incompatible_numpy_clearly(versions, monkeypatch):
    """Under TRITON_INTERPRET=1 with a numpy the interpreter cannot use, the ops raise a
    RuntimeError that says why, instead of numpy's "only 0-dimensional arrays" deep inside."""
    versions("3.6.0", "2.5.0")
    monkeypatch.setattr(backend, "INTERPRET", True)
    with pytest.raises(RuntimeError, match="needs numpy < 2.3"):
        backend.use_triton(torch.zeros(1))
    # The float64 and the compiled GPU paths do not need the interpreter.
    assert backend.use_triton(torch.zeros(1, dtype=torch.float64)) is False


def test_cpu_tensors_take_the_pytorch_path_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(backend, "INTERPRET", False)
    assert backend.use_triton(torch.zeros(1)) is False


def test_onnx_export_flag_reads_what_is_in_onnx_export_reads(monkeypatch):
    """The cached read of the exporters' flags (no imports per op call) agrees with
    ``torch.onnx.is_in_onnx_export`` for each exporter's flag."""
    import torch.onnx
    from torch.onnx._internal.exporter import _flags
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    flag = backend._onnx_export_flag()
    assert flag() is False and torch.onnx.is_in_onnx_export() is False
    assert not backend.standard_ops_wanted()
    monkeypatch.setattr(_flags, "_is_onnx_exporting", True)
    assert flag() and torch.onnx.is_in_onnx_export() and backend.standard_ops_wanted()
    monkeypatch.setattr(_flags, "_is_onnx_exporting", False)
    monkeypatch.setattr(GLOBALS, "in_onnx_export", True)
    assert flag() and torch.onnx.is_in_onnx_export() and backend.standard_ops_wanted()
