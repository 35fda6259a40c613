"""Distances between two sets of samples (rows are samples)."""

from __future__ import annotations

import torch


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_projections: int = 256,
                       generator: torch.Generator | None = None, p: int = 2) -> float:
    """Sliced p-Wasserstein distance: W_p averaged over random 1-D projections,
    (E_theta W_p(theta.a, theta.b)^p)^(1/p). Set sizes may differ (compared at common quantiles)."""
    a = a.reshape(a.shape[0], -1).to(torch.float64)
    b = b.reshape(b.shape[0], -1).to(torch.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sample sets have {a.shape[1]} and {b.shape[1]} features")
    theta = torch.randn(a.shape[1], n_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa, pb = (a @ theta).sort(dim=0).values, (b @ theta).sort(dim=0).values
    if len(pa) != len(pb):
        q = (torch.arange(max(len(pa), len(pb)), dtype=torch.float64) + 0.5) / max(len(pa), len(pb))
        pa, pb = torch.quantile(pa, q, dim=0), torch.quantile(pb, q, dim=0)
    return float(((pa - pb).abs() ** p).mean() ** (1 / p))
