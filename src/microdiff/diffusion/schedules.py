"""Sigma grids for sampling: n+1 VE noise levels, descending, ending in 0.

Every grid function returns the n sampler steps' starting sigmas followed by a final 0, like
k-diffusion's ``get_sigmas_*``, so grids and samplers combine freely.
"""

from __future__ import annotations

import math

import torch

from .ddpm import DiscreteSchedule
from .vp import cosine_t_to_sigma

# v-diffusion's cosine schedule reaches t = 1 (alpha = 0), i.e. sigma = infinity in the VE view;
# its grids start at this finite sigma instead (t = 1 - 6.4e-5: the network input differs from
# pure noise by 5e-9 relative).
COSINE_SIGMA_MAX = 1e4


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check_range(n: int, sigma_min: float, sigma_max: float) -> None:
    if n < 1:
        raise ValueError(f"number of steps must be at least 1, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device="cpu",
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Karras et al. 2022 eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    _check_range(n, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, device=device, dtype=dtype)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float, device="cpu",
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """Evenly spaced in log sigma."""
    _check_range(n, sigma_min, sigma_max)
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device, dtype=dtype)
    return _append_zero(log_sigmas.exp())


def _cosine_t_to_grid(t: torch.Tensor, sigma_max: float, dtype) -> torch.Tensor:
    sigmas = cosine_t_to_sigma(t.to(torch.float64)).clamp(max=sigma_max)
    return _append_zero(sigmas.to(dtype or torch.get_default_dtype()))


def cosine_t(n: int, sigma_max: float = COSINE_SIGMA_MAX, device="cpu",
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """v-diffusion's plain cosine grid: t = linspace(1, 0, n+1)[:-1], sigma = tan(pi t / 2)."""
    _check_range(n, 1e-12, sigma_max)
    t = torch.linspace(1, 0, n + 1, dtype=torch.float64, device=device)[:-1]
    return _cosine_t_to_grid(t, sigma_max, dtype)


def ddpm_log_snr_t(ddpm_t: torch.Tensor) -> torch.Tensor:
    """Cosine-schedule time of the continuous DDPM schedule log SNR = -log(expm1(1e-4 + 10 t^2))."""
    log_snr = -torch.special.expm1(1e-4 + 10 * ddpm_t**2).log()
    # alpha = sqrt(sigmoid(log_snr)), sigma = sqrt(sigmoid(-log_snr)); t = 2/pi * atan2(sigma, alpha)
    return torch.atan2(torch.sigmoid(-log_snr).sqrt(), torch.sigmoid(log_snr).sqrt()) * (2 / math.pi)


# Where v-diffusion splices the DDPM schedule onto the cosine one (its published constants).
SPLICE_DDPM_CROSSOVER = 0.48536712
SPLICE_COSINE_CROSSOVER = 0.80074257


def spliced_ddpm_cosine_t(t: torch.Tensor) -> torch.Tensor:
    """v-diffusion's spliced schedule: cosine time for small t, the DDPM schedule beyond the splice."""
    big_t = t * (1 + SPLICE_COSINE_CROSSOVER - SPLICE_DDPM_CROSSOVER)
    ddpm_part = ddpm_log_snr_t(big_t + SPLICE_DDPM_CROSSOVER - SPLICE_COSINE_CROSSOVER)
    return torch.where(big_t < SPLICE_COSINE_CROSSOVER, big_t, ddpm_part)


def spliced_ddpm_cosine(n: int, sigma_max: float = COSINE_SIGMA_MAX, device="cpu",
                        dtype: torch.dtype | None = None) -> torch.Tensor:
    """The grid v-diffusion's samplers use: spliced_ddpm_cosine_t(linspace(1, 0, n+1)[:-1])."""
    _check_range(n, 1e-12, sigma_max)
    t = torch.linspace(1, 0, n + 1, dtype=torch.float64, device=device)[:-1]
    return _cosine_t_to_grid(spliced_ddpm_cosine_t(t), sigma_max, dtype)


def ddpm(schedule: DiscreteSchedule, n: int, spacing: str = "trailing", steps_offset: int = 0,
         device="cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """The sigmas of ``n`` DDPM timesteps (see ``DiscreteSchedule.timesteps``), then 0."""
    timesteps = schedule.timesteps(n, spacing, steps_offset)
    sigmas = schedule.sigmas[timesteps].to(dtype or torch.get_default_dtype())
    return _append_zero(sigmas).to(device)


GRIDS = {
    "karras": karras,
    "exponential": exponential,
    "cosine": cosine_t,
    "spliced_ddpm_cosine": spliced_ddpm_cosine,
}


def truncate(sigmas: torch.Tensor, sigma_stop: float) -> torch.Tensor:
    """Truncated sampling: the grid's levels above ``sigma_stop``, then ``sigma_stop``, then 0. The
    last step (to 0) of every sampler here returns x0_hat = D(x, sigma_stop): for a model trained only
    on data noisy at sigma_stop (Ambient), its best guess of the clean image from there."""
    if not sigma_stop > 0:
        raise ValueError(f"truncate_sigma={sigma_stop}: must be > 0 (0 is ordinary sampling)")
    above = sigmas[sigmas > sigma_stop]
    if len(above) == 0:
        raise ValueError(f"truncate_sigma={sigma_stop} is not below the grid's largest sigma {float(sigmas[0]):.4g}")
    return torch.cat([above, above.new_tensor([sigma_stop, 0.0])])


def check_sigmas(sigmas: torch.Tensor) -> None:
    """Raise a one-line ValueError unless ``sigmas`` is a valid sampling grid."""
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"sigmas must be a 1-D torch.Tensor, got {type(sigmas).__name__}")
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}")
    if not bool(torch.isfinite(sigmas).all()):
        raise ValueError("sigmas contain inf or nan; clamp the largest sigma to a finite value")
    if bool((sigmas < 0).any()):
        raise ValueError(f"sigmas must be non-negative, got min {float(sigmas.min()):.4g}")
    if bool((sigmas[1:] > sigmas[:-1]).any()):
        raise ValueError("sigmas must be non-increasing (sampling runs from noise to data)")
    if float(sigmas[-1]) != 0.0:
        raise ValueError(
            f"the sigma grid must end in 0 to return a clean sample (last is {float(sigmas[-1]):.4g}); "
            "append a zero, as the grid functions in microdiff.diffusion.schedules do"
        )
    if float(sigmas[0]) == 0.0:
        raise ValueError("the sigma grid starts at 0: there is nothing to denoise")
