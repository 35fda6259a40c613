"""Conversions between the VE view used everywhere in microdiff and variance-preserving (VP) views.

VE:  x = x0 + sigma * n.      VP:  x_vp = alpha * x0 + sigma_vp * n,  alpha^2 + sigma_vp^2 = 1.
The two describe the same noisy sample up to scale: x_vp = alpha * x with alpha = 1/sqrt(1+sigma^2)
and sigma_vp = sigma * alpha. The cosine schedule of v-diffusion writes alpha = cos(pi t/2),
sigma_vp = sin(pi t/2), hence sigma = tan(pi t/2).
"""

from __future__ import annotations

import math

import torch


def vp_alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma_vp) of the VP process that matches VE noise level ``sigma``."""
    alpha = torch.rsqrt(1 + sigma**2)
    return alpha, sigma * alpha


def sigma_to_cosine_t(sigma: torch.Tensor) -> torch.Tensor:
    """Cosine-schedule time t in [0, 1] of VE noise level sigma (t = 2/pi * atan(sigma))."""
    return torch.atan(sigma) * (2 / math.pi)


def cosine_t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """VE noise level of cosine-schedule time t (sigma = tan(pi t / 2)); t = 1 is infinite."""
    return torch.tan(t * (math.pi / 2))


# Prediction-target conversions, all in the VE view (x = x0 + sigma * eps).
def eps_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (x - x0) / sigma


def x0_from_eps(x: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x - sigma * eps


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """v = alpha * eps - sigma_vp * x0 (Salimans & Ho), for the VP process matching ``sigma``."""
    alpha, sigma_vp = vp_alpha_sigma(sigma)
    return alpha * eps - sigma_vp * x0


def x0_from_v(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = alpha * x_vp - sigma_vp * v with x_vp = alpha * x."""
    alpha, sigma_vp = vp_alpha_sigma(sigma)
    return alpha**2 * x - sigma_vp * v
