"""Where an op runs: the Triton kernels, or the plain PyTorch composite of the same math.

- CUDA / ROCm tensors: the compiled Triton kernels.
- CPU tensors with ``TRITON_INTERPRET=1`` set before import: the same Triton kernels
  through Triton's interpreter (how the kernels are tested without a GPU).
- Other CPU tensors, and float64 anywhere (the kernels compute in fp32, which would
  lose what float64 is asked for): ATen's own batch_norm / relu kernels, in place where
  eager PyTorch would allocate, so never slower than the unfused eager sequence.
"""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: torch.Tensor) -> bool:
    """True where ``t``'s op runs through the Triton kernels."""
    if t.dtype == torch.float64:
        return False
    if t.device.type == "cuda":
        return True
    return INTERPRET and t.device.type == "cpu"
