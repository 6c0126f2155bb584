"""Where an op runs: the Triton kernels, or the plain PyTorch composite of the same math.

- CUDA / ROCm tensors: the compiled Triton kernels.
- CPU tensors with ``TRITON_INTERPRET=1`` set before import: the same Triton kernels
  through Triton's interpreter (how the kernels are tested without a GPU).
- Other CPU tensors, and float64 anywhere (the kernels compute in fp32, which would
  lose what float64 is asked for): ATen's own batch_norm / relu kernels, in place where
  eager PyTorch would allocate, so never slower than the unfused eager sequence.
- While exporting to ONNX (either exporter) or inside ``fused_resnet.export.standard_ops()``,
  every tensor takes that ATen sequence, so the tracer records standard ops.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Optional

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def interpreter_incompatibility() -> Optional[str]:
    """Why Triton's interpreter cannot run the kernels with the installed packages, or None.

    Triton 3.6's interpreter turns a 1-element array into a Python int for ``range()``,
    which numpy >= 2.3 refuses; triton 3.7 squeezes the array first. The compiled GPU path
    does not use the interpreter and is unaffected.
    """
    import numpy
    import triton
    from torch.torch_version import TorchVersion

    if TorchVersion(triton.__version__) < (3, 7) and TorchVersion(numpy.__version__) >= (2, 3):
        return (f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) needs numpy < 2.3, "
                f"found numpy {numpy.__version__}: install 'numpy<2.3' or triton >= 3.7, or run on a GPU")
    return None


# How many fused_resnet.export.standard_ops() blocks are open (the ops take ATen's sequence).
standard_ops_depth = 0


def standard_ops_wanted() -> bool:
    """True while the ops must be recorded as ATen's sequence: inside ``standard_ops()``, or
    during ``torch.onnx.export`` (both exporters set ``is_in_onnx_export``; ONNX has no
    translation of the fused ops)."""
    if standard_ops_depth:
        return True
    onnx = sys.modules.get("torch.onnx")  # not imported: certainly not exporting
    return onnx is not None and onnx.is_in_onnx_export()


def use_triton(t: torch.Tensor) -> bool:
    """True where ``t``'s op runs through the Triton kernels."""
    if t.dtype == torch.float64:
        return False
    # Dynamo (torch.compile) keeps the fused ops; torch.export's non-strict tracing, which
    # the ONNX exporter runs, is plain Python and sees the flag.
    if not torch.compiler.is_dynamo_compiling() and standard_ops_wanted():
        return False
    if t.device.type == "cuda":
        return True
    if INTERPRET and t.device.type == "cpu":
        # Checked in eager calls only: Dynamo cannot trace the version comparison (a str subclass).
        problem = None if torch.compiler.is_compiling() else interpreter_incompatibility()
        if problem:
            raise RuntimeError(problem)
        return True
    return False
