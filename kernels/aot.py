"""Ahead-of-time compilation of the kernels for GPU targets, on a machine without a GPU.

``record_launches`` intercepts ``kernel[grid](...)`` calls made by the launchers (with CPU
tensors, nothing runs) and keeps their arguments. ``compile_launch`` then specialises each
one exactly as a real launch would (Triton's own argument binder: dtypes, integer
specialisation, 16-byte alignment) and compiles it for a ``GPUTarget``: PTX and cubin for
NVIDIA, AMDGCN and hsaco for AMD. ``resource_usage`` reads registers and spills.

This leans on Triton's launch internals (``create_function_from_signature``,
``JITFunction._pack_args``); it is tested against the triton version the project pins.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGETS = {
    "sm_80": GPUTarget("cuda", 80, 32),
    "sm_90a": GPUTarget("cuda", 90, 32),
    "gfx942": GPUTarget("hip", "gfx942", 64),
}


@dataclass
class Launch:
    """One intercepted ``kernel[grid](*args, **kwargs)``."""

    kernel: JITFunction
    args: tuple
    kwargs: dict
    grid: Any

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@dataclass
class Recording:
    launches: list[Launch] = field(default_factory=list)


@contextlib.contextmanager
def record_launches() -> Iterator[Recording]:
    """Within the block, kernel launches are recorded instead of run."""
    recording = Recording()
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        recording.launches.append(Launch(self, args, dict(kwargs), grid))

    JITFunction.run = record
    try:
        yield recording
    finally:
        JITFunction.run = original


def specialize(launch: Launch, target: GPUTarget):
    """(ASTSource, options) that a real launch of ``launch`` on ``target`` would compile."""
    backend = make_backend(target)
    binder = create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(
        backend, launch.kwargs, bound_args, specialization, options)
    return ASTSource(launch.kernel, signature, constexprs, attrs), options


def specialization_key(launch: Launch, target: GPUTarget) -> str:
    """Two launches with the same key compile to the same binary."""
    src, options = specialize(launch, target)
    return f"{launch.name}|{sorted(src.signature.items())}|{sorted(src.constants.items(), key=str)}|{src.attrs}"


def compile_launch(launch: Launch, target: GPUTarget):
    src, options = specialize(launch, target)
    return triton.compile(src, target=target, options=options.__dict__)


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(compiled) -> dict:
    """Registers, spills and scratch of a compiled kernel, read from its binary.

    ``spills`` is 0 for a kernel that spills nothing: on NVIDIA the LOCAL bytes of
    ``cuobjdump --dump-resource-usage`` (where spilled registers live), on AMD the
    .vgpr_spill_count + .sgpr_spill_count of the AMDGCN metadata.
    """
    asm = compiled.asm
    if "cubin" in asm:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(asm["cubin"])
            out = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True,
                                 text=True, check=True).stdout
        fields = dict(re.findall(r"(\w+):(\d+)", out.split("Function", 1)[-1]))
        return {"registers": int(fields["REG"]), "spills": int(fields["LOCAL"]),
                "stack_bytes": int(fields["STACK"]), "shared_bytes": int(fields["SHARED"])}
    text = asm["amdgcn"]

    def first(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return {"registers": first(r"\.vgpr_count:\s+(\d+)"),
            "spills": first(r"\.vgpr_spill_count:\s+(\d+)") + first(r"\.sgpr_spill_count:\s+(\d+)"),
            "stack_bytes": first(r"ScratchSize:\s+(\d+)"), "shared_bytes": first(r"\.group_segment_fixed_size:\s+(\d+)")}


def launches_of_every_kernel() -> list[Launch]:
    """The launches the ops make, over every dtype, layout, residual mode, train/eval
    and affine setting, recorded with small CPU tensors (nothing runs)."""
    import torch

    from .add_relu import add_relu_backward, add_relu_forward
    from .bn_add_relu import (RESIDUAL_ADD, RESIDUAL_BN, RESIDUAL_NONE, ChannelNorm, bn_add_relu_backward,
                              bn_add_relu_forward)
    from .bn_stats import bn_stats
    from .layout import layout_of

    C = 8
    with record_launches() as rec:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for channels_last in (False, True):
                x = torch.randn(2, C, 4, 4, dtype=dtype)
                if channels_last:
                    x = x.to(memory_format=torch.channels_last)
                layout = layout_of(x)
                add_relu_forward(x, x)
                add_relu_backward(x, x)
                for affine in (False, True):
                    w = torch.ones(C) if affine else None
                    stats = torch.zeros(C), torch.ones(C), torch.zeros((), dtype=torch.long)
                    for momentum in (0.1, None):
                        bn_stats(x, layout, *stats, momentum, 1e-5)
                    bn_stats(x, layout, None, None, None, 0.1, 1e-5, return_var=True)
                    norm = ChannelNorm(torch.zeros(C), torch.ones(C), w, w)
                    for mode in (RESIDUAL_NONE, RESIDUAL_ADD, RESIDUAL_BN):
                        r = x if mode != RESIDUAL_NONE else None
                        rn = norm if mode == RESIDUAL_BN else None
                        for training in (False, True):
                            bn_add_relu_forward(x, layout, norm, 1e-5, not training, r, rn, 1e-5, not training)
                            bn_add_relu_backward(x, x, x, layout, norm, training, mode, True, r, rn, training)
                        bn_add_relu_backward(x, x, x, layout, norm, False, mode, False, r, rn, False)
    return rec.launches
