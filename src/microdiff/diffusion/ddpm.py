"""Discrete DDPM noise schedules: beta tables, their VE sigmas, and the sigma <-> timestep map.

A discrete model was trained at timesteps k = 0..T-1 with alpha_bar_k = prod_{i<=k} (1 - beta_i),
i.e. at VE noise levels sigma_k = sqrt((1 - alpha_bar_k) / alpha_bar_k). Samplers work with any
sigma; ``DiscreteSchedule.sigma_to_t`` turns it into the (fractional or rounded) timestep the
network expects, interpolating linearly in log sigma between table entries.
"""

from __future__ import annotations

import math

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


def make_betas(
    name: str = "linear",
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """Beta table in float64.

    linear:        DDPM (Ho et al. 2020), betas evenly spaced in [beta_start, beta_end].
    scaled_linear: Stable Diffusion, sqrt(beta) evenly spaced (use beta_start=8.5e-4, beta_end=0.012).
    cosine:        Nichol & Dhariwal 2021, alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2),
                   beta_k = min(1 - alpha_bar(k+1)/alpha_bar(k), max_beta).
    """
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}")
    if name == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if name == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if name == "cosine":
        k = torch.arange(num_timesteps + 1, dtype=torch.float64)
        alpha_bar = torch.cos((k / num_timesteps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)
    raise ValueError(f"unknown beta schedule {name!r}; choose one of {', '.join(BETA_SCHEDULES)}")


class DiscreteSchedule:
    """The VE sigmas of a discrete DDPM model and the map between sigma and timestep."""

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D table with every entry in (0, 1)")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()  # ascending in k
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_name(cls, name: str = "linear", num_timesteps: int = 1000, **kwargs) -> "DiscreteSchedule":
        return cls(make_betas(name, num_timesteps, **kwargs))

    @property
    def num_timesteps(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Fractional timestep of each sigma (log-sigma interpolation, clamped to the table)."""
        sigma = torch.as_tensor(sigma)
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.to(torch.float64).clamp(min=1e-30).log()
        if quantize:
            t = (log_sigma[..., None] - log_sigmas).abs().argmin(dim=-1).to(torch.float64)
        else:
            log_sigma = log_sigma.clamp(log_sigmas[0], log_sigmas[-1])
            hi = torch.searchsorted(log_sigmas, log_sigma.contiguous()).clamp(1, len(log_sigmas) - 1)
            lo = hi - 1
            w = (log_sigma - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
            t = lo + w
        return t.to(sigma.dtype if sigma.is_floating_point() else torch.float64)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at a fractional timestep (log-sigma interpolation)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        log_sigmas = self.log_sigmas.to(t.device)
        lo = t.floor().long().clamp(0, len(log_sigmas) - 1)
        hi = t.ceil().long().clamp(0, len(log_sigmas) - 1)
        w = t - t.floor()
        return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()

    def timesteps(self, n: int, spacing: str = "trailing", steps_offset: int = 0) -> torch.Tensor:
        """``n`` integer timesteps, descending, with the spacings diffusers users know.

        linspace: round(linspace(0, T-1, n));  leading: k*(T//n) + steps_offset;
        trailing: round(T - k*T/n) - 1 (starts at T-1, the noisiest step; Lin et al. 2024).
        """
        T = self.num_timesteps
        if not 1 <= n <= T:
            raise ValueError(f"number of steps must be in [1, {T}], got {n}")
        if spacing == "linspace":
            ts = torch.linspace(0, T - 1, n, dtype=torch.float64).round()
        elif spacing == "leading":
            ts = torch.arange(n, dtype=torch.float64) * (T // n) + steps_offset
        elif spacing == "trailing":
            ts = (T - torch.arange(n, dtype=torch.float64) * (T / n)).round() - 1
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; choose linspace, leading or trailing")
        return ts.sort(descending=True).values.long().clamp(0, T - 1)
