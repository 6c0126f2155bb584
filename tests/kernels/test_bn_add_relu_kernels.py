"""The backward's two ways to the ReLU mask agree bitwise: reading the stored y, and
recomputing it from x (and r) with the forward's expression and rounding."""
from __future__ import annotations

import pytest
import torch

from reference import DEVICE, TRITON_PATH

pytestmark = [pytest.mark.both, pytest.mark.skipif(not TRITON_PATH, reason="the Triton kernels themselves")]


def tricky_input(dtype, channels_last):
    """Values whose normalised form is exactly 0, or so small it rounds to 0 in dtype."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 7, generator=g)
    x[:, :, :2] = 1.0  # a plane of identical values lands exactly on the mean's neighbourhood
    x[0, :, 3, :3] = 1.0 + torch.tensor([1e-7, 3e-8, -1e-7])
    x = x.to(DEVICE, dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mode", ["bn_relu", "bn_add_bn_relu"])
def test_recomputed_mask_is_the_stored_outputs(dtype, channels_last, mode):
    from fused_resnet.kernels import (RESIDUAL_BN, RESIDUAL_NONE, ChannelNorm, bn_add_relu_forward, bn_stats,
                                      layout_of)
    from fused_resnet.kernels.bn_add_relu import bn_add_relu_backward_dx, bn_add_relu_backward_sums

    x = tricky_input(dtype, channels_last)
    r = tricky_input(dtype, channels_last).flip(0) if mode == "bn_add_bn_relu" else None
    layout = layout_of(x)
    C = x.shape[1]
    ones, zeros = torch.ones(C, device=DEVICE), torch.zeros(C, device=DEVICE)
    # bias = -mean * scale puts the constant plane's pre-activation at (or within
    # rounding of) zero, where a mask computed differently would disagree.
    mean, invstd = bn_stats(x, layout, None, None, None, 0.1, 1e-5)
    norm = ChannelNorm(mean, invstd, ones, zeros + (mean - 1.0) * invstd)
    r_norm = None
    mode_id = RESIDUAL_NONE
    if r is not None:
        r_mean, r_invstd = bn_stats(r, layout, None, None, None, 0.1, 1e-5)
        r_norm = ChannelNorm(r_mean, r_invstd, ones, zeros)
        mode_id = RESIDUAL_BN
    y = bn_add_relu_forward(x, layout, norm, 1e-5, False, r, r_norm)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    dy = dy.contiguous(memory_format=layout.memory_format)
    results = []
    for from_inputs in (False, True):
        sums, _, dw, db, r_dw, r_db = bn_add_relu_backward_sums(dy, y, x, layout, norm, mode_id, r, r_norm, True,
                                                                from_inputs)
        dx, dr = bn_add_relu_backward_dx(dy, y, x, layout, norm, True, mode_id, sums, layout.N * layout.HW, None,
                                         r, r_norm, True, from_inputs)
        results.append([t for t in (sums[:2], dw, db, dx, dr, r_dw, r_db) if t is not None])
    for read, recomputed in zip(*results):
        assert torch.equal(read, recomputed)
