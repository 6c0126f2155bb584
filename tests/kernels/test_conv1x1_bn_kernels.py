"""The 1x1-convolution GEMM kernels themselves (kernels/conv1x1_bn.py): the prologue's
activation is bitwise the materialised one, the statistics merge survives a large mean,
the dgrad's accumulate and the wgrad's split over M."""
from __future__ import annotations

import pytest
import torch

from reference import DEVICE, TRITON_PATH
from test_conv1x1_bn import bf16_casts_round_to_nearest

# The kernel tests run the kernels: in the interpreter process here, on a GPU there.
kernel_test = [pytest.mark.both, pytest.mark.skipif(not TRITON_PATH, reason="the Triton kernels themselves")]


def runs_kernels(test):
    for mark in kernel_test:
        test = mark(test)
    return test


def nhwc(t):
    return t.to(DEVICE).contiguous(memory_format=torch.channels_last)


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prologue_is_bitwise_the_materialised_activation(dtype):
    """conv(relu(bn(x))) with bn in the GEMM's prologue equals the GEMM over relu(bn(x))
    written by bn_add_relu's kernel, bit for bit, and the dgrad's recomputed ReLU mask is
    that activation's: a plane of x sits exactly on the ReLU's threshold."""
    from fused_resnet.kernels import ChannelNorm, bn_add_relu_forward, layout_of
    from fused_resnet.kernels.conv1x1_bn import conv1x1_dgrad, conv1x1_forward, conv1x1_wgrad

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 18, 3, 5, generator=g)
    x[:, :, 0] = 0.75  # (0.75 - 0.75) * scale + 0 = 0 exactly
    x = nhwc(x.to(dtype))
    C = x.shape[1]
    mean = torch.full((C,), 0.75, device=DEVICE)
    norm = ChannelNorm(mean, torch.rand(C, generator=g).to(DEVICE) + 0.5, torch.randn(C, generator=g).to(DEVICE),
                       torch.zeros(C, device=DEVICE))
    w = torch.randn(17, C, 1, 1, generator=g).to(DEVICE, dtype)
    with bf16_casts_round_to_nearest():
        a = bn_add_relu_forward(x, layout_of(x), norm, 0.0, False)
        fused, _, _ = conv1x1_forward(x, w, None, 1, prologue=norm)
        plain, _, _ = conv1x1_forward(a, w, None, 1)
        assert torch.equal(fused, plain)
        dy = nhwc(torch.randn(fused.shape, generator=g).to(dtype))
        g_buf, _ = conv1x1_dgrad(dy, w, x, 1, prologue=norm)
        da, _ = conv1x1_dgrad(dy, w, a, 1)
        assert torch.equal(g_buf, torch.where(a > 0, da, 0))
        assert torch.equal(conv1x1_wgrad(dy, x, w, 1, prologue=norm)[0], conv1x1_wgrad(dy, a, w, 1)[0])


@runs_kernels
def test_stats_merge_survives_a_large_mean():
    """Per-tile (mean, M2) of 1,000 rows at mean 1e4, std 1 in 63 tiles (two blocks of the
    merge loop) merged to float64's mean and M2, where E[y^2] - E[y]^2 in fp32 loses it."""
    from fused_resnet.kernels.conv1x1_bn import conv1x1_stats_merge_kernel

    M, C, rows = 1000, 3, 16
    y = torch.randn(M, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 1e4
    y = y.float().double()  # values as an fp32 GEMM would store them
    tiles = [y[i:i + rows] for i in range(0, M, rows)]
    partials = torch.stack([torch.stack([t.mean(0), ((t - t.mean(0)) ** 2).sum(0)]) for t in tiles]).float()
    merged = torch.empty(3, C, dtype=torch.float32, device=DEVICE)
    conv1x1_stats_merge_kernel[(1,)](partials.to(DEVICE), merged, C, len(tiles), M, rows, BLOCK_P=32, BLOCK_C=64)
    merged = merged.cpu().double()
    assert torch.equal(merged[0], torch.zeros(C, dtype=torch.float64))
    torch.testing.assert_close(merged[2], y.mean(0), rtol=2e-7, atol=0)
    torch.testing.assert_close(merged[1], ((y - y.mean(0)) ** 2).sum(0), rtol=1e-4, atol=0)


@runs_kernels
def test_dgrad_adds_another_gradient_or_convolution():
    from fused_resnet.kernels.conv1x1_bn import conv1x1_dgrad

    g = torch.Generator().manual_seed(2)
    x = nhwc(torch.randn(2, 20, 3, 3, generator=g))
    w = torch.randn(9, 20, 1, 1, generator=g).to(DEVICE)
    dy = nhwc(torch.randn(2, 9, 3, 3, generator=g))
    other = nhwc(torch.randn(x.shape, generator=g))
    dx, _ = conv1x1_dgrad(dy, w, x, 1, add=other)
    ref = torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double()) + other.double()
    torch.testing.assert_close(dx.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="stride"):
        conv1x1_dgrad(dy[:, :, :2, :2].contiguous(memory_format=torch.channels_last), w, x, 2, add=other)
    # A second convolution of the same x in the same reduction: x's whole gradient in one GEMM.
    w2 = torch.randn(33, 20, 1, 1, generator=g).to(DEVICE)
    dy2 = nhwc(torch.randn(2, 33, 3, 3, generator=g))
    dx, _ = conv1x1_dgrad(dy, w, x, 1, second=(dy2, w2))
    ref = (torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double())
           + torch.nn.grad.conv2d_input(x.shape, w2.double(), dy2.double()))
    torch.testing.assert_close(dx.double(), ref, rtol=1e-5, atol=1e-5)


@runs_kernels
def test_wgrad_splits_over_m_in_a_fixed_order():
    """Six splits of the 96 rows (the interpreter's rule), each a fp32 partial, added in
    order: the weight and bias gradients of float64, bitwise the same on a second run."""
    from fused_resnet.kernels.conv1x1_bn import INTERPRETER_TILES, conv1x1_wgrad, gemm_tiles, wgrad_splits

    g = torch.Generator().manual_seed(3)
    x = nhwc(torch.randn(3, 16, 4, 8, generator=g))  # M = 96 rows
    w = torch.randn(16, 16, 1, 1, generator=g).to(DEVICE)
    dy = nhwc(torch.randn(3, 16, 4, 8, generator=g))
    tiles = gemm_tiles(16, 16, 96, torch.float32, None)
    assert tiles == INTERPRETER_TILES
    assert wgrad_splits(96, 16, 16, tiles, 4, None) == (6, 16)
    dw, db = conv1x1_wgrad(dy, x, w, 1, bias_grad=True)
    ref = torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double())
    torch.testing.assert_close(dw.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db.double(), dy.double().sum((0, 2, 3)), rtol=1e-5, atol=1e-5)
    dw2, db2 = conv1x1_wgrad(dy, x, w, 1, bias_grad=True)
    assert torch.equal(dw, dw2) and torch.equal(db, db2)


@runs_kernels
def test_empty_batch():
    from fused_resnet.kernels.conv1x1_bn import conv1x1_dgrad, conv1x1_forward, conv1x1_wgrad

    x = nhwc(torch.randn(0, 8, 3, 3))
    w = torch.randn(5, 8, 1, 1).to(DEVICE)
    y, partials, _ = conv1x1_forward(x, w, None, 2, stats=True)
    assert y.shape == (0, 5, 2, 2) and partials.shape[0] == 0
    dx, _ = conv1x1_dgrad(y, w, x, 2)
    assert dx.shape == x.shape
    dw, _ = conv1x1_wgrad(y, x, w, 2)
    assert torch.equal(dw, torch.zeros_like(w))


def test_tile_rule_is_deterministic_and_fits_shared_memory():
    """The rule's tiles per target: powers of two in [16, 128], the stages' shared memory
    within each target's per-block limit (aot.SHARED_MEMORY_LIMITS: 227 KiB sm_90a, 163 KiB
    sm_80, 64 KiB gfx942)."""
    from fused_resnet.kernels.aot import SHARED_MEMORY_LIMITS, TARGETS
    from fused_resnet.kernels.conv1x1_bn import gemm_tiles

    for name, limit in SHARED_MEMORY_LIMITS.items():
        target = TARGETS[name]
        for dtype in (torch.float32, torch.bfloat16):
            for M, N, K in ((802816, 64, 256), (12544, 2048, 512), (50, 23, 20)):
                t = gemm_tiles(M, N, K, dtype, target)
                assert t == gemm_tiles(M, N, K, dtype, target)
                for b in (t.block_m, t.block_n, t.block_k):
                    assert 16 <= b <= 128 and b & (b - 1) == 0
                size = torch.empty((), dtype=dtype).element_size()
                assert (t.block_m + t.block_n) * t.block_k * size * t.num_stages <= limit


# ---------------------------------------------------------------------------- autotune opt-in


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"shapes": []}, ValueError, "shapes"),
    ({"shapes": [(1, 16, 4, 4)]}, ValueError, "shapes"),
    ({"shapes": [(1, 16, 4, 4, 16)], "repeats": 0}, ValueError, "repeats"),
    ({"shapes": [(1, 16, 4, 4, 16)], "dtype": torch.float64}, TypeError, "dtype"),
])
def test_autotune_rejects_bad_arguments(kwargs, exc, match):
    from fused_resnet.kernels.conv1x1_bn import autotune_conv1x1

    with pytest.raises(exc, match=match):
        autotune_conv1x1(device="cpu", **kwargs)


@pytest.mark.interpreter
def test_autotune_prints_the_rule_against_the_best_on_a_tiny_shape(capsys):
    from fused_resnet.kernels.conv1x1_bn import INTERPRETER_TILES, autotune_candidates, autotune_conv1x1

    candidates = autotune_candidates(32, 16, 16, torch.float32, None)
    assert candidates[0] == INTERPRETER_TILES and len(set(candidates)) == len(candidates)
    rows = autotune_conv1x1([(1, 16, 4, 8, 16)], device="cpu", repeats=1)
    assert rows[0]["rule"] == INTERPRETER_TILES
    assert {t for _, t in rows[0]["all"]} == set(candidates)
    out = capsys.readouterr().out
    assert "rule tiles" in out and "1,16,4,8,16" in out and "interpreter times" in out
