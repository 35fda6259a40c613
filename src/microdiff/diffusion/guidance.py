"""Guidance as denoiser wrappers: classifier-free guidance and weighted multi-prompt composition.

    D(x) = D_null(x) + s(sigma) * sum_i w_i (D_i(x) - D_null(x))

with D_i the denoiser under condition i and D_null under the unconditional one (v-diffusion's
weighted prompts; negative weights steer away). s(sigma) is ``scale`` inside the guidance interval
[lo, hi] and 1 outside it (Kynkaenniemi et al. 2024), so a single prompt of weight 1 gets plain
CFG inside the interval and the conditional denoiser outside. All branches go through the model
in one batched forward. The wrapper is itself a denoiser, so samplers need not know about it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .denoiser import append_dims


def _batch_cond(conds: Sequence[Mapping], batch: int) -> dict:
    """Concatenate the per-branch condition dicts along the batch dimension."""
    keys = set(conds[0])
    for c in conds[1:]:
        if set(c) != keys:
            raise ValueError(
                f"every condition must have the same keys; got {sorted(keys)} and {sorted(c)}"
            )
    out = {}
    for key in conds[0]:
        values = [c[key] for c in conds]
        if not isinstance(values[0], torch.Tensor) or values[0].ndim == 0:
            # scalars (floats, 0-d tensors) are shared by all samples; they must agree across branches
            if any(bool(v != values[0]) for v in values[1:]):
                raise ValueError(f"condition {key!r} differs between branches but is not a tensor")
            out[key] = values[0]
            continue
        parts = []
        for v in values:
            if v.shape[0] not in (1, batch):
                raise ValueError(
                    f"condition {key!r} has batch size {v.shape[0]} but x has {batch}; "
                    "give one entry per sample or one for all"
                )
            parts.append(v.expand(batch, *v.shape[1:]))
        out[key] = torch.cat(parts)
    return out


class GuidedDenoiser:
    """Weighted multi-prompt classifier-free guidance around ``denoiser``.

    conds: one dict of model keyword arguments per prompt; uncond: the dict for the null prompt.
    weights: one per prompt (default 1 each). interval: optional (sigma_lo, sigma_hi).
    """

    def __init__(self, denoiser, conds: Sequence[Mapping], uncond: Mapping, scale: float = 1.0,
                 weights: Sequence[float] | None = None,
                 interval: tuple[float, float] | None = None):
        if not conds:
            raise ValueError("guidance needs at least one condition")
        weights = [1.0] * len(conds) if weights is None else [float(w) for w in weights]
        if len(weights) != len(conds):
            raise ValueError(f"got {len(weights)} weights for {len(conds)} prompts")
        if interval is not None and not 0 <= interval[0] <= interval[1]:
            raise ValueError(f"guidance interval must satisfy 0 <= lo <= hi, got {interval}")
        self.denoiser = denoiser
        self.conds, self.uncond = list(conds), uncond
        self.scale, self.weights, self.interval = float(scale), weights, interval

    def _scale(self, sigma: torch.Tensor) -> torch.Tensor:
        scale = torch.full_like(sigma, self.scale)
        if self.interval is None:
            return scale
        lo, hi = self.interval
        inside = (sigma >= lo) & (sigma <= hi)
        return torch.where(inside, scale, torch.ones_like(scale))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(batch)
        scale = self._scale(sigma)
        # A single prompt of weight 1 at scale 1 is just the conditional model: skip the null branch.
        if len(self.conds) == 1 and self.weights[0] == 1.0 and bool((scale == 1).all()):
            return self.denoiser(x, sigma, **_batch_cond([self.conds[0]], batch), **extra)
        branches = [self.uncond, *self.conds]
        n = len(branches)
        cond = _batch_cond(branches, batch)
        extra = {k: torch.cat([v] * n) if isinstance(v, torch.Tensor) and v.shape[:1] == (batch,) else v
                 for k, v in extra.items()}
        out = self.denoiser(torch.cat([x] * n), torch.cat([sigma] * n), **cond, **extra)
        d_null, *d_conds = out.chunk(n)
        guided = torch.zeros_like(d_null)
        for w, d in zip(self.weights, d_conds):
            guided = guided + w * (d - d_null)
        return d_null + append_dims(scale, x.ndim) * guided


def cfg(denoiser, cond: Mapping, uncond: Mapping, scale: float,
        interval: tuple[float, float] | None = None) -> GuidedDenoiser:
    """Classifier-free guidance D_u + scale (D_c - D_u), one batched forward."""
    return GuidedDenoiser(denoiser, [cond], uncond, scale=scale, interval=interval)


def zeros_like_cond(cond: Mapping) -> dict:
    """micro_diffusion's null condition: every tensor replaced by zeros of the same shape."""
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
