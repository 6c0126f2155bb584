"""Argument checks shared by the functional ops and modules.

Each check raises the exception type PyTorch raises for the same mistake and names the
argument, so a bad call fails loudly instead of reading out of bounds.
"""
from __future__ import annotations

from typing import Optional

import torch


def check_activation(name: str, t: torch.Tensor) -> None:
    """A 4-D floating-point activation (N, C, H, W)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"expected 4D {name} (got {t.dim()}D input)")
    if not t.dtype.is_floating_point:
        # What ATen raises for batch_norm on an integer or bool tensor.
        raise NotImplementedError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_like(name: str, t: torch.Tensor, x: torch.Tensor, x_name: str = "x") -> None:
    """``t`` has the shape, dtype and device of ``x`` (a residual, a gradient)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.shape != x.shape:
        raise RuntimeError(f"{name} has shape {tuple(t.shape)} but {x_name} has shape {tuple(x.shape)}")
    if t.dtype != x.dtype:
        raise RuntimeError(f"{name} has dtype {t.dtype} but {x_name} has dtype {x.dtype}")
    if t.device != x.device:
        raise RuntimeError(f"{name} is on {t.device} but {x_name} is on {x.device}")


def check_channel_param(name: str, t: Optional[torch.Tensor], x: torch.Tensor) -> None:
    """A per-channel tensor (weight, bias, running stats) matching x's channels and device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
    C = x.shape[1]
    if t.dim() != 1 or t.numel() != C:
        raise RuntimeError(f"{name} should contain {C} elements not {t.numel()} (shape {tuple(t.shape)})")
    if t.device != x.device:
        raise RuntimeError(f"{name} is on {t.device} but the input is on {x.device}")
    if not t.is_floating_point():
        raise RuntimeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_batch_norm_args(
    x: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    num_batches_tracked: Optional[torch.Tensor],
    prefix: str = "",
) -> None:
    """The checks ``torch.nn.functional.batch_norm`` makes, with the argument named."""
    check_activation(prefix + "input", x)
    C, device = x.shape[1], x.device
    for t in (running_mean, running_var, weight, bias):
        # The common case (a 1-D floating tensor of C values on x's device) in few attribute reads:
        # this runs on every op call, on the host, before the GPU gets its launches.
        if t is not None and not (isinstance(t, torch.Tensor) and t.shape == (C,) and t.device == device
                                  and t.dtype.is_floating_point):
            for name, p in (("running_mean", running_mean), ("running_var", running_var),
                            ("weight", weight), ("bias", bias)):
                check_channel_param(prefix + name, p, x)
    if (running_mean is None) != (running_var is None):
        raise RuntimeError(f"{prefix}running_mean and {prefix}running_var must both be given or both be None")
    if not training and running_mean is None:
        raise RuntimeError(f"{prefix}running_mean must be defined in evaluation mode")
    if training:
        size = x.shape[0] * x.shape[2] * x.shape[3]
        if size == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    if momentum is None and training and running_mean is not None and num_batches_tracked is None:
        raise ValueError(f"{prefix}momentum=None (cumulative average) needs {prefix}num_batches_tracked")
    if num_batches_tracked is not None:
        if not isinstance(num_batches_tracked, torch.Tensor) or num_batches_tracked.numel() != 1:
            raise RuntimeError(f"{prefix}num_batches_tracked must be a one-element tensor")
        if num_batches_tracked.device != x.device:
            raise RuntimeError(f"{prefix}num_batches_tracked is on {num_batches_tracked.device} but the input is on {x.device}")
