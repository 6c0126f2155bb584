"""Running a test body in several processes joined by a gloo process group, on CPU.

- :func:`run_distributed` spawns ``world_size`` processes (``torch.multiprocessing``, spawn
  start method, a free loopback port), runs ``fn(rank, world_size, *args)`` in each inside
  an initialised gloo group, and returns what each rank returned (rank order). A failed
  assertion in any rank fails the test with that rank's traceback.
- :func:`cpu_sync_batchnorm` lets ``torch.nn.SyncBatchNorm`` itself run on CPU tensors, as
  the reference: it gives the five CUDA-only ATen kernels its autograd Function calls
  (``batch_norm_stats`` and friends) CPU implementations that follow the CUDA kernels'
  math (computed in float64), and, inside the block, lets its device check accept "cpu".
- :class:`CollectiveCounter` counts the collectives issued inside a block.
- :func:`global_batch` / :func:`local_rows`: one global float64 batch, the same on every
  rank, and the rows a rank takes of it.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import tempfile
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# ----------------------------------------------------------------------------- spawning


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # a few processes share two cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_distributed(fn: Callable, world_size: int, *args: Any) -> List[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, ...)]``, each in its own process.

    ``fn`` must be importable (a module-level function); results must be picklable.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(fn, world_size, free_port(), out_dir, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


# ----------------------------------------------------------------------------- data


def global_batch(sizes, seed, mean=0.0, std=1.0, shape=(5, 3, 4)):
    """The concatenated batch of every rank (float64), the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((sum(sizes),) + tuple(shape), generator=g, dtype=torch.float64) * std + mean


def local_rows(sizes, rank):
    lo = sum(sizes[:rank])
    return slice(lo, lo + sizes[rank])


# ---------------------------------------------------- nn.SyncBatchNorm on CPU, as the reference

_CPU_KERNELS = None


def _reduce_dims(t: torch.Tensor) -> List[int]:
    return [0] + list(range(2, t.dim()))


def _per_channel(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return v.view([1, -1] + [1] * (t.dim() - 2))


def _stat_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _batch_norm_stats(input, eps):
    var, mean = torch.var_mean(input.double(), dim=_reduce_dims(input), correction=0)
    return mean.to(_stat_dtype(input)), torch.rsqrt(var + eps).to(_stat_dtype(input))


def _batch_norm_gather_stats_with_counts(input, mean, invstd, running_mean, running_var, momentum, eps, counts):
    # The CUDA kernel's sequential (Chan) merge over ranks, in float64.
    avg = torch.zeros(mean.shape[1], dtype=torch.float64)
    var_n = torch.zeros_like(avg)
    n = 0.0
    for j in range(mean.shape[0]):
        count = float(counts[j])
        m = mean[j].double()
        v = (1.0 / invstd[j].double() ** 2 - eps) * count
        factor = 1.0 / (n + count)
        var_n += v + (avg - m) ** 2 * n * count * factor
        avg = n * factor * avg + count * factor * m
        n += count
    if running_mean is not None:
        running_mean.copy_((1 - momentum) * running_mean.double() + momentum * avg)
        running_var.copy_((1 - momentum) * running_var.double() + momentum * var_n / (n - 1))
    return avg.to(mean.dtype), torch.rsqrt(var_n / n + eps).to(mean.dtype)


def _batch_norm_elemt(input, weight, bias, mean, invstd, eps):
    out = (input.double() - _per_channel(mean.double(), input)) * _per_channel(invstd.double(), input)
    if weight is not None:
        out = out * _per_channel(weight.double(), input)
    if bias is not None:
        out = out + _per_channel(bias.double(), input)
    return out.to(input.dtype)


def _batch_norm_backward_reduce(grad_out, input, mean, invstd, weight, input_g, weight_g, bias_g):
    dims = _reduce_dims(input)
    g = grad_out.double()
    sum_dy = g.sum(dims)
    sum_dy_xmu = (g * (input.double() - _per_channel(mean.double(), input))).sum(dims)
    dtype = _stat_dtype(input)
    grad_weight = (sum_dy_xmu * invstd.double()).to(weight.dtype if weight is not None else dtype)
    grad_bias = sum_dy.to(weight.dtype if weight is not None else dtype)
    return sum_dy.to(dtype), sum_dy_xmu.to(dtype), grad_weight, grad_bias


def _batch_norm_backward_elemt(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    n = count.double().sum()
    invstd = invstd.double()
    k = invstd if weight is None else invstd * weight.double()
    centred = input.double() - _per_channel(mean.double(), input)
    g = (grad_out.double() - _per_channel(sum_dy.double() / n, input)
         - centred * _per_channel(invstd * invstd * sum_dy_xmu.double() / n, input))
    return (g * _per_channel(k, input)).to(input.dtype)


def _register_cpu_kernels() -> None:
    global _CPU_KERNELS
    if _CPU_KERNELS is not None:
        return
    lib = torch.library.Library("aten", "IMPL")
    for name, fn in (("batch_norm_stats", _batch_norm_stats),
                     ("batch_norm_gather_stats_with_counts", _batch_norm_gather_stats_with_counts),
                     ("batch_norm_elemt", _batch_norm_elemt),
                     ("batch_norm_backward_reduce", _batch_norm_backward_reduce),
                     ("batch_norm_backward_elemt", _batch_norm_backward_elemt)):
        lib.impl(name, fn, "CPU")
    _CPU_KERNELS = lib


@contextlib.contextmanager
def cpu_sync_batchnorm():
    """Inside the block, ``nn.SyncBatchNorm`` runs (forward and backward) on CPU tensors."""
    _register_cpu_kernels()
    saved = torch._C._get_privateuse1_backend_name
    torch._C._get_privateuse1_backend_name = lambda: "cpu"  # nn.SyncBatchNorm's device check
    try:
        yield
    finally:
        torch._C._get_privateuse1_backend_name = saved


# ------------------------------------------------------------------------- collectives


class CollectiveCounter(contextlib.ContextDecorator):
    """Counts calls of the torch.distributed collectives inside the block, by name."""

    NAMES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter")

    def __enter__(self):
        self.counts = {name: 0 for name in self.NAMES}
        self._saved = {name: getattr(dist, name) for name in self.NAMES}
        for name in self.NAMES:
            setattr(dist, name, self._counting(name, self._saved[name]))
        return self

    def _counting(self, name, fn):
        def wrapper(*args, **kwargs):
            self.counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        return False

    @property
    def total(self) -> int:
        return sum(self.counts.values())
