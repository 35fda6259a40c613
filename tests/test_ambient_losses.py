"""The ambient losses against their formulas.

Noisy data (Ambient Tweedie / Ambient-o): for Gaussian data x0 ~ N(mu, s0^2) the clean denoiser is
linear, E[x0 | x_t] = mu + s0^2 / (s0^2 + sigma^2) (x_t - mu). A linear denoiser fitted with the
ambient loss on data seen only as x_tn = x0 + sigma_tn z must recover it (tolerance 0.01 on the
slope and intercept over 400k float64 samples: their standard errors are about 0.002), while the
naive loss (x_tn treated as clean) recovers the denoiser of the wider N(mu, s0^2 + sigma_tn^2).

Masked data (Ambient Diffusion): the loss has exactly zero gradient on unobserved elements, and
the masked-input denoiser does not depend on what it does not see.
"""

import math

import pytest
import torch
from torch import nn

from microdiff.diffusion.denoiser import EDM, Denoiser, X0Prediction
from microdiff.diffusion.loss import (ambient_noisy_input, ambient_target, denoising_loss, edm_weight,
                                      vp_ambient_noisy_input)

MU, S0 = 0.3, 0.5


class LinearX0(nn.Module):
    """F(c_in x) = a * x + b for the x0 parameterisation at one sigma: D(x) = a x + b."""

    def __init__(self, sigma: float):
        super().__init__()
        self.c_in = 1 / math.sqrt(1 + sigma**2)
        self.a = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x, t, **_):
        return self.a * x / self.c_in + self.b


def _fit(sigma: float, sigma_tn: float, ambient: bool, n: int = 400_000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = MU + S0 * torch.randn(n, 1, dtype=torch.float64, generator=g)
    x_tn = x0 + sigma_tn * torch.randn(n, 1, dtype=torch.float64, generator=g)
    noise = torch.randn(n, 1, dtype=torch.float64, generator=g)
    model = LinearX0(sigma)
    den = Denoiser(model, X0Prediction())
    sig = torch.full((n,), sigma, dtype=torch.float64)
    # ambient: x_tn with its trusted level; naive baseline: x_tn as if it were clean data
    kwargs = {"sigma_tn": torch.full((n,), sigma_tn, dtype=torch.float64)} if ambient else {}
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = denoising_loss(den, x_tn, sig, noise=noise, weighting=lambda s: torch.ones_like(s), **kwargs).loss
        loss.backward()
        return loss

    opt.step(closure)
    return float(model.a.detach()), float(model.b.detach())


def _clean_denoiser(sigma: float, var: float = S0**2):
    a = var / (var + sigma**2)
    return a, MU * (1 - a)


@pytest.mark.parametrize("sigma,sigma_tn", [(0.5, 0.2), (1.0, 0.6), (3.0, 1.0)])
def test_ambient_minimiser_is_the_clean_denoiser(sigma, sigma_tn):
    a, b = _fit(sigma, sigma_tn, ambient=True)
    a_true, b_true = _clean_denoiser(sigma)
    # Measured over data seeds 0-4, all three cases: fitted minus closed form at most 0.002 (ambient)
    # and 0.0013 (naive); naive minus clean 0.036-0.038 at (0.5, 0.2), 0.18 and 0.095 in the others.
    assert abs(a - a_true) < 0.01 and abs(b - b_true) < 0.01
    a_naive, _ = _fit(sigma, sigma_tn, ambient=False)
    a_wide, _ = _clean_denoiser(sigma, S0**2 + sigma_tn**2)
    assert abs(a_naive - a_wide) < 0.01
    assert abs(a_naive - a_true) > 0.03  # the test can tell the two apart


def test_ambient_noisy_input_has_variance_sigma():
    g = torch.Generator().manual_seed(1)
    x0 = torch.zeros(200_000, 1, dtype=torch.float64)
    x_tn = x0 + 0.4 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x = ambient_noisy_input(x_tn, torch.full((x0.shape[0],), 1.3, dtype=torch.float64),
                            torch.full((x0.shape[0],), 0.4, dtype=torch.float64),
                            torch.randn(x0.shape, generator=g, dtype=torch.float64))
    assert abs(float(x.std()) - 1.3) < 0.01


def test_vp_form_is_alpha_times_ve_form():
    g = torch.Generator().manual_seed(2)
    x_tn, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0.2, 0.4, 0.6, 0.9])
    alpha, sigma_vp = torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)
    sigma_tn = torch.tensor([0.0, 0.1, 0.2, 0.3])
    vp = vp_ambient_noisy_input(x_tn, alpha, sigma_vp, sigma_tn, noise)
    ve = ambient_noisy_input(x_tn, sigma_vp / alpha, sigma_tn, noise)
    torch.testing.assert_close(vp, alpha.view(-1, 1, 1, 1) * ve, rtol=1e-5, atol=1e-6)


class Table(nn.Module):
    """A backbone whose output is a free tensor: its gradient is the loss's gradient on F."""

    def __init__(self, shape):
        super().__init__()
        self.out = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(3)))

    def forward(self, x, t, **_):
        return self.out


def _batch(seed=4):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 2, 6, 6, generator=g)
    return x0, torch.tensor([0.3, 1.0, 4.0]), torch.randn(x0.shape, generator=g)


def test_sigma_tn_zero_is_the_plain_loss():
    x0, sigma, noise = _batch()
    den = Denoiser(Table(x0.shape), EDM(0.5))
    plain = denoising_loss(den, x0, sigma, noise=noise, reduction="sum_per_sample")
    amb = denoising_loss(den, x0, sigma, noise=noise, sigma_tn=torch.zeros(3), reduction="sum_per_sample")
    torch.testing.assert_close(plain.loss, amb.loss, rtol=0, atol=0)


def test_ambient_o_weighting_divides_by_one_minus_r_squared():
    x0, sigma, noise = _batch()
    sigma_tn = torch.tensor([0.1, 0.5, 2.0])
    den = Denoiser(Table(x0.shape), EDM(0.5))
    tw = denoising_loss(den, x0, sigma, noise=noise, sigma_tn=sigma_tn, reduction="sum_per_sample")
    ao = denoising_loss(den, x0, sigma, noise=noise, sigma_tn=sigma_tn, ambient_weighting="ambient_o",
                        reduction="sum_per_sample")
    r = (sigma_tn / sigma) ** 2
    torch.testing.assert_close(ao.per_sample * (1 - r) ** 2, tw.per_sample, rtol=1e-5, atol=0)


def test_ambient_loss_value_matches_the_formula_in_x_space():
    """lambda(sigma) |(1-r) D + r x - x_tn|^2, computed directly from D, equals the F-space loss."""
    x0, sigma, noise = _batch()
    sigma_tn = torch.tensor([0.1, 0.5, 2.0])
    den = Denoiser(Table(x0.shape), EDM(0.5))
    res = denoising_loss(den, x0, sigma, noise=noise, sigma_tn=sigma_tn, weighting=edm_weight,
                         reduction="sum_per_sample")
    with torch.no_grad():
        x = ambient_noisy_input(x0, sigma, sigma_tn, noise)
        r = ((sigma_tn / sigma) ** 2).view(-1, 1, 1, 1)
        pred = (1 - r) * den(x, sigma) + r * x
        direct = (edm_weight(sigma).view(-1, 1, 1, 1) * (pred - x0) ** 2).flatten(1).sum(1).mean()
    torch.testing.assert_close(res.loss.detach(), direct, rtol=1e-5, atol=0)
    x0_eff, keep = ambient_target(x0, x, sigma, sigma_tn)
    torch.testing.assert_close(keep * x0_eff + r * x, x0, rtol=1e-5, atol=1e-5)


def test_sigma_not_above_sigma_tn_is_refused():
    x0, sigma, noise = _batch()
    den = Denoiser(Table(x0.shape), EDM(0.5))
    with pytest.raises(ValueError, match="sample 1: sigma=1 is not above its trusted noise level sigma_tn=1.5"):
        denoising_loss(den, x0, sigma, noise=noise, sigma_tn=torch.tensor([0.0, 1.5, 0.2]))


def test_unobserved_elements_get_exactly_zero_gradient():
    x0, sigma, noise = _batch()
    g = torch.Generator().manual_seed(5)
    observed = (torch.rand(3, 1, 6, 6, generator=g) < 0.4).float()
    seen = observed * (torch.rand(3, 1, 6, 6, generator=g) < 0.9).float()
    table = Table(x0.shape)
    den = Denoiser(table, EDM(0.5))
    for reduction in ("sum_per_sample", "mean", "mean_per_sample"):
        table.out.grad = None
        denoising_loss(den, x0, sigma, noise=noise, mask=observed, input_mask=seen, reduction=reduction).loss.backward()
        grad = table.out.grad
        hidden = (observed == 0).expand_as(grad)
        assert bool((grad[hidden] == 0).all())
        assert float(grad[~hidden].abs().min()) > 0  # every observed element is supervised (incl. A minus A-tilde)


class Conv(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(2 * channels, channels, 3, padding=1)

    def forward(self, x, t, **_):
        return self.conv(x)


def test_masked_input_denoiser_ignores_what_it_does_not_see():
    x0, sigma, _ = _batch()
    g = torch.Generator().manual_seed(6)
    seen = (torch.rand(3, 1, 6, 6, generator=g) < 0.5).float()
    den = Denoiser(Conv(2), EDM(0.5))
    x = torch.randn(x0.shape, generator=g)
    other = x + (1 - seen) * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(den(x, sigma, input_mask=seen), den(other, sigma, input_mask=seen), rtol=0, atol=0)
    # the net input is [c_in * m * x, m]: mask channels are not scaled by c_in
    captured = {}

    class Spy(Conv):
        def forward(self, x, t, **_):
            captured["x"] = x
            return super().forward(x, t)

    spy = Spy(2)
    d = Denoiser(spy, EDM(0.5))(x, sigma, input_mask=seen)
    c_skip, c_out, c_in = (v.view(-1, 1, 1, 1) for v in EDM(0.5).scalings(sigma))
    torch.testing.assert_close(captured["x"][:, :2], c_in * seen * x)
    torch.testing.assert_close(captured["x"][:, 2:], seen.expand(-1, 2, -1, -1))
    # seen elements: the usual c_skip x + c_out F; hidden ones: F itself (an x0 prediction, well
    # conditioned at low sigma where c_out -> 0)
    F = spy.conv(captured["x"])
    torch.testing.assert_close(d, seen * (c_skip * seen * x + c_out * F) + (1 - seen) * F)


class ConvC(nn.Module):
    """A pretrained-style backbone without mask channels (C in, C out)."""

    in_channels = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, t, **_):
        return self.conv(x)


def test_model_without_mask_channels_predicts_hidden_pixels_with_its_raw_output():
    x0, sigma, noise = _batch()
    g = torch.Generator().manual_seed(7)
    observed = (torch.rand(3, 1, 6, 6, generator=g) < 0.6).float()
    seen = observed * (torch.rand(3, 1, 6, 6, generator=g) < 0.8).float()
    net = ConvC()
    den = Denoiser(net, EDM(0.5))
    assert not den.has_mask_channels(2)
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        d = den(x, sigma, input_mask=seen)
        c_skip, c_out, c_in = (v.view(-1, 1, 1, 1) for v in EDM(0.5).scalings(sigma))
        F = net(c_in * seen * x, None)
        torch.testing.assert_close(d, seen * (c_skip * seen * x + c_out * F) + (1 - seen) * F)
        other = x + (1 - seen) * torch.randn(x.shape, generator=g)
        torch.testing.assert_close(den(other, sigma, input_mask=seen), d, rtol=0, atol=0)
    # the loss is lambda(sigma) |D - x0|^2 on the observed pixels, in both seen and hidden ones
    res = denoising_loss(den, x0, sigma, noise=noise, weighting=edm_weight, mask=observed, input_mask=seen,
                         reduction="sum_per_sample")
    direct = (edm_weight(sigma).view(-1, 1, 1, 1) * observed * (d - x0) ** 2).flatten(1).sum(1).mean()
    torch.testing.assert_close(res.loss.detach(), direct, rtol=1e-5, atol=1e-6)
    table = Table(x0.shape)
    table.in_channels = 2
    denoising_loss(Denoiser(table, EDM(0.5)), x0, sigma, noise=noise, mask=observed, input_mask=seen).loss.backward()
    assert bool((table.out.grad[(observed == 0).expand_as(x0)] == 0).all())


def test_consistency_loss_is_zero_in_expectation_for_the_true_denoiser():
    """Gaussian data: the exact denoiser is self-consistent (E[L] = 0), a wrong one at low noise is not."""
    from microdiff.ambient.consistency import consistency_loss

    def exact(x, sigma, slope=1.0):
        s = sigma.view(-1, 1)
        return MU + slope * S0**2 / (S0**2 + s**2) * (x - MU)

    n = 100_000
    g = torch.Generator().manual_seed(11)
    sigma_tn, sigma = torch.full((n,), 0.8, dtype=torch.float64), torch.full((n,), 0.2, dtype=torch.float64)
    x_tn = MU + (S0**2 + 0.64) ** 0.5 * torch.randn(n, 1, dtype=torch.float64, generator=g)
    good = consistency_loss(exact, x_tn, sigma_tn, sigma, steps=6, generator=g)
    wrong = consistency_loss(lambda x, s: exact(x, s, 1.3 if float(s[0]) < 0.5 else 1.0), x_tn, sigma_tn, sigma,
                             steps=6, generator=g)
    se = float(good.std()) / n**0.5
    # Measured over generator seeds 11-15: good / se -1.5 to 1.0, wrong / se 85-89
    assert abs(float(good.mean())) < 4 * se
    assert float(wrong.mean()) > 20 * se
