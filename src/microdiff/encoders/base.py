"""The two protocols every encoder implements, so datasets, precompute, training and the pipeline
never care which model is behind them.

TextEncoder:  ``encode(list[str]) -> TextEncoding(states (B,L,D), mask (B,L) bool, pooled (B,D))``
              with ``dim``, ``max_length`` and ``identifier`` (a stable string stored in
              checkpoints and shard metadata, from which ``load_text_encoder`` rebuilds it).
Autoencoder:  ``encode(images in [-1, 1], (B,3,H,W)) -> latents`` already scaled (and shifted),
              ``decode(latents) -> images in [-1, 1]``, with ``latent_channels``, ``downsample``
              (spatial factor) and ``identifier``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class TextEncoding:
    states: torch.Tensor  # (B, L, D) token states
    mask: torch.Tensor  # (B, L) bool, True = real token
    pooled: torch.Tensor  # (B, D) one vector per caption

    def to(self, device=None, dtype: torch.dtype | None = None) -> "TextEncoding":
        """Move to ``device``; ``dtype`` applies to the float tensors (the mask stays bool)."""
        return TextEncoding(self.states.to(device=device, dtype=dtype), self.mask.to(device=device),
                            self.pooled.to(device=device, dtype=dtype))


@runtime_checkable
class TextEncoder(Protocol):
    dim: int
    max_length: int
    identifier: str

    def encode(self, captions: list[str]) -> TextEncoding: ...


@runtime_checkable
class Autoencoder(Protocol):
    latent_channels: int
    downsample: int
    identifier: str

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class IdentityAutoencoder(torch.nn.Module):
    """Pixel-space diffusion: latents are the images themselves."""

    downsample = 1

    def __init__(self, channels: int = 3):
        super().__init__()
        self.latent_channels = channels
        self.identifier = "identity" if channels == 3 else f"identity:{channels}"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


__all__ = ["TextEncoding", "TextEncoder", "Autoencoder", "IdentityAutoencoder"]
