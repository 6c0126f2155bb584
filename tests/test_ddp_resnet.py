"""DDP and FSDP2 around a converted torchvision ResNet (downsample blocks included), on CPU / gloo.

``fused_resnet.convert`` then ``fused_resnet.convert_sync_batchnorm`` then
``DistributedDataParallel`` (before issue 20 DDP refused the model on CPU: the shortcuts'
BatchNorms became ``nn.SyncBatchNorm``), against torchvision's model in float64 in one
process on the concatenated batch. World 2 here; world 4 (one rank's local batch empty)
runs in the spawn of
``test_sync_batchnorm.test_ddp_converted_models_process_groups_and_fallback`` (spawning
costs seconds).
"""
from __future__ import annotations

import copy
from typing import Dict

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fused_resnet
from distributed_helpers import global_batch, local_rows, run_distributed
from fused_resnet.nn.sync_batchnorm import SyncBatchNorm2d, convert_sync_batchnorm
from seed_blocks import randomize_batchnorms

RESNET_SIZES = {2: [3, 1], 4: [2, 1, 3, 0]}  # uneven local batches, a single image, an empty one


def relative_error(actual, expected) -> float:
    """max|a - e| / max|e|: stable on the near-zero elements of a gradient."""
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def resnet_ddp_worker(rank, world) -> Dict[str, float]:
    """convert -> convert_sync_batchnorm -> DDP around torchvision's resnet18 (three
    downsample blocks), one training step, against float64 torchvision on the whole batch."""
    sizes = RESNET_SIZES[world]
    rows = local_rows(sizes, rank)
    torch.manual_seed(0)
    original = randomize_batchnorms(torchvision.models.resnet18(num_classes=4))
    full = copy.deepcopy(original).double()
    model = convert_sync_batchnorm(fused_resnet.convert(copy.deepcopy(original)))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert sum(type(m) is SyncBatchNorm2d for m in model.modules()) == 3  # the shortcuts' BatchNorms
    ddp = nn.parallel.DistributedDataParallel(model)  # raised "only work with GPU modules" before

    x_full = global_batch(sizes, 40, shape=(3, 32, 32))
    weights = global_batch(sizes, 41, shape=(4,))
    ((ddp(x_full[rows].float()) * weights[rows].float()).sum()).backward()
    ((full(x_full) * weights).sum() / world).backward()  # DDP averages the gradients over ranks
    errors = {}
    for (name, p), p64 in zip(model.named_parameters(), full.parameters()):
        errors[f"grad/{name}"] = relative_error(p.grad, p64.grad)
    for (name, b), b64 in zip(model.named_buffers(), full.buffers()):
        if b.is_floating_point():
            errors[f"buffer/{name}"] = relative_error(b, b64)
        else:
            assert torch.equal(b, b64), name
    ddp.eval()
    full.eval()
    with torch.no_grad():
        # Every rank calls DDP's forward, an empty one too: in eval it still broadcasts the buffers.
        y = ddp(x_full[rows].float())
        if sizes[rank]:
            errors["eval/y"] = relative_error(y, full(x_full[rows]))
    return errors


def check_resnet_ddp_errors(errors, world) -> None:
    """Gradients after DDP's averaging, running statistics and the eval output match float64
    torchvision on the concatenated batch within 2e-4 of each tensor's largest magnitude
    (measured: up to 9e-5, on layer4's BatchNorm gradients: 1x1 maps, a few values per channel)."""
    worst = max((max(e.values()), rank) for rank, e in enumerate(errors))
    print(f"\nresnet18 under DDP, world {world}: largest relative error {worst[0]:.1e} (rank {worst[1]})")
    for rank, e in enumerate(errors):
        bad = {k: v for k, v in e.items() if v > 2e-4}
        assert not bad, (rank, bad)


def fsdp_worker(rank, world) -> float:
    """FSDP2 (``fully_shard`` per stage and around the whole model) over a converted,
    synchronised resnet18 on gloo / CPU: one SGD step, against torchvision in one process
    on the whole batch. Returns the largest relative difference of the updated state."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    original = randomize_batchnorms(torchvision.models.resnet18(num_classes=4))
    model = convert_sync_batchnorm(fused_resnet.convert(copy.deepcopy(original)))
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        fully_shard(stage)
    fully_shard(model)
    sizes = RESNET_SIZES[world]
    x_full = global_batch(sizes, 60, shape=(3, 32, 32)).float()
    labels = torch.arange(sum(sizes)) % 4
    rows = local_rows(sizes, rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # This rank's share of the global mean: FSDP averages the gradients over ranks.
    (F.cross_entropy(model(x_full[rows]), labels[rows], reduction="sum") * world / len(labels)).backward()
    optimizer.step()
    reference = torch.optim.SGD(original.parameters(), lr=0.1)
    F.cross_entropy(original(x_full), labels).backward()
    reference.step()
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    return max(relative_error(state[k], v.double()) for k, v in original.state_dict().items()
               if v.is_floating_point())


def resnet_ddp_and_fsdp_worker(rank, world):
    return resnet_ddp_worker(rank, world), fsdp_worker(rank, world)


def test_ddp_and_fsdp2_converted_torchvision_resnet():
    """World 2 here; DDP at world 4 runs in model_worker's spawn (spawning costs seconds).
    FSDP2: the state after one step within 1e-3 of the largest magnitude of each tensor
    (fp32 against fp32 on a different partition of the batch; measured about 1e-4)."""
    ddp_errors, fsdp_errors = zip(*run_distributed(resnet_ddp_and_fsdp_worker, 2))
    check_resnet_ddp_errors(ddp_errors, 2)
    print(f"FSDP2 resnet18, world 2: largest relative difference after one step {max(fsdp_errors):.1e}")
    assert max(fsdp_errors) < 1e-3
