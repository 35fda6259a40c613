"""Gaussian mixtures: a data distribution whose exact denoiser is known in closed form.

For x = x0 + sigma * n with x0 from a mixture of N(mu_k, diag(s_k^2)) with weights w_k,

    E[x0 | x] = sum_k r_k(x) * (mu_k + s_k^2 / (s_k^2 + sigma^2) * (x - mu_k)),
    r_k(x) proportional to w_k N(x; mu_k, diag(s_k^2 + sigma^2)),

which is the ideal denoiser D(x, sigma) every trained model approximates. Tests, benchmarks and
the demo use it as ground truth for samplers and losses.
"""

from __future__ import annotations

import math
import torch


class GaussianMixture:
    """A mixture of axis-aligned Gaussians in ``dim`` dimensions (float64 internally)."""

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must be (K, dim), got shape {tuple(self.means.shape)}")
        k, dim = self.means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        self.stds = stds.expand(k).reshape(k, 1).expand(k, dim).clone() if stds.ndim <= 1 else stds.clone()
        if self.stds.shape != (k, dim) or bool((self.stds <= 0).any()):
            raise ValueError("stds must be positive, one per component or one per component and dim")
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError("weights must be K non-negative numbers with a positive sum")
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def ring(cls, n_components: int = 8, radius: float = 1.0, std: float = 0.1, dim: int = 2) -> "GaussianMixture":
        """Components evenly spaced on a circle in the first two coordinates."""
        angles = torch.arange(n_components, dtype=torch.float64) * (2 * math.pi / n_components)
        means = torch.zeros(n_components, dim, dtype=torch.float64)
        means[:, 0], means[:, 1] = radius * angles.cos(), radius * angles.sin()
        return cls(means, std)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[comp] + self.stds[comp] * z).to(dtype)

    def _component_log_probs(self, x: torch.Tensor, sigma: torch.Tensor):
        """log(w_k N(x; mu_k, diag(s_k^2 + sigma^2))) (B, K), the variances (B, K, dim), x - mu."""
        var = (self.stds**2).to(x)[None] + (sigma**2)[:, None, None]  # (B, K, dim)
        diff = x[:, None, :] - self.means.to(x)[None]
        log_p = -0.5 * ((diff**2 / var) + var.log() + math.log(2 * math.pi)).sum(-1)
        return log_p + self.weights.to(x).log()[None], var, diff

    def _posterior(self, x: torch.Tensor, sigma: torch.Tensor):
        """Responsibilities r (B, K) and total variances v (B, K, dim) for flattened x (B, dim)."""
        log_p, var, diff = self._component_log_probs(x, sigma)
        return torch.softmax(log_p, dim=1), var, diff

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The exact denoiser E[x0 | x] for x of shape (B, dim) (or (B, ...) flattening to dim)."""
        shape = x.shape
        x = x.reshape(shape[0], -1)
        if x.shape[1] != self.dim:
            raise ValueError(f"x flattens to {x.shape[1]} features; this mixture has dim {self.dim}")
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(shape[0])
        r, var, diff = self._posterior(x, sigma)
        s2 = (self.stds**2).to(x)[None]
        cond_mean = self.means.to(x)[None] + s2 / var * diff  # (B, K, dim)
        return (r[..., None] * cond_mean).sum(1).reshape(shape)

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """log density of x under the mixture convolved with N(0, sigma^2 I)."""
        x = x.reshape(x.shape[0], -1)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return torch.logsumexp(self._component_log_probs(x, sigma)[0], dim=1)


class OracleBackbone(torch.nn.Module):
    """A 'backbone' that returns exactly what a perfectly trained network would output under a
    given parameterisation: F = (D*(x, sigma) - c_skip x)/c_out with D* the mixture's exact
    denoiser. It inverts c_in and c_noise itself, so wrapping it in ``Denoiser`` must give D*."""

    def __init__(self, mixture: GaussianMixture, parameterization, sigma_from_noise_input):
        super().__init__()
        self.mixture = mixture
        self.parameterization = parameterization
        self.sigma_from_noise_input = sigma_from_noise_input

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        from microdiff.diffusion.denoiser import append_dims

        sigma = self.sigma_from_noise_input(c_noise)
        c_skip, c_out, c_in = self.parameterization.scalings(append_dims(sigma, x_in.ndim))
        x = x_in / c_in
        return (self.mixture.denoise(x, sigma) - c_skip * x) / c_out


def probability_flow_reference(mixture: GaussianMixture, x: torch.Tensor, sigma_from: float,
                               sigma_to: float, rtol: float = 1e-12, atol: float = 1e-12) -> torch.Tensor:
    """Integrate the probability-flow ODE dx/dsigma = (x - D*(x, sigma))/sigma of the mixture from
    sigma_from down to sigma_to > 0 with SciPy's DOP853 in float64 (an independent reference for
    the samplers; needs the ``eval`` extra)."""
    try:
        from scipy.integrate import solve_ivp
    except ImportError as exc:  # pragma: no cover - exercised only without scipy
        raise ImportError("probability_flow_reference needs SciPy: pip install 'microdiff[eval]'") from exc
    if not 0 < sigma_to < sigma_from:
        raise ValueError("need 0 < sigma_to < sigma_from")
    shape = x.shape
    y0 = x.detach().to(torch.float64).reshape(-1).numpy()

    def rhs(log_sigma, y):  # d x / d log(sigma) = x - D(x, sigma)
        xt = torch.from_numpy(y).reshape(shape)
        return (xt - mixture.denoise(xt, math.exp(log_sigma))).reshape(-1).numpy()

    sol = solve_ivp(rhs, (math.log(sigma_from), math.log(sigma_to)), y0, method="DOP853",
                    rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1].copy()).reshape(shape)
