"""Sigma grids against their published formulas and k-diffusion; DDPM tables against numpy."""

import math

import numpy as np
import pytest
import torch

from microdiff.diffusion import schedules
from microdiff.diffusion.ddpm import DiscreteSchedule, make_betas
from kdiffusion_reference import load_kdiffusion_sampling

K = load_kdiffusion_sampling()
needs_k = pytest.mark.skipif(K is None, reason="k-diffusion reference not installed (make test installs it)")


def test_karras_matches_published_formula_float64():
    n, smin, smax, rho = 10, 0.002, 80.0, 7.0
    got = schedules.karras(n, smin, smax, rho, dtype=torch.float64).numpy()
    i = np.arange(n)
    want = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    assert got.shape == (n + 1,) and got[-1] == 0.0
    np.testing.assert_allclose(got[:-1], want, rtol=1e-14)  # float64 round-off
    assert np.all(np.diff(got) < 0)


@needs_k
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_karras_and_exponential_equal_kdiffusion(dtype):
    with torch.no_grad():
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            kk = K.get_sigmas_karras(17, 0.03, 14.6, rho=7.0)
            ke = K.get_sigmas_exponential(17, 0.03, 14.6)
        finally:
            torch.set_default_dtype(old)
    assert torch.equal(schedules.karras(17, 0.03, 14.6, 7.0, dtype=dtype), kk)
    assert torch.equal(schedules.exponential(17, 0.03, 14.6, dtype=dtype), ke)


def test_cosine_grid_is_tan_of_linear_t():
    n = 8
    got = schedules.cosine_t(n, dtype=torch.float64).numpy()
    t = np.linspace(1, 0, n + 1)[:-1]
    want = np.tan(np.pi * t / 2)
    want[0] = schedules.COSINE_SIGMA_MAX  # t = 1 is sigma = inf, clamped
    np.testing.assert_allclose(got[:-1], want, rtol=1e-12)
    assert got[-1] == 0


def _vdiffusion_spliced_t(t):
    """v-diffusion's spliced schedule, written independently: for big_t past the cosine crossover
    the DDPM schedule log SNR = -log(expm1(1e-4 + 10 u^2)) gives sigma/alpha = exp(-logSNR/2)
    = sqrt(expm1(1e-4 + 10 u^2)), so t = 2/pi * atan(sqrt(expm1(...)))."""
    ddpm_x, cos_x = 0.48536712, 0.80074257
    big_t = t * (1 + cos_x - ddpm_x)
    u = big_t + ddpm_x - cos_x
    ddpm_t = 2 / np.pi * np.arctan(np.sqrt(np.expm1(1e-4 + 10 * u**2)))
    return np.where(big_t < cos_x, big_t, ddpm_t)


def test_spliced_ddpm_cosine_matches_vdiffusion_formula():
    t = np.linspace(0, 1, 1001)
    got = schedules.spliced_ddpm_cosine_t(torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(got, _vdiffusion_spliced_t(t), rtol=1e-12, atol=1e-14)
    # continuous at the splice (the crossovers were chosen for that); it ends where the DDPM
    # schedule ends, log SNR = -log(expm1(10.0001)), i.e. sigma = sqrt(expm1(10.0001)) ~ 148
    k = np.searchsorted(t * (1 + 0.80074257 - 0.48536712), 0.80074257)
    assert abs(got[k] - got[k - 1]) < 2e-3
    assert abs(np.tan(np.pi / 2 * got[-1]) - np.sqrt(np.expm1(10.0001))) < 1e-8
    grid = schedules.spliced_ddpm_cosine(25, dtype=torch.float64).numpy()
    tt = np.linspace(1, 0, 26)[:-1]
    want = np.tan(np.pi / 2 * _vdiffusion_spliced_t(tt))
    want = np.minimum(want, schedules.COSINE_SIGMA_MAX)
    np.testing.assert_allclose(grid[:-1], want, rtol=1e-10)


def test_ddpm_tables_match_numpy():
    b = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - b)
    s = DiscreteSchedule.from_name("linear")
    np.testing.assert_allclose(s.sigmas.numpy(), np.sqrt((1 - abar) / abar), rtol=1e-12)
    # cosine betas: Nichol & Dhariwal, alpha_bar(t) = cos^2((t/T + s)/(1+s) pi/2)
    f = lambda k: np.cos((k / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    want = np.minimum(1 - f(np.arange(1, 1001)) / f(np.arange(1000)), 0.999)
    np.testing.assert_allclose(make_betas("cosine").numpy(), want, rtol=1e-12)
    sl = make_betas("scaled_linear", beta_start=0.00085, beta_end=0.012).numpy()
    np.testing.assert_allclose(sl, np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, rtol=1e-12)


def test_sigma_timestep_round_trip():
    s = DiscreteSchedule.from_name("cosine")
    t = torch.tensor([0.0, 1.0, 17.25, 500.5, 998.9], dtype=torch.float64)
    np.testing.assert_allclose(s.sigma_to_t(s.t_to_sigma(t)).numpy(), t.numpy(), atol=1e-9)
    k = torch.arange(0, 1000, 37)
    assert torch.equal(s.sigma_to_t(s.sigmas[k], quantize=True).long(), k)
    # between two table entries, the timestep interpolates linearly in log sigma
    mid = (s.log_sigmas[10] + s.log_sigmas[11]).div(2).exp()
    assert abs(float(s.sigma_to_t(mid)) - 10.5) < 1e-9


@pytest.mark.parametrize(
    "spacing, want",
    [
        ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
        ("leading", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
    ],
)
def test_ddpm_timestep_spacings(spacing, want):
    s = DiscreteSchedule.from_name("linear")
    assert s.timesteps(10, spacing).tolist() == want
    grid = schedules.ddpm(s, 10, spacing, dtype=torch.float64)
    np.testing.assert_allclose(grid[:-1].numpy(), s.sigmas[want].numpy(), rtol=0)
    assert grid[-1] == 0


def test_bad_grids_raise_one_clear_error():
    with pytest.raises(ValueError, match="end in 0"):
        schedules.check_sigmas(torch.tensor([3.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="non-negative"):
        schedules.check_sigmas(torch.tensor([3.0, 1.0, -0.5, 0.0]))
    with pytest.raises(ValueError, match="non-increasing"):
        schedules.check_sigmas(torch.tensor([1.0, 3.0, 0.0]))
    with pytest.raises(ValueError, match="inf or nan"):
        schedules.check_sigmas(torch.tensor([math.inf, 1.0, 0.0]))
    with pytest.raises(ValueError, match="1-D"):
        schedules.check_sigmas(torch.ones(2, 2))
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        schedules.karras(10, 5.0, 1.0)
    with pytest.raises(ValueError, match="at least 1"):
        schedules.exponential(0, 0.1, 1.0)
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        DiscreteSchedule.from_name("linear").timesteps(10, "sideways")
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas("quadratic")
