"""Every kernel, specialised as the ops launch it at real ResNet shapes, compiles for NVIDIA
sm_80 and sm_90a and AMD gfx942, on this GPU-less machine, without a register spill and
within each target's shared memory per block.

The shapes: the input of every BatchNorm and every 1x1 convolution of torchvision's
ResNets (built on the meta device) at 224x224, batch 1 to 256, NCHW and channels_last
(the GEMMs: channels_last). ``FUSED_RESNET_AOT`` picks which configurations:

- ``quick`` (the default, what ``make test`` runs): the tails (BatchNorm, add, ReLU) in
  the configurations the modules of a converted ResNet launch, in fp32;
- ``conv1x1`` (``make test-aot AOT=conv1x1``, in CI): the 1x1-convolution GEMMs of
  ``fuse_convolutions=True`` at batch 256 in every dtype, TF32 on and off;
- ``modules``: the tails as ``quick`` in fp32, fp16 and bf16, parameters in fp32 or the
  activation dtype, and the GEMMs at every batch size in every dtype;
- ``every``: every configuration the ops accept (affine or not, momentum None, no
  counter or running statistics, SyncBatchNorm, a frozen BatchNorm next to a training
  one, no parameter gradients, TF32 off), in every dtype, at every batch size.

Compiled binaries stay in Triton's cache (``TRITON_CACHE_DIR``, default ~/.triton/cache),
so a second run only reads them back. ``FUSED_RESNET_AOT_REPORT=<file>`` also writes the
per-target tables as JSON.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from fused_resnet import backend

pytestmark = [
    pytest.mark.aot,
    pytest.mark.skipif(backend.INTERPRET, reason="compiles real GPU binaries; not under the interpreter"),
]

CONFIGURATIONS = os.environ.get("FUSED_RESNET_AOT", "quick")
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
           "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
BATCH_SIZES = tuple(range(1, 257))
RESOLUTION = 224


def resnet_shapes() -> tuple[tuple, tuple]:
    """(C, H, W) of every BatchNorm input and (C_in, H, W, C_out, stride) of every 1x1
    convolution of the torchvision ResNets at RESOLUTION, from a forward pass on the meta
    device."""
    import torch
    import torchvision

    activations, conv1x1 = set(), set()

    def record(module, inputs, out):
        C, H, W = inputs[0].shape[1:]
        if isinstance(module, torch.nn.BatchNorm2d):
            activations.add((C, H, W))
        elif module.kernel_size == (1, 1) and module.groups == 1 and module.padding == (0, 0):
            conv1x1.add((C, H, W, module.out_channels, module.stride[0]))

    for name in RESNETS:
        with torch.device("meta"):
            model = getattr(torchvision.models, name)()
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.Conv2d)):
                module.register_forward_hook(record)
        model(torch.empty(1, 3, RESOLUTION, RESOLUTION, device="meta"))
    return tuple(sorted(activations)), tuple(sorted(conv1x1))


@pytest.fixture(scope="module")
def shapes():
    import torch

    from fused_resnet.kernels.aot import DTYPES, RealShapes

    # name: (dtypes, every, the tails' shapes, the GEMMs' shapes, the GEMMs' batch sizes)
    activations, conv1x1 = resnet_shapes()
    sets = {"quick": ((torch.float32,), False, activations, (), BATCH_SIZES),
            "conv1x1": (DTYPES, True, (), conv1x1, (256,)),
            "modules": (DTYPES, False, activations, conv1x1, BATCH_SIZES),
            "every": (DTYPES, True, activations, conv1x1, BATCH_SIZES)}
    if CONFIGURATIONS not in sets:
        raise ValueError(f"FUSED_RESNET_AOT must be one of {sorted(sets)}, not {CONFIGURATIONS!r}")
    dtypes, every, tails, gemms, gemm_batch_sizes = sets[CONFIGURATIONS]
    return RealShapes(tails, BATCH_SIZES, dtypes, gemms, gemm_batch_sizes), every


def launches_on(shapes, target_name: str) -> list:
    """The launches over ``shapes`` on one target (the GEMMs' tiles depend on it)."""
    from fused_resnet.kernels.aot import TARGETS, real_shape_launches

    real, every = shapes
    return list(real_shape_launches(real, TARGETS[target_name], every=every))


@pytest.fixture(scope="module")
def pool():
    from fused_resnet.kernels.aot import compile_pool

    with compile_pool() as workers:
        yield workers


def test_shapes_are_every_resnet_stage():
    """The stem, every stage's widths of the plain, bottleneck, ResNeXt and wide blocks."""
    activations, conv1x1 = resnet_shapes()
    assert (64, 112, 112) in activations and (64, 56, 56) in activations  # stem, resnet18 layer1
    assert (2048, 7, 7) in activations and (512, 56, 56) in activations  # resnet50 layer4, resnext101 layer1
    assert (1024, 7, 7) in activations  # wide / resnext50 layer4's inner width
    assert len(activations) == 16
    assert (1024, 14, 14, 2048, 2) in conv1x1 and (64, 56, 56, 256, 1) in conv1x1  # a downsample, a conv3


def test_every_kernel_is_launched():
    """LAUNCH_FAMILIES covers every @triton.jit *_kernel of every module of the package."""
    import importlib
    import pkgutil

    import triton

    import fused_resnet.kernels as package
    from fused_resnet.kernels.aot import launches_of_every_kernel

    defined = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        defined |= {name for name, obj in vars(module).items()
                    if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")
                    and obj.fn.__module__ == module.__name__}
    missing = defined - {launch.name for launch in launches_of_every_kernel()}
    assert not missing, (f"never launched: {sorted(missing)}; add a function yielding their launches to "
                         "LAUNCH_FAMILIES in kernels/aot.py")


def _table(target_name: str, table: dict, count: int, seconds: float, cpu_seconds: float) -> str:
    lines = [f"{target_name}: {count} specialisations ({CONFIGURATIONS} configurations), {seconds:.0f} s "
             f"({cpu_seconds:.0f} CPU-s compiling or reading back)",
             f"  {'kernel':<40} {'variants':>8} {'max regs':>8} {'spills':>6} {'max shared':>10}"]
    for name, row in table.items():
        lines.append(f"  {name:<40} {row['variants']:>8} {row['max_registers']:>8} {row['max_spills']:>6} "
                     f"{row['max_shared_bytes']:>10}")
    return "\n".join(lines)


def _write_report(target_name: str, entry: dict) -> None:
    path = os.environ.get("FUSED_RESNET_AOT_REPORT")
    if not path:
        return
    report = {}
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
    report[target_name] = entry
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


@pytest.mark.parametrize("target_name", ["sm_80", "sm_90a", "gfx942"])
def test_compiles_without_spills(shapes, pool, target_name, capsys):
    from fused_resnet.kernels.aot import SHARED_MEMORY_LIMITS, TARGETS, compile_all, unique_launches, usage_table

    target = TARGETS[target_name]
    unique = unique_launches(launches_on(shapes, target_name), target)
    start = time.perf_counter()
    results = compile_all(unique, target, pool)
    seconds = time.perf_counter() - start
    cpu_seconds = sum(usage["cpu_seconds"] for _, usage in results)
    table = usage_table(results)
    with capsys.disabled():
        print("\n" + _table(target_name, table, len(unique), seconds, cpu_seconds))
    _write_report(target_name, {"configurations": CONFIGURATIONS, "specialisations": len(unique),
                                "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
                                "kernels": table})
    spills = [f"{launch.describe()}: {usage}" for launch, usage in results if usage["spills"]]
    assert not spills, "register spills:\n" + "\n".join(spills)
    limit = SHARED_MEMORY_LIMITS[target_name]
    over = [f"{launch.describe()}: {usage['shared_bytes']} B" for launch, usage in results
            if usage["shared_bytes"] > limit]
    assert not over, f"over {target_name}'s {limit} B of shared memory per block:\n" + "\n".join(over)
    # Every GEMM with 16-bit inputs or TF32 runs its dot on the tensor cores (fp32 "ieee" may not).
    on_fma = [launch.describe() for launch, usage in results if _dot_wants_tensor_cores(launch)
              and not usage["tensor_core_instructions"]]
    assert not on_fma, f"dots without {target_name}'s tensor-core instructions:\n" + "\n".join(on_fma)
    if target_name == "sm_90a":
        # Hopper: every tensor-core dot on wgmma (an mma.sync there runs at a fraction of its peak).
        not_wgmma = [launch.describe() for launch, usage in results if _dot_wants_tensor_cores(launch)
                     and usage["wgmma_instructions"] < usage["tensor_core_instructions"]]
        assert not not_wgmma, "dots on mma.sync, not wgmma, on sm_90a:\n" + "\n".join(not_wgmma)
        # The launch audit's projection counts these loops as pipelined: the compiler must agree.
        from fused_resnet.tools.launch_audit import H100, read_launch
        claimed = [launch.describe() for launch, usage in results
                   if read_launch(launch, "", H100).pipelined and not usage["pipelined"]]
        assert not claimed, "the launch audit projects these as pipelined, the compiler did not:\n" + \
            "\n".join(claimed)


def _dot_wants_tensor_cores(launch) -> bool:
    args = launch.bound_arguments()
    if "INPUT_PRECISION" not in args:
        return False
    return args["INPUT_PRECISION"] == "tf32" or args["x_ptr"].dtype in (torch.bfloat16, torch.float16)


def test_a_ragged_batch_compiles_nothing_new():
    """Batches 31 and 32 (and 255, 256) of the same layer specialise the GEMMs and the
    elementwise BatchNorm kernels alike: the integers that change with the batch (M, the row
    count, a split's rows) are not specialised, so a ragged last batch or another eval batch
    reuses the binaries; and the unspecialised GEMM and BatchNorm kernels still load 16 bytes
    a thread on sm_90a (the masks they bound run across the vector dimension)."""
    from fused_resnet.kernels.aot import (TARGETS, RealShapes, bn_add_relu_launches, compile_launch,
                                          conv1x1_launches, specialization_key)

    target = TARGETS["sm_90a"]
    keyed = {"conv1x1_forward_kernel", "conv1x1_dgrad_kernel", "conv1x1_wgrad_kernel",
             "conv1x1_dgrad_wgrad_kernel", "bn_add_relu_forward_kernel", "bn_add_relu_backward_dx_kernel"}

    def keys(batch):
        shapes = RealShapes(((256, 56, 56),), (batch,), (torch.bfloat16,), conv1x1=((64, 56, 56, 256, 1),))
        launches = [launch for family in (conv1x1_launches, bn_add_relu_launches)
                    for launch in family(shapes, False, target) if launch.name in keyed]
        return launches, {specialization_key(launch, target) for launch in launches}

    for small, large in ((31, 32), (255, 256)):
        launches, small_keys = keys(small)
        assert {launch.name for launch in launches} == keyed
        assert small_keys == keys(large)[1], (small, large)
    for name in ("conv1x1_forward_kernel", "bn_add_relu_forward_kernel"):
        ptx = compile_launch(next(launch for launch in launches if launch.name == name), target).asm["ptx"]
        assert "ld.global.v4" in ptx or ", 0x10" in ptx, f"{name}: no 16-byte loads"
