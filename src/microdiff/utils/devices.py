"""Which device and which rank a process uses: torchrun's environment, or explicit values.

Device names everywhere (``--device``, ``train.device``): ``auto`` (cuda:LOCAL_RANK when a CUDA GPU
is there, else cpu), ``cpu``, ``cuda`` (cuda:LOCAL_RANK under torchrun), ``cuda:N`` and ``mps``.
``auto`` never picks mps: the samplers keep a float64 state, which MPS does not support.
"""

from __future__ import annotations

import difflib
import os

import torch

from .errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def resolve_dist(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else torchrun's env RANK / WORLD_SIZE, else 0 / 1."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
    return rank, world_size


def _unknown(name: object, field: str) -> UserError:
    close = difflib.get_close_matches(str(name).lower(), ["auto", "cpu", "cuda", "mps"], n=1, cutoff=0.5)
    aliases = {"gpu": "cuda", "cuda0": "cuda:0", "nvidia": "cuda"}
    hint = aliases.get(str(name).strip().lower()) or (close[0] if close else None)
    return UserError(f"{field}={name}: unknown device; choose one of {', '.join(DEVICE_CHOICES)}"
                     + (f" (did you mean {hint}?)" if hint else ""))


def parse_device(device: str | torch.device | None, field: str = "--device") -> torch.device:
    """A device name as a ``torch.device`` without checking that it exists here (see the module
    docstring; ``"cuda"`` means cuda:LOCAL_RANK). Unknown names raise a UserError naming ``field``."""
    if isinstance(device, torch.device):
        parsed = device
    else:
        text = "auto" if device is None else str(device).strip().lower()
        if text == "auto":
            text = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            parsed = torch.device(text)
        except (RuntimeError, ValueError):
            raise _unknown(device, field) from None
        if parsed.type not in ("cpu", "cuda", "mps") or (parsed.index is not None and parsed.index < 0):
            raise _unknown(device, field)
    if parsed.type == "cuda" and parsed.index is None:
        parsed = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return parsed


def resolve_device(device: str | torch.device | None, field: str = "--device") -> torch.device:
    """``parse_device`` and a check that the device is on this machine: a CUDA device that is not
    there (no CUDA, or cuda:7 of 2 GPUs) or mps without MPS raises a UserError naming ``field``,
    the value and what to use instead."""
    parsed = parse_device(device, field)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"{field}={device}: CUDA is not available on this machine ({why}); "
                            f"use {field}=cpu (or auto)")
        count = torch.cuda.device_count()
        if parsed.index >= count:
            names = "cuda:0" if count == 1 else f"cuda:0 ... cuda:{count - 1}"
            raise UserError(f"{field}={device}: this machine has {count} CUDA device(s) ({names}); "
                            "pick one of them (or auto)")
    if parsed.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError(f"{field}={device}: MPS (Apple GPU) is not available on this machine; "
                            f"use {field}=cpu (or auto)")
    return parsed




DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def backbone_dtype(name: str | None, device: torch.device, field: str = "--dtype") -> torch.dtype:
    """The weights dtype a sampling command uses: ``auto`` is bfloat16 on CUDA and float32 elsewhere;
    bfloat16 on a GPU that cannot run it (before Ampere) is refused naming ``field``."""
    text = "auto" if name is None else str(name).strip().lower()
    if text == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if text not in DTYPE_NAMES:
        raise UserError(f"{field}={name}: unknown dtype; choose auto, {', '.join(DTYPE_NAMES)}")
    dtype = DTYPE_NAMES[text]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"{field}=bfloat16: this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16 "
                        f"support; use {field}=float16 or float32")
    return dtype


__all__ = ["DEVICE_CHOICES", "DTYPE_NAMES", "resolve_dist", "parse_device", "resolve_device", "backbone_dtype"]
