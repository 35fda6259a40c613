"""A small MLP backbone for low-dimensional data (toy distributions, tests, the smoke demo)."""

from __future__ import annotations

import math

import torch
from torch import nn


class FourierNoiseEmbedding(nn.Module):
    """[sin, cos](pi * 2^k * c_noise) for k = 0..n-1: c_noise of order 1 (EDM's ln(sigma)/4, the
    cosine t) is resolved at every scale from 2 to 2^-n."""

    def __init__(self, n_frequencies: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_frequencies), persistent=False)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise[:, None].float() * self.freqs[None]
        return torch.cat([angles.sin(), angles.cos(), c_noise[:, None].float()], dim=1)


class FourierInputEmbedding(nn.Module):
    """[x, sin, cos](2^k x) for k = 0..n-1, per coordinate. Without it an MLP on raw 2-D
    coordinates learns fine structure (clusters much narrower than the data) very slowly: what
    EDM's c_skip*x leaves for F to learn is almost all high-frequency."""

    def __init__(self, n_frequencies: int = 6):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(n_frequencies), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = (x[:, :, None] * self.freqs).flatten(1)
        return torch.cat([x, angles.sin(), angles.cos()], dim=1)


class MLPBackbone(nn.Module):
    """F(x, c_noise) for x of shape (B, dim): an MLP with SiLU over Fourier features of x and of
    c_noise (``x_frequencies=0`` feeds raw x)."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, n_frequencies: int = 8,
                 x_frequencies: int = 6):
        super().__init__()
        self.config = {"dim": dim, "hidden": hidden, "depth": depth, "n_frequencies": n_frequencies,
                       "x_frequencies": x_frequencies}
        self.embed = FourierNoiseEmbedding(n_frequencies)
        self.embed_x = FourierInputEmbedding(x_frequencies)
        width_in = dim * (1 + 2 * x_frequencies) + 2 * n_frequencies + 1
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(width_in if i == 0 else hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.config["dim"]:
            raise ValueError(f"MLPBackbone expects x of shape (B, {self.config['dim']}), got {tuple(x.shape)}")
        h = torch.cat([self.embed_x(x), self.embed(c_noise).to(x.dtype)], dim=1)
        return self.net(h)
