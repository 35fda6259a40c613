"""Which device and which rank a process uses: torchrun's environment, or explicit values."""

from __future__ import annotations

import os

import torch


def resolve_dist(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else torchrun's env RANK / WORLD_SIZE, else 0 / 1."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
    return rank, world_size


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: cuda:LOCAL_RANK when CUDA is there, else cpu. ``"cuda"`` means
    cuda:LOCAL_RANK under torchrun."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


__all__ = ["resolve_dist", "resolve_device"]
