"""The loss minimiser is the right one: a tiny network trained with each parameterisation on a
1-D mixture approaches the mixture's exact denoiser E[x0 | x] at several noise levels."""

import pytest
import torch

from microdiff.data.mixture import GaussianMixture
from microdiff.diffusion.denoiser import EDM, Denoiser, EpsPrediction, VPrediction, X0Prediction
from microdiff.diffusion.noise import LogUniform
from microdiff.diffusion.toy_training import train_denoiser
from microdiff.models import MLPBackbone

MIX = GaussianMixture([[-1.0], [0.6], [1.5]], [0.15, 0.25, 0.1], [0.4, 0.35, 0.25])
CHECK_SIGMAS = [0.1, 0.3, 1.0, 3.0]
BOUND = 0.2  # the relative error a trained denoiser stays under (see the test)


def _relative_error(denoiser, sigma):
    """RMS of (D_learned - D_exact) over x ~ p_sigma, relative to the RMS of (D_exact - E[x0]):
    0 is perfect, 1 is no better than ignoring x."""
    g = torch.Generator().manual_seed(123)
    x = MIX.sample(4000, g) + sigma * torch.randn(4000, 1, generator=g, dtype=torch.float64)
    exact = MIX.denoise(x, sigma)
    with torch.no_grad():
        learned = denoiser(x.float(), torch.full((4000,), sigma)).double()
    baseline = (exact - (MIX.weights @ MIX.means)).pow(2).mean().sqrt()
    return float((learned - exact).pow(2).mean().sqrt() / baseline)


def _train(param, steps=1500):
    torch.manual_seed(0)
    denoiser = Denoiser(MLPBackbone(dim=1, hidden=64, depth=3), param)
    result = train_denoiser(denoiser, lambda n, g: MIX.sample(n, g), LogUniform(0.05, 6.0),
                            steps=steps, batch_size=512, lr=3e-3)
    return denoiser, result


@pytest.fixture(scope="module")
def trained():
    return {name: _train(p) for name, p in
            {"edm": EDM(0.5), "v": VPrediction(), "eps": EpsPrediction(), "x0": X0Prediction()}.items()}


@pytest.mark.parametrize("name", ["edm", "v", "eps", "x0"])
def test_trained_denoiser_approaches_the_exact_one(name, trained):
    denoiser, result = trained[name]
    # one batch's loss is noisy (last / first single steps 0.33-0.92 over seeds 0-4); the mean of the last
    # 100 over the first 10 is 0.76-0.79 (edm), 0.82-0.87 (v), 0.51-0.53 (eps), 0.40-0.43 (x0)
    losses = result.losses
    assert sum(losses[-100:]) / 100 < 0.95 * sum(losses[:10]) / 10, (losses[:10], losses[-100:])
    # eps-models give D = x - sigma*eps: their error grows with sigma (checked below), so they are
    # held to the bound on sigma <= 1 only.
    sigmas = [s for s in CHECK_SIGMAS if name != "eps" or s <= 1.0]
    errors = {s: _relative_error(denoiser, s) for s in sigmas}
    # An untrained network sits near 1; a minimiser of the right loss gets within a few percent. Measured
    # over seeds 0-7 (network init, data, sigmas; the same on torch 2.13.0 and 2.14.1), the worst sigma
    # gives 0.10-0.13 (edm, at sigma 3), 0.05-0.08 (v), 0.05-0.07 (eps), 0.05-0.08 (x0); a wrong target
    # gives 1.09-1.11 (below).
    assert max(errors.values()) < BOUND, errors


def test_eps_prediction_is_worst_at_high_noise(trained):
    """The known weakness that EDM preconditioning and v-prediction fix. Measured over seeds 0-7: eps
    0.30-0.40 against edm 0.10-0.13 at sigma 3, a ratio of 2.3-3.7."""
    assert _relative_error(trained["eps"][0], 3.0) > 1.5 * _relative_error(trained["edm"][0], 3.0)


def test_wrong_target_does_not_approach_the_exact_denoiser():
    """Control: training an EDM-wrapped network on v-targets (a mismatched parameterisation) must
    fail the same check, or the check above could not fail."""

    class Mismatched(EDM):
        def target(self, x0, x, sigma):
            return VPrediction().target(x0, x, sigma)

    denoiser, _ = _train(Mismatched(0.5), steps=600)
    errors = {s: _relative_error(denoiser, s) for s in CHECK_SIGMAS}
    assert max(errors.values()) > BOUND, errors  # seeds 0-7: 1.09-1.11
