"""Training noise-level distributions against their defining laws.

Statistical tests use fixed torch.Generator seeds, so each is deterministic; the thresholds are
chosen so that a correct sampler would fail them with probability ~1e-3 or less on a fresh seed,
while the mistakes they guard against (wrong range, wrong parameters, wrong transform) move the
statistics by many times the threshold at these sample sizes.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from microdiff.diffusion.noise import (NOISE_DISTRIBUTIONS, CosineUniform, DiscreteUniform, LogNormal,
                                       LogUniform, make_noise_distribution)

N = 200_000
# Kolmogorov distribution: P(sqrt(n) * D_n > 1.95) ~= 1e-3 for a correct sampler.
KS_MAX = 1.95 / math.sqrt(N)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("p_mean,p_std", [(-1.2, 1.2), (-0.6, 1.2), (0.0, 0.6)])
def test_lognormal_log_sigma_has_the_requested_mean_and_std(p_mean, p_std):
    s = LogNormal(p_mean, p_std).sample(N, generator=_gen(0))
    assert s.shape == (N,) and s.dtype == torch.float32
    assert bool((s > 0).all()) and bool(torch.isfinite(s).all())
    z = np.log(s.double().numpy())
    # standard error of the mean: p_std/sqrt(N); of the std: ~p_std/sqrt(2N). 5 SE each.
    assert abs(z.mean() - p_mean) < 5 * p_std / math.sqrt(N)
    assert abs(z.std(ddof=1) - p_std) < 5 * p_std / math.sqrt(2 * N)
    # and the shape is Gaussian, not just the first two moments
    assert stats.kstest(z, "norm", args=(p_mean, p_std)).statistic < KS_MAX


def test_lognormal_default_is_edm():
    d = LogNormal()
    assert (d.p_mean, d.p_std) == (-1.2, 1.2)


@pytest.mark.parametrize("t_min,t_max", [(1e-4, 1 - 1e-4), (0.2, 0.9)])
def test_cosine_uniform_time_is_uniform(t_min, t_max):
    s = CosineUniform(t_min, t_max).sample(N, generator=_gen(1))
    assert s.shape == (N,) and s.dtype == torch.float32
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    t = 2 / np.pi * np.arctan(s.double().numpy())
    # float32 sigma carries ~6e-8 relative error: t can leave [t_min, t_max] by ~1e-7 at most
    assert t.min() >= t_min - 1e-6 and t.max() <= t_max + 1e-6
    assert stats.kstest(t, "uniform", args=(t_min, t_max - t_min)).statistic < KS_MAX


def test_cosine_uniform_default_range_keeps_sigma_finite():
    d = CosineUniform()
    # closed form of the end points: tan(pi/2 * 1e-4) ~ 1.571e-4 and tan(pi/2 * (1 - 1e-4)) ~ 6366
    s = d.sample(N, generator=_gen(2)).double().numpy()
    assert s.min() >= math.tan(math.pi / 2 * 1e-4) * (1 - 1e-6)
    assert s.max() <= math.tan(math.pi / 2 * (1 - 1e-4)) * (1 + 1e-5)


@pytest.mark.parametrize("lo,hi", [(0.002, 80.0), (0.5, 3.0)])
def test_log_uniform_log_sigma_is_uniform(lo, hi):
    s = LogUniform(lo, hi).sample(N, generator=_gen(3))
    assert s.shape == (N,) and s.dtype == torch.float32
    z = np.log(s.double().numpy())
    a, b = math.log(lo), math.log(hi)
    assert z.min() >= a - 1e-6 and z.max() <= b + 1e-6  # float32 round-off of exp/log
    assert stats.kstest(z, "uniform", args=(a, b - a)).statistic < KS_MAX


def _linear_sigmas_numpy(T=1000):
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    return np.sqrt((1.0 - abar) / abar)


def test_discrete_linear_table_matches_numpy_recomputation():
    d = DiscreteUniform()
    got = d.schedule.sigmas
    assert got.dtype == torch.float64 and got.shape == (1000,)
    np.testing.assert_allclose(got.numpy(), _linear_sigmas_numpy(), rtol=1e-12, atol=0)


def test_discrete_samples_are_table_entries_drawn_uniformly():
    d = DiscreteUniform()
    T = d.schedule.num_timesteps
    n = 100_000
    s = d.sample(n, generator=_gen(4))
    assert s.shape == (n,) and s.dtype == torch.float32
    table32 = torch.from_numpy(_linear_sigmas_numpy()).float()  # strictly increasing, also in float32
    assert bool((table32[1:] > table32[:-1]).all())
    idx = torch.searchsorted(table32, s)
    assert bool((idx < T).all())
    assert bool((table32[idx.clamp(max=T - 1)] == s).all()), "every sample must be a table entry"
    counts = np.bincount(idx.numpy(), minlength=T)
    assert (counts > 0).all(), "every timestep must appear"
    # chi-square goodness of fit to U{0..T-1}: 999 dof, expected 100 per cell
    p = stats.chisquare(counts).pvalue
    assert p > 1e-3


def test_discrete_uniform_with_an_explicit_schedule():
    from microdiff.diffusion.ddpm import DiscreteSchedule

    betas = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    d = DiscreteUniform.from_schedule(DiscreteSchedule(betas))
    abar = np.cumprod(1 - betas.numpy())
    table = np.sqrt((1 - abar) / abar)
    s = d.sample(40_000, generator=_gen(5)).double().numpy()
    # each sample is one of the 4 entries (float32 rounding, 1e-7 relative)
    k = np.abs(s[:, None] - table[None]).argmin(1)
    np.testing.assert_allclose(s, table[k], rtol=1e-7)
    counts = np.bincount(k, minlength=4)
    assert stats.chisquare(counts).pvalue > 1e-3


@pytest.mark.parametrize("name,kwargs", [
    ("lognormal", {"p_mean": -0.6, "p_std": 1.2}),
    ("cosine", {"t_min": 0.01, "t_max": 0.99}),
    ("discrete", {"beta_schedule": "cosine", "num_timesteps": 500}),
    ("loguniform", {"sigma_min": 0.01, "sigma_max": 10.0}),
])
def test_same_seed_same_samples_and_config_round_trip(name, kwargs):
    d = make_noise_distribution(name, **kwargs)
    assert isinstance(d, NOISE_DISTRIBUTIONS[name])
    a = d.sample(1000, generator=_gen(7))
    b = d.sample(1000, generator=_gen(7))
    c = d.sample(1000, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.unique().numel() > 100  # not a constant or near-constant stream
    cfg = d.config()
    assert cfg["name"] == name
    rebuilt = make_noise_distribution(**cfg)
    assert torch.equal(rebuilt.sample(1000, generator=_gen(7)), a)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError) as info:
        make_noise_distribution("gaussian")
    msg = str(info.value)
    assert "gaussian" in msg
    for name in ("lognormal", "cosine", "discrete", "loguniform"):
        assert name in msg


@pytest.mark.parametrize("name,kwargs", [
    ("lognormal", {"p_std": 0.0}),
    ("lognormal", {"p_std": -1.0}),
    ("cosine", {"t_min": 0.0}),
    ("cosine", {"t_max": 1.0}),
    ("cosine", {"t_min": 0.6, "t_max": 0.4}),
    ("loguniform", {"sigma_min": 0.0}),
    ("loguniform", {"sigma_min": 5.0, "sigma_max": 1.0}),
    ("discrete", {"num_timesteps": 1}),
    ("discrete", {"beta_schedule": "quadratic"}),
])
def test_bad_parameters_raise(name, kwargs):
    with pytest.raises(ValueError):
        make_noise_distribution(name, **kwargs)


def test_discrete_uniform_config_round_trips_an_explicit_schedule():
    """Rebuilding from the saved config gives the same sigma table, for a named schedule with
    custom betas and for an explicit table."""
    from microdiff.diffusion.ddpm import DiscreteSchedule

    betas = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    for d in (DiscreteUniform.from_schedule(DiscreteSchedule(betas)),
              DiscreteUniform("scaled_linear", 500, beta_start=0.00085, beta_end=0.012)):
        rebuilt = make_noise_distribution(**d.config())
        torch.testing.assert_close(rebuilt.schedule.sigmas, d.schedule.sigmas, rtol=1e-12, atol=0)
