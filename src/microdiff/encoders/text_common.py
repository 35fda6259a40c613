"""What every text encoder shares: the saved-folder file names, caption checks, masked mean pooling,
truncation counting."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

CONFIG_FILE = "text_encoder.json"
WEIGHTS_FILE = "text_encoder.safetensors"
CHECKPOINT_KEY = "text_encoder"  # safetensors metadata key holding the identifier in a checkpoint


def check_captions(captions: list[str]) -> list[str]:
    """A non-empty list of strings, or a ValueError that says which entry is wrong."""
    if isinstance(captions, str):
        raise ValueError("encode() takes a list of captions, got one str; wrap it: encode([caption])")
    captions = list(captions)
    if not captions:
        raise ValueError("encode() got no captions; pass at least one (use '' for an empty caption)")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise ValueError(f"captions[{i}] is {type(c).__name__}, not str; use '' for an empty caption")
    return captions


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L, D) states over the real tokens of (B, L) ``mask``, accumulated in float32."""
    w = mask.to(torch.float32).unsqueeze(-1)
    return ((states.float() * w).sum(1) / w.sum(1).clamp_min(1e-9)).to(states.dtype)


def _count_truncation(encoder: Any, cut: int, total: int) -> None:
    encoder.encoded += total
    if cut:
        if encoder.truncated == 0:
            warnings.warn(f"{encoder.identifier}: {cut} of {total} captions are longer than max_length="
                          f"{encoder.max_length} tokens and were truncated; later truncations are only "
                          "counted in .truncated", stacklevel=3)
        encoder.truncated += cut


def _save_config(directory: str | os.PathLike, payload: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return directory


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "CHECKPOINT_KEY", "check_captions", "masked_mean"]
