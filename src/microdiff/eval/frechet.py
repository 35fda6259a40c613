"""Fréchet distance between two Gaussians fitted to features, and a cheap pixel feature space.

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1^1/2 S2 S1^1/2)

computed in float64 with two symmetric eigendecompositions (no scipy): S1^1/2 from the eigenpairs
of S1, then the trace term as the sum of square roots of the eigenvalues of the symmetric
S1^1/2 S2 S1^1/2 (which are those of S1 S2, so the formula is the usual tr sqrtm(S1 S2)). Eigenvalues
below the round-off floor (D * eps * the largest; negative ones included) are set to 0, so singular
covariances (fewer samples than features) are handled as accurately as full-rank ones.

    feature_statistics(features)           -> (mu, sigma), unbiased covariance (N - 1), as pytorch-fid
    frechet_distance(mu1, sigma1, mu2, sigma2) -> float
    frechet_distance_from_features(a, b)   -> float
    pixel_features(images, size=8)         -> (B, 3 * size * size) area-downsampled pixels

With Inception-v3 pool features this is FID. ``pixel_features`` is NOT Inception: it is a
pixel-space FD, good for comparing runs of the ``microdiff demo`` with each other (colour and
layout statistics), not for comparison with published FID numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SYMMETRY_TOLERANCE = 1e-6  # relative asymmetry above which a covariance is rejected


def _as_float64(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().double().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a numeric array or tensor; got {type(value).__name__}") from None
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values; check the features it came from")
    return array


def _covariance(value: Any, name: str, dim: int) -> np.ndarray:
    sigma = np.atleast_2d(_as_float64(value, name))
    if sigma.shape != (dim, dim):
        raise ValueError(f"{name} must be a ({dim}, {dim}) covariance to match the means; got shape {sigma.shape}")
    scale = max(float(np.abs(sigma).max()), np.finfo(np.float64).tiny)
    if float(np.abs(sigma - sigma.T).max()) > SYMMETRY_TOLERANCE * scale:
        raise ValueError(f"{name} is not symmetric; pass a covariance matrix (e.g. from feature_statistics)")
    return (sigma + sigma.T) / 2


def _clamp(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix below its round-off floor (D * eps * largest) set to 0: their
    square roots (~1e-8 of the largest) would otherwise be pure noise."""
    floor = len(eigenvalues) * np.finfo(np.float64).eps * max(float(np.abs(eigenvalues).max()), 0.0)
    return np.where(eigenvalues > floor, eigenvalues, 0.0)


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(_clamp(w))) @ v.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Means are (D,) and covariances (D, D), as numpy arrays, tensors or nested lists."""
    mu1, mu2 = np.atleast_1d(_as_float64(mu1, "mu1")), np.atleast_1d(_as_float64(mu2, "mu2"))
    if mu1.ndim != 1 or mu2.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of the same length (D,); got shapes {mu1.shape} and "
                         f"{mu2.shape}")
    dim = mu1.shape[0]
    sigma1, sigma2 = _covariance(sigma1, "sigma1", dim), _covariance(sigma2, "sigma2", dim)
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(_clamp(eigenvalues)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
    return max(value, 0.0)  # >= 0 in exact arithmetic; round-off may leave -1e-13


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) (divided by N - 1, as pytorch-fid) of (N, D) features,
    in float64."""
    x = _as_float64(features, "features")
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D): one row per sample; got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"features has {x.shape[0]} sample(s); a covariance needs at least 2 rows")
    mu = x.mean(axis=0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def frechet_distance_from_features(a: Any, b: Any) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D)."""
    a, b = _as_float64(a, "a"), _as_float64(b, "b")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must be (N, D) feature sets with the same D; got shapes {a.shape} and {b.shape}")
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def pixel_features(images: Any, size: int = 8):
    """Pixel features for a pixel-space FD (not Inception FID): images (B, 3, H, W) in [0, 1] averaged
    over pixel areas down to ``size`` x ``size`` (torch's adaptive average pooling: exact block means
    when H and W are multiples of ``size``) and flattened channel-major to (B, 3 * size * size), float64."""
    import torch
    import torch.nn.functional as F

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a whole number of pixels >= 1; got {size!r}")
    if (not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3
            or not images.is_floating_point()):
        got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) float tensor in [0, 1]; got {got}")
    if images.shape[2] < size or images.shape[3] < size:
        raise ValueError(f"size={size} is larger than the images ({images.shape[2]} x {images.shape[3]}); "
                         "pick a size <= the image side")
    x = images.detach().to("cpu", torch.float64)
    return F.adaptive_avg_pool2d(x, size).reshape(x.shape[0], -1)


__all__ = ["frechet_distance", "feature_statistics", "frechet_distance_from_features", "pixel_features"]
