"""The launch audit (fused_resnet/tools/launch_audit.py): every Triton launch of a converted
torchvision ResNet-50, recorded on meta tensors with the H100's plan, fills the GPU and
stays near its roofline bound (a projection; nothing runs). Batch 256 here; batch 32 with
the zoo tests (``make test-zoo``)."""
from __future__ import annotations

import pytest

from fused_resnet import backend
from fused_resnet.tools import launch_audit as la

pytestmark = pytest.mark.skipif(backend.INTERPRET, reason="records the compiled kernels' launches")


def figures(**kw) -> la.LaunchFigures:
    base = dict(kernel="k", stage="layer1", programs=1024, bytes=64 << 20, flops=0, depth=1, pipelined=False,
                num_stages=1, num_warps=4, precision="ieee")
    return la.project(la.LaunchFigures(**(base | kw)), la.H100)


def test_projection_and_check_on_made_up_launches():
    """Bandwidth at 3.35 TB/s; a grid of one program gets one SM's share; a deep unpipelined
    loop is bound by its DRAM round trips; each of these is what the check rejects."""
    wide = figures()
    assert wide.bandwidth_us == pytest.approx((64 << 20) / 3.35e6)
    assert wide.projected_us == pytest.approx(wide.bandwidth_us) and not la.launch_problems([wide])
    narrow = figures(programs=1, bytes=int(6.4e6), depth=32)
    assert narrow.projected_us == pytest.approx(narrow.bandwidth_us * 132)
    assert [p for p in la.launch_problems([narrow]) if "1 programs" in p]
    deep = figures(programs=256, bytes=int(3e6), depth=64)
    assert deep.serial_us == pytest.approx(64 * 0.8) and la.launch_problems([deep])
    pipelined = figures(programs=256, bytes=int(3e6), depth=64, pipelined=True, num_stages=4)
    assert pipelined.serial_us == pytest.approx(deep.serial_us / 4)
    small = figures(programs=1, bytes=200 * 1024, depth=8)  # under 256 KB: latency-bound whatever its grid
    assert not la.launch_problems([small])
    gemm = figures(programs=264, bytes=int(1e8), flops=int(1e12), precision="bf16", pipelined=True, num_stages=4,
                   depth=8, num_warps=8)
    assert gemm.compute_us == pytest.approx(1e12 / 989e6) and gemm.roofline_us == gemm.compute_us


def test_stages_and_eager_are_projected_alike():
    """A training step at batch 32 (bf16, channels_last, the default path): launches in each
    stage, every BatchNorm's statistics and its backward, and eager's sequence beside it."""
    audit = la.audit_case(la.AuditCase(32, "bfloat16", False, True))
    stages = audit.stage_times()
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        assert stages[stage]["launches"] > 0 and stages[stage]["kernels"] > 0 and stages[stage]["eager"] > 0
    kernels = [f.kernel for f in audit.launches]
    # ResNet-50: 53 BatchNorms, each one statistics pass; one backward reduction each, but
    # the 4 downsample BatchNorms share their block's (bn_add_bn_relu).
    assert kernels.count("bn_stats_partial_kernel") == 53
    assert kernels.count("bn_add_relu_backward_reduce_kernel") == 49
    assert {op.op for op in audit.eager} >= {"convolution", "native_batch_norm", "convolution_backward"}
    assert "| layer4 |" in la.format_stage_table([audit])


def check_resnet50(batch: int, dtype: str, fuse: bool):
    for training in (True, False):
        recorder = la.record(la.AuditCase(batch, dtype, fuse, training), fused=True)
        assert recorder.launches
        if fuse and dtype == "bfloat16":
            assert any(f.kernel.startswith("conv1x1_") for f in recorder.launches)
        problems = la.launch_problems(recorder.launches)
        assert not problems, f"{len(problems)} launches fail:\n" + "\n".join(problems[:20])


@pytest.mark.parametrize("fuse", [False, True], ids=["default", "fuse_convolutions"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_every_launch_fills_an_h100_at_batch_256(dtype, fuse):
    check_resnet50(256, dtype, fuse)


@pytest.mark.zoo
@pytest.mark.parametrize("fuse", [False, True], ids=["default", "fuse_convolutions"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_every_launch_fills_an_h100_at_batch_32(dtype, fuse):
    check_resnet50(32, dtype, fuse)
