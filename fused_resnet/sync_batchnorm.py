"""BatchNorm + (optional shortcut add) + ReLU with batch statistics synchronised across a
``torch.distributed`` process group: the fused ``nn.SyncBatchNorm`` tails.

- ``sync_bn_relu(x, ...)``                = relu(SyncBatchNorm(x))
- ``sync_bn_add_relu(x, residual, ...)``  = relu(SyncBatchNorm(x) + residual)
- ``sync_bn_add_bn_relu(x, residual, ...)`` = relu(SyncBatchNorm(x) + SyncBatchNorm_r(residual))

Forward, per process:

1. Local per-channel moments (mean and *biased* variance) of every normalisation that
   uses batch statistics: ``bn_stats(..., return_var=True)`` on the Triton path,
   ``torch.var_mean`` on the CPU path. The local count N*H*W is a shape, known on the host.
2. ONE ``all_gather`` of ``[count, mean_x, var_x (, mean_r, var_r)]`` in float64 (both
   BatchNorms of ``bn_add_bn_relu`` share the collective; counts are carried as tensors,
   so uneven and even empty local batches are right without reading a value on the host).
3. The merge, in rank order (deterministic): ``mean = sum_i n_i m_i / N`` and
   ``var = sum_i n_i (v_i + (m_i - mean)^2) / N``, the closed form of Chan et al.'s
   parallel merge that ``batch_norm_gather_stats_with_counts`` (nn.SyncBatchNorm) applies.

   Why gather moments rather than all_reduce sums: all_reduce of (n, sum x, sum x^2)
   cancels catastrophically when |mean| >> std (fp32 E[x^2] - E[x]^2 of an input with
   mean 1e3 and std 1 is noise), and all_reduce of sums shifted by a common shift needs
   a shift every process knows *before* the collective (the running mean may be absent,
   or far from the batch at the start). Each process's moments are already shifted
   (``bn_stats`` shifts by a sample of the channel), and the merge only forms
   differences ``m_i - mean`` of numbers of the batch's size, so large means stay
   accurate. float64 keeps counts above 2^24 exact; the payload is
   ``world_size * (1 + 4C)`` numbers per op, negligible next to the activations.
4. The running statistics (unbiased variance with the *global* count, ``momentum`` or,
   for ``momentum=None``, ``1 / num_batches_tracked`` as a device tensor) and
   1/sqrt(var + eps), then one fused elementwise pass (``bn_add_relu_forward``).

Backward: the local reduction pass (``bn_add_relu_backward_sums``) gives the per-channel
sums ``sum g``, ``sum g (x - mean)`` (and ``sum g (r - r_mean)``) and the parameter
gradients, which stay LOCAL as in nn.SyncBatchNorm (DistributedDataParallel averages
parameter gradients); ONE ``all_reduce`` of the [2 or 3, C] sums; then the elementwise
pass for dx with the global count (``bn_add_relu_backward_dx``; the sums are divided by
the count tensor on the device, so the count never visits the host).

Outside an initialised process group, with a world of one process, or when batch
statistics are not used (eval), every op is the single-process op of
:mod:`fused_resnet.bn_add_relu` (nn.SyncBatchNorm falls back to F.batch_norm likewise).

On the CPU path (no Triton) the same structure runs as plain torch ops; it also serves
the rare mixes the kernels cannot express in one launch (one BatchNorm synchronised and
the other with local batch statistics) and an un-fused ``relu=False`` normalisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import backend
from .bn_add_relu import _dense, bn_add_bn_relu, bn_add_relu, bn_relu
from .kernels import RESIDUAL_ADD, RESIDUAL_BN, RESIDUAL_NONE, ChannelNorm, as_layout, bn_stats, layout_of
from .kernels.bn_add_relu import (bn_add_relu_backward_dx, bn_add_relu_backward_sums, bn_add_relu_forward,
                                  can_mask_from_inputs)
from .validation import check_activation, check_batch_norm_args, check_channel_param, check_like

__all__ = [
    "sync_batch_norm_add_relu",
    "sync_bn_add_bn_relu",
    "sync_bn_add_relu",
    "sync_bn_relu",
    "sync_world_size",
]

# Where a normalisation's statistics come from.
RUNNING = "running"  # the running statistics (eval)
LOCAL = "local"  # this process's batch statistics (a BatchNorm that is not synchronised)
SYNC = "sync"  # the batch statistics of the whole process group

_C = (1, -1, 1, 1)  # per-channel vector -> broadcastable over (N, C, H, W)


# --------------------------------------------------------------------- process groups


def resolve_group(process_group: Optional[Any]) -> Any:
    """The group statistics are synchronised over: ``process_group``, or the whole world."""
    return dist.group.WORLD if process_group is None else process_group


def sync_world_size(process_group: Optional[Any] = None) -> int:
    """How many processes share batch statistics: 1 outside an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(resolve_group(process_group))


def _all_gather(t: Tensor, group: Any, world_size: int) -> Tensor:
    """[world_size, numel]: every process's ``t`` in rank order."""
    if t.device.type != "cpu" and dist.get_backend(group) != "gloo":
        out = t.new_empty((world_size, t.numel()))
        dist.all_gather_into_tensor(out, t, group=group)
        return out
    # Gloo has no all_gather_into_tensor.
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t, group=group)
    return torch.stack(parts)


# ----------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class _NormSpec:
    """One normalisation of the op: where its statistics come from, and its constants."""

    stats: str  # RUNNING, LOCAL or SYNC
    momentum: Optional[float]
    eps: float


@dataclass(frozen=True, eq=False)
class _Config:
    residual_mode: int
    x: _NormSpec
    r: Optional[_NormSpec]  # RESIDUAL_BN only
    group: Any
    world_size: int
    relu: bool
    triton: bool

    @property
    def specs(self) -> List[_NormSpec]:
        return [self.x] if self.r is None else [self.x, self.r]


def _stats_dtype(x: Tensor, triton: bool) -> torch.dtype:
    # Statistics in fp32 (fp64 for fp64 input on the composite path), as ATen keeps them.
    return torch.float64 if (x.dtype == torch.float64 and not triton) else torch.float32


# ----------------------------------------------------------------------------- forward


def _local_moments(v: Tensor, layout, triton: bool, dtype: torch.dtype, eps: float):
    """(mean, biased var) per channel of this process's batch (zeros for an empty one)."""
    if v.numel() == 0:
        zeros = v.new_zeros(v.shape[1], dtype=dtype)
        return zeros, zeros
    if triton:
        mean, _, var = bn_stats(v, layout, None, None, None, None, eps, return_var=True)
        return mean, var
    var, mean = torch.var_mean(v.to(dtype), dim=(0, 2, 3), correction=0)
    return mean, var


def _merge(gathered: Tensor, k: int, C: int):
    """Global (mean [k, C], biased var [k, C], count [1]) from the gathered moments.

    ``gathered`` is [world, 1 + 2kC] float64: count, then (mean, var) of each of the k
    normalisations. Sums over ranks run in rank order on every process.
    """
    n = gathered[:, :1]
    moments = gathered[:, 1:].view(-1, k, 2, C)
    total = n.sum(0)
    w = (n / total.clamp(min=1)).view(-1, 1, 1)  # n_i / N; zero for empty local batches
    mean = (w * moments[:, :, 0]).sum(0)
    dev = moments[:, :, 0] - mean
    var = (w * (moments[:, :, 1] + dev * dev)).sum(0)
    return mean, var, total


def _update_running(running_mean, running_var, num_batches_tracked, momentum, mean, var, total) -> None:
    """nn.SyncBatchNorm's running-statistics update, with no value read on the host."""
    if running_mean is None:
        return
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    factor = (1.0 / num_batches_tracked.double()) if momentum is None else momentum
    unbiased = var * (total / (total - 1))
    # An empty batch (in the whole group) leaves them as they are, as nn.BatchNorm2d does.
    keep = total > 0
    rm, rv = running_mean.double(), running_var.double()
    running_mean.copy_(torch.where(keep, (1 - factor) * rm + factor * mean, rm))
    running_var.copy_(torch.where(keep, (1 - factor) * rv + factor * unbiased, rv))


def _affine(v: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """(v - mean) * invstd * weight + bias as ATen computes it: v * alpha + beta."""
    alpha = invstd if weight is None else invstd * weight.to(invstd.dtype)
    beta = -mean * alpha
    if bias is not None:
        beta = beta + bias.to(invstd.dtype)
    return v.to(invstd.dtype) * alpha.view(_C) + beta.view(_C)


def _forward(cfg: _Config, x, weight, bias, residual, r_weight, r_bias, bn_state, r_state):
    """(y, per-norm (mean, invstd), global count) of the op."""
    is_bn = cfg.residual_mode == RESIDUAL_BN
    sdtype = _stats_dtype(x, cfg.triton)
    layout = None
    if cfg.triton:
        x = _dense(x)
        layout = layout_of(x)
        if residual is not None:
            residual = as_layout(residual, layout)
    inputs = [x, residual] if is_bn else [x]
    count = x.shape[0] * x.shape[2] * x.shape[3]  # a shape: known on the host

    # 1. Local moments of every normalisation that uses batch statistics.
    local = [_local_moments(v, layout, cfg.triton, sdtype, spec.eps) if spec.stats != RUNNING else None
             for v, spec in zip(inputs, cfg.specs)]
    local_count = x.new_full((1,), count, dtype=torch.float64)

    # 2. One collective for every synchronised normalisation.
    synced = [i for i, spec in enumerate(cfg.specs) if spec.stats == SYNC]
    global_stats = {}
    total = local_count
    if synced:
        packed = torch.cat([local_count] + [m.to(torch.float64) for i in synced for m in local[i]])
        gathered = _all_gather(packed, cfg.group, cfg.world_size)
        mean, var, total = _merge(gathered, len(synced), x.shape[1])
        global_stats = {i: (mean[j], var[j]) for j, i in enumerate(synced)}

    # 3. Running statistics and the per-channel (mean, invstd) each normalisation uses.
    stats = []
    for i, (spec, (running_mean, running_var, num_batches_tracked)) in enumerate(zip(cfg.specs, [bn_state, r_state])):
        if spec.stats == RUNNING:
            # A copy: the buffer may change (a later training forward) before this backward.
            stats.append((running_mean.to(sdtype, copy=True), torch.rsqrt(running_var.double() + spec.eps).to(sdtype)))
            continue
        if spec.stats == SYNC:
            mean, var = global_stats[i]
            n = total
        else:
            mean, var = (m.double() for m in local[i])
            n = local_count
        _update_running(running_mean, running_var, num_batches_tracked, spec.momentum, mean, var, n)
        stats.append((mean.to(sdtype), torch.rsqrt(var + spec.eps).to(sdtype)))

    # 4. The elementwise pass.
    (mean, invstd), (r_mean, r_invstd) = stats[0], (stats[1] if is_bn else (None, None))
    if cfg.triton:
        r_norm = ChannelNorm(r_mean, r_invstd, r_weight, r_bias) if is_bn else None
        y = bn_add_relu_forward(x, layout, ChannelNorm(mean, invstd, weight, bias), cfg.x.eps, False,
                                residual=residual, residual_norm=r_norm, r_eps=cfg.r.eps if is_bn else 0.0)
    else:
        y = _affine(x, mean, invstd, weight, bias)
        if is_bn:
            y = y + _affine(residual, r_mean, r_invstd, r_weight, r_bias)
        elif cfg.residual_mode == RESIDUAL_ADD:
            y = y + residual
        if cfg.relu:
            y = y.relu_()
        y = y.to(x.dtype)
    return y, mean, invstd, r_mean, r_invstd, total, count


# ---------------------------------------------------------------------------- backward


def _input_grad(g, centred, invstd, weight, mean_g, mean_gv, training):
    """d(input) of (v - mean) * invstd * weight + bias, given g = d(output)."""
    k = invstd if weight is None else invstd * weight.to(invstd.dtype)
    if training:
        g = g - mean_g.view(_C) - centred * (invstd * invstd * mean_gv).view(_C)
    return g * k.view(_C)


def _all_reduce_rows(rows: List[Tensor], group: Any) -> List[Tensor]:
    packed = torch.stack(rows)
    dist.all_reduce(packed, group=group)
    return list(packed.unbind(0))


class SyncBnAddReLUFunction(torch.autograd.Function):
    """The synchronised op: one all_gather in forward, one all_reduce in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, r_weight, r_bias, running_mean, running_var, num_batches_tracked,
                r_running_mean, r_running_var, r_num_batches_tracked, cfg: _Config):
        with backend.launch_device(x):
            y, mean, invstd, r_mean, r_invstd, total, count = _forward(
                cfg, x, weight, bias, residual, r_weight, r_bias,
                (running_mean, running_var, num_batches_tracked),
                (r_running_mean, r_running_var, r_num_batches_tracked))
        is_bn = cfg.residual_mode == RESIDUAL_BN
        ctx.save_for_backward(x, y if cfg.relu else None, residual if is_bn else None, weight, bias, r_weight,
                              r_bias, mean, invstd, r_mean, r_invstd, total)
        ctx.cfg = cfg
        ctx.count = count
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, residual, weight, bias, r_weight, r_bias, mean, invstd, r_mean, r_invstd, total = ctx.saved_tensors
        cfg: _Config = ctx.cfg
        needs = ctx.needs_input_grad
        is_bn = cfg.residual_mode == RESIDUAL_BN
        need_input = needs[0] or (is_bn and needs[3])
        backward = _backward_triton if cfg.triton else _backward_composite
        with backend.launch_device(x):
            dx, d_res, dw, db, r_dw, r_db = backward(
                cfg, ctx.count, dy, y, x, residual, weight, bias, r_weight, r_bias, mean, invstd, r_mean, r_invstd,
                total, need_input, any(needs[i] for i in (1, 2, 4, 5)))

        def some(t, need):
            return t if need else None

        return (some(dx, needs[0]), some(dw, needs[1] and weight is not None), some(db, needs[2] and bias is not None),
                some(d_res, needs[3] and cfg.residual_mode != RESIDUAL_NONE),
                some(r_dw, needs[4] and r_weight is not None), some(r_db, needs[5] and r_bias is not None),
                None, None, None, None, None, None, None)


def _backward_triton(cfg, count, dy, y, x, residual, weight, bias, r_weight, r_bias, mean, invstd, r_mean, r_invstd,
                     total, need_input, need_params):
    """Kernels: local sums (and local parameter gradients), one all_reduce, then dx."""
    is_bn = cfg.residual_mode == RESIDUAL_BN
    x = _dense(x)
    layout = layout_of(x)
    dy, y = as_layout(dy, layout), as_layout(y, layout)
    if residual is not None:
        residual = as_layout(residual, layout)
    norm = ChannelNorm(mean, invstd, weight, bias)
    r_norm = ChannelNorm(r_mean, r_invstd, r_weight, r_bias) if is_bn else None
    training, r_training = cfg.x.stats != RUNNING, is_bn and cfg.r.stats != RUNNING
    # The forward normalised with exactly these statistics: the ReLU mask can be recomputed.
    from_inputs = can_mask_from_inputs(cfg.residual_mode, training, r_training)
    # An empty local batch gives zero sums (its reduction adds no rows) and still joins the all_reduce.
    sums, d_res, dw, db, r_dw, r_db = bn_add_relu_backward_sums(
        dy, y, x, layout, norm, cfg.residual_mode, residual, r_norm, need_params, from_inputs)
    if not need_input:
        return None, None, dw, db, r_dw, r_db
    rows = 3 if is_bn else 2  # row 2 (sum g (r - r_mean)) exists only with a residual BatchNorm
    dist.all_reduce(sums[:rows], group=cfg.group)
    # The kernel divides the sums by its count argument: hand it sums / N and a count of 1,
    # so the global count (a tensor) never visits the host.
    mean_sums = (sums.double() / total.clamp(min=1)).float()
    dx, d_res = bn_add_relu_backward_dx(
        dy, y, x, layout, norm, training, cfg.residual_mode, mean_sums, 1.0, d_res, residual, r_norm,
        r_training, from_inputs)
    return dx, d_res, dw, db, r_dw, r_db


def _backward_composite(cfg, count, dy, y, x, residual, weight, bias, r_weight, r_bias, mean, invstd, r_mean,
                        r_invstd, total, need_input, need_params):
    """The same structure in torch ops (CPU path, and the mixes the kernels do not take)."""
    is_bn = cfg.residual_mode == RESIDUAL_BN
    sdtype = mean.dtype
    g = torch.ops.aten.threshold_backward(dy, y, 0) if cfg.relu else dy
    gf = g.to(sdtype)
    dims = (0, 2, 3)
    x_c = x.to(sdtype) - mean.view(_C)
    sums = [gf.sum(dims), (gf * x_c).sum(dims)]
    if is_bn:
        r_c = residual.to(sdtype) - r_mean.view(_C)
        sums.append((gf * r_c).sum(dims))

    def param_grads(s_gv, istd, w, b):
        # Local, as in nn.SyncBatchNorm: DistributedDataParallel averages them.
        dw_ = (s_gv * istd).to(w.dtype) if (w is not None and need_params) else None
        db_ = sums[0].to(b.dtype) if (b is not None and need_params) else None
        return dw_, db_

    dw, db = param_grads(sums[1], invstd, weight, bias)
    r_dw, r_db = param_grads(sums[2], r_invstd, r_weight, r_bias) if is_bn else (None, None)
    if not need_input:
        return None, None, dw, db, r_dw, r_db

    synced = any(spec.stats == SYNC for spec in cfg.specs)
    global_sums = _all_reduce_rows(sums, cfg.group) if synced else sums
    local_n = torch.full_like(total, count)

    def grad(v_c, spec, istd, w, row):
        if spec.stats == RUNNING:
            return _input_grad(gf, v_c, istd, w, None, None, False)
        s, n = (global_sums, total) if spec.stats == SYNC else (sums, local_n)
        n = n.clamp(min=1).to(sdtype)
        return _input_grad(gf, v_c, istd, w, s[0] / n, s[row] / n, True)

    dx = grad(x_c, cfg.x, invstd, weight, 1).to(x.dtype)
    d_res = None
    if is_bn:
        d_res = grad(r_c, cfg.r, r_invstd, r_weight, 2).to(residual.dtype)
    elif cfg.residual_mode == RESIDUAL_ADD:
        d_res = g
    return dx, d_res, dw, db, r_dw, r_db


# ------------------------------------------------------------------------------ checks


def _check_sync_args(x, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
                     sync: bool, prefix: str = "") -> None:
    """``check_batch_norm_args``; a synchronised one may hold one value per channel locally."""
    if not sync:
        check_batch_norm_args(x, running_mean, running_var, weight, bias, training, momentum, eps,
                              num_batches_tracked, prefix=prefix)
        return
    check_activation(prefix + "input", x)
    if x.shape[1] == 0:
        raise ValueError(f"SyncBatchNorm number of {prefix}input channels should be non-zero")
    if not training:
        raise ValueError(f"{prefix}statistics can only be synchronised in training (batch statistics)")
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        check_channel_param(prefix + name, t, x)
    if (running_mean is None) != (running_var is None):
        raise RuntimeError(f"{prefix}running_mean and {prefix}running_var must both be given or both be None")
    if momentum is None and running_mean is not None and num_batches_tracked is None:
        raise ValueError(f"{prefix}momentum=None (cumulative average) needs {prefix}num_batches_tracked")
    if num_batches_tracked is not None:
        if not isinstance(num_batches_tracked, torch.Tensor) or num_batches_tracked.numel() != 1:
            raise RuntimeError(f"{prefix}num_batches_tracked must be a one-element tensor")
        if num_batches_tracked.device != x.device:
            raise RuntimeError(
                f"{prefix}num_batches_tracked is on {num_batches_tracked.device} but the input is on {x.device}")


# -------------------------------------------------------------------------- entry point


_ARG_NAMES = ("running_mean", "running_var", "weight", "bias", "training", "momentum", "eps", "num_batches_tracked")


def sync_batch_norm_add_relu(
    x: Tensor,
    residual: Optional[Tensor],
    residual_mode: int,
    bn: Dict[str, Any],
    r_bn: Optional[Dict[str, Any]] = None,
    *,
    sync: bool,
    r_sync: bool = False,
    process_group: Optional[Any] = None,
    relu: bool = True,
) -> Tensor:
    """The one entry point of the synchronised ops (the modules call it directly).

    ``bn`` / ``r_bn``: the keyword arguments of ``fused_resnet.bn_relu`` for the main /
    the shortcut's BatchNorm (``running_mean``, ``running_var``, ``weight``, ``bias``,
    ``training``, ``momentum``, ``eps``, ``num_batches_tracked``), as
    ``fused_resnet.nn.batchnorm.batch_norm_arguments`` gives them. ``sync`` / ``r_sync``:
    synchronise that BatchNorm's batch statistics over ``process_group`` (None: the
    world); ignored (single-process op) outside a process group of 2+ processes.
    ``relu=False`` leaves the ReLU out (no residual allowed; composite path only).
    """
    unknown = set(bn) - set(_ARG_NAMES) | (set(r_bn) - set(_ARG_NAMES) if r_bn else set())
    if unknown:
        raise TypeError(f"unexpected BatchNorm arguments {sorted(unknown)}")
    bn = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5,
          "num_batches_tracked": None, **bn}
    is_bn = residual_mode == RESIDUAL_BN
    if is_bn:
        if r_bn is None:
            raise TypeError("residual_mode RESIDUAL_BN needs r_bn")
        r_bn = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5,
                "num_batches_tracked": None, **r_bn}
    if not relu and residual_mode != RESIDUAL_NONE:
        raise ValueError("relu=False takes no residual")
    world_size = sync_world_size(process_group)
    sync = bool(sync and bn["training"] and world_size > 1)
    r_sync = bool(is_bn and r_sync and r_bn["training"] and world_size > 1)

    _check_sync_args(x, *(bn[k] for k in _ARG_NAMES), sync=sync)
    if residual_mode != RESIDUAL_NONE:
        check_like("residual", residual, x)
    if is_bn:
        _check_sync_args(residual, *(r_bn[k] for k in _ARG_NAMES), sync=r_sync, prefix="r_")

    if not (sync or r_sync) and relu:
        # Nothing to synchronise: the single-process op.
        if residual_mode == RESIDUAL_NONE:
            return bn_relu(x, **bn)
        if residual_mode == RESIDUAL_ADD:
            return bn_add_relu(x, residual, **bn)
        return bn_add_bn_relu(x, residual, **bn, **{f"r_{k}": v for k, v in r_bn.items()})

    def spec(args, synced):
        stats = SYNC if synced else (LOCAL if args["training"] else RUNNING)
        return _NormSpec(stats, args["momentum"], float(args["eps"]))

    x_spec = spec(bn, sync)
    r_spec = spec(r_bn, r_sync) if is_bn else None
    stats = {s.stats for s in ([x_spec] if r_spec is None else [x_spec, r_spec])}
    # One dx launch shares sum(g) between both norms: a synchronised one and a local one
    # cannot share it, so that (rare) mix runs on the composite path.
    triton = backend.use_triton(x) and relu and not (SYNC in stats and LOCAL in stats)
    cfg = _Config(residual_mode, x_spec, r_spec, resolve_group(process_group) if (sync or r_sync) else None,
                  world_size, relu, triton)
    r_bn = r_bn or {}
    return SyncBnAddReLUFunction.apply(
        x, bn["weight"], bn["bias"], residual if residual_mode != RESIDUAL_NONE else None,
        r_bn.get("weight"), r_bn.get("bias"), bn["running_mean"], bn["running_var"], bn["num_batches_tracked"],
        r_bn.get("running_mean"), r_bn.get("running_var"), r_bn.get("num_batches_tracked"), cfg)


# --------------------------------------------------------------------------- functional


def sync_bn_relu(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Optional[Tensor] = None,
    process_group: Optional[Any] = None,
) -> Tensor:
    """``relu(SyncBatchNorm(x))``: :func:`fused_resnet.bn_relu` with the batch statistics
    (``training=True``) synchronised over ``process_group`` (None: the whole world).

    Outside an initialised process group of 2+ processes, or with ``training=False``,
    it is ``bn_relu``. Every process of the group must call it (it is a collective).
    """
    bn = dict(running_mean=running_mean, running_var=running_var, weight=weight, bias=bias, training=training,
              momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked)
    return sync_batch_norm_add_relu(x, None, RESIDUAL_NONE, bn, sync=training, process_group=process_group)


def sync_bn_add_relu(
    x: Tensor,
    residual: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Optional[Tensor] = None,
    process_group: Optional[Any] = None,
) -> Tensor:
    """``relu(SyncBatchNorm(x) + residual)``; see :func:`sync_bn_relu`."""
    bn = dict(running_mean=running_mean, running_var=running_var, weight=weight, bias=bias, training=training,
              momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked)
    return sync_batch_norm_add_relu(x, residual, RESIDUAL_ADD, bn, sync=training, process_group=process_group)


def sync_bn_add_bn_relu(
    x: Tensor,
    residual: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    r_running_mean: Optional[Tensor],
    r_running_var: Optional[Tensor],
    r_weight: Optional[Tensor],
    r_bias: Optional[Tensor],
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    r_training: Optional[bool] = None,
    r_momentum: Optional[float] = 0.1,
    r_eps: float = 1e-5,
    num_batches_tracked: Optional[Tensor] = None,
    r_num_batches_tracked: Optional[Tensor] = None,
    process_group: Optional[Any] = None,
) -> Tensor:
    """``relu(SyncBatchNorm(x) + SyncBatchNorm_r(residual))``, both BatchNorms
    synchronised in one collective; see :func:`sync_bn_relu` and
    :func:`fused_resnet.bn_add_bn_relu`. ``r_training`` defaults to ``training``.
    """
    if r_training is None:
        r_training = training
    bn = dict(running_mean=running_mean, running_var=running_var, weight=weight, bias=bias, training=training,
              momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked)
    r_bn = dict(running_mean=r_running_mean, running_var=r_running_var, weight=r_weight, bias=r_bias,
                training=r_training, momentum=r_momentum, eps=r_eps, num_batches_tracked=r_num_batches_tracked)
    return sync_batch_norm_add_relu(x, residual, RESIDUAL_BN, bn, r_bn, sync=training, r_sync=r_training,
                                    process_group=process_group)
