"""The 1x1-convolution GEMM kernels themselves (kernels/conv1x1_bn/): the prologue's
activation is bitwise the materialised one, the statistics merge survives a large mean,
the dgrad's accumulate, the wgrad's split over M, both in one pass, and the tile rules."""
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
    merge loop; and in two levels) merged to float64's mean and M2, where E[y^2] - E[y]^2 in
    fp32 loses it."""
    from fused_resnet.kernels.conv1x1_bn import conv1x1_stats_merge_kernel

    M, C, rows = 1000, 3, 16
    y = torch.randn(M, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 1e4
    y = y.float().double()  # values as an fp32 GEMM would store them
    tiles = [y[i:i + rows] for i in range(0, M, rows)]
    partials = torch.stack([torch.stack([t.mean(0), ((t - t.mean(0)) ** 2).sum(0)]) for t in tiles]).float()
    merged = torch.empty(3, C, dtype=torch.float32, device=DEVICE)
    conv1x1_stats_merge_kernel[(1, 1)](partials.to(DEVICE), merged, C, len(tiles), M, rows, len(tiles),
                                       FINAL=True, BLOCK_P=32, BLOCK_C=64)
    # Two levels (groups of 8 tiles in 8 programs, then their 8 means and M2s) agree to rounding.
    groups = torch.empty(8, 2, C, dtype=torch.float32, device=DEVICE)
    conv1x1_stats_merge_kernel[(1, 8)](partials.to(DEVICE), groups, C, len(tiles), M, rows, 8,
                                       FINAL=False, BLOCK_P=4, BLOCK_C=64)
    two_level = torch.empty(3, C, dtype=torch.float32, device=DEVICE)
    conv1x1_stats_merge_kernel[(1, 1)](groups, two_level, C, 8, M, rows * 8, 8, FINAL=True, BLOCK_P=32, BLOCK_C=64)
    torch.testing.assert_close(two_level.cpu().double(), merged.cpu().double(), rtol=1e-4, atol=1e-7)
    merged = merged.cpu().double()
    assert torch.equal(merged[0], torch.zeros(C, dtype=torch.float64))
    torch.testing.assert_close(merged[2], y.mean(0), rtol=2e-7, atol=0)
    torch.testing.assert_close(merged[1], ((y - y.mean(0)) ** 2).sum(0), rtol=1e-4, atol=0)


@runs_kernels
def test_split_sum_levels_fill_the_gpu_and_add_in_a_fixed_order(monkeypatch):
    """combining_levels groups the rows so that each level but the last runs about
    PLAN_PROGRAMS programs and the last reads under SMALL_PASS_BYTES; a sum through three
    levels or more (the constants shrunk to a small case) equals float64's to fp32 rounding, and
    twice the same bits."""
    from fused_resnet.kernels.conv1x1_bn import partials as conv1x1_partials

    assert conv1x1_partials.combining_levels(12544, 3 * 64 * 4, 3) == [142, 89]
    assert conv1x1_partials.combining_levels(100, 4096, 300) == [100]  # the column blocks alone fill it
    monkeypatch.setattr(conv1x1_partials, "PLAN_PROGRAMS", 6)
    monkeypatch.setattr(conv1x1_partials, "SMALL_PASS_BYTES", 200)
    rows, numel = 37, 90
    levels = conv1x1_partials.combining_levels(rows, numel * 4, 2)
    assert len(levels) >= 3 and levels[-1] <= 2, levels
    partials = torch.randn(rows, numel, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    sums = []
    for _ in range(2):
        out = torch.empty(numel, device=DEVICE)
        conv1x1_partials._split_sum(partials, out, rows, numel, None)
        sums.append(out.cpu())
    assert torch.equal(sums[0], sums[1])
    torch.testing.assert_close(sums[0].double(), partials.cpu().double().sum(0), rtol=1e-5, atol=1e-5)


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


def _two_passes(dy, w, x, stride, norm, second):
    from fused_resnet.kernels.conv1x1_bn import conv1x1_dgrad, conv1x1_wgrad

    out, partials = conv1x1_dgrad(dy, w, x, stride, norm, second=second)
    grads = conv1x1_wgrad(dy, x, w, stride, norm, bias_grad=True)
    grads2 = conv1x1_wgrad(second[0], x, second[1], 1, bias_grad=True) if second else None
    return out, partials, grads, grads2


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["plain", "stride 2", "prologue", "second", "wide C_in"])
def test_dgrad_and_wgrad_in_one_pass(dtype, case):
    """conv1x1_dgrad_wgrad reads dY (and x, and a second convolution's dY2) once for both
    gradients: the same as the two passes (fp32 within 1e-5, bf16 within one rounding of
    the stored result), the fp32 gradients within 1e-5 of float64, the BatchNorm
    partials of its prologue in the dgrad's [tiles, 3, C_in] layout, bitwise the same on
    a second run; C_in = 80 does not fit one program and takes the two passes."""
    from fused_resnet.kernels.bn_add_relu import ChannelNorm
    from fused_resnet.kernels.conv1x1_bn import conv1x1_dgrad_wgrad, dgrad_wgrad_plan

    g = torch.Generator().manual_seed(5)
    C_in = 80 if case == "wide C_in" else 20
    C_out, stride = 24, (2 if case == "stride 2" else 1)
    x = nhwc(torch.randn(2, C_in, 5, 7, generator=g).to(dtype))
    Ho, Wo = (5 - 1) // stride + 1, (7 - 1) // stride + 1
    dy = nhwc(torch.randn(2, C_out, Ho, Wo, generator=g).to(dtype))
    w = torch.randn(C_out, C_in, 1, 1, generator=g).to(dtype).to(DEVICE)
    second = None
    if case == "second":
        second = (nhwc(torch.randn(2, 36, 5, 7, generator=g).to(dtype)),
                  torch.randn(36, C_in, 1, 1, generator=g).to(dtype).to(DEVICE))
    norm = None
    if case == "prologue":
        norm = ChannelNorm(*(t.to(DEVICE) for t in (torch.randn(C_in, generator=g), torch.rand(C_in, generator=g) + 0.5,
                                                    torch.randn(C_in, generator=g), torch.randn(C_in, generator=g))))
    if DEVICE == "cpu":  # the interpreter: one pass wherever it fits
        fits = dgrad_wgrad_plan(70, C_out, C_in, 36 if second else 0, dtype, None, prologue=norm is not None)
        assert (fits is None) == (case == "wide C_in")

    one = conv1x1_dgrad_wgrad(dy, w, x, stride, norm, second=second, bias_grad=True, bias_grad2=True)
    two = _two_passes(dy, w, x, stride, norm, second)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    pairs = [(one[0], two[0]), *zip(one[2], two[2])] + (list(zip(one[3], two[3])) if second else [])
    for a, b in pairs:
        if case == "wide C_in":
            assert torch.equal(a, b)
        torch.testing.assert_close(a.float(), b.float(), **tol)
    if norm is not None:
        assert one[1].shape == two[1].shape
        torch.testing.assert_close(one[1][:, :2].sum(0), two[1][:, :2].sum(0), rtol=1e-4, atol=1e-4)
    if dtype == torch.float32 and norm is None:
        ref_dx = torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double(), stride=stride)
        if second:
            ref_dx += torch.nn.grad.conv2d_input(x.shape, second[1].double(), second[0].double())
        torch.testing.assert_close(one[0].double(), ref_dx, rtol=1e-5, atol=1e-5)
        ref_dw = torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double(), stride=stride)
        torch.testing.assert_close(one[2][0].double(), ref_dw, rtol=1e-5, atol=1e-5)
    again = conv1x1_dgrad_wgrad(dy, w, x, stride, norm, second=second, bias_grad=True, bias_grad2=True)
    assert torch.equal(again[0], one[0]) and torch.equal(again[2][0], one[2][0])


def test_one_pass_rule_is_deterministic_and_per_target():
    """One pass on sm_90a with tensor cores at ResNet-50 layer1's shapes, never on sm_80 or
    gfx942 (ptxas spills there) or fp32 (TF32 included); wider weights take two passes."""
    from fused_resnet.kernels.aot import TARGETS
    from fused_resnet.kernels.conv1x1_bn import GemmTiles, dgrad_wgrad_plan, dgrad_wgrad_tiles

    hopper = TARGETS["sm_90a"]
    assert dgrad_wgrad_tiles(256, 64, 0, torch.bfloat16, hopper) == GemmTiles(64, 256, 64, 1, 8, 2)
    # TF32 takes two passes: the tiles that would fit lower to mma.sync, not wgmma.
    assert dgrad_wgrad_tiles(256, 64, 0, torch.float32, hopper, "tf32", prologue=True) is None
    assert dgrad_wgrad_tiles(64, 64, 256, torch.float32, hopper, "tf32") is None
    assert dgrad_wgrad_tiles(64, 64, 0, torch.float32, hopper, "ieee") is None
    for name in ("sm_80", "gfx942"):
        assert dgrad_wgrad_tiles(64, 64, 0, torch.bfloat16, TARGETS[name]) is None
    for N, K, N2 in ((512, 128, 0), (256, 128, 0), (128, 64, 256)):  # layer2's conv3, wider C_in, a wide pair
        assert dgrad_wgrad_tiles(N, K, N2, torch.bfloat16, hopper) is None
    # About 256 programs, each split a whole number of row blocks: the partials are at most the rule's.
    tiles, splits, rows = dgrad_wgrad_plan(802816, 256, 64, 0, torch.bfloat16, hopper)
    assert splits == 256 and rows % tiles.block_m == 0 and splits * rows >= 802816
    assert dgrad_wgrad_plan(802816, 256, 64, 0, torch.bfloat16, hopper) == (tiles, splits, rows)


@runs_kernels
def test_interpreter_plans_as_takes_the_targets_tiles():
    """Inside interpreter_plans_as(sm_90a), the interpreter's launches take sm_90a's tiles
    (here 64-row output tiles instead of 16: the short grid's, M = 128 fills no H100) and
    compute the same convolution."""
    from fused_resnet.kernels.aot import TARGETS
    from fused_resnet.kernels.conv1x1_bn import conv1x1_forward, interpreter_plans_as

    if DEVICE != "cpu":
        pytest.skip("the interpreter's plan")
    g = torch.Generator().manual_seed(6)
    x = nhwc(torch.randn(2, 32, 8, 8, generator=g))  # M = 128 rows
    w = torch.randn(48, 32, 1, 1, generator=g)
    y, _, rows = conv1x1_forward(x, w, None, 1, stats=True, allow_tf32=True)
    with interpreter_plans_as(TARGETS["sm_90a"]):
        y_planned, partials, planned_rows = conv1x1_forward(x, w, None, 1, stats=True, allow_tf32=True)
    assert (rows, planned_rows, partials.shape[0]) == (16, 64, 2)
    torch.testing.assert_close(y_planned, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), torch.nn.functional.conv2d(x.double(), w.double()), rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("zeros", [False, True])
def test_outputs_are_allocated_channels_last_without_a_copy(zeros):
    """The GEMMs' outputs are allocated channels_last: an NCHW allocation made channels_last
    would add a copy of the whole output (one more launch, twice its bytes) to every call."""
    from torch.profiler import ProfilerActivity, profile

    from fused_resnet.kernels.conv1x1_bn.common import _nhwc_empty

    like = torch.ones(1, device=DEVICE, dtype=torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = _nhwc_empty((2, 6, 3, 5), like, zeros=zeros)
    ops = {event.name for event in prof.events()}
    assert not ops & {"aten::contiguous", "aten::clone", "aten::copy_"}, ops
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert out.dtype == torch.bfloat16 and out.device == like.device and out.shape == (2, 6, 3, 5)
    if zeros:
        assert torch.equal(out, torch.zeros_like(out))
