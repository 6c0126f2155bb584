"""One tail op, one pass, one shape: its bytes fused (Triton kernels through the interpreter,
plus the ATen ops around them) and eager (every ATen op), in units of T."""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from ..common import (EAGER_BUDGET, FUSED_BUDGET, MINIMUM, TAIL_OPS, activation_bytes, canonical_dtype,
                      check_tail_case, eager_tail, fused_tail, tail_case)
from ..traffic import AtenOp, AtenTrafficMode, Launch, Traffic, TritonTrafficCounter, aten_traffic, triton_traffic

OPS = TAIL_OPS


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


class FusedCounters:
    """The fused side's counters: every Triton launch (interpreter) and every ATen op around
    the kernels, looked for inside the fused ops. Calling it gives the context to count in."""

    def __init__(self):
        self.kernels, self.around = TritonTrafficCounter(), AtenTrafficMode(look_inside=("fused_resnet",))

    @contextlib.contextmanager
    def __call__(self):
        with self.kernels, self.around:
            yield
        if self.around.opaque:
            raise RuntimeError(f"could not look inside custom ops {self.around.opaque}: their ATen ops would go "
                               "uncounted")


def _run_pass(tail: Callable, op: str, pass_: str, shape, dtype: str, channels_last: bool,
              counters: Callable[[], contextlib.AbstractContextManager]) -> None:
    """Run ``tail`` for one pass with fresh seeded tensors; only the pass itself runs inside ``counters()``."""
    case = tail_case(op, pass_, shape, dtype, "channels_last" if channels_last else "nchw")
    x = case.x_leaf.clone()  # a non-leaf, as a convolution's output is; the copy is not the tail's traffic
    if pass_.startswith("forward"):
        with counters(), torch.no_grad() if pass_ == "forward_eval" else contextlib.nullcontext():
            case.forward(tail, x)
        return
    y = case.forward(tail, x)
    dy = case.grad_output(y)
    with counters():
        torch.autograd.grad(y, case.differentiable(), dy)


def _activation_bytes(shape: Sequence[int], dtype: str) -> tuple[int, int]:
    """(T, one element per channel) in bytes for an activation of ``shape``."""
    return activation_bytes(shape, dtype), activation_bytes(shape[1:2], dtype)


def _check_case(op: str, pass_: str, dtype: str) -> str:
    """The canonical dtype name, after checking op and pass."""
    check_tail_case(op, pass_)
    return canonical_dtype(dtype)


def eager_traffic(op: str, pass_: str, shape: Sequence[int], dtype: str = "float32",
                  channels_last: bool = True) -> tuple[Traffic, list[AtenOp]]:
    """The eager op sequence's traffic in one pass, counted by :class:`AtenTrafficMode` (no interpreter needed)."""
    dtype = _check_case(op, pass_, dtype)
    mode = AtenTrafficMode()
    _run_pass(eager_tail, op, pass_, tuple(shape), dtype, channels_last, lambda: mode)
    return aten_traffic(mode.ops, _activation_bytes(shape, dtype)[0]), mode.ops


def fused_traffic(op: str, pass_: str, shape: Sequence[int], dtype: str = "float32",
                  channels_last: bool = True) -> tuple[Traffic, Traffic, list[Launch], list[AtenOp]]:
    """The fused op's traffic in one pass: (Triton kernels, ATen ops around them, launches, ATen ops).

    Needs the interpreter (see :class:`TritonTrafficCounter`).
    """
    dtype = _check_case(op, pass_, dtype)
    counters = FusedCounters()
    _run_pass(fused_tail, op, pass_, tuple(shape), dtype, channels_last, counters)
    T, per_channel = _activation_bytes(shape, dtype)
    launches, ops = counters.kernels.launches, counters.around.ops
    return triton_traffic(launches, T, per_channel), aten_traffic(ops, T), launches, ops


def audit_op(op: str, pass_: str, shape: Sequence[int], dtype: str = "float32",
             channels_last: bool = True) -> OpAudit:
    """Count one op's traffic in one pass at ``shape``, fused (interpreter) and eager."""
    shape = tuple(shape)
    kernels, around, launches, around_ops = fused_traffic(op, pass_, shape, dtype, channels_last)
    eager, eager_ops = eager_traffic(op, pass_, shape, dtype, channels_last)
    dtype = _check_case(op, pass_, dtype)
    T, _ = _activation_bytes(shape, dtype)
    return OpAudit(op, pass_, shape, dtype, channels_last, T, kernels, around, eager,
                   [launch.kernel for launch in launches], [o.name for o in around_ops], [o.name for o in eager_ops])

