"""SyncBatchNormReLU2d / SyncBatchNormAddReLU2d / convert_sync_batchnorm.

Distributed tests spawn 2 to 4 CPU processes joined by gloo (``distributed_helpers``) and
compare, on every rank, outputs, every gradient and the running statistics with

- ``torch.nn.SyncBatchNorm`` (+ add) + ReLU run in the same processes on the same data
  (nn.SyncBatchNorm's own module and autograd Function; its five CUDA-only ATen kernels get
  CPU implementations in float64, see ``distributed_helpers.cpu_sync_batchnorm``), and
- a single-process float64 ``nn.BatchNorm2d`` over the concatenated global batch.

Local batch sizes are uneven, one rank's batch is empty, one holds a single image. Each
spawn batches many checks: spawning costs seconds. The unmarked tests run the PyTorch
(composite) path; the interpreter-marked one runs the Triton kernels through
TRITON_INTERPRET=1, which the spawned processes inherit.
"""
from __future__ import annotations

import copy
import inspect
from typing import Dict

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distributed_helpers import CollectiveCounter, cpu_sync_batchnorm, global_batch, local_rows, run_distributed
from reference import forbid_host_sync
from fused_resnet import backend
from fused_resnet.nn.batchnorm import BatchNormAddReLU2d, BatchNormReLU2d
from fused_resnet.nn.blocks import FusedBasicBlock, FusedBottleneck
from fused_resnet.nn.sync_batchnorm import (SyncBatchNorm2d, SyncBatchNormAddReLU2d, SyncBatchNormReLU2d,
                                            convert_sync_batchnorm)
from fused_resnet.sync_batchnorm import sync_bn_add_relu, sync_bn_relu

# (atol, rtol), fp32: activations and input gradients; per-channel sums (parameter
# gradients, running statistics) accumulate over the batch.
TOL = (1e-5, 1e-5)
PARAM_TOL = (1e-4, 1e-5)
# mean 1e3, std 1: x - mean is exact up to the fp32 rounding of the mean (ulp(1e3)/2 = 3e-5,
# nn.SyncBatchNorm keeps an fp32 mean too), which sum(g * (x - mean)) accumulates. The
# running variance stays sharp: a naive E[x^2] - E[x]^2 in fp32 would be off by O(1).
LARGE_MEAN_TOL = (2e-4, 1e-4)
LARGE_MEAN_PARAM_TOL = (2e-3, 1e-4)

C, H, W = 5, 3, 4


# --------------------------------------------------------------------------- utilities


class Checker:
    """assert_close that also records the largest absolute error of each quantity."""

    def __init__(self):
        self.max_err: Dict[str, float] = {}

    def __call__(self, key, actual, expected, tol=TOL):
        if actual is None and expected is None:
            return
        actual = torch.zeros_like(expected) if actual is None else actual
        expected = torch.zeros_like(actual) if expected is None else expected
        actual, expected = actual.detach().double(), expected.detach().double()
        err = (actual - expected).abs().max().item() if actual.numel() else 0.0
        self.max_err[key] = max(self.max_err.get(key, 0.0), err)
        torch.testing.assert_close(actual, expected, atol=tol[0], rtol=tol[1], msg=lambda m: f"{key}: {m}")


def init_bn(bn: nn.modules.batchnorm._BatchNorm, seed: int) -> nn.Module:
    """Random affine parameters and running statistics, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
        if bn.track_running_stats:
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return bn


def twin(cls, bn, **kwargs):
    """A ``cls`` with ``bn``'s hyper-parameters and a copy of its state."""
    out = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **kwargs)
    out.load_state_dict(bn.state_dict())
    return out


def leaf(t, channels_last=False):
    t = t.detach().float()
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.clone().requires_grad_()


def grad_of(p):
    return None if p is None else p.grad


# ------------------------------------------------------------------------ parity worker

# op: how the residual enters. "add_localbn": the shortcut is a plain nn.BatchNorm2d (local
# statistics) while the main BatchNorm is synchronised; "add_broadcast": a (1, C, 1, 1)
# residual (the un-fused path).
OPS = ("relu", "add", "add_bn", "add_localbn", "add_broadcast")


def run_op(rank, world, op, check, tag, sizes, channels_last=False, momentum=0.1, mean=0.0, std=1.0, bare=False):
    """Train steps (one per entry of ``sizes``: each rank's local batch size) then one eval
    step of one op on three models in lock step: ours, nn.SyncBatchNorm (+ add) + ReLU, and
    float64 nn.BatchNorm2d over the concatenated batch. Returns our (y, dx) per step.

    ``bare``: affine=False, track_running_stats=False (batch statistics in eval too).
    """
    kwargs = dict(momentum=momentum, affine=not bare, track_running_stats=not bare)
    ours = init_bn((SyncBatchNormReLU2d if op == "relu" else SyncBatchNormAddReLU2d)(C, **kwargs), 1)
    ref = twin(nn.SyncBatchNorm, ours)
    full = twin(nn.BatchNorm2d, ours).double()
    r_cls = {"add_bn": nn.SyncBatchNorm, "add_localbn": nn.BatchNorm2d}.get(op)
    ours_r = init_bn(r_cls(C, **kwargs), 2) if r_cls else None
    ref_r = twin(r_cls, ours_r) if r_cls else None
    full_r = twin(nn.BatchNorm2d, ours_r).double() if r_cls else None
    # The float64 full batch is no reference for a shortcut with local statistics, nor
    # for batch statistics in eval (nn.SyncBatchNorm does not synchronise in eval).
    lock_step = [ours, ref, full] + ([ours_r, ref_r, full_r] if r_cls else [])
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    tol, ptol = (LARGE_MEAN_TOL, LARGE_MEAN_PARAM_TOL) if abs(mean) > 100 else (TOL, PARAM_TOL)
    steps = list(sizes) + [sizes[-1]]
    outputs = []

    for step, local_sizes in enumerate(steps):
        training = step < len(steps) - 1
        use_full = op != "add_localbn" and (training or not bare)
        for m in lock_step:
            m.train(training)
        rows = local_rows(local_sizes, rank)
        x_full = global_batch(local_sizes, 100 + step, mean, std)
        r_full = global_batch(local_sizes, 200 + step, 0.5, 2.0)
        if op == "add_broadcast":
            r_full = r_full[:1, :, :1, :1]
        dy_full = global_batch(local_sizes, 300 + step)
        r_rows = slice(None) if op == "add_broadcast" else rows

        def call(bn, bn_r, x, r):
            if op == "relu":
                return bn(x) if isinstance(bn, SyncBatchNormReLU2d) else F.relu(bn(x))
            if isinstance(bn, SyncBatchNormAddReLU2d):
                return bn(x, r, residual_bn=bn_r) if bn_r is not None else bn(x, r)
            return F.relu(bn(x) + (bn_r(r) if bn_r is not None else r))

        x, r = leaf(x_full[rows], channels_last), leaf(r_full[r_rows], channels_last)
        with CollectiveCounter() as collectives:
            y = call(ours, ours_r, x, r)
            y.backward(dy_full[rows].float())
        outputs.append((y.detach().clone(), x.grad.clone()))
        expected = {"all_gather": 1, "all_reduce": 1} if training else {}
        assert {k: v for k, v in collectives.counts.items() if v} == expected, (tag, op, collectives.counts)
        assert y.dtype == x.dtype and (y.numel() == 0 or y.is_contiguous(memory_format=memory_format)), (tag, op, step)

        x2, r2 = leaf(x_full[rows], channels_last), leaf(r_full[r_rows], channels_last)
        with cpu_sync_batchnorm():
            y2 = call(ref, ref_r, x2, r2)
            y2.backward(dy_full[rows].float())

        key = f"{tag}/{op}/{'train' if training else 'eval'}"
        check(f"{key}/nn/y", y, y2, tol)
        check(f"{key}/nn/dx", x.grad, x2.grad, tol)
        if op != "relu":
            check(f"{key}/nn/d_residual", r.grad, r2.grad, tol)
        params = [(ours, ref, full, "")] + ([(ours_r, ref_r, full_r, "r_")] if r_cls else [])
        for a, b, _, prefix in params:
            for name in ("weight", "bias"):
                check(f"{key}/nn/d{prefix}{name}", grad_of(getattr(a, name)), grad_of(getattr(b, name)), ptol)
            check(f"{key}/nn/{prefix}running_mean", a.running_mean, b.running_mean, PARAM_TOL)
            check(f"{key}/nn/{prefix}running_var", a.running_var, b.running_var, PARAM_TOL)
            assert (a.num_batches_tracked is None) == (b.num_batches_tracked is None)
            assert a.num_batches_tracked is None or int(a.num_batches_tracked) == int(b.num_batches_tracked)

        if use_full:
            x64, r64 = x_full.clone().requires_grad_(), r_full.clone().requires_grad_()
            y64 = call(full, full_r, x64, r64)
            y64.backward(dy_full)
            check(f"{key}/f64/y", y, y64[rows], tol)
            check(f"{key}/f64/dx", x.grad, x64.grad[rows], tol)
            if op in ("add", "add_bn"):
                check(f"{key}/f64/d_residual", r.grad, r64.grad[rows], tol)
            for a, _, c, prefix in params:
                for name in ("weight", "bias") if not bare else ():
                    # Parameter gradients stay local: their sum over ranks is the full batch's.
                    g = getattr(a, name).grad.detach().clone()
                    dist.all_reduce(g)
                    check(f"{key}/f64/sum_d{prefix}{name}", g, getattr(c, name).grad, ptol)
                check(f"{key}/f64/{prefix}running_mean", a.running_mean, c.running_mean, PARAM_TOL)
                check(f"{key}/f64/{prefix}running_var", a.running_var, c.running_var, PARAM_TOL)
        for m in lock_step:
            m.zero_grad(set_to_none=True)
    return outputs


def run_twice(rank, world, op, check, tag, **config):
    """run_op, then the same steps again from the same state: bit for bit the same."""
    first = run_op(rank, world, op, check, tag, **config)
    again = run_op(rank, world, op, Checker(), tag, **config)
    for (y1, dx1), (y2, dx2) in zip(first, again):
        assert torch.equal(y1, y2) and torch.equal(dx1, dx2), f"{tag}/{op}: not bitwise reproducible"


PARITY_CONFIGS = {
    "uneven": dict(sizes=([3, 1, 2], [2, 2, 1]), mean=0.5, std=2.0),
    "empty_rank_nhwc": dict(sizes=([2, 0, 4], [0, 3, 1]), channels_last=True, momentum=None, mean=-1.0, std=1.5),
    "large_mean": dict(sizes=([1, 2, 1],), momentum=0.3, mean=1e3),
    "bare": dict(sizes=([2, 3, 1],), bare=True),
}


def parity_worker(rank, world, configs, ops) -> Dict[str, float]:
    check = Checker()
    for i, (tag, config) in enumerate(configs.items()):
        for op in ops:
            if i == 0:
                run_twice(rank, world, op, check, tag, **config)
            else:
                run_op(rank, world, op, check, tag, **config)
    check_errors(rank)
    return check.max_err


def check_errors(rank):
    """Bad arguments raise PyTorch's exception types naming the argument, before any collective."""
    cases = [
        (lambda: SyncBatchNormReLU2d(C)(torch.randn(2, C, 4)), ValueError, "4D"),
        (lambda: SyncBatchNormReLU2d(0)(torch.randn(2, 0, 3, 3)), ValueError, "channels"),
        (lambda: SyncBatchNormAddReLU2d(C)(torch.randn(2, C, 3, 3), torch.randn(2, C, 3, 3), residual_bn=nn.ReLU()),
         TypeError, "residual_bn"),
        (lambda: sync_bn_add_relu(torch.randn(2, C, 3, 3), torch.randn(2, C, 3, 2), None, None, training=True),
         RuntimeError, "residual"),
        (lambda: sync_bn_relu(torch.randn(2, C, 3, 3), torch.zeros(C + 1), torch.ones(C + 1), training=True),
         RuntimeError, "running_mean"),
        (lambda: sync_bn_relu(torch.randn(2, C, 3, 3), torch.zeros(C), torch.ones(C), training=True, momentum=None),
         ValueError, "num_batches_tracked"),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=words):
            call()


@pytest.mark.parametrize("world", [3])
def test_matches_nn_sync_batchnorm_and_full_batch(world):
    """Every op, uneven / empty / single-image local batches, NCHW and channels_last,
    momentum 0.1 and None, mean 1e3 inputs, eval after training: outputs, input and
    parameter gradients, running statistics, one collective per forward and per backward."""
    errors = run_distributed(parity_worker, world, PARITY_CONFIGS, OPS)
    report = {k: max(e[k] for e in errors) for k in errors[0]}
    print()
    for tag in PARITY_CONFIGS:
        for kind in ("nn", "f64"):
            worst = max((v, k) for k, v in report.items() if k.startswith(tag + "/") and f"/{kind}/" in k)
            print(f"{tag:>16} vs {kind}: max abs error {worst[0]:.2e} ({worst[1]})")


# ---------------------------------------------------------- models, DDP, groups, fallback


def small_fused_model() -> nn.Module:
    """conv -> BatchNormReLU2d -> FusedBasicBlock (identity) -> FusedBottleneck (identity)."""
    torch.manual_seed(3)
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormReLU2d(8))
    model = nn.Sequential(stem, FusedBasicBlock(8, 8), FusedBottleneck(8, 2))
    for i, m in enumerate(model.modules()):
        if isinstance(m, nn.BatchNorm2d):
            init_bn(m, 10 + i)
    return model


def defused(model: nn.Module) -> nn.Module:
    """A float64 copy computing with plain nn.BatchNorm2d (+ ReLU) in place of the fused modules.

    The fused blocks apply the ReLU themselves around a plain norm; a stem BatchNormReLU2d
    becomes Sequential(BatchNorm2d, ReLU) (parameter and buffer order unchanged).
    """
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (BatchNormReLU2d, BatchNormAddReLU2d)):
                plain = twin(nn.BatchNorm2d, child)
                if isinstance(parent, nn.Sequential):
                    plain = nn.Sequential(plain, nn.ReLU())
                setattr(parent, name, plain)
    return model.double()


def model_worker(rank, world) -> Dict[str, float]:
    check = Checker()
    sizes = [3, 2] if world == 2 else [2] * world
    rows = local_rows(sizes, rank)

    # 1. DDP over a converted fused model: the gradients DDP averages and the running
    #    statistics equal those of the float64 model on the concatenated batch.
    fused = small_fused_model()
    full = defused(fused)
    model = convert_sync_batchnorm(fused)
    assert sum(isinstance(m, (SyncBatchNormReLU2d, SyncBatchNormAddReLU2d)) for m in model.modules()) == 6
    ddp = nn.parallel.DistributedDataParallel(model)
    x_full = global_batch(sizes, 7, shape=(3, 6, 6))
    weights = global_batch(sizes, 8, shape=(8, 6, 6))
    loss = (ddp(x_full[rows].float()) * weights[rows].float()).sum()
    loss.backward()
    # DDP averages: the reference loss is the mean over ranks of their losses.
    ((full(x_full) * weights).sum() / world).backward()
    for (name, p), p64 in zip(model.named_parameters(), full.parameters()):
        check(f"ddp/grad/{name}", p.grad, p64.grad, PARAM_TOL)
    for (name, b), b64 in zip(model.named_buffers(), full.buffers()):
        check(f"ddp/buffer/{name}", b, b64, PARAM_TOL)
    ddp.eval()
    full.eval()
    with torch.no_grad():
        check("ddp/eval/y", ddp(x_full[rows].float()), full(x_full[rows]), PARAM_TOL)

    # 2. A torchvision-style block with a (conv, BatchNorm2d) shortcut: after the
    #    conversion the shortcut is a SyncBatchNorm2d, synchronised with the block.
    torch.manual_seed(4)
    block = FusedBasicBlock(3, 8, stride=2, downsample=nn.Sequential(nn.Conv2d(3, 8, 1, 2, bias=False),
                                                                     nn.BatchNorm2d(8)))
    for i, m in enumerate(block.modules()):
        if isinstance(m, nn.BatchNorm2d):
            init_bn(m, 20 + i)
    full = defused(block)
    block = convert_sync_batchnorm(block)
    assert type(block.downsample[1]) is SyncBatchNorm2d and type(block.bn2) is SyncBatchNormAddReLU2d
    x = leaf(x_full[rows])
    with cpu_sync_batchnorm():  # in case the block runs the shortcut's nn.SyncBatchNorm itself
        y = block(x)
        (y * weights[rows, :, :3, :3].float()).sum().backward()
    x64 = x_full.clone().requires_grad_()
    y64 = full(x64)
    (y64 * weights[:, :, :3, :3]).sum().backward()
    check("block/y", y, y64[rows])
    check("block/dx", x.grad, x64.grad[rows])
    for (name, b), b64 in zip(block.named_buffers(), full.buffers()):
        check(f"block/buffer/{name}", b, b64, PARAM_TOL)

    # 3. A group of one process (and eval) is the single-process module, bit for bit.
    groups = [dist.new_group([r]) for r in range(world)]
    single = init_bn(BatchNormAddReLU2d(C), 5)
    lone = twin(SyncBatchNormAddReLU2d, single, process_group=groups[rank])
    for training in (True, False):
        single.train(training)
        lone.train(training)
        x, r = global_batch([2], 9 + training), global_batch([2], 11)
        xs, xl = leaf(x), leaf(x)
        ys, yl = single(xs, r.float()), lone(xl, r.float())
        ys.sum().backward()
        yl.sum().backward()
        assert torch.equal(ys, yl) and torch.equal(xs.grad, xl.grad)
        assert torch.equal(single.running_var, lone.running_var)
        assert torch.equal(single.weight.grad, lone.weight.grad)

    # 4. Two process groups of two (world 4): statistics are shared within a group only.
    if world == 4:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        pair = pairs[rank // 2]
        m = init_bn(SyncBatchNormReLU2d(C, process_group=pair), 6)
        m64 = twin(nn.BatchNorm2d, m).double()
        x_pair = global_batch([2, 1], 30 + rank // 2)
        mine = local_rows([2, 1], rank % 2)
        x = leaf(x_pair[mine])
        m(x).sum().backward()
        x64 = x_pair.clone().requires_grad_()
        F.relu(m64(x64)).sum().backward()
        check("groups/dx", x.grad, x64.grad[mine])
        check("groups/running_var", m.running_var, m64.running_var, PARAM_TOL)
    return check.max_err


def model_and_resnet_worker(rank, world):
    from test_ddp_resnet import resnet_ddp_worker

    return model_worker(rank, world), resnet_ddp_worker(rank, world)


@pytest.mark.parametrize("world", [4])
def test_ddp_converted_models_process_groups_and_fallback(world):
    """model_worker's checks, and DDP around a converted torchvision resnet18 (world 4)."""
    from test_ddp_resnet import check_resnet_ddp_errors

    errors, resnet_errors = zip(*run_distributed(model_and_resnet_worker, world))
    print(f"\nmax abs error (world {world}): {max(max(e.values()) for e in errors):.2e}")
    check_resnet_ddp_errors(resnet_errors, world)


# --------------------------------------------------------------- Triton path (interpreter)




def triton_worker(rank, world) -> Dict[str, float]:
    assert backend.INTERPRET, "TRITON_INTERPRET=1 must reach the spawned processes"
    check = Checker()
    configs = {"uneven": dict(sizes=([2, 1],), mean=0.5, std=2.0),
               "empty_rank_nhwc": dict(sizes=([0, 2],), channels_last=True, momentum=None)}
    for i, (tag, config) in enumerate(configs.items()):
        for op in ("relu", "add", "add_bn"):
            (run_twice if i == 0 else run_op)(rank, world, op, check, tag, **config)
    # DDP around a converted torchvision block with a (conv, BatchNorm2d) downsample.
    from torchvision.models import resnet as tv

    import fused_resnet

    torch.manual_seed(5)
    block = tv.BasicBlock(3, 4, stride=2, downsample=nn.Sequential(nn.Conv2d(3, 4, 1, 2, bias=False),
                                                                   nn.BatchNorm2d(4)))
    for i, m in enumerate(block.modules()):
        if isinstance(m, nn.BatchNorm2d):
            init_bn(m, 40 + i)
    full = copy.deepcopy(block).double()
    ddp = nn.parallel.DistributedDataParallel(convert_sync_batchnorm(fused_resnet.convert(block)))
    sizes = [2, 1]
    x_full, w_full = global_batch(sizes, 50, shape=(3, 4, 4)), global_batch(sizes, 51, shape=(4, 2, 2))
    rows = local_rows(sizes, rank)
    (ddp(x_full[rows].float()) * w_full[rows].float()).sum().backward()
    ((full(x_full) * w_full).sum() / world).backward()
    for (name, p), p64 in zip(ddp.module.named_parameters(), full.parameters()):
        check(f"ddp_block/grad/{name}", p.grad, p64.grad, PARAM_TOL)
    for (name, b), b64 in zip(ddp.module.named_buffers(), full.buffers()):
        check(f"ddp_block/buffer/{name}", b, b64, PARAM_TOL)
    # No value is read on the host in forward or backward, momentum=None included.
    bn = init_bn(SyncBatchNormAddReLU2d(C, momentum=None), 1)
    bn_r = init_bn(nn.SyncBatchNorm(C, momentum=None), 2)
    x, r = leaf(global_batch([2], rank)), leaf(global_batch([2], 5 + rank))
    with forbid_host_sync():
        bn(x, r, residual_bn=bn_r).sum().backward()
    return check.max_err


@pytest.mark.interpreter
def test_triton_path_matches_nn_sync_batchnorm():
    errors = run_distributed(triton_worker, 2)
    print(f"\nTriton path, max abs error: {max(max(e.values()) for e in errors):.2e}")


# ------------------------------------------------------------- single process (no spawn)


@pytest.mark.both
@pytest.mark.parametrize("op", ["relu", "add", "add_bn"])
def test_without_process_group_is_the_single_process_module(op):
    """No initialised process group: bit for bit the single-process fused module."""
    assert not dist.is_initialized()
    single = init_bn(BatchNormReLU2d(C) if op == "relu" else BatchNormAddReLU2d(C), 1)
    sync = twin(SyncBatchNormReLU2d if op == "relu" else SyncBatchNormAddReLU2d, single)
    shortcut = init_bn(nn.BatchNorm2d(C), 2)
    sync_shortcut = twin(nn.SyncBatchNorm, shortcut)
    for training in (True, False):
        for m in (single, sync, shortcut, sync_shortcut):
            m.train(training)
        x, r = global_batch([2], 1), global_batch([2], 2).float()
        xs, xy = leaf(x), leaf(x)
        if op == "relu":
            ys, yy = single(xs), sync(xy)
        elif op == "add":
            ys, yy = single(xs, r), sync(xy, r)
        else:
            ys, yy = single(xs, r, residual_bn=shortcut), sync(xy, r, residual_bn=sync_shortcut)
        ys.sum().backward()
        yy.sum().backward()
        assert torch.equal(ys, yy) and torch.equal(xs.grad, xy.grad)
        for a, b in [(single, sync)] + ([(shortcut, sync_shortcut)] if op == "add_bn" else []):
            assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
            assert torch.equal(a.weight.grad, b.weight.grad)


def test_convert_sync_batchnorm_keeps_tensors_modes_and_qconfig():
    stem_bn = init_bn(BatchNormReLU2d(8), 1)
    frozen = nn.BatchNorm2d(8, affine=False, track_running_stats=False)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), stem_bn, FusedBasicBlock(8, 8), frozen, nn.BatchNorm1d(4))
    model[2].bn1.weight.requires_grad_(False)
    model[2].bn2.eval()
    model[2].bn2.qconfig = "qconfig"
    before = {name: t for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    keys = list(model.state_dict())
    group = object()  # any process-group handle is kept as given

    out = convert_sync_batchnorm(model, process_group=group)
    assert out is model
    assert type(model[1]) is SyncBatchNormReLU2d and type(model[2].bn1) is SyncBatchNormReLU2d
    assert type(model[2].bn2) is SyncBatchNormAddReLU2d
    # A plain BatchNorm2d becomes the fused package's SyncBatchNorm2d (DDP takes it on CPU), others torch's.
    assert type(model[3]) is SyncBatchNorm2d and type(model[4]) is nn.SyncBatchNorm
    assert all(m.process_group is group for m in model.modules() if hasattr(m, "process_group"))
    after = {name: t for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert list(model.state_dict()) == keys
    assert not model[2].bn1.weight.requires_grad
    assert not model[2].bn2.training and model[2].bn1.training
    assert model[2].bn2.qconfig == "qconfig"
    assert model[3].running_mean is None and not model[3].affine
    # A fused module itself is returned converted; a converted one is re-converted.
    single = convert_sync_batchnorm(stem_bn)
    assert type(single) is SyncBatchNormReLU2d and single.weight is stem_bn.weight
    assert convert_sync_batchnorm(single, group).process_group is group


def test_sync_modules_take_nn_sync_batchnorm_constructor():
    m = SyncBatchNormAddReLU2d(4, 1e-3, None, True, True, None)
    assert m.eps == 1e-3 and m.momentum is None and m.process_group is None
    assert isinstance(m, nn.BatchNorm2d) and m.applies_relu
    assert list(m.state_dict()) == list(nn.SyncBatchNorm(4).state_dict())
    fused = SyncBatchNormReLU2d.from_batchnorm(nn.BatchNorm2d(4), process_group="g")
    assert fused.process_group == "g"


_TORCH_HAS_BIAS_KEYWORD = "bias" in inspect.signature(nn.SyncBatchNorm.__init__).parameters


@pytest.mark.skipif(not _TORCH_HAS_BIAS_KEYWORD, reason="this torch's nn.SyncBatchNorm takes no bias= keyword")
def test_sync_modules_take_the_bias_keyword():
    m = SyncBatchNormAddReLU2d(4, bias=False)
    assert m.bias is None and m.weight is not None
    assert list(m.state_dict()) == list(nn.SyncBatchNorm(4, bias=False).state_dict())


@pytest.mark.skipif(_TORCH_HAS_BIAS_KEYWORD, reason="this torch's nn.SyncBatchNorm takes bias=")
def test_sync_modules_refuse_bias_keyword_like_torch():
    """On a torch without the keyword, the fused modules refuse it as nn.SyncBatchNorm does."""
    with pytest.raises(TypeError) as expected:
        nn.SyncBatchNorm(4, bias=False)
    with pytest.raises(TypeError, match="bias") as actual:
        SyncBatchNormAddReLU2d(4, bias=False)
    assert type(actual.value) is type(expected.value)
