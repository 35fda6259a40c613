"""Training noise-level distributions: where on the sigma axis the loss is spent.

Each distribution is a small object with ``sample(n, generator=None, device="cpu")`` returning a
(n,) float32 tensor of VE sigmas, and a ``config()`` to save beside checkpoints.
"""

from __future__ import annotations

import math

import torch

from ..utils.registry import lookup
from .ddpm import DiscreteSchedule
from .vp import cosine_t_to_sigma


def _uniform(n, generator, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gen_device).to(device)


class LogNormal:
    """ln(sigma) ~ N(P_mean, P_std^2) (EDM). micro_diffusion: (-0.6, 1.2) at 256 px, (0, 0.6) at 512."""

    name = "lognormal"

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        if p_std <= 0:
            raise ValueError(f"p_std must be positive, got {p_std}")
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def sample(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        gen_device = generator.device if generator is not None else device
        z = torch.randn(n, generator=generator, device=gen_device).to(device)
        return (self.p_mean + self.p_std * z).exp()

    def config(self):
        return {"name": self.name, "p_mean": self.p_mean, "p_std": self.p_std}


class CosineUniform:
    """t ~ U(t_min, t_max) on the cosine schedule, sigma = tan(pi t / 2) (v-diffusion).

    The default range keeps sigma in [1.6e-4, 6.4e3]: t = 0 and t = 1 are sigma = 0 and infinity,
    where the training targets are undefined."""

    name = "cosine"

    def __init__(self, t_min: float = 1e-4, t_max: float = 1 - 1e-4):
        if not 0 < t_min < t_max < 1:
            raise ValueError(f"need 0 < t_min < t_max < 1, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)

    def sample(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        t = self.t_min + (self.t_max - self.t_min) * _uniform(n, generator, device)
        return cosine_t_to_sigma(t.double()).float()

    def config(self):
        return {"name": self.name, "t_min": self.t_min, "t_max": self.t_max}


class DiscreteUniform:
    """A DDPM timestep k ~ U{0, ..., T-1}, sigma = the schedule's sigma_k.

    Built from a named beta schedule (``beta_schedule``, ``num_timesteps``, and make_betas'
    keyword arguments such as beta_start/beta_end), or from an explicit ``betas`` table."""

    name = "discrete"

    def __init__(self, beta_schedule: str = "linear", num_timesteps: int = 1000,
                 betas=None, **beta_kwargs):
        if betas is not None:
            self.schedule = DiscreteSchedule(torch.as_tensor(betas, dtype=torch.float64))
            self._config = {"betas": self.schedule.betas.tolist()}
        else:
            self.schedule = DiscreteSchedule.from_name(beta_schedule, num_timesteps, **beta_kwargs)
            self._config = {"beta_schedule": beta_schedule, "num_timesteps": num_timesteps, **beta_kwargs}

    @classmethod
    def from_schedule(cls, schedule: DiscreteSchedule) -> "DiscreteUniform":
        return cls(betas=schedule.betas)

    def sample(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        gen_device = generator.device if generator is not None else device
        k = torch.randint(self.schedule.num_timesteps, (n,), generator=generator, device=gen_device)
        return self.schedule.sigmas[k.cpu()].float().to(device)

    def config(self):
        return {"name": self.name, **self._config}


class LogUniform:
    """ln(sigma) ~ U(ln sigma_min, ln sigma_max): flat over noise scales, for ablations and plots."""

    name = "loguniform"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def sample(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return (lo + (hi - lo) * _uniform(n, generator, device)).exp()

    def config(self):
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


NOISE_DISTRIBUTIONS = {cls.name: cls for cls in (LogNormal, CosineUniform, DiscreteUniform, LogUniform)}


def make_noise_distribution(name: str, **kwargs):
    return lookup(NOISE_DISTRIBUTIONS, name, "noise distribution")(**kwargs)
