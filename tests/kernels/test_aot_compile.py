"""Every kernel, with the signatures and constants the ops launch, compiles for NVIDIA sm_80
and sm_90a and AMD gfx942, on this GPU-less machine, without a register spill."""
from __future__ import annotations

import pytest

from fused_resnet import backend

pytestmark = [
    pytest.mark.aot,
    pytest.mark.skipif(backend.INTERPRET, reason="compiles real GPU binaries; not under the interpreter"),
]


@pytest.fixture(scope="module")
def launches():
    from fused_resnet.kernels.aot import launches_of_every_kernel

    return launches_of_every_kernel()


def test_every_kernel_is_launched(launches):
    """The recorded launches cover every @triton.jit kernel the package defines."""
    import importlib

    import triton

    defined = set()
    for name in ("add_relu", "bn_add_relu", "bn_stats"):
        module = importlib.import_module(f"fused_resnet.kernels.{name}")
        defined |= {name for name, obj in vars(module).items()
                    if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")}
    assert defined == {launch.name for launch in launches}


@pytest.mark.parametrize("target_name", ["sm_80", "sm_90a", "gfx942"])
def test_compiles_without_spills(launches, target_name):
    from fused_resnet.kernels.aot import TARGETS, compile_launch, resource_usage, specialization_key

    target = TARGETS[target_name]
    unique = {}
    for launch in launches:
        unique.setdefault(specialization_key(launch, target), launch)
    problems, registers = [], {}
    for launch in unique.values():
        compiled = compile_launch(launch, target)
        binary = "cubin" if target.backend == "cuda" else "hsaco"
        assert compiled.asm.get(binary), f"{launch.name}: no {binary} for {target_name}"
        usage = resource_usage(compiled)
        registers[launch.name] = max(registers.get(launch.name, 0), usage["registers"])
        if usage["spills"]:
            problems.append(f"{launch.name}: {usage}")
    print(f"{target_name}: {len(unique)} specialisations; max registers per kernel: {registers}")
    assert not problems, "register spills:\n" + "\n".join(problems)
