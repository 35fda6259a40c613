"""Sampling Ambient Diffusion models: the network only ever saw masked inputs [A~ * x_t, A~].

Each image gets its masks once, before the first step, and keeps them through the whole
trajectory (a fresh mask every step would be a different model at every step). With several
masks per image the denoiser's outputs are averaged over them, which makes the estimate agree
across masks (a cheap form of the consistency across masks Ambient Diffusion samples with).
"""

from __future__ import annotations

import torch

from .corruptions import further_mask


def sampling_masks(generators: list[torch.Generator], shape: tuple[int, int, int], keep_prob: float,
                   draws: int = 1, block: int = 1, device: str | torch.device = "cpu") -> torch.Tensor:
    """(draws, B, 1, H, W) masks, image k's drawn from ``generators[k]`` (1 = seen)."""
    if not 0 < keep_prob <= 1:
        raise ValueError(f"mask_keep_prob={keep_prob}: must be in (0, 1]")
    if draws < 1:
        raise ValueError(f"mask_draws={draws}: must be >= 1")
    _, h, w = shape
    per_image = [further_mask(torch.ones(draws, 1, h, w), 1 - keep_prob, g, block) for g in generators]
    return torch.stack(per_image, 1).to(device)


class FixedMaskDenoiser:
    """D(x, sigma) = mean over k of D(x, sigma; input_mask = masks[k]) with each image's own masks.

    Guidance wrappers call it with the batch repeated (conditional and unconditional branches); the
    masks repeat the same way, so every branch of an image sees the same masks."""

    def __init__(self, denoiser, masks: torch.Tensor):
        if masks.ndim != 5:
            raise ValueError(f"masks must be (draws, B, 1, H, W); got {tuple(masks.shape)}")
        self.denoiser, self.masks = denoiser, masks

    @property
    def parameterization(self):
        return self.denoiser.parameterization

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        batch = self.masks.shape[1]
        if x.shape[0] % batch:
            raise ValueError(f"x has batch {x.shape[0]}, not a multiple of the {batch} images the masks were drawn for")
        repeats = x.shape[0] // batch
        out = None
        for mask in self.masks:
            d = self.denoiser(x, sigma, input_mask=mask.to(x.dtype).repeat(repeats, 1, 1, 1), **cond)
            out = d if out is None else out + d
        return out / self.masks.shape[0]


__all__ = ["sampling_masks", "FixedMaskDenoiser"]
