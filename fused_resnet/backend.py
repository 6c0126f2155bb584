"""Where an op runs: the Triton kernels, or the plain PyTorch composite of the same math.

- CUDA / ROCm tensors: the compiled Triton kernels.
- CPU tensors with ``TRITON_INTERPRET=1`` set before import: the same Triton kernels
  through Triton's interpreter (how the kernels are tested without a GPU).
- Other CPU tensors, and float64 anywhere (the kernels compute in fp32, which would
  lose what float64 is asked for): ATen's own batch_norm / relu kernels, in place where
  eager PyTorch would allocate, so never slower than the unfused eager sequence.
- While exporting to ONNX (either exporter) or inside ``fused_resnet.export.standard_ops()``,
  every tensor takes that ATen sequence, so the tracer records standard ops.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
from typing import Callable, Optional

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def interpreter_incompatibility() -> Optional[str]:
    """Why Triton's interpreter cannot run the kernels with the installed packages, or None.

    Triton 3.6's interpreter turns a 1-element array into a Python int for ``range()``,
    which numpy >= 2.3 refuses; triton 3.7 squeezes the array first. The compiled GPU path
    does not use the interpreter and is unaffected.
    """
    import numpy
    import triton
    from torch.torch_version import TorchVersion

    if TorchVersion(triton.__version__) < (3, 7) and TorchVersion(numpy.__version__) >= (2, 3):
        return (f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) needs numpy < 2.3, "
                f"found numpy {numpy.__version__}: install 'numpy<2.3' or triton >= 3.7, or run on a GPU")
    return None


# How many fused_resnet.export.standard_ops() blocks are open (the ops take ATen's sequence).
standard_ops_depth = 0


@functools.lru_cache(maxsize=None)
def _onnx_export_flag() -> Callable[[], bool]:
    """``torch.onnx.is_in_onnx_export`` without its two imports per call (1.6 us on every op
    call of a process that imported torch.onnx, as torchvision and timm do): the two flags it
    reads, where this torch keeps them where 2.11 to 2.14 do; else the function itself."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return sys.modules["torch.onnx"].is_in_onnx_export
    if not (hasattr(_flags, "_is_onnx_exporting") and hasattr(GLOBALS, "in_onnx_export")):
        return sys.modules["torch.onnx"].is_in_onnx_export
    return lambda: GLOBALS.in_onnx_export or _flags._is_onnx_exporting


def standard_ops_wanted() -> bool:
    """True while the ops must be recorded as ATen's sequence: inside ``standard_ops()``, or
    during ``torch.onnx.export`` (both exporters set ``is_in_onnx_export``; ONNX has no
    translation of the fused ops)."""
    if standard_ops_depth:
        return True
    # torch.onnx not imported: certainly not exporting.
    return "torch.onnx" in sys.modules and _onnx_export_flag()()


def use_triton(t: torch.Tensor) -> bool:
    """True where ``t``'s op runs through the Triton kernels."""
    if t.dtype == torch.float64:
        return False
    # Dynamo (torch.compile) keeps the fused ops; torch.export's non-strict tracing, which
    # the ONNX exporter runs, is plain Python and sees the flag.
    if not torch.compiler.is_dynamo_compiling() and standard_ops_wanted():
        return False
    if t.is_cuda:  # ROCm tensors too
        return True
    if INTERPRET and t.is_cpu:
        # Checked in eager calls only: Dynamo cannot trace the version comparison (a str subclass).
        problem = None if torch.compiler.is_compiling() else interpreter_incompatibility()
        if problem:
            raise RuntimeError(problem)
        return True
    return False


_NO_DEVICE_GUARD = contextlib.nullcontext()


def launch_device(t: torch.Tensor):
    """The context every kernel launch runs in: ``t``'s CUDA device made current (Triton
    compiles for and launches on the current device), a no-op for CPU tensors."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return _NO_DEVICE_GUARD


def op_implementation(work: Callable, empty_dtype: Optional[Callable[[torch.Tensor], torch.dtype]] = None) -> Callable:
    """What ``torch.library`` registers for an op whose eager calls run ``work`` itself (``call_op``):
    ``work`` with its launches under its first argument's device (``launch_device``),
    whatever device is current when it is called, and each output ``work`` leaves None
    (nothing an eager caller would read) as an empty tensor, since a custom op cannot return
    None: of ``empty_dtype(x)``, by default x's dtype, as the op's fake returns it."""

    @functools.wraps(work)
    def implementation(x, *args, **kwargs):
        with launch_device(x):
            out = work(x, *args, **kwargs)
        if isinstance(out, tuple) and any(t is None for t in out):
            empty = x.new_empty((0,), dtype=None if empty_dtype is None else empty_dtype(x))
            out = tuple(empty.clone() if t is None else t for t in out)
        return out

    # torch.library infers the op's schema from this signature: work's own, annotations resolved.
    implementation.__signature__ = inspect.signature(work, eval_str=True)
    return implementation


def needs_autograd(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether an op call goes through its autograd Function: a gradient is wanted, or
    ``torch.jit.trace`` is recording (its check run, without gradients, must record the same graph)."""
    if torch.is_grad_enabled():
        for t in tensors:  # a loop, not any(<generator>): this runs on every op call
            if t is not None and t.requires_grad:
                return True
    return bool(torch._C._get_tracing_state())


def eager_call(x: torch.Tensor) -> bool:
    """Whether an op call may skip the ``torch.library`` dispatcher and run the op's
    implementation: an eager call on a plain tensor. Compiling, exporting and tracing (fake
    or functional tensors, a dispatch mode, torch.jit.trace) go through the op, so the graph holds one node.
    The dispatcher costs as much host time as the rest of the op (``tools/host_time.py``)."""
    return (not torch.compiler.is_compiling() and type(x) is torch.Tensor
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._get_tracing_state())


def call_op(op: Callable, implementation: Callable, args: tuple, mutated: tuple = ()):
    """``op(*args)``, or in an eager call (``eager_call``) ``implementation(*args)`` under
    ``launch_device(args[0])``, with the version counters of the ``mutated`` tensors bumped,
    as the dispatcher would. ``implementation`` may return None where the op returns an
    empty tensor (nothing to allocate for an output the caller drops)."""
    if not eager_call(args[0]):
        return op(*args)
    with launch_device(args[0]):
        out = implementation(*args)
    if mutated:
        # One call for all of them (None: an absent buffer; inference tensors have no counter: left alone).
        torch.autograd.graph.increment_version([t for t in mutated if t is not None])
    return out
