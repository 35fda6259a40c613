"""The consistency phase of Ambient Tweedie (Daras et al. 2024): training below sigma_tn.

Data noisy at sigma_tn says nothing directly about the denoiser at sigma < sigma_tn, but a correct
model is consistent with itself: if x_t is drawn from the model's own reverse process started at
x_tn, then E[D(x_t, sigma) | x_tn] = D(x_tn, sigma_tn) (posterior means form a martingale). The
loss is the squared norm of the difference, estimated without bias from two independent draws:

    L = < D(x_t^1, sigma) - T , D(x_t^2, sigma) - T >,    T = D(x_tn, sigma_tn) (no gradient)

whose expectation is |E[D(x_t, sigma) | x_tn] - T|^2. The draws run the ancestral (DDPM-like)
reverse process from sigma_tn down to sigma, without gradients.
"""

from __future__ import annotations

import torch

from ..diffusion.denoiser import append_dims
from ..diffusion.samplers import ancestral_step


@torch.no_grad()
def reverse_draw(denoiser, x: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor, steps: int,
                 generator: torch.Generator | None = None, **cond) -> torch.Tensor:
    """x at ``sigma_to`` drawn by ``steps`` ancestral steps from x at ``sigma_from`` (per-sample levels,
    geometric spacing)."""
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least one reverse step")
    if bool((sigma_to >= sigma_from).any()):
        raise ValueError("reverse_draw goes down in noise: every sigma_to must be below its sigma_from")
    ratio = sigma_to / sigma_from
    for k in range(steps):
        s = sigma_from * ratio ** (k / steps)
        s_next = sigma_from * ratio ** ((k + 1) / steps)
        d = denoiser(x, s, **cond)
        down, up = ancestral_step(s, s_next)
        x = x + append_dims((down - s) / s, x.ndim) * (x - d)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device
                            if generator is not None else x.device).to(x.device)
        x = x + append_dims(up, x.ndim) * noise
    return x


def consistency_loss(denoiser, x_tn: torch.Tensor, sigma_tn: torch.Tensor, sigma: torch.Tensor, steps: int = 8,
                     generator: torch.Generator | None = None, **cond) -> torch.Tensor:
    """Per-sample unbiased estimate of |E[D(x_t, sigma) | x_tn] - D(x_tn, sigma_tn)|^2 (shape (B,)), for
    sigma < sigma_tn; gradients flow through the two low-noise evaluations only."""
    with torch.no_grad():
        target = denoiser(x_tn, sigma_tn, **cond)
    first = reverse_draw(denoiser, x_tn, sigma_tn, sigma, steps, generator, **cond)
    second = reverse_draw(denoiser, x_tn, sigma_tn, sigma, steps, generator, **cond)
    a = denoiser(first, sigma, **cond) - target
    b = denoiser(second, sigma, **cond) - target
    return (a * b).flatten(1).sum(1)


__all__ = ["reverse_draw", "consistency_loss"]
