"""Deployment of converted models: standard-op graphs for ONNX, torch.export and TorchScript.

The fused ops are ``torch.library`` custom ops on the Triton path; outside PyTorch they
mean nothing. So wherever a graph leaves PyTorch the ops are recorded as the ATen sequence
they compute (``batch_norm`` / ``add`` / ``relu``), which every runtime knows:

- ``torch.onnx.export`` (``dynamo=False`` and ``dynamo=True``): automatic. Both exporters
  set ``torch.onnx.is_in_onnx_export()`` while they trace, and :mod:`fused_resnet.backend`
  then sends every op down its PyTorch path. This needs no registration (no
  ``register_custom_op_symbolic``, no ``custom_translation_table`` the user must pass) and
  reads one public flag that torch 2.11 to 2.14 set the same way; an ONNX translation of
  the custom ops would also have to rebuild their in-place running-statistics updates.
- ``torch.export``: the fused ops stay single nodes (what ``torch.compile`` and AOT
  Inductor want). For a graph of standard ops, export inside :func:`standard_ops`.
- ``torch.jit.script``: the fused modules and blocks script to their eager sequence
  (their ``forward`` takes that branch under ``torch.jit.is_scripting()``).
  ``torch.jit.trace`` records the fused ops' autograd Function on the Triton path (a
  Python op, which ``torch.jit.save`` cannot store); inside :func:`standard_ops`, ATen's.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from . import backend

__all__ = ["standard_ops"]


@contextlib.contextmanager
def standard_ops() -> Iterator[None]:
    """Inside the block every fused op runs, and is traced as, PyTorch's own ATen sequence.

    ``with fused_resnet.export.standard_ops(): ep = torch.export.export(model, (x,))``
    gives a program with ``batch_norm`` / ``add`` / ``relu`` nodes in place of the fused
    ones, on every device. The numbers are eager PyTorch's (not the kernels').
    """
    backend.standard_ops_depth += 1
    try:
        yield
    finally:
        backend.standard_ops_depth -= 1
