"""One process or many (``torchrun``): process-group setup, device choice and model wrapping.

    dist_info = setup_distributed("auto", "auto")      # reads RANK / WORLD_SIZE / LOCAL_RANK
    model = wrap_model(module, dist_info, "ddp")        # DDP, FSDP2 (fully_shard) or the module itself

NCCL on GPUs and gloo on CPUs by default. Only rank 0 writes files; every rank keeps its own
data position and RNG state, gathered into rank 0's checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..utils.devices import resolve_device, resolve_dist

# FSDP2 shards each of these blocks on its own, then the rest of the model as one unit
_SHARD_UNITS = {"DiTBlock", "UNetBlock", "TextBlock"}


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def check_device(name: str, field: str = "train.device") -> torch.device:
    """``name`` as a torch device (see utils.devices), refusing devices this machine does not have; errors
    name ``field`` (the config key or the command-line flag it came from)."""
    return resolve_device(name, field=field)


def setup_distributed(device: str = "auto", backend: str = "auto", field: str = "train.device") -> DistInfo:
    rank, world = resolve_dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = check_device(device, field)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    initialized_here = False
    if world > 1 and not dist.is_initialized():
        chosen = ("nccl" if dev.type == "cuda" else "gloo") if backend == "auto" else backend
        dist.init_process_group(chosen, device_id=dev if chosen == "nccl" else None)
        initialized_here = True
    return DistInfo(rank, world, local, dev, initialized_here)


def teardown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(module: nn.Module, info: DistInfo, strategy: str = "ddp") -> nn.Module:
    """The module a training step calls: itself (one process), DDP or FSDP2 (``fully_shard`` on each
    transformer / UNet block, then on the whole)."""
    if not info.distributed:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for sub in module.modules():
            if sub is not module and type(sub).__name__ in _SHARD_UNITS:
                fully_shard(sub)
        fully_shard(module)
        return module
    raise ValueError(f"distributed.strategy={strategy!r}: use ddp or fsdp")



def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` (a list on every rank), e.g. data positions and RNG states for a checkpoint."""
    if not info.distributed:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


__all__ = ["DistInfo", "setup_distributed", "teardown", "wrap_model", "all_reduce_mean", "gather_objects",
           "barrier", "check_device"]
