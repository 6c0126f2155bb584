"""Memory-traffic audit: bytes the fused kernels move against the eager op sequence.

Nothing here needs a GPU. Bytes are counted, not assumed:

- **Fused**: the Triton kernels run through Triton's interpreter (``TRITON_INTERPRET=1``),
  and :class:`TritonTrafficCounter` records the addresses every masked load and store
  touches (masked-off lanes excluded). Each launch contributes its *unique* bytes read and
  its unique bytes written, per buffer; summed over launches.
- **Eager**: :class:`AtenTrafficMode`, a ``TorchDispatchMode``, sees every ATen op the
  eager sequence dispatches and counts its inputs as read and its outputs (and mutated
  arguments) as written: the *one-pass* count. Batch norm cannot be one pass: in
  training it reads its input twice (statistics, then normalisation) and its backward
  reads grad and input twice (reductions, then the elementwise pass; in eval the second
  pass reads grad only). The *implementation* count adds those re-reads.

Activation bytes (tensors the size of the activation, T) are reported apart from per-channel
parameters, statistics and partial sums, which the traffic budget leaves out. Activation
bytes are linear in the activation size, so they are measured at small shapes (the
interpreter is slow) and reported per T; per-stage bytes at real shapes are those ratios
times the real T: a scaling, said so wherever it is printed.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

OPS = ("bn_relu", "bn_add_relu", "bn_add_bn_relu", "add_relu")
PASSES = ("forward_train", "forward_eval", "backward_train", "backward_eval")
PASS_LABELS = {"forward_train": "fwd train", "forward_eval": "fwd eval",
               "backward_train": "bwd train", "backward_eval": "bwd eval"}
# add_relu has no BatchNorm: train and eval are the same op, audited once.
OP_PASSES = {op: PASSES for op in OPS[:-1]} | {"add_relu": ("forward_eval", "backward_eval")}

# Traffic in units of T (bytes of one activation tensor).
# The least any implementation moves without keeping a whole activation on chip: training
# needs the statistics before normalising and the gradient sums before dx (two passes over
# x, and over dy and x); eval is one pass. In training the ReLU mask can be recomputed
# from the saved inputs (bn_relu, bn_add_bn_relu), where bn_add_relu, whose residual is
# not saved, reads the saved output.
MINIMUM = {
    "bn_relu": {"forward_train": 3, "forward_eval": 2, "backward_train": 5, "backward_eval": 4},
    "bn_add_relu": {"forward_train": 4, "forward_eval": 3, "backward_train": 7, "backward_eval": 5},
    "bn_add_bn_relu": {"forward_train": 5, "forward_eval": 3, "backward_train": 8, "backward_eval": 6},
    "add_relu": {"forward_eval": 3, "backward_eval": 3},
}
# What the fused kernels move by design (issue 2 budgeted 7T for the bn_relu backward,
# which reads y; recomputing the mask from x brought it to 5T), and what eager PyTorch
# was expected to move.
FUSED_BUDGET = {
    "bn_relu": {"forward_train": 3, "forward_eval": 2, "backward_train": 5},
    "bn_add_relu": {"forward_train": 4, "forward_eval": 3, "backward_train": 7},
}
EAGER_BUDGET = {
    "bn_relu": {"forward_train": 5, "forward_eval": 4, "backward_train": 8},
    "bn_add_relu": {"forward_train": 8, "forward_eval": 7, "backward_train": 8},
}

# GPUs for the projection, peak DRAM bandwidth in TB/s (vendor data sheets).
PROJECTION_GPUS = {"H100": 3.35, "H200": 4.8, "A100": 2.0, "MI300X": 5.3}
PROJECTION_GPU_NAMES = {"H100": "H100 SXM", "H200": "H200", "A100": "A100 80GB", "MI300X": "MI300X"}


def interpreter_active() -> bool:
    """True when the kernels were built by ``TRITON_INTERPRET=1`` (set before triton was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .kernels.bn_add_relu import bn_add_relu_forward_kernel
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
    """One kernel launch and the buffers it touched."""

    kernel: str
    grid: tuple
    buffers: list[BufferTraffic]


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
        self.launches.append(Launch(executor.fn.__name__, grid, buffers))
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
    """Bytes batch norm's implementation re-reads beyond one pass (see the module docstring)."""
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


@dataclass
class OpAudit:
    """One op, one pass, one shape: fused (Triton kernels + ATen ops around them) and eager."""

    op: str
    pass_: str
    shape: tuple[int, ...]
    dtype: str
    channels_last: bool
    activation_bytes: int
    fused_kernels: Traffic
    fused_aten: Traffic
    eager: Traffic
    kernel_launches: list[str]
    fused_aten_ops: list[str]
    eager_ops: list[str]

    def ratio(self, nbytes: float) -> float:
        return nbytes / self.activation_bytes

    @property
    def fused_activation(self) -> int:
        return self.fused_kernels.activation + self.fused_aten.activation

    @property
    def fused_launches(self) -> int:
        return self.fused_kernels.launches + self.fused_aten.launches

    @property
    def eager_one_pass(self) -> int:
        return self.eager.activation

    @property
    def eager_implementation(self) -> int:
        return self.eager.activation + self.eager.extra_activation_read

    def figures(self) -> dict:
        """The audit's figures in units of T, for tables and JSON."""
        return {
            "fused": self.ratio(self.fused_activation),
            "fused_read": self.ratio(self.fused_kernels.activation_read + self.fused_aten.activation_read),
            "fused_written": self.ratio(self.fused_kernels.activation_written + self.fused_aten.activation_written),
            "fused_other_bytes": self.fused_kernels.other + self.fused_aten.other,
            "eager_one_pass": self.ratio(self.eager_one_pass),
            "eager_implementation": self.ratio(self.eager_implementation),
            "eager_other_bytes": self.eager.other,
            "minimum": MINIMUM[self.op][self.pass_],
            "fused_budget": FUSED_BUDGET.get(self.op, {}).get(self.pass_),
            "eager_budget": EAGER_BUDGET.get(self.op, {}).get(self.pass_),
            "fused_launches": self.fused_launches,
            "fused_kernel_launches": self.fused_kernels.launches,
            "eager_launches": self.eager.launches,
        }

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(figures=self.figures())
        return out


class _Block:
    """The BatchNorms of one tail, as in a torchvision block: ``bn`` on the main path and
    ``bn_r`` on the shortcut (used by ``bn_add_bn_relu``)."""

    def __init__(self, C: int, dtype: torch.dtype):
        self.bn = nn.BatchNorm2d(C).to(dtype)
        self.bn_r = nn.BatchNorm2d(C).to(dtype)
        with torch.no_grad():
            for bn in (self.bn, self.bn_r):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)

    def train(self, training: bool) -> None:
        self.bn.train(training)
        self.bn_r.train(training)

    def params(self, op: str) -> list[torch.Tensor]:
        bns = {"bn_relu": [self.bn], "bn_add_relu": [self.bn], "bn_add_bn_relu": [self.bn, self.bn_r]}
        return [p for bn in bns.get(op, []) for p in (bn.weight, bn.bias)]


def eager_tail(op: str, x: torch.Tensor, r: torch.Tensor, block: _Block) -> torch.Tensor:
    """The tail as torchvision's blocks write it: ``bn``, ``out += identity``, in-place ReLU.

    ``x`` must not be a leaf (``add_relu`` adds into it, as into a convolution's output).
    """
    if op == "bn_relu":
        return torch.relu_(block.bn(x))
    out = x if op == "add_relu" else block.bn(x)
    out += block.bn_r(r) if op == "bn_add_bn_relu" else r
    return torch.relu_(out)


def fused_tail(op: str, x: torch.Tensor, r: torch.Tensor, block: _Block) -> torch.Tensor:
    """The same tail through the fused functional ops, with nn.BatchNorm2d's bookkeeping."""
    from . import functional as F

    bn, bn_r = block.bn, block.bn_r
    if op == "add_relu":
        return F.add_relu(x, r)
    stats = (bn.running_mean, bn.running_var)
    common = dict(training=bn.training, momentum=bn.momentum, eps=bn.eps, num_batches_tracked=bn.num_batches_tracked)
    if op == "bn_relu":
        return F.bn_relu(x, *stats, bn.weight, bn.bias, **common)
    if op == "bn_add_relu":
        return F.bn_add_relu(x, r, *stats, bn.weight, bn.bias, **common)
    return F.bn_add_bn_relu(x, r, *stats, bn.weight, bn.bias, bn_r.running_mean, bn_r.running_var,
                            bn_r.weight, bn_r.bias, r_momentum=bn_r.momentum, r_eps=bn_r.eps,
                            r_num_batches_tracked=bn_r.num_batches_tracked, **common)


def _run_pass(tail: Callable, op: str, pass_: str, shape, dtype: torch.dtype, channels_last: bool,
              counters: Callable[[], contextlib.AbstractContextManager]) -> None:
    """Run ``tail`` for one pass with fresh seeded tensors; only the pass itself runs inside ``counters()``."""
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x_leaf, r = (torch.randn(shape, generator=gen).to(dtype=dtype, memory_format=fmt).requires_grad_()
                 for _ in range(2))
    torch.manual_seed(0)
    block = _Block(shape[1], dtype)
    block.train(pass_.endswith("train"))
    x = x_leaf.clone()  # a non-leaf, as a convolution's output is
    if pass_.startswith("forward"):
        with counters(), torch.no_grad() if pass_ == "forward_eval" else contextlib.nullcontext():
            tail(op, x, r, block)
        return
    y = tail(op, x, r, block)
    dy = torch.randn(y.shape, generator=gen).to(dtype=dtype, memory_format=fmt)
    with counters():
        torch.autograd.grad(y, [x_leaf] + ([] if op == "bn_relu" else [r]) + block.params(op), dy)


def _activation_bytes(shape: Sequence[int], dtype: torch.dtype) -> tuple[int, int]:
    """(T, one element per channel) in bytes for an activation of ``shape``."""
    element = torch.empty((), dtype=dtype).element_size()
    return int(np.prod(shape)) * element, shape[1] * element


def _check_case(op: str, pass_: str, dtype: str) -> torch.dtype:
    from .bench import DTYPES, canonical_dtype

    if op not in OPS:
        raise ValueError(f"unknown op '{op}'; choose from {', '.join(OPS)}")
    if pass_ not in OP_PASSES[op]:
        raise ValueError(f"op '{op}' has no pass '{pass_}'; choose from {', '.join(OP_PASSES[op])}")
    return DTYPES[canonical_dtype(dtype)]


def eager_traffic(op: str, pass_: str, shape: Sequence[int], dtype: str = "float32",
                  channels_last: bool = True) -> tuple[Traffic, list[AtenOp]]:
    """The eager op sequence's traffic in one pass, counted by :class:`AtenTrafficMode` (no interpreter needed)."""
    torch_dtype = _check_case(op, pass_, dtype)
    mode = AtenTrafficMode()
    _run_pass(eager_tail, op, pass_, tuple(shape), torch_dtype, channels_last, lambda: mode)
    return aten_traffic(mode.ops, _activation_bytes(shape, torch_dtype)[0]), mode.ops


def fused_traffic(op: str, pass_: str, shape: Sequence[int], dtype: str = "float32",
                  channels_last: bool = True) -> tuple[Traffic, Traffic, list[Launch], list[AtenOp]]:
    """The fused op's traffic in one pass: (Triton kernels, ATen ops around them, launches, ATen ops).

    Needs the interpreter (see :class:`TritonTrafficCounter`).
    """
    torch_dtype = _check_case(op, pass_, dtype)
    kernels, around = TritonTrafficCounter(), AtenTrafficMode(look_inside=("fused_resnet",))

    @contextlib.contextmanager
    def counters():
        with kernels, around:
            yield

    _run_pass(fused_tail, op, pass_, tuple(shape), torch_dtype, channels_last, counters)
    if around.opaque:
        raise RuntimeError(f"could not look inside custom ops {around.opaque}: their ATen ops would go uncounted")
    T, per_channel = _activation_bytes(shape, torch_dtype)
    return triton_traffic(kernels.launches, T, per_channel), aten_traffic(around.ops, T), kernels.launches, around.ops


def audit_op(op: str, pass_: str, shape: Sequence[int], dtype: str = "float32",
             channels_last: bool = True) -> OpAudit:
    """Count one op's traffic in one pass at ``shape``, fused (interpreter) and eager."""
    from .bench import canonical_dtype

    shape = tuple(shape)
    kernels, around, launches, around_ops = fused_traffic(op, pass_, shape, dtype, channels_last)
    eager, eager_ops = eager_traffic(op, pass_, shape, dtype, channels_last)
    T, _ = _activation_bytes(shape, _check_case(op, pass_, dtype))
    return OpAudit(op, pass_, shape, canonical_dtype(dtype), channels_last, T, kernels, around, eager,
                   [launch.kernel for launch in launches], [o.name for o in around_ops], [o.name for o in eager_ops])


# --------------------------------------------------------------------------- ResNet stages


def audit_shape(shape: Sequence[int], batch: int = 2, max_hw: int = 4) -> tuple[int, int, int, int]:
    """The small shape the interpreter measures for a real stage shape: its channels, a
    couple of images, and at most max_hw x max_hw pixels."""
    _, C, H, W = shape
    return (batch, C, min(H, max_hw), min(W, max_hw))


@dataclass
class StageTraffic:
    """One stage's BatchNorm tails in one pass at the real shapes (activation bytes, scaled)."""

    model: str
    stage: str
    pass_: str
    blocks: int
    tails: int
    fused: float
    eager_one_pass: float
    eager_implementation: float
    minimum: float
    fused_launches: int
    eager_launches: int
    fused_launches_last_block: int
    eager_launches_last_block: int


def stage_traffic(model: str, batch: int, resolution: int, dtype: str, measured: dict) -> list[StageTraffic]:
    """Per stage and pass: ratios measured per (op, channels) times each tail's real T, summed."""
    from .bench import DTYPES, bn_tails

    element = torch.empty((), dtype=DTYPES[dtype]).element_size()
    tails = bn_tails(model, batch, resolution)
    out = []
    for stage in dict.fromkeys(t.stage for t in tails):
        in_stage = [t for t in tails if t.stage == stage]
        blocks = len({t.block for t in in_stage})
        for pass_ in PASSES:
            sums = dict(fused=0.0, eager_one_pass=0.0, eager_implementation=0.0, minimum=0.0)
            launches = [0, 0, 0, 0]  # fused, eager: in the stage, in its last block
            for tail in in_stage:
                a: OpAudit = measured[(tail.op, tail.shape[1], pass_)]
                T = element * int(np.prod(tail.shape))
                f = a.figures()
                for key in sums:
                    sums[key] += f[key] * T
                last = tail.block == in_stage[-1].block
                launches = [n + d for n, d in zip(launches, (a.fused_launches, a.eager.launches,
                                                             a.fused_launches * last, a.eager.launches * last))]
            out.append(StageTraffic(model, stage, pass_, blocks, len(in_stage), **sums,
                                    fused_launches=launches[0], eager_launches=launches[1],
                                    fused_launches_last_block=launches[2], eager_launches_last_block=launches[3]))
    return out


@dataclass
class AuditConfig:
    models: list[str]
    batch: int
    resolution: int
    dtype: str
    gpu: str
    max_hw: int = 4


def run_audit(config: AuditConfig, show_progress: bool = True) -> dict:
    """Measure every op / pass (both layouts, at a reference shape) and every (op, channels)
    a stage of the chosen models uses; return all figures as a JSON-able dict."""
    from .bench import bn_tails, machine_info, progress

    reference = (2, 64, 8, 8)
    todo = [("reference", op, p, reference, cl) for op in OPS for p in OP_PASSES[op] for cl in (True, False)]
    stage_shapes = {}
    for model in config.models:
        for tail in bn_tails(model, config.batch, config.resolution):
            stage_shapes.setdefault((tail.op, tail.shape[1]), audit_shape(tail.shape, max_hw=config.max_hw))
    todo += [("stage", op, p, shape, True) for (op, _), shape in stage_shapes.items() for p in PASSES]
    reference_audits, stage_audits = [], {}
    for kind, op, pass_, shape, cl in progress(todo, len(todo), "audit", show_progress):
        a = audit_op(op, pass_, shape, config.dtype, cl)
        if kind == "reference":
            reference_audits.append(a)
        else:
            stage_audits[(op, shape[1], pass_)] = a
    stages = [s for model in config.models
              for s in stage_traffic(model, config.batch, config.resolution, config.dtype, stage_audits)]
    info = machine_info("cpu")
    return {
        "fused_resnet_audit": 1,
        "note": ("Bytes counted by running the Triton kernels in Triton's interpreter (CPU) and eager ATen ops "
                 "under a TorchDispatchMode; per-stage bytes are per-T ratios measured at small shapes scaled to "
                 "the real shapes; projected times are bytes / peak bandwidth, a lower bound, not a measurement."),
        "machine": info,
        "settings": asdict(config),
        "gpu_peak_bandwidth_bytes_per_s": PROJECTION_GPUS[config.gpu] * 1e12,
        "gpu_name": PROJECTION_GPU_NAMES[config.gpu],
        "ops": [a.to_json() for a in reference_audits],
        "stage_ops": [a.to_json() for a in stage_audits.values()],
        "stages": [asdict(s) for s in stages],
    }


# --------------------------------------------------------------------------- reports


def _t(value) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def format_op_table(data: dict) -> str:
    """Per op and pass, in units of T: fused and eager measured, beside minimum and budgets."""
    from .bench import render_table

    by_key = {}
    for a in data["ops"]:
        by_key[(a["op"], a["pass_"], a["channels_last"])] = a
    header = ["op", "pass", "minimum", "fused", "(NCHW)", "budget", "eager 1-pass", "eager impl", "budget",
              "eager/fused", "launches fused/eager", "fused other bytes"]
    rows, over_budget, over_minimum = [], [], []
    for op in OPS:
        for pass_ in OP_PASSES[op]:
            cl, nchw = by_key[(op, pass_, True)], by_key[(op, pass_, False)]
            f = cl["figures"]
            rows.append([op, PASS_LABELS[pass_], _t(f["minimum"]), _t(f["fused"]), _t(nchw["figures"]["fused"]),
                         _t(f["fused_budget"]), _t(f["eager_one_pass"]), _t(f["eager_implementation"]),
                         _t(f["eager_budget"]), _t(f["eager_implementation"] / f["fused"]),
                         f"{f['fused_launches']} ({f['fused_kernel_launches']} Triton) / {f['eager_launches']}",
                         f["fused_other_bytes"]])
            kernels = ", ".join(dict.fromkeys(cl["kernel_launches"]))
            if f["fused_budget"] is not None and f["fused"] > f["fused_budget"] + 1e-9:
                over_budget.append(f"{op} {PASS_LABELS[pass_]}: {f['fused']:.2f} T > budget {f['fused_budget']} T "
                                   f"({kernels})")
            elif f["fused"] > f["minimum"] + 1e-9:
                over_minimum.append(f"{op} {PASS_LABELS[pass_]}: {f['fused']:.2f} T vs minimum {f['minimum']} T")
    shape = "x".join(map(str, data["ops"][0]["shape"]))
    title = (f"Memory traffic per fused op, in T = bytes of one activation tensor (measured at {shape}, "
             f"{data['settings']['dtype']}, channels_last; NCHW beside it)")
    legend = ("minimum: least traffic without holding an activation on chip (training: statistics / gradient sums "
              "before the elementwise pass; eval: one pass). fused: unique bytes the Triton kernels load + store "
              "(interpreter, masked lanes excluded), plus any ATen op around them. eager 1-pass: each ATen op reads "
              "its inputs and writes its outputs once; eager impl: plus batch norm's second pass (training forward "
              "re-reads x; backward re-reads grad and, in training, x). Budgets: the design figures. launches: Triton "
              "launches + ATen ops around them (fused) / ATen ops (eager; on a GPU one ATen op may launch several "
              "kernels). other bytes: per-channel parameters, statistics and partial sums (not in T). "
              "eager/fused: eager impl / fused.")
    text = [title, render_table(header, rows), legend]
    text.append("Over the design budget: " + ("; ".join(over_budget) if over_budget
                                                else "none (every budgeted fused op measured within its budget)"))
    if over_minimum:
        text.append("Above the minimum (no budget set): " + "; ".join(over_minimum) + ". The interpreter executes "
                    "every load, including loads a compiled kernel drops as dead, so these are upper bounds.")
    return "\n".join(text)


def format_stage_table(data: dict) -> str:
    """Per model, stage and pass at the real shapes: MB moved, launches, projected time on a GPU."""
    from .bench import render_table

    peak = data["gpu_peak_bandwidth_bytes_per_s"]
    s = data["settings"]
    header = ["model", "stage", "pass", "blocks", "fused MB", "eager MB 1-pass", "eager MB impl", "minimum MB",
              "eager/fused", "launches/block fused/eager", f"proj. us fused/eager ({data['gpu_name']})"]
    rows = []
    for st in data["stages"]:
        rows.append([st["model"], st["stage"], PASS_LABELS[st["pass_"]], st["blocks"], f"{st['fused'] / 1e6:.1f}",
                     f"{st['eager_one_pass'] / 1e6:.1f}", f"{st['eager_implementation'] / 1e6:.1f}",
                     f"{st['minimum'] / 1e6:.1f}", f"{st['eager_implementation'] / st['fused']:.2f}",
                     f"{st['fused_launches_last_block']} / {st['eager_launches_last_block']}",
                     f"{st['fused'] / peak * 1e6:.0f} / {st['eager_implementation'] / peak * 1e6:.0f}"])
    title = (f"BatchNorm/add/ReLU traffic per ResNet stage at batch {s['batch']}, {s['resolution']}x{s['resolution']}, "
             f"{s['dtype']} (activation bytes only; convolutions excluded, identical in both)")
    legend = (f"Per-T ratios measured in the interpreter at (2, C, <={s['max_hw']}, <={s['max_hw']}) for every "
              f"(op, channels) of the stage, scaled to the real shapes analytically (activation bytes are linear in "
              f"the activation size). PROJECTION, not a measurement: proj. us = bytes / peak bandwidth of "
              f"{data['gpu_name']} ({peak / 1e12:.2f} TB/s), a lower bound on the tails' time.")
    return "\n".join([title, render_table(header, rows), legend])


def format_audit(data: dict) -> str:
    return format_op_table(data) + "\n\n" + format_stage_table(data)


def run_in_interpreter(argv: Sequence[str]) -> int:
    """Re-run ``fused-resnet <argv>`` in a child process with TRITON_INTERPRET=1.

    The kernels can only be counted through the interpreter, which triton picks at import time.
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.call([sys.executable, "-m", "fused_resnet", *argv], env=env)
