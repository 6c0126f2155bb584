"""Triton kernels of fused-resnet and their launch helpers (installed as ``fused_resnet.kernels``).

Only Triton code lives here: no ``nn.Module`` and no autograd. Each file is one kernel
family, read top to bottom: kernels first, then the launchers that size their grids.
"""
from .add_relu import add_relu_backward, add_relu_forward
from .bn_add_relu import (
    RESIDUAL_ADD,
    RESIDUAL_BN,
    RESIDUAL_NONE,
    ChannelNorm,
    bn_add_relu_backward,
    bn_add_relu_forward,
)
from .bn_stats import bn_stats
from .layout import Layout, as_layout, layout_of, reduction_plan

__all__ = [
    "ChannelNorm", "Layout", "RESIDUAL_ADD", "RESIDUAL_BN", "RESIDUAL_NONE",
    "add_relu_backward", "add_relu_forward", "as_layout", "bn_add_relu_backward",
    "bn_add_relu_forward", "bn_stats", "layout_of", "reduction_plan",
]
