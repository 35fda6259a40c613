"""Samplers over a denoiser, in k-diffusion's calling convention.

    sample_<name>(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, **options)

``denoiser(x, sigma_batch, **extra_args)`` returns x0_hat; ``x`` is noise already scaled by
``sigmas[0]``; ``sigmas`` is a grid from ``microdiff.diffusion.schedules`` (descending, ending in 0).
The result is the final sample. ``callback`` gets a dict with x, i, sigma, sigma_hat, denoised.
Stochastic samplers take ``generator``: one torch.Generator, or one per sample so that each image
is independent of the batch size (see ``microdiff.diffusion.rng``). The state keeps x's dtype:
pass float64 noise for a float64 trajectory.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from tqdm.auto import trange

from ..utils.registry import lookup
from .rng import randn_like
from .schedules import check_sigmas


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """(sigma_down, sigma_up): deterministic target level and fresh-noise level of one step.

    sigma_up = eta * sigma_to * sqrt(1 - sigma_to^2/sigma_from^2) is exactly DDIM's noise
    (Song et al. 2021, eq. 16) written in VE units; eta = 1 is DDPM's ancestral sampler.
    """
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(
        sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    )
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


class _Model:
    """Calls the denoiser with a per-sample sigma and checks what comes back."""

    def __init__(self, denoiser, x: torch.Tensor, extra_args):
        self.denoiser = denoiser
        self.extra_args = extra_args or {}
        self.s_in = x.new_ones([x.shape[0]])
        self.shape = x.shape

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        denoised = self.denoiser(x, sigma * self.s_in, **self.extra_args)
        if denoised.shape != self.shape:
            raise ValueError(
                f"the denoiser returned shape {tuple(denoised.shape)} for x of shape "
                f"{tuple(self.shape)}; it must return x0_hat of the same shape as x"
            )
        return denoised


def _prepare(denoiser, x, sigmas, extra_args):
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        raise ValueError("x must be a tensor whose first dimension is the batch")
    check_sigmas(sigmas)
    return _Model(denoiser, x, extra_args), sigmas.to(device=x.device, dtype=x.dtype)


def _churn(x, sigma, n_steps, s_churn, s_tmin, s_tmax, s_noise, generator):
    """EDM's stochastic 'churn': raise the noise level to sigma_hat = sigma (1 + gamma)."""
    gamma = min(s_churn / n_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if s_churn > 0:
        # Drawn at every step, used only where gamma > 0: the same noise stream as k-diffusion,
        # so a seed gives the same images with either library.
        eps = randn_like(x, generator) * s_noise
        if gamma > 0:
            x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, generator=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without the
    second-order correction), with optional churn."""
    model, sigmas = _prepare(denoiser, x, sigmas, extra_args)
    n = len(sigmas) - 1
    for i in trange(n, disable=disable):
        x, sigma_hat = _churn(x, sigmas[i], n, s_churn, s_tmin, s_tmax, s_noise, generator)
        denoised = model(x, sigma_hat)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        x = x + to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None,
                           eta=1.0, s_noise=1.0, generator=None):
    """Ancestral sampling: an Euler step down to sigma_down, then fresh noise of sigma_up."""
    model, sigmas = _prepare(denoiser, x, sigmas, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i])
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0 and eta:
            x = x + randn_like(x, generator) * s_noise * sigma_up
    return x


def sample_ddim(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None,
                eta=0.0, s_noise=1.0, generator=None):
    """DDIM (Song et al. 2021). In VE units a DDIM step is x0 + sigma_down*eps_hat + sigma_up*z,
    which is the ancestral step above, whatever the VP schedule: eta=0 is deterministic DDIM
    (= Euler in VE units), eta=1 is DDPM ancestral sampling. v-diffusion's sampling loop is this
    sampler on a v-model with its cosine grid."""
    return sample_euler_ancestral(denoiser, x, sigmas, extra_args=extra_args, callback=callback,
                                  disable=disable, eta=eta, s_noise=s_noise, generator=generator)


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None,
                s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, generator=None):
    """Heun's second-order method, EDM Algorithm 2: churn, Euler step, trapezoidal correction;
    the last step (to sigma = 0) is a plain Euler step."""
    model, sigmas = _prepare(denoiser, x, sigmas, extra_args)
    n = len(sigmas) - 1
    for i in trange(n, disable=disable):
        x, sigma_hat = _churn(x, sigmas[i], n, s_churn, s_tmin, s_tmax, s_noise, generator)
        denoised = model(x, sigma_hat)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
    return x


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR in VE units, lambda = -log(sigma): the DPM-Solver time variable."""
    return sigma.log().neg()


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in x0-prediction form."""
    model, sigmas = _prepare(denoiser, x, sigmas, extra_args)
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i])
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _lambda(sigmas[i + 1]) - _lambda(sigmas[i])
            if old_denoised is not None:
                r = (_lambda(sigmas[i]) - _lambda(sigmas[i - 1])) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            else:
                denoised_d = denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None,
                        eta=1.0, s_noise=1.0, generator=None):
    """DPM-Solver++(3M) SDE: third-order multistep in x0-prediction form; eta scales the injected
    noise (eta=0 is the deterministic third-order ODE solver, registered as ``dpmpp_3m``)."""
    model, sigmas = _prepare(denoiser, x, sigmas, extra_args)
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i])
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _lambda(sigmas[i + 1]) - _lambda(sigmas[i])
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x - torch.expm1(-h_eta) * denoised
            phi_2 = torch.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                noise_level = sigmas[i + 1] * (-torch.expm1(-2 * h * eta)).sqrt() * s_noise
                x = x + randn_like(x, generator) * noise_level
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def sample_dpmpp_3m(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None):
    """Deterministic DPM-Solver++(3M): ``sample_dpmpp_3m_sde`` with eta = 0."""
    return sample_dpmpp_3m_sde(denoiser, x, sigmas, extra_args=extra_args, callback=callback,
                               disable=disable, eta=0.0)


SAMPLERS: dict[str, Callable] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
}
STOCHASTIC = frozenset({"euler_ancestral", "ddim", "dpmpp_3m_sde"})  # ddim only when eta > 0


def get_sampler(name: str) -> Callable:
    return lookup(SAMPLERS, name, "sampler")


def sampler_options(name: str) -> tuple[str, ...]:
    """The keyword options a sampler takes besides the calling convention (``eta``, ``s_churn``,
    ``generator``, ...), read from its signature, so an option it does not take can be refused."""
    params = inspect.signature(get_sampler(name)).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in ("extra_args", "callback",
                                                                                         "disable"))


def samplers_with(option: str) -> list[str]:
    """The registered samplers that take ``option`` (for error messages)."""
    return [name for name in SAMPLERS if option in sampler_options(name)]


def denoiser_calls(name: str, n_steps: int) -> int:
    """Denoiser evaluations a sampler makes for an n-step grid ending in 0 (without churn)."""
    get_sampler(name)
    return 2 * n_steps - 1 if name == "heun" else n_steps


__all__ = [n for n in dir() if n.startswith("sample_")] + [
    "SAMPLERS", "STOCHASTIC", "get_sampler", "sampler_options", "samplers_with", "denoiser_calls", "to_d",
    "ancestral_step",
]
