"""Parameterisations: how a backbone F becomes the denoiser D(x, sigma, **cond) -> x0_hat.

Every parameterisation is a set of scalings of the VE noise level sigma (Karras et al. 2022, eq. 7):

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma), **cond)

| parameterisation | c_skip              | c_out                      | c_in              | c_noise        |
|------------------|---------------------|----------------------------|-------------------|----------------|
| EDM (sigma_data) | sd^2/(s^2+sd^2)     | s*sd/sqrt(s^2+sd^2)        | 1/sqrt(s^2+sd^2)  | ln(s)/4        |
| v (cosine VP)    | 1/(1+s^2)           | -s/sqrt(1+s^2)             | 1/sqrt(1+s^2)     | 2/pi*atan(s)   |
| eps (VP)         | 1                   | -s                         | 1/sqrt(1+s^2)     | t of schedule  |
| x0               | 0                   | 1                          | 1/sqrt(1+s^2)     | ln(s)/4        |

For v and eps, c_in * x is exactly the VP input alpha*x0 + sigma_vp*n those networks were trained
on. The regression target of F that makes D exact is (x0 - c_skip*x)/c_out: eps for eps-models,
v for v-models. A unit-weighted loss on F equals a loss on D weighted by 1/c_out^2, so each
parameterisation's "natural" weighting is 1/c_out^2 (EDM's lambda, v-loss, eps-loss).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..utils.registry import lookup
from .ddpm import DiscreteSchedule
from .vp import sigma_to_cosine_t


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a per-sample (B,) tensor broadcasts against B x ...."""
    if v.ndim > ndim:
        raise ValueError(f"cannot broadcast a tensor of shape {tuple(v.shape)} to {ndim} dims")
    return v.reshape(*v.shape, *([1] * (ndim - v.ndim)))


class Parameterization:
    """Scalings c_skip, c_out, c_in and the network's noise input c_noise, as functions of sigma."""

    name = "base"

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def noise_input(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """What F should output for D to return x0 (sigma broadcastable against x)."""
        c_skip, c_out, _ = self.scalings(sigma)
        return (x0 - c_skip * x) / c_out

    def natural_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) on |D - x0|^2 that equals a unit-weighted loss on F: 1/c_out^2."""
        return self.scalings(sigma)[1] ** -2

    def config(self) -> dict[str, Any]:
        return {"name": self.name}


class EDM(Parameterization):
    """Karras et al. 2022 preconditioning; micro_diffusion trains with sigma_data = 0.9."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5):
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def scalings(self, sigma):
        sd2 = self.sigma_data**2
        denom = sigma**2 + sd2
        return sd2 / denom, sigma * self.sigma_data * denom.rsqrt(), denom.rsqrt()

    def noise_input(self, sigma):
        return sigma.log() / 4

    def config(self):
        return {"name": self.name, "sigma_data": self.sigma_data}


class VPrediction(Parameterization):
    """v-prediction on the cosine VP schedule (v-diffusion); the network sees t = 2/pi*atan(sigma)."""

    name = "v"

    def scalings(self, sigma):
        c_in = torch.rsqrt(1 + sigma**2)
        return c_in**2, -sigma * c_in, c_in

    def noise_input(self, sigma):
        return sigma_to_cosine_t(sigma)


class EpsPrediction(Parameterization):
    """eps-prediction on a VP process.

    Continuous (``schedule=None``): the network sees the cosine-schedule time t = 2/pi*atan(sigma),
    scaled by ``time_scale`` (e.g. 1000 for networks trained on t in [0, 1000]).
    Discrete (``schedule=DiscreteSchedule``): the network sees the DDPM timestep of sigma,
    fractional, or rounded to the table if ``quantize``.
    """

    name = "eps"

    def __init__(self, schedule: DiscreteSchedule | None = None, quantize: bool = False,
                 time_scale: float = 1.0):
        self.schedule = schedule
        self.quantize = quantize
        self.time_scale = float(time_scale)

    def scalings(self, sigma):
        return torch.ones_like(sigma), -sigma, torch.rsqrt(1 + sigma**2)

    def noise_input(self, sigma):
        if self.schedule is None:
            return sigma_to_cosine_t(sigma) * self.time_scale
        return self.schedule.sigma_to_t(sigma, quantize=self.quantize)

    def config(self):
        cfg = {"name": self.name, "time_scale": self.time_scale, "quantize": self.quantize}
        cfg["discrete"] = self.schedule is not None
        return cfg


class X0Prediction(Parameterization):
    """The network predicts x0 directly from the VP-scaled input (Ambient-style x0 models)."""

    name = "x0"

    def scalings(self, sigma):
        return torch.zeros_like(sigma), torch.ones_like(sigma), torch.rsqrt(1 + sigma**2)

    def noise_input(self, sigma):
        return sigma.log() / 4


PARAMETERIZATIONS = {cls.name: cls for cls in (EDM, VPrediction, EpsPrediction, X0Prediction)}


def make_parameterization(name: str, **kwargs) -> Parameterization:
    return lookup(PARAMETERIZATIONS, name, "parameterisation")(**kwargs)


def first_output(out: Any) -> torch.Tensor:
    """The denoiser's raw output F from a backbone that returns a tensor, tuple or dict."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, dict):
        return next(iter(out.values()))
    raise TypeError(f"backbone returned {type(out).__name__}; expected a tensor, tuple or dict")


class Denoiser(nn.Module):
    """D(x, sigma, **cond) -> x0_hat around a plain backbone ``F(x_in, c_noise, **cond)``.

    The sampler state may be float64 while the backbone runs in its own dtype: the backbone input
    is cast to the backbone's parameter dtype and its output cast back to x's dtype.
    """

    def __init__(self, backbone: nn.Module, parameterization: Parameterization):
        super().__init__()
        self.backbone = backbone
        self.parameterization = parameterization

    def _sigma_batch(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(
                f"sigma must be a scalar or have shape ({x.shape[0]},) to match x of shape "
                f"{tuple(x.shape)}; got {tuple(sigma.shape)}"
            )
        return sigma

    def _model_dtype(self, fallback: torch.dtype) -> torch.dtype:
        for p in self.backbone.parameters():
            if p.is_floating_point():
                return p.dtype
        return fallback

    def model_output(self, x: torch.Tensor, sigma, input_mask: torch.Tensor | None = None,
                     **cond) -> tuple[Any, torch.Tensor]:
        """Run the backbone. Returns (raw backbone output, sigma as a (B,) tensor).

        ``input_mask`` (Ambient Diffusion; 1 = seen, broadcastable to x): a backbone with mask channels
        (2C in) gets ``[c_in * (m * x), m]`` (the mask is not scaled by c_in); one without (C in, e.g. a
        pretrained model being fine-tuned) gets ``c_in * (m * x)``."""
        sigma = self._sigma_batch(x, sigma)
        _, _, c_in = self.parameterization.scalings(append_dims(sigma, x.ndim))
        dtype = self._model_dtype(x.dtype)
        c_noise = self.parameterization.noise_input(sigma)
        net_in = c_in * x
        if input_mask is not None:
            mask = input_mask.to(x.dtype).expand_as(x)
            net_in = torch.cat([net_in * mask, mask], dim=1) if self.has_mask_channels(x.shape[1]) else net_in * mask
        out = self.backbone(net_in.to(dtype), c_noise.to(dtype), **cond)
        return out, sigma

    def has_mask_channels(self, channels: int) -> bool:
        """Whether the backbone takes ``[x, mask]`` (2 x ``channels`` inputs) rather than x alone."""
        expected = getattr(self.backbone, "in_channels", None)
        if expected is None:
            expected = (getattr(self.backbone, "config", None) or {}).get("in_channels")
        return expected is None or expected == 2 * channels

    def forward(self, x: torch.Tensor, sigma, input_mask: torch.Tensor | None = None, **cond) -> torch.Tensor:
        """x0_hat. With ``input_mask`` the backbone and the skip see only ``m * x``, so D depends on the
        seen elements alone: D is the usual c_skip * x + c_out * F where the network sees, and its raw
        output F (an x0 prediction) where it does not. (Through c_out * F the hidden elements would need
        F ~ x0 / c_out, which blows up at low sigma, where c_out -> 0.)"""
        out, sigma = self.model_output(x, sigma, input_mask=input_mask, **cond)
        F = first_output(out).to(x.dtype)
        if F.shape != x.shape:
            raise ValueError(
                f"backbone output has shape {tuple(F.shape)} but the input x has {tuple(x.shape)}; "
                "a denoiser must return one prediction per input element"
            )
        c_skip, c_out, _ = self.parameterization.scalings(append_dims(sigma, x.ndim))
        estimate = c_skip * seen_input(x, input_mask) + c_out * F
        if input_mask is None:
            return estimate
        mask = input_mask.to(x.dtype)
        return mask * estimate + (1 - mask) * F


def seen_input(x: torch.Tensor, input_mask: torch.Tensor | None) -> torch.Tensor:
    """What a masked-input denoiser sees of x: ``m * x`` (or x without a mask)."""
    return x if input_mask is None else x * input_mask.to(x.dtype)


__all__ = [
    "EDM", "VPrediction", "EpsPrediction", "X0Prediction", "Parameterization", "Denoiser",
    "PARAMETERIZATIONS", "make_parameterization", "append_dims", "first_output", "seen_input",
]
