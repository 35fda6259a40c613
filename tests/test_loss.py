"""The denoising loss against hand computations.

masked_mse is checked against numpy; the weightings against their closed forms; denoising_loss
(computed on the backbone output F) against lambda(sigma) * |D - x0|^2 computed directly in D space
with the scalings written out here from Karras et al. 2022 (Table 1) / the v and eps conventions;
and at the exact denoiser of a Gaussian mixture against the Bayes error from 2-D quadrature.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from microdiff.data.mixture import OracleBackbone
from microdiff.diffusion.denoiser import EDM, Denoiser, EpsPrediction, VPrediction
from microdiff.diffusion.loss import (LossResult, denoising_loss, edm_weight, eps_weight, make_weighting,
                                      masked_mse, min_snr_weight, unit_weight, v_weight)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --- masked_mse -----------------------------------------------------------------------------------
def _np_masked_mse(pred, target, weight, mask, reduction):
    """Hand reference in float64 numpy. weight: (B,) or broadcastable; mask broadcastable."""
    pred, target = pred.numpy(), target.numpy()
    B = pred.shape[0]
    err = (pred - target) ** 2
    if weight is not None:
        w = weight.numpy()
        err = err * (w.reshape(B, *[1] * (err.ndim - 1)) if w.ndim == 1 else w)
    m = np.ones_like(err) if mask is None else np.broadcast_to(mask.numpy().astype(np.float64), err.shape)
    err = err * m
    if reduction == "none":
        return err
    per_sum = np.array([err[b].sum() for b in range(B)])
    per_cnt = np.array([m[b].sum() for b in range(B)])
    if reduction == "sum_per_sample":
        return per_sum.mean()
    if reduction == "mean":
        return per_sum.sum() / per_cnt.sum()
    # mean_per_sample: each sample's mean over what it observed (0 if it observed nothing)
    return np.mean([per_sum[b] / per_cnt[b] if per_cnt[b] > 0 else 0.0 for b in range(B)])


REDUCTIONS = ["mean", "mean_per_sample", "sum_per_sample", "none"]
MASKS = ["none", "full", "patch"]  # no mask, elementwise 0/1 mask, (B, 1, H, W) mask broadcast over C


def _mse_inputs(seed, mask_kind):
    g = _gen(seed)
    shape = (4, 3, 5, 6)
    pred = torch.randn(shape, generator=g, dtype=torch.float64)
    target = torch.randn(shape, generator=g, dtype=torch.float64)
    weight = torch.rand(shape[0], generator=g, dtype=torch.float64) + 0.1
    if mask_kind == "none":
        mask = None
    elif mask_kind == "full":
        mask = (torch.rand(shape, generator=g) < 0.6).to(torch.float64)
    else:
        mask = (torch.rand(shape[0], 1, *shape[2:], generator=g) < 0.6).to(torch.float64)
    return pred, target, weight, mask


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_masked_mse_matches_numpy(reduction, mask_kind):
    pred, target, weight, mask = _mse_inputs(0, mask_kind)
    for w in (None, weight):
        got = masked_mse(pred, target, w, mask, reduction)
        want = _np_masked_mse(pred, target, w, mask, reduction)
        # float64 sums of ~360 terms in a different order: 1e-12 relative
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-15)
        assert got.shape == (pred.shape if reduction == "none" else ())


def test_masked_mse_broadcast_weight_that_is_not_per_sample():
    pred, target, _, mask = _mse_inputs(1, "full")
    w = torch.rand(1, 3, 1, 1, generator=_gen(2), dtype=torch.float64)  # per channel
    for reduction in REDUCTIONS:
        np.testing.assert_allclose(masked_mse(pred, target, w, mask, reduction).numpy(),
                                   _np_masked_mse(pred, target, w, mask, reduction), rtol=1e-12, atol=1e-15)


def test_masked_mse_sample_with_nothing_observed():
    """A fully masked sample counts zero elements: it adds nothing to 'mean' and 0 to the per-sample
    averages (its mean is defined as 0, count clamped to 1)."""
    pred, target, weight, mask = _mse_inputs(3, "full")
    mask[1] = 0
    for reduction in REDUCTIONS:
        np.testing.assert_allclose(masked_mse(pred, target, weight, mask, reduction).numpy(),
                                   _np_masked_mse(pred, target, weight, mask, reduction),
                                   rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask_kind", ["full", "patch"])
def test_masked_out_elements_do_not_affect_the_loss(reduction, mask_kind):
    pred, target, weight, mask = _mse_inputs(4, mask_kind)
    base = masked_mse(pred, target, weight, mask, reduction)
    hidden = mask.expand_as(pred) == 0
    assert bool(hidden.any()) and bool((~hidden).any())
    pred2, target2 = pred.clone(), target.clone()
    pred2[hidden] = 1e100  # (1e100)^2 is still finite in float64, and 1e200 * 0 = 0 exactly
    target2[hidden] = -3e99
    got = masked_mse(pred2, target2, weight, mask, reduction)
    # identical observed terms; masked terms contribute exact zeros: equal to the last bit
    assert torch.equal(got, base)


def test_masked_mse_on_one_dimensional_inputs_without_mask():
    """(B,) predictions (one number per sample) with a per-sample weight, no mask."""
    g = _gen(5)
    pred, target = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    w = torch.rand(6, generator=g, dtype=torch.float64)
    e = w.numpy() * (pred.numpy() - target.numpy()) ** 2
    for reduction in ("mean", "mean_per_sample", "sum_per_sample"):
        np.testing.assert_allclose(masked_mse(pred, target, w, None, reduction).numpy(), e.mean(), rtol=1e-12)
    np.testing.assert_allclose(masked_mse(pred, target, w, None, "none").numpy(), e, rtol=1e-12)


def test_masked_mse_on_one_dimensional_inputs_with_a_mask():
    """(B,) inputs with a (B,) 0/1 mask: each sample's mean_per_sample divides by its *own* observed
    count (1 or 0), so it is w*err where observed and 0 where not (regression test for a fixed bug)."""
    g = _gen(6)
    pred, target = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    w = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    for weight in (None, w):
        for reduction in REDUCTIONS:
            got = masked_mse(pred, target, weight, mask, reduction)
            # float64 sums of 7 terms: 1e-12 relative
            np.testing.assert_allclose(got.numpy(), _np_masked_mse(pred, target, weight, mask, reduction),
                                       rtol=1e-12, atol=1e-15)
            assert got.shape == ((7,) if reduction == "none" else ())
    # written out once more by hand for mean_per_sample: the mean over all 7 samples of w*m*err
    e = (w * (pred - target) ** 2 * mask).numpy()
    np.testing.assert_allclose(masked_mse(pred, target, w, mask, "mean_per_sample").numpy(), e.sum() / 7,
                               rtol=1e-12)
    np.testing.assert_allclose(masked_mse(pred, target, w, mask, "mean").numpy(), e.sum() / 4, rtol=1e-12)


def test_masked_mse_soft_mask_with_per_sample_total_below_one():
    # 1-D: a soft weight per sample; sum(m) = m itself, so the per-sample mean is w*err wherever m > 0
    g = _gen(7)
    pred, target = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    m = torch.tensor([0.25, 0.1, 0.0, 1.0, 0.6], dtype=torch.float64)
    want = np.mean(np.where(m.numpy() > 0, (w * (pred - target) ** 2).numpy(), 0.0))
    got = masked_mse(pred, target, w, m, "mean_per_sample")
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)  # 5 float64 terms: 1e-12 relative
    np.testing.assert_allclose(got.numpy(), _np_masked_mse(pred, target, w, m, "mean_per_sample"), rtol=1e-12)

    # (B, C, H, W) with a (B, 1, H, W) soft mask rescaled so each sample's total is 0.25 (0.1 for one)
    pred, target, w, _ = _mse_inputs(8, "none")
    raw = torch.rand(4, 1, 5, 6, generator=_gen(9), dtype=torch.float64)
    totals = torch.tensor([0.25, 0.25, 0.1, 0.25], dtype=torch.float64)
    soft = raw / raw.sum((1, 2, 3), keepdim=True) * totals[:, None, None, None]
    soft_counts = soft.expand_as(pred).reshape(4, -1).sum(1)  # 3 channels: 0.75, ..., 0.3, ...
    assert bool((soft_counts < 1).all())  # the regime where clamping the count at 1 would be wrong
    got = masked_mse(pred, target, w, soft, "mean_per_sample")
    # ~90 float64 terms per sample: 1e-12 relative
    np.testing.assert_allclose(got.numpy(), _np_masked_mse(pred, target, w, soft, "mean_per_sample"), rtol=1e-12)
    for reduction in ("mean", "sum_per_sample", "none"):  # the helper is right for these with soft masks
        np.testing.assert_allclose(masked_mse(pred, target, w, soft, reduction).numpy(),
                                   _np_masked_mse(pred, target, w, soft, reduction), rtol=1e-12, atol=1e-15)


# --- weightings -----------------------------------------------------------------------------------
SIGMAS = torch.tensor(np.concatenate([np.logspace(-3, 3, 25), [0.2, 0.5, 1 / math.sqrt(2), 1.0]]),
                      dtype=torch.float64)


def _close(got, want):
    # closed forms of a handful of float64 operations: 1e-12 relative
    np.testing.assert_allclose(np.asarray(got.numpy() if isinstance(got, torch.Tensor) else got), want,
                               rtol=1e-12, atol=0)


def test_weightings_match_closed_forms():
    s = SIGMAS.numpy()
    sd = 0.5
    edm = (s**2 + sd**2) / (s * sd) ** 2
    v = (1 + s**2) / s**2
    eps = 1 / s**2
    _close(EDM(sd).natural_weight(SIGMAS), edm)
    _close(edm_weight(SIGMAS, sd), edm)
    _close(edm_weight(SIGMAS, 0.9), (s**2 + 0.81) / (s * 0.9) ** 2)
    _close(VPrediction().natural_weight(SIGMAS), v)
    _close(v_weight(SIGMAS), v)
    _close(EpsPrediction().natural_weight(SIGMAS), eps)
    _close(eps_weight(SIGMAS), eps)
    for gamma in (1.0, 5.0, 40.0):
        want = np.minimum(1 / s**2, gamma)
        assert (want == gamma).any() and (want < gamma).any()  # both branches exercised
        _close(min_snr_weight(SIGMAS, gamma), want)
    _close(min_snr_weight(SIGMAS), np.minimum(1 / s**2, 5.0))  # default gamma 5
    u = unit_weight(SIGMAS)
    assert u.shape == SIGMAS.shape and u.dtype == torch.float64 and bool((u == 1).all())


def test_make_weighting_by_name():
    s = SIGMAS.numpy()
    _close(make_weighting("natural", EDM(0.5))(SIGMAS), (s**2 + 0.25) / (s * 0.5) ** 2)
    _close(make_weighting("natural", VPrediction())(SIGMAS), (1 + s**2) / s**2)
    _close(make_weighting("natural", EpsPrediction())(SIGMAS), 1 / s**2)
    _close(make_weighting("edm")(SIGMAS), (s**2 + 0.25) / (s * 0.5) ** 2)
    _close(make_weighting("edm", sigma_data=0.9)(SIGMAS), (s**2 + 0.81) / (s * 0.9) ** 2)
    _close(make_weighting("eps")(SIGMAS), 1 / s**2)
    _close(make_weighting("v")(SIGMAS), (1 + s**2) / s**2)
    _close(make_weighting("x0")(SIGMAS), np.ones_like(s))
    _close(make_weighting("min_snr")(SIGMAS), np.minimum(1 / s**2, 5.0))
    two = np.minimum(1 / s**2, 2.0)
    assert (two == 2.0).any() and (two < 2.0).any() and not np.allclose(two, np.minimum(1 / s**2, 5.0))
    _close(make_weighting("min_snr", gamma=2.0)(SIGMAS), two)
    with pytest.raises(ValueError, match="natural"):
        make_weighting("natural")
    with pytest.raises(ValueError) as info:
        make_weighting("bogus")
    msg = str(info.value)
    assert "bogus" in msg
    for name in ("natural", "edm", "eps", "v", "min_snr", "x0"):
        assert name in msg


# --- denoising_loss on F == lambda |D - x0|^2 in D space --------------------------------------------
class _MLP(nn.Module):
    """A small fixed random float64 backbone F(x_in, c_noise): flattens x_in, appends c_noise."""

    def __init__(self, dim, hidden=16, seed=0):
        super().__init__()
        g = _gen(seed)
        self.w1 = nn.Parameter(torch.randn(dim + 1, hidden, generator=g, dtype=torch.float64) / math.sqrt(dim + 1))
        self.b1 = nn.Parameter(0.1 * torch.randn(hidden, generator=g, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(hidden, dim, generator=g, dtype=torch.float64) / math.sqrt(hidden))
        self.b2 = nn.Parameter(0.1 * torch.randn(dim, generator=g, dtype=torch.float64))

    def forward(self, x_in, c_noise):
        h = torch.cat([x_in.reshape(len(x_in), -1), c_noise[:, None]], 1)
        return (torch.tanh(h @ self.w1 + self.b1) @ self.w2 + self.b2).reshape(x_in.shape)


def _np_scalings(name, s, sd=0.5):
    """(c_skip, c_out, c_in, c_noise) in float64 numpy, written out from the conventions."""
    if name == "edm":
        r = np.sqrt(s**2 + sd**2)
        return sd**2 / (s**2 + sd**2), s * sd / r, 1 / r, np.log(s) / 4
    if name == "v":
        return 1 / (1 + s**2), -s / np.sqrt(1 + s**2), 1 / np.sqrt(1 + s**2), 2 / np.pi * np.arctan(s)
    if name == "eps":
        return np.ones_like(s), -s, 1 / np.sqrt(1 + s**2), 2 / np.pi * np.arctan(s)
    raise AssertionError(name)


PARAMS = {"edm": lambda: EDM(0.5), "v": VPrediction, "eps": EpsPrediction}


def _np_weight(wname, pname, s):
    if wname == "edm":
        return (s**2 + 0.25) / (s * 0.5) ** 2
    if wname == "min_snr":
        return np.minimum(1 / s**2, 5.0)
    return 1 / _np_scalings(pname, s)[1] ** 2  # natural: 1/c_out^2


def _d_space(backbone, pname, x0, sigma, noise, weight_np, mask=None):
    """lambda(sigma) * mask * (D(x0 + sigma n, sigma) - x0)^2 per element, with D built here from
    the numpy scalings; a torch graph through the backbone's parameters."""
    s = sigma.numpy()
    c_skip, c_out, c_in, c_noise = (torch.from_numpy(np.asarray(c, dtype=np.float64)) for c in _np_scalings(pname, s))
    shape = (-1,) + (1,) * (x0.ndim - 1)
    x = x0 + sigma.reshape(shape) * noise
    D = c_skip.reshape(shape) * x + c_out.reshape(shape) * backbone(c_in.reshape(shape) * x, c_noise)
    e = torch.from_numpy(weight_np).reshape(shape) * (D - x0) ** 2
    return e if mask is None else e * mask


LOSS_SIGMAS = torch.tensor([0.02, 0.1, 0.3, 0.45, 0.8, 1.5, 4.0, 20.0], dtype=torch.float64)


@pytest.mark.parametrize("pname", ["edm", "v", "eps"])
@pytest.mark.parametrize("wname", ["edm", "min_snr", "natural"])
def test_loss_on_F_equals_weighted_error_in_D_space(pname, wname):
    dim, B = 3, len(LOSS_SIGMAS)
    backbone = _MLP(dim, seed=10)
    param = PARAMS[pname]()
    denoiser = Denoiser(backbone, param)
    g = _gen(11)
    x0 = torch.randn(B, dim, generator=g, dtype=torch.float64)
    noise = torch.randn(B, dim, generator=g, dtype=torch.float64)
    sigma = LOSS_SIGMAS.clone()
    weighting = make_weighting(wname, param) if wname == "natural" else (
        make_weighting("edm", sigma_data=0.5) if wname == "edm" else make_weighting("min_snr"))
    w_np = _np_weight(wname, pname, sigma.numpy())

    res = denoising_loss(denoiser, x0, sigma, weighting=weighting, noise=noise, reduction="mean")
    ref = _d_space(backbone, pname, x0, sigma, noise, w_np)
    # same quantity through (F - target)^2 * lambda c_out^2 vs lambda (D - x0)^2: a few roundings
    # amplified by at most the ratio |x0|/|D - x0| (sigma = 0.02): 1e-10 relative
    np.testing.assert_allclose(res.loss.detach().numpy(), ref.mean().detach().numpy(), rtol=1e-10)
    assert res.per_sample.shape == (B,)
    np.testing.assert_allclose(res.per_sample.numpy(), ref.mean(1).detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(res.sigma.numpy(), sigma.numpy(), rtol=0)
    # the D-space error is not trivially small, so the comparison above has teeth
    assert float(ref.mean().detach()) > 1e-3

    params = list(backbone.parameters())
    g_loss = torch.autograd.grad(res.loss, params)
    g_ref = torch.autograd.grad(ref.mean(), params)
    for a, b in zip(g_loss, g_ref):
        scale = float(b.abs().max())
        assert scale > 0
        # gradients of the same function through two algebraically equal graphs: 1e-9 relative
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-12 * scale)


# --- the exact denoiser of a Gaussian mixture: Bayes error ------------------------------------------
def _np_mixture(mixture):
    return mixture.means.numpy(), mixture.stds.numpy(), mixture.weights.numpy()


def _np_posterior(mixture, x, sigma):
    """Written-out posterior of x0 given x = x0 + sigma n for a diagonal mixture, in numpy float64:
    p(x), E[x0|x] and tr Var(x0|x). Per component k: x ~ N(mu_k, s_k^2 + sigma^2); x0 | x, k is
    N(mu_k + s_k^2/(s_k^2+sigma^2) (x - mu_k), s_k^2 sigma^2/(s_k^2+sigma^2)) per coordinate."""
    mu, sd, w = _np_mixture(mixture)
    s2 = sd**2  # (K, dim)
    var = s2 + sigma**2
    diff = x[:, None, :] - mu[None]  # (N, K, dim)
    log_p = -0.5 * (diff**2 / var + np.log(2 * np.pi * var)).sum(-1) + np.log(w)  # (N, K)
    top = log_p.max(1, keepdims=True)
    p_k = np.exp(log_p - top)
    density = p_k.sum(1) * np.exp(top[:, 0])
    r = p_k / p_k.sum(1, keepdims=True)
    m_k = mu[None] + s2 / var * diff  # (N, K, dim)
    m = (r[..., None] * m_k).sum(1)
    v_k = s2 * sigma**2 / var  # (K, dim)
    tr_var = (r[..., None] * (v_k[None] + (m_k - m[:, None]) ** 2)).sum((1, 2))  # law of total variance
    return density, m, tr_var


def _bayes_error_quadrature(mixture, sigma, n=601):
    """E|x0 - E[x0|x]|^2 = integral of p_sigma(x) tr Var(x0|x) dx by the trapezoid rule on a grid
    that reaches 10 standard deviations past the outermost means; the integrand is smooth and
    negligible at the edges, so the rule is accurate far beyond the Monte Carlo error it is compared
    with. Returns (integral, integral of p) -- the latter must be 1."""
    mu, sd, _ = _np_mixture(mixture)
    reach = 10 * math.sqrt(float((sd**2).max()) + sigma**2)
    axes = [np.linspace(mu[:, d].min() - reach, mu[:, d].max() + reach, n) for d in range(2)]
    X, Y = np.meshgrid(*axes, indexing="ij")
    density, _, tr_var = _np_posterior(mixture, np.stack([X.ravel(), Y.ravel()], 1), sigma)
    cell = (axes[0][1] - axes[0][0]) * (axes[1][1] - axes[1][0])
    wq = np.ones(n)
    wq[[0, -1]] = 0.5
    wgrid = np.outer(wq, wq).ravel() * cell
    return float((wgrid * density * tr_var).sum()), float((wgrid * density).sum())


def _constant_delta(x_in, c_noise):
    return torch.full_like(x_in, 0.05)


def _smooth_delta(x_in, c_noise):
    a = torch.sin(2.0 * x_in[:, 0] + 3.0 * c_noise)
    b = torch.tanh(x_in[:, 1] - x_in[:, 0]) * torch.cos(c_noise)
    return 0.1 * torch.stack([a + 0.3 * b, 0.5 * a - b], 1)


class _Perturbed(nn.Module):
    def __init__(self, base, delta):
        super().__init__()
        self.base, self.delta = base, delta

    def forward(self, x_in, c_noise):
        return self.base(x_in, c_noise) + self.delta(x_in, c_noise)


@pytest.mark.parametrize("sigma_value", [0.1, 0.5, 2.0])
def test_loss_at_exact_denoiser_is_bayes_error_and_perturbations_raise_it(mixture, sigma_value):
    B, dim, sd = 20000, 2, 0.5
    param = EDM(sd)
    oracle = OracleBackbone(mixture, param, lambda c: (4 * c).exp())
    weighting = make_weighting("natural", param)
    g = _gen(100 + int(10 * sigma_value))
    x0 = mixture.sample(B, generator=g)
    noise = torch.randn(B, dim, generator=g, dtype=torch.float64)
    sigma = torch.full((B,), sigma_value, dtype=torch.float64)
    base = denoising_loss(Denoiser(oracle, param), x0, sigma, weighting=weighting, noise=noise)

    lam = (sigma_value**2 + sd**2) / (sigma_value * sd) ** 2
    _, c_out, c_in, c_noise = _np_scalings("edm", np.float64(sigma_value), sd)
    x0n, nn_ = x0.numpy(), noise.numpy()
    x = x0n + sigma_value * nn_
    _, post_mean, _ = _np_posterior(mixture, x, sigma_value)
    per_sample = lam * ((post_mean - x0n) ** 2).mean(1)  # the 'mean' reduction divides by B*dim

    # deterministic: the package's loss at the oracle equals this numpy sum (torch and numpy compute
    # the same posterior mean in a different order): 1e-9 relative on a mean of 40000 float64 terms
    np.testing.assert_allclose(float(base.loss), per_sample.mean(), rtol=1e-9)

    # (a) Bayes error by quadrature. The loss is a mean of B iid per-sample terms with expectation
    # lambda * Bayes / dim; their sample standard deviation / sqrt(B) is the standard error (CLT).
    # A correct loss is outside 5 standard errors with probability ~6e-7 (and the seed is fixed);
    # with SE < 2% of the value, a wrong weighting or a wrong oracle of a few percent fails.
    bayes, mass = _bayes_error_quadrature(mixture, sigma_value)
    assert abs(mass - 1) < 1e-9  # the grid covers the density
    want = lam * bayes / dim
    se = per_sample.std(ddof=1) / math.sqrt(B)
    assert se < 0.02 * want  # the test resolves the loss to a few percent
    assert abs(float(base.loss) - want) < 5 * se, (float(base.loss), want, se)

    # (b) F' = F* + delta(x_in, c_noise). With the natural weighting lambda c_out^2 = 1, so
    #   L' - L = mean(delta^2) + 2 mean(delta * (F* - target)),   F* - target = (D* - x0)/c_out.
    # The cross term has expectation 0 (E[D* - x0 | x] = 0 and delta depends on x only); it is a mean
    # of B iid per-sample terms, so it lies within 5 standard errors of 0. We also check the identity
    # itself exactly, with the cross term computed here from the numpy posterior mean.
    x_in = torch.from_numpy(c_in * x)
    cn = torch.full((B,), float(c_noise), dtype=torch.float64)
    resid = (post_mean - x0n) / c_out  # F* - target, (B, dim)
    for delta in (_constant_delta, _smooth_delta):
        d = delta(x_in, cn).numpy()
        pert = denoising_loss(Denoiser(_Perturbed(oracle, delta), param), x0, sigma,
                              weighting=weighting, noise=noise)
        increase = float(pert.loss) - float(base.loss)
        mean_d2 = (d**2).mean()
        cross = (d * resid).mean(1)  # per-sample cross terms
        # identity, float64 roundings of O(1) sums: 1e-9 absolute relative to mean(delta^2). This is
        # the sharp check of the quadratic structure (unit weight on F): the statistical one below
        # is loose, 5 standard errors of the cross term being about the size of mean(delta^2) here.
        np.testing.assert_allclose(increase, mean_d2 + 2 * cross.mean(), rtol=0, atol=1e-9 * mean_d2)
        se_cross = 2 * cross.std(ddof=1) / math.sqrt(B)
        assert abs(increase - mean_d2) < 5 * se_cross, (increase, mean_d2, se_cross)
        assert increase > 0


# --- LossResult.per_sample and the per-sample reductions --------------------------------------------
@pytest.mark.parametrize("use_mask", [False, True])
def test_per_sample_and_per_sample_reductions(use_mask):
    B, shape = 6, (2, 3, 3)
    dim = int(np.prod(shape))
    backbone = _MLP(dim, seed=20)
    param = EDM(0.5)
    denoiser = Denoiser(backbone, param)
    g = _gen(21)
    x0 = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    noise = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.2, 0.5, 1.0, 3.0, 10.0], dtype=torch.float64)
    mask = None
    if use_mask:
        mask = (torch.rand(B, 1, 3, 3, generator=g) < 0.5).to(torch.float64)
        mask[0], mask[1] = 0, 1  # one sample with nothing observed, one fully observed
        mask[2, 0, 0, 0] = 0.3  # and a soft entry
    weighting = make_weighting("min_snr")
    w_np = _np_weight("min_snr", "edm", sigma.numpy())
    e = _d_space(backbone, "edm", x0, sigma, noise, w_np, mask).detach().numpy().reshape(B, -1)
    m = np.ones((B, dim)) if mask is None else np.broadcast_to(mask.numpy(), (B, *shape)).reshape(B, -1)
    cnt = m.sum(1)
    want_per_sample = np.where(cnt > 0, e.sum(1) / np.where(cnt > 0, cnt, 1), 0.0)
    assert (want_per_sample > 0).sum() >= B - 1

    with torch.no_grad():
        results = {r: denoising_loss(denoiser, x0, sigma, weighting=weighting, noise=noise, mask=mask, reduction=r)
                   for r in ("mean", "mean_per_sample", "sum_per_sample")}
    for r, res in results.items():
        assert isinstance(res, LossResult) and res.per_sample.shape == (B,)
        # per_sample does not depend on the reduction; ~18 float64 terms: 1e-10 relative
        np.testing.assert_allclose(res.per_sample.numpy(), want_per_sample, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(float(results["mean_per_sample"].loss), results["mean_per_sample"].per_sample.mean().item(),
                               rtol=1e-12)
    np.testing.assert_allclose(float(results["mean_per_sample"].loss), want_per_sample.mean(), rtol=1e-10)
    np.testing.assert_allclose(float(results["sum_per_sample"].loss), e.sum(1).mean(), rtol=1e-10)
    np.testing.assert_allclose(float(results["mean"].loss), e.sum() / cnt.sum(), rtol=1e-10)
    if use_mask:  # the three reductions genuinely differ here
        vals = [float(r.loss) for r in results.values()]
        assert len({round(v, 8) for v in vals}) == 3
