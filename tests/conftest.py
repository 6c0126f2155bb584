"""Shared fixtures. Tolerances and float64 references live in ``reference.py``."""
from __future__ import annotations

import pytest
import torch

from fused_resnet import backend


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def triton_path() -> bool:
    """True when this process runs the ops through the Triton kernels (interpreter)."""
    return backend.INTERPRET
