"""Parameterisations: each wraps an oracle backbone into the same exact denoiser; round trips."""

import math

import numpy as np
import pytest
import torch

from microdiff.data.mixture import OracleBackbone
from microdiff.diffusion import vp
from microdiff.diffusion.ddpm import DiscreteSchedule
from microdiff.diffusion.denoiser import (EDM, Denoiser, EpsPrediction, VPrediction, X0Prediction,
                                         make_parameterization)

DISCRETE = DiscreteSchedule.from_name("linear")

# (parameterisation, inverse of its c_noise) -- the oracle needs sigma back from what the network sees
CASES = {
    "edm_0.5": (EDM(0.5), lambda c: (4 * c).exp()),
    "edm_0.9": (EDM(0.9), lambda c: (4 * c).exp()),
    "v": (VPrediction(), vp.cosine_t_to_sigma),
    "eps_continuous": (EpsPrediction(time_scale=1000.0), lambda c: vp.cosine_t_to_sigma(c / 1000)),
    "eps_discrete": (EpsPrediction(DISCRETE), DISCRETE.t_to_sigma),
    "x0": (X0Prediction(), lambda c: (4 * c).exp()),
}


@pytest.mark.parametrize("name", CASES)
def test_oracle_backbone_gives_the_exact_denoiser(name, mixture):
    param, inverse = CASES[name]
    D = Denoiser(OracleBackbone(mixture, param, inverse), param)
    g = torch.Generator().manual_seed(0)
    # discrete models only know the sigmas of their table: test inside [sigma_min, sigma_max]
    lo, hi = (DISCRETE.sigma_min * 1.01, DISCRETE.sigma_max * 0.99) if name == "eps_discrete" else (0.01, 80)
    sigma = (math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(64, generator=g, dtype=torch.float64)).exp()
    x = mixture.sample(64, g) + sigma[:, None] * torch.randn(64, 2, generator=g, dtype=torch.float64)
    want = mixture.denoise(x, sigma)
    # float64 round-off, amplified by c_out for eps at large sigma (x0 = x - sigma*eps)
    torch.testing.assert_close(D(x, sigma), want, rtol=1e-9, atol=1e-9)


def test_edm_scalings_are_the_published_ones():
    s, sd = torch.tensor(2.0, dtype=torch.float64), 0.5
    c_skip, c_out, c_in = EDM(sd).scalings(s)
    assert float(c_skip) == pytest.approx(sd**2 / (4 + sd**2), rel=1e-15)
    assert float(c_out) == pytest.approx(2 * sd / math.sqrt(4 + sd**2), rel=1e-15)
    assert float(c_in) == pytest.approx(1 / math.sqrt(4 + sd**2), rel=1e-15)
    assert float(EDM(sd).noise_input(s)) == pytest.approx(math.log(2) / 4, rel=1e-15)


def test_v_parameterisation_sees_the_vp_input_and_cosine_time():
    """c_in * x is alpha*x0 + sigma_vp*n and c_noise is t with alpha = cos(pi t/2)."""
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    sigma = vp.cosine_t_to_sigma(t)
    x0, n = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    x_ve = x0 + sigma[:, None] * n
    _, _, c_in = VPrediction().scalings(sigma[:, None])
    alpha, sig_vp = torch.cos(math.pi * t / 2)[:, None], torch.sin(math.pi * t / 2)[:, None]
    torch.testing.assert_close(c_in * x_ve, alpha * x0 + sig_vp * n, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(VPrediction().noise_input(sigma), t, rtol=1e-13, atol=1e-14)


def test_conversions_round_trip():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0, 80.0], dtype=torch.float64)[:, None]
    x = x0 + sigma * eps
    torch.testing.assert_close(vp.eps_from_x0(x, x0, sigma), eps, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(vp.x0_from_eps(x, eps, sigma), x0, rtol=1e-12, atol=1e-12)
    v = vp.v_from_x0_eps(x0, eps, sigma)
    torch.testing.assert_close(vp.x0_from_v(x, v, sigma), x0, rtol=1e-12, atol=1e-12)
    # v written in VP coordinates, independently: x_vp = cos(phi) x0 + sin(phi) eps, v = d x_vp / d phi
    phi = torch.atan(sigma)
    torch.testing.assert_close(v, torch.cos(phi) * eps - torch.sin(phi) * x0, rtol=1e-12, atol=1e-12)
    # the training target of each parameterisation is that quantity
    torch.testing.assert_close(VPrediction().target(x0, x, sigma), v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(EpsPrediction().target(x0, x, sigma), eps, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(X0Prediction().target(x0, x, sigma), x0, rtol=1e-12, atol=1e-12)


def test_float64_state_with_float32_backbone():
    net = torch.nn.Linear(3, 3)
    D = Denoiser(lambda_backbone(net), EDM(0.5))
    x = torch.randn(2, 3, dtype=torch.float64)
    out = D(x, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert out.dtype == torch.float64 and out.shape == x.shape


class lambda_backbone(torch.nn.Module):  # noqa: N801 - a tiny adapter used above
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, c_noise):
        assert x.dtype == torch.float32 and c_noise.dtype == torch.float32
        return self.net(x) * c_noise[:, None]


def test_bad_shapes_and_names_raise():
    D = Denoiser(lambda_backbone(torch.nn.Linear(3, 3)), EDM())
    with pytest.raises(ValueError, match=r"sigma must be a scalar or have shape \(2,\)"):
        D(torch.randn(2, 3), torch.ones(3))
    wrong = Denoiser(lambda_backbone(torch.nn.Linear(3, 4)), EDM())
    with pytest.raises(ValueError, match="backbone output has shape"):
        wrong(torch.randn(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="unknown parameterisation 'vee'"):
        make_parameterization("vee")
    with pytest.raises(ValueError, match="sigma_data must be positive"):
        EDM(0.0)
    assert isinstance(make_parameterization("edm", sigma_data=0.9), EDM)
    assert np.isclose(make_parameterization("edm", sigma_data=0.9).sigma_data, 0.9)
