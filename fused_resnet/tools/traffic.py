"""Counting the bytes an op moves: Triton launches through the interpreter, ATen ops through
a ``TorchDispatchMode``. What is counted, and how it is reported, is :mod:`fused_resnet.tools.audit`.

- :class:`TritonTrafficCounter` records the addresses every masked load and store of a
  Triton launch touches (masked-off lanes excluded): each launch contributes its *unique*
  bytes read and its unique bytes written, per buffer. Needs ``TRITON_INTERPRET=1`` set
  before triton is imported.
- :class:`AtenTrafficMode` sees every ATen op dispatched inside it and counts its inputs
  as read and its outputs (and mutated arguments) as written: the *one-pass* count, plus
  batch norm's second pass over its input (training forward) and over grad and input
  (backward) as *extra* reads.
- :class:`Traffic` sums either, activation-sized tensors apart from the rest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten


def interpreter_active() -> bool:
    """True when the kernels were built by ``TRITON_INTERPRET=1`` (set before triton was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    from fused_resnet.kernels.bn_add_relu import bn_add_relu_forward_kernel
    return isinstance(bn_add_relu_forward_kernel, InterpretedFunction)


# --------------------------------------------------------------------------- Triton kernels


@dataclass
class BufferTraffic:
    """One tensor a launch touched: its size and the unique bytes loaded from / stored to it."""

    names: str
    nbytes: int
    read: int = 0
    written: int = 0


@dataclass
class Launch:
    """One kernel launch, the buffers it touched, and its integer and boolean arguments
    (constexprs included) by name."""

    kernel: str
    grid: tuple
    buffers: list[BufferTraffic]
    scalars: dict = field(default_factory=dict)


def _unique_bytes(accesses: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(unique addresses, bytes at each) of a list of (addresses, itemsize) accesses."""
    if not accesses:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    addrs = np.concatenate([a for a, _ in accesses])
    sizes = np.concatenate([np.full(a.size, s, np.int64) for a, s in accesses])
    addrs, first = np.unique(addrs, return_index=True)
    return addrs, sizes[first]


class TritonTrafficCounter:
    """Records, for every Triton launch in the block, the unique bytes each buffer gave and took.

    Patches the interpreter's masked load / store (``InterpreterBuilder``) and its grid
    executor (to mark launch boundaries and learn the tensor arguments), and restores them
    on exit. Needs ``TRITON_INTERPRET=1`` set before triton was imported.
    """

    def __init__(self):
        self.launches: list[Launch] = []
        self._loads: Optional[list] = None
        self._stores: Optional[list] = None

    def __enter__(self):
        if not interpreter_active():
            raise RuntimeError("counting kernel traffic needs TRITON_INTERPRET=1 set before triton is imported")
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        self._saved = (interpreter.GridExecutor.__call__, builder.__dict__.get("create_masked_load"),
                       builder.__dict__.get("create_masked_store"))
        counter, grid_call = self, interpreter.GridExecutor.__call__
        class_load, class_store = builder.create_masked_load, builder.create_masked_store

        def record(into, ptrs, mask):
            if into is not None:
                # Masks arrive as int32 arrays: make them boolean before selecting lanes.
                p, m = np.broadcast_arrays(ptrs.data, np.asarray(mask.data).astype(bool))
                into.append((p[m].astype(np.uint64), ptrs.get_element_ty().primitive_bitwidth // 8))

        def masked_load(ptrs, mask, *args, **kwargs):
            record(counter._loads, ptrs, mask)
            return class_load(ptrs, mask, *args, **kwargs)

        def masked_store(ptrs, value, mask, *args, **kwargs):
            record(counter._stores, ptrs, mask)
            return class_store(ptrs, value, mask, *args, **kwargs)

        def launch(executor, *args, **kwargs):
            counter._loads, counter._stores = [], []
            try:
                # The interpreter's own host copies are not the kernel's traffic.
                with _disable_current_modes():
                    return grid_call(executor, *args, **kwargs)
            finally:
                counter._finish(executor, args, kwargs)

        builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
        interpreter.GridExecutor.__call__ = launch
        return self

    def __exit__(self, *exc):
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        grid_call, load, store = self._saved
        interpreter.GridExecutor.__call__ = grid_call
        for name, saved in (("create_masked_load", load), ("create_masked_store", store)):
            if saved is None:
                builder.__dict__.pop(name, None)
            else:
                setattr(builder, name, saved)
        return False

    def _finish(self, executor, args, kwargs):
        """Attribute this launch's unique addresses to the tensor arguments' storages."""
        named = list(zip(executor.arg_names, args)) + list(kwargs.items())
        storages: dict[int, BufferTraffic] = {}
        for name, value in named:
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                buf = storages.setdefault(storage.data_ptr(), BufferTraffic("", storage.nbytes()))
                buf.names = f"{buf.names}|{name}" if buf.names else name
        starts = np.array(sorted(storages), dtype=np.uint64)
        buffers = [storages[int(s)] for s in starts]
        for accesses, attr in ((self._loads, "read"), (self._stores, "written")):
            addrs, sizes = _unique_bytes(accesses)
            owner = np.searchsorted(starts, addrs, side="right") - 1
            for i, buf in enumerate(buffers):
                inside = (owner == i) & (addrs < starts[i] + np.uint64(buf.nbytes))
                setattr(buf, attr, getattr(buf, attr) + int(sizes[inside].sum()))
        grid = executor.grid if isinstance(executor.grid, tuple) else ()
        scalars = {name: value for name, value in named if isinstance(value, (bool, int))}
        self.launches.append(Launch(executor.fn.__name__, grid, buffers, scalars))
        self._loads = self._stores = None


# --------------------------------------------------------------------------- ATen ops

# Ops that allocate without touching memory; they launch nothing.
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
# In-place ops that overwrite their first argument without reading it.
_WRITE_ONLY_SELF = {"copy_", "fill_", "zero_", "normal_", "uniform_"}
# Batch-norm forwards: the index of their ``training`` argument (None: always training).
_BN_FORWARD = {"native_batch_norm": 5, "_native_batch_norm_legit": 5, "cudnn_batch_norm": 5,
               "miopen_batch_norm": 5, "_batch_norm_with_update": None}
# Batch-norm backwards: (index of grad, index of input, index of ``training``).
_BN_BACKWARD = {"native_batch_norm_backward": (0, 1, 7), "batch_norm_backward": (0, 1, 7),
                "cudnn_batch_norm_backward": (1, 0, None), "miopen_batch_norm_backward": (1, 0, None)}


@dataclass
class AtenOp:
    """One ATen op: sizes of the tensors it read and wrote, and of the re-reads its
    implementation adds (batch norm's second pass)."""

    name: str
    reads: list[int]
    writes: list[int]
    extra_reads: list[int] = field(default_factory=list)


def _tensors(values) -> list[torch.Tensor]:
    """The distinct tensors in a (nested) argument list, by memory (an argument given twice is read once)."""
    seen, out = set(), []
    for t in tree_flatten(values)[0]:
        if isinstance(t, torch.Tensor) and (t.data_ptr(), t.nbytes) not in seen:
            seen.add((t.data_ptr(), t.nbytes))
            out.append(t)
    return out


def _bound_args(func, args, kwargs) -> list:
    """Argument values in schema order (keyword arguments placed where they belong)."""
    return [args[i] if i < len(args) else kwargs.get(a.name) for i, a in enumerate(func._schema.arguments)]


def _extra_reads(name: str, values: list) -> list[int]:
    """Bytes batch norm's implementation re-reads beyond one pass (see the module docstring of :mod:`fused_resnet.tools.audit`)."""
    if name in _BN_FORWARD:
        index = _BN_FORWARD[name]
        training = True if index is None else bool(values[index])
        return [values[0].nbytes] if training else []
    if name in _BN_BACKWARD:
        grad, inp, index = _BN_BACKWARD[name]
        training = True if index is None else bool(values[index])
        return [values[grad].nbytes] + ([values[inp].nbytes] if training else [])
    return []


def _custom_op_impl(func) -> Optional[Callable]:
    """The Python implementation behind a ``torch.library.custom_op``, to look inside it."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:
        return None
    opdef = OPDEFS.get(func._schema.name)
    return getattr(opdef, "_init_fn", None)


class AtenTrafficMode(TorchDispatchMode):
    """Records every ATen op dispatched inside it as an :class:`AtenOp`.

    Views and allocations move no bytes and launch nothing: they are skipped. Custom ops
    of the namespaces in ``look_inside`` run their Python implementation under this mode,
    so the ATen ops around their kernels are seen (their kernels are counted by
    :class:`TritonTrafficCounter`).
    """

    def __init__(self, look_inside: Sequence[str] = ()):
        super().__init__()
        self.ops: list[AtenOp] = []
        self.look_inside = tuple(look_inside)
        self.opaque: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in self.look_inside:
            impl = _custom_op_impl(func)
            if impl is not None:
                with self:
                    return impl(*args, **kwargs)
            self.opaque.append(str(func))
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if func.is_view or name in _ALLOCATIONS or func.namespace in self.look_inside:
            return out
        values = _bound_args(func, args, kwargs)
        written = [v for v, a in zip(values, func._schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
        read = values[1:] if name in _WRITE_ONLY_SELF else values
        self.ops.append(AtenOp(str(func), [t.nbytes for t in _tensors(read)],
                               [t.nbytes for t in _tensors([written, out])], _extra_reads(name, values)))
        return out


# --------------------------------------------------------------------------- one op, one pass


@dataclass
class Traffic:
    """Bytes moved by one op in one pass, activation tensors apart from the rest."""

    activation_read: int = 0
    activation_written: int = 0
    other_read: int = 0
    other_written: int = 0
    extra_activation_read: int = 0  # eager only: batch norm's unavoidable second pass
    launches: int = 0

    @property
    def activation(self) -> int:
        return self.activation_read + self.activation_written

    @property
    def other(self) -> int:
        return self.other_read + self.other_written

    def add(self, read: int, written: int, activation: bool) -> None:
        if activation:
            self.activation_read += read
            self.activation_written += written
        else:
            self.other_read += read
            self.other_written += written


def triton_traffic(launches: Sequence[Launch], activation_bytes: int, per_channel_bytes: int) -> Traffic:
    """Sum of the launches' unique bytes.

    Activation traffic: what a launch moves to or from an activation-sized buffer, unless
    it is at most one element per channel (``per_channel_bytes``): the statistics kernel's
    read of each channel's shift x[0, c, 0, 0] is a per-channel load, as the budget counts it.
    """
    traffic = Traffic(launches=len(launches))
    for launch in launches:
        for buf in launch.buffers:
            activation = buf.nbytes >= activation_bytes and buf.read + buf.written > per_channel_bytes
            traffic.add(buf.read, buf.written, activation)
    return traffic


def aten_traffic(ops: Sequence[AtenOp], activation_bytes: int) -> Traffic:
    """Sum over ATen ops: inputs read, outputs written, and batch norm's re-reads."""
    traffic = Traffic(launches=len(ops))
    for op in ops:
        for n in op.reads:
            traffic.add(n, 0, n >= activation_bytes)
        for n in op.writes:
            traffic.add(0, n, n >= activation_bytes)
        traffic.extra_activation_read += sum(n for n in op.extra_reads if n >= activation_bytes)
    return traffic
