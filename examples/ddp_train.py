"""Data-parallel training of a converted ResNet, launched with torchrun.

    torchrun --nproc_per_node 2 examples/ddp_train.py              # gloo on CPU; on GPUs nccl, one per process
    torchrun --nproc_per_node 1 examples/ddp_train.py --original   # the unconverted model, the whole batch

The steps a user takes: ``fused_resnet.convert``, channels_last, then
``fused_resnet.convert_sync_batchnorm`` (statistics over every process), then
``DistributedDataParallel``, and the forward under autocast (bf16). Each rank takes its
share of one global batch, so the printed loss (the global batch's mean, one JSON line per
step on rank 0) is the same for any number of processes, up to rounding.
``--original`` runs torchvision's model unconverted, with ``nn.SyncBatchNorm`` when there
are 2+ processes (which DDP accepts on GPUs only).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel

import fused_resnet


def build(original: bool, device: torch.device, world: int) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on every rank (DDP would broadcast rank 0's anyway)
    model = torchvision.models.resnet18(num_classes=10)
    if not original:
        model = fused_resnet.convert(model)
    model = model.to(device, memory_format=torch.channels_last)
    if world > 1:
        convert = torch.nn.SyncBatchNorm.convert_sync_batchnorm if original else fused_resnet.convert_sync_batchnorm
        model = convert(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def train(args, precision: str, device: torch.device, rank: int, world: int) -> None:
    model = build(args.original, device, world)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = torch.Generator().manual_seed(1)  # the same global batch on every rank
    for step in range(args.steps):
        images = torch.randn(args.batch, 3, args.size, args.size, generator=data)
        labels = torch.randint(0, 10, (args.batch,), generator=data)
        mine = torch.arange(args.batch).tensor_split(world)[rank]  # uneven shares allowed
        x = images[mine].to(device, memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss_sum = F.cross_entropy(model(x), labels[mine].to(device), reduction="sum")
        # This rank's share of the global mean; DDP averages gradients over ranks, hence * world.
        (loss_sum * world / args.batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss_sum.detach().float()
        dist.all_reduce(total)
        if rank == 0:
            print(json.dumps({"precision": precision, "step": step, "loss": total.item() / args.batch}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="global batch size")
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--precision", default="bf16", help="fp32, bf16 (autocast) or both: fp32,bf16")
    parser.add_argument("--original", action="store_true", help="train torchvision's model unconverted")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        for precision in args.precision.split(","):
            if precision not in ("fp32", "bf16"):
                parser.error(f"--precision: unknown precision {precision!r} (fp32, bf16)")
            train(args, precision, device, rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
