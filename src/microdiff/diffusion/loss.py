"""The denoising loss: one weighted squared error that every parameterisation, patch masking and
the ambient losses share.

    L = E_sigma E_x0,n  lambda(sigma) * || D(x0 + sigma n, sigma) - x0 ||^2

computed on the backbone output F against its target (x0 - c_skip x)/c_out with weight
lambda(sigma) * c_out(sigma)^2, which is the same number with better conditioning.

The ambient losses are options of the same function: per-sample trusted noise levels
``sigma_tn`` (Ambient Tweedie / Ambient-o: learn from noisy data) and an ``input_mask`` the network
sees (Ambient Diffusion: learn from masked data, scored on the observed ``mask``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch

from ..utils.registry import lookup
from .denoiser import Denoiser, Parameterization, append_dims, first_output, seen_input
from .rng import randn_like

REDUCTIONS = ("mean", "mean_per_sample", "sum_per_sample", "none")


# --- weightings lambda(sigma) on |D - x0|^2 --------------------------------------------------------
def edm_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM's lambda = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 (unit variance of F's error)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def eps_weight(sigma: torch.Tensor) -> torch.Tensor:
    """1/sigma^2 = SNR: a unit-weighted eps-prediction loss."""
    return sigma**-2


def v_weight(sigma: torch.Tensor) -> torch.Tensor:
    """(1 + sigma^2)/sigma^2 = SNR + 1: a unit-weighted v-prediction loss."""
    return (1 + sigma**2) / sigma**2


def min_snr_weight(sigma: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) on the x0 error, SNR = 1/sigma^2.
    (Their eps- and v-space weights min(SNR,g)/SNR and min(SNR,g)/(SNR+1) are this one.)"""
    return torch.clamp(sigma**-2, max=gamma)


def unit_weight(sigma: torch.Tensor) -> torch.Tensor:
    """1: a plain x0-prediction loss."""
    return torch.ones_like(sigma)


WEIGHTING_FUNCTIONS = {"edm": edm_weight, "eps": eps_weight, "v": v_weight, "min_snr": min_snr_weight,
                       "x0": unit_weight}


def make_weighting(name: str, parameterization: Parameterization | None = None,
                   **kwargs) -> Callable[[torch.Tensor], torch.Tensor]:
    """lambda(sigma) by name. 'natural' is the parameterisation's own (a unit loss on F)."""
    fn = lookup({"natural": None, **WEIGHTING_FUNCTIONS}, name, "loss weighting")
    if fn is None:
        if parameterization is None:
            raise ValueError("the 'natural' weighting needs the parameterisation it belongs to")
        return parameterization.natural_weight
    return partial(fn, **kwargs) if kwargs else fn


# --- the squared error ----------------------------------------------------------------------------
def masked_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Weighted squared error with an optional 0/1 (or soft) mask of observed elements.

    weight: per-sample (B,) or broadcastable to pred. mask: broadcastable to pred; masked-out
    elements neither contribute nor count. Reductions:
      mean            - sum of weighted errors over observed elements / number observed (batch-wide;
                        micro_diffusion's loss over visible patches);
      mean_per_sample - each sample's mean over its observed elements, then the batch mean;
      sum_per_sample  - each sample's sum over its elements, then the batch mean (EDM, Ambient);
      none            - the per-element weighted, masked error.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    err, mask = _masked_errors(pred, target, weight, mask)
    return err if reduction == "none" else _reduce(err, mask, reduction)


def _masked_errors(pred, target, weight, mask):
    """Per-element weighted, masked squared errors, and the mask expanded to their shape."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    err = (pred - target) ** 2
    if weight is not None:
        err = err * (append_dims(weight, err.ndim) if weight.ndim == 1 else weight)
    if mask is not None:
        mask = mask.to(err.dtype).expand_as(err)
        err = err * mask
    return err, mask


def _per_sample_sums(err: torch.Tensor, mask: torch.Tensor | None):
    """Each sample's summed error and its observed count (elements, or mask total)."""
    total = err.reshape(err.shape[0], -1).sum(1)
    count = (mask.reshape(err.shape[0], -1).sum(1) if mask is not None
             else torch.full_like(total, err[0].numel()))
    return total, count


def _reduce(err: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if reduction not in REDUCTIONS[:-1]:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS[:-1])}")
    total, count = _per_sample_sums(err, mask)
    if reduction == "sum_per_sample":
        return total.mean()
    if reduction == "mean":
        return _safe_divide(total.sum(), count.sum())
    return _safe_divide(total, count).mean()


def _safe_divide(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count, and 0 where nothing was observed (count == 0; soft masks may sum below 1)."""
    return torch.where(count > 0, total / count.clamp(min=torch.finfo(count.dtype).tiny), 0.0)


def output_loss_mask(out: Any) -> torch.Tensor | None:
    """The mask of elements a backbone actually predicted, if it says so: a dict output's
    ``loss_mask`` (e.g. MicroDiT's visible patches under token masking), else None."""
    return out.get("loss_mask") if isinstance(out, dict) else None


def _combine_masks(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    return a * b


@dataclass
class LossResult:
    loss: torch.Tensor  # the scalar to backpropagate
    per_sample: torch.Tensor  # (B,) weighted error, mean over observed elements (for logging by sigma)
    sigma: torch.Tensor  # (B,)
    output: Any  # the raw backbone output (may carry e.g. a patch mask)


AMBIENT_WEIGHTINGS = ("tweedie", "ambient_o")


def ambient_noisy_input(x_tn: torch.Tensor, sigma: torch.Tensor, sigma_tn: torch.Tensor,
                        noise: torch.Tensor) -> torch.Tensor:
    """x_t = x_tn + sqrt(sigma^2 - sigma_tn^2) * noise: data already noisy at sigma_tn, noised up to sigma
    (per-sample sigma, sigma_tn of shape (B,); requires sigma > sigma_tn where sigma_tn > 0)."""
    s, s_tn = append_dims(sigma, x_tn.ndim), append_dims(sigma_tn, x_tn.ndim)
    return x_tn + (s**2 - s_tn**2).clamp(min=0).sqrt() * noise


def vp_ambient_noisy_input(x_tn: torch.Tensor, alpha: torch.Tensor, sigma_vp: torch.Tensor,
                           sigma_tn: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The VP form x_t = alpha * x_tn + sqrt(sigma_vp^2 - alpha^2 sigma_tn^2) * noise. It is alpha times
    :func:`ambient_noisy_input` at the VE level sigma_vp / alpha, which is how our denoisers (VE view, c_in
    scaling) train eps/v/latent models on noisy data."""
    a, s, s_tn = (append_dims(v, x_tn.ndim) for v in (alpha, sigma_vp, sigma_tn))
    return a * x_tn + (s**2 - (a * s_tn) ** 2).clamp(min=0).sqrt() * noise


def ambient_target(x_tn: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
                   sigma_tn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ambient Tweedie: train E[x_tn | x_t] = (1 - r) D(x_t) + r x_t (r = sigma_tn^2 / sigma^2) towards x_tn;
    sigma and sigma_tn are per sample, shape (B,).

    Written as a target for D itself: (1 - r) D + r x - x_tn = (1 - r) (D - x0_eff) with
    x0_eff = (x_tn - r x) / (1 - r). Returns (x0_eff, 1 - r), both broadcastable against x."""
    r = append_dims((sigma_tn / sigma) ** 2, x.ndim)
    return (x_tn - r * x) / (1 - r), 1 - r


def denoising_loss(denoiser: Denoiser, x0: torch.Tensor, sigma: torch.Tensor, *,
                   weighting: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   noise: torch.Tensor | None = None, generator=None,
                   mask: torch.Tensor | None = None, reduction: str = "mean",
                   cond: dict | None = None, sigma_tn: torch.Tensor | None = None,
                   ambient_weighting: str = "tweedie", input_mask: torch.Tensor | None = None,
                   check_sigma: bool = True) -> LossResult:
    """One denoising-loss evaluation at per-sample noise levels ``sigma`` (shape (B,)).

    weighting: lambda(sigma) on |D - x0|^2; default is the parameterisation's natural one.
    mask: observed elements (ambient masks, padding); it is multiplied by the backbone's own
    ``loss_mask`` when the backbone returns one, so a token-masked MicroDiT is scored only on the
    patches it saw.

    Ambient options:
      sigma_tn (B,): each sample's trusted noise level; ``x0`` is then x_tn = x0 + sigma_tn z, noised
        to sigma as x_tn + sqrt(sigma^2 - sigma_tn^2) n, and the loss is lambda(sigma) * w * |(1 - r) D
        + r x - x_tn|^2 (:func:`ambient_target`) with w = 1 ("tweedie") or w = sigma^4 / (sigma^2 -
        sigma_tn^2)^2 = 1/(1-r)^2 ("ambient_o", Ambient-o's weighting: the |D - x0_eff|^2 error at
        full weight). sigma_tn = 0 is the plain loss. Every sample needs sigma > sigma_tn (or sigma_tn = 0).
      input_mask: what the network sees (Ambient Diffusion's A-tilde); the denoiser gets
        ``[c_in * m * x, m]`` (or ``c_in * m * x`` without mask channels), its skip uses ``m * x`` and
        F itself is the x0 prediction of hidden elements. Score the loss on A with ``mask``.
      check_sigma: verify sigma > sigma_tn here (a host-device sync on a GPU); callers that checked on
        the host already (the trainer's ambient step) pass False.
    """
    if sigma.shape != (x0.shape[0],):
        raise ValueError(f"sigma must have shape ({x0.shape[0]},), got {tuple(sigma.shape)}")
    if ambient_weighting not in AMBIENT_WEIGHTINGS:
        raise ValueError(f"unknown ambient weighting {ambient_weighting!r}; choose one of {', '.join(AMBIENT_WEIGHTINGS)}")
    param = denoiser.parameterization
    weighting = weighting or param.natural_weight
    noise = randn_like(x0, generator) if noise is None else noise
    s = append_dims(sigma.to(x0.dtype), x0.ndim)
    if sigma_tn is None:
        x, target_x0, factor = x0 + s * noise, x0, None
    else:
        sigma_tn = sigma_tn.to(sigma.device, sigma.dtype)
        if check_sigma and bool(((sigma_tn > 0) & (sigma <= sigma_tn)).any()):
            k = int(((sigma_tn > 0) & (sigma <= sigma_tn)).nonzero()[0])
            raise ValueError(f"sample {k}: sigma={float(sigma[k]):.4g} is not above its trusted noise level "
                             f"sigma_tn={float(sigma_tn[k]):.4g}; draw sigma above sigma_tn for noisy data")
        x = ambient_noisy_input(x0, sigma.to(x0.dtype), sigma_tn.to(x0.dtype), noise)
        target_x0, keep = ambient_target(x0, x, sigma.to(x0.dtype), sigma_tn.to(x0.dtype))
        factor = keep.reshape(-1) ** 2 if ambient_weighting == "tweedie" else None
    out, sigma = denoiser.model_output(x, sigma, input_mask=input_mask, **(cond or {}))
    F = first_output(out).to(x0.dtype)
    target = param.target(target_x0, seen_input(x, input_mask), s)
    weight = weighting(sigma) * param.scalings(sigma)[1] ** 2
    if factor is not None:
        weight = weight * factor.to(weight.dtype)
    if input_mask is not None:
        # hidden elements are predicted by F itself (D = F there, see Denoiser.forward), so F's target
        # there is x0_eff with weight lambda(sigma) (* the ambient factor) instead of c_out^2 times that
        seen = input_mask.to(x0.dtype).expand_as(x0)
        hidden_weight = append_dims(weight / param.scalings(sigma)[1] ** 2, x0.ndim)
        target = seen * target + (1 - seen) * target_x0
        weight = seen * append_dims(weight, x0.ndim) + (1 - seen) * hidden_weight
    err, mask = _masked_errors(F, target, weight, _combine_masks(mask, output_loss_mask(out)))
    loss = _reduce(err, mask, reduction)
    with torch.no_grad():
        total, count = _per_sample_sums(err, mask)
        per_sample = _safe_divide(total, count)
    return LossResult(loss=loss, per_sample=per_sample, sigma=sigma, output=out)
