"""A minimal training loop for low-dimensional denoisers: the diffusion core end to end.

Used by the smoke demo and by the loss-minimiser tests. The full trainer (EMA, checkpoints,
resume, distributed, mixed precision) lives in ``microdiff.train``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from .denoiser import Denoiser
from .loss import denoising_loss


@dataclass
class ToyTrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_denoiser(denoiser: Denoiser, sample_data: Callable[[int, torch.Generator], torch.Tensor],
                   noise_distribution, *, steps: int = 2000, batch_size: int = 512, lr: float = 2e-3,
                   weighting=None, seed: int = 0, progress: bool = False) -> ToyTrainResult:
    """Adam with a cosine learning-rate decay on the denoising loss; returns the loss history."""
    import time

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(denoiser.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    result = ToyTrainResult()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train", disable=not progress, unit="step")
    for step in bar:
        x0 = sample_data(batch_size, g).float()
        sigma = noise_distribution.sample(batch_size, g)
        out = denoising_loss(denoiser, x0, sigma, weighting=weighting, generator=g)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        result.losses.append(float(out.loss.detach()))
        if progress and step % 50 == 0:
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
    result.seconds = time.perf_counter() - start
    return result
