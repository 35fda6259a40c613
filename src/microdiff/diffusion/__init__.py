"""The diffusion math, no weights: parameterisations, noise distributions, losses, grids, samplers,
guidance. Pure functions and thin classes; see each module's docstring for the formulas."""

from . import ddpm, denoiser, guidance, loss, noise, rng, samplers, schedules, vp
from .denoiser import EDM, Denoiser, EpsPrediction, VPrediction, X0Prediction, make_parameterization
from .guidance import GuidedDenoiser, cfg
from .loss import denoising_loss, make_weighting, masked_mse
from .noise import make_noise_distribution
from .samplers import SAMPLERS, get_sampler

__all__ = [
    "ddpm", "denoiser", "guidance", "loss", "noise", "rng", "samplers", "schedules", "vp",
    "EDM", "Denoiser", "EpsPrediction", "VPrediction", "X0Prediction", "make_parameterization",
    "GuidedDenoiser", "cfg", "denoising_loss", "make_weighting", "masked_mse",
    "make_noise_distribution", "SAMPLERS", "get_sampler",
]
