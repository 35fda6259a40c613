"""Sample-set metrics on feature arrays: KID, improved precision/recall, Vendi score, CLIP score.

Pure functions on (N, D) features (numpy arrays, torch tensors or nested lists; one row per
sample), computed in float64 on the CPU with numpy:

    kernel_inception_distance(gen, ref, ...)  -> (mean, std)  unbiased polynomial-kernel MMD^2 over subsets
    polynomial_mmd2(x, y, ...)                -> float        one unbiased MMD^2 estimate (the KID building block)
    precision_recall(gen, ref, k=3)           -> {"precision", "recall"}  k-NN manifolds (Kynkäänniemi et al. 2019)
    vendi_score(features)                     -> float        exp(entropy of eig(K / n)), cosine kernel
    vendi_score_from_kernel(K)                -> float        the same from a precomputed similarity matrix
    clip_score(image_features, text_features) -> (mean, per_pair)  scale * max(cos, 0)
    paired_cosine(a, b)                       -> (N,)         raw cosine similarity of row pairs

With Inception-v3 pool features, ``kernel_inception_distance`` is KID (Bińkowski et al. 2018) and
``precision_recall`` is the usual improved precision/recall (the paper uses VGG-16 fc2 features);
with CLIP image and text embeddings, ``clip_score`` is CLIPScore. Features come from elsewhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .frechet import _as_float64

DIAGONAL_TOLERANCE = 1e-6  # |K_ii - 1| above which a Vendi similarity matrix is rejected
SYMMETRY_TOLERANCE = 1e-6  # relative asymmetry above which a Vendi similarity matrix is rejected


# --- input checks -----------------------------------------------------------------------------------
def _features(value: Any, name: str, min_rows: int = 1) -> np.ndarray:
    """(N, D) float64 features with N >= min_rows, D >= 1 and no NaN/inf, or a one-line ValueError."""
    x = _as_float64(value, name)
    if x.ndim != 2:
        raise ValueError(f"{name} must be (N, D) features, one row per sample; got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}); pass at least {min_rows} feature row(s) with D >= 1")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} has {x.shape[0]} sample(s); this metric needs at least {min_rows} rows")
    return x


def _pair(a: Any, b: Any, names: tuple[str, str], min_rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    x, y = _features(a, names[0], min_rows), _features(b, names[1], min_rows)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{names[0]} and {names[1]} must have the same feature dimension D; got {x.shape[1]} and "
                         f"{y.shape[1]} (were they extracted by the same network?)")
    return x, y


def whole_number(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}; got {value!r}")
    return int(value)


def _normalise_rows(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{name} has {int(np.sum(norms == 0))} all-zero row(s); cosine similarity needs non-zero "
                         "vectors")
    return x / norms


# --- KID ----------------------------------------------------------------------------------------------
def _polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    return (gamma * (x @ y.T) + coef0) ** degree


def _mmd2(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    m, n = len(x), len(y)
    k_xx = _polynomial_kernel(x, x, degree, gamma, coef0)
    k_yy = _polynomial_kernel(y, y, degree, gamma, coef0)
    k_xy = _polynomial_kernel(x, y, degree, gamma, coef0)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def _kernel_params(dim: int, degree: Any, gamma: Any, coef0: Any) -> tuple[int, float, float]:
    degree = whole_number(degree, "degree", 1)
    gamma = 1.0 / dim if gamma is None else gamma
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float, np.floating)) or not np.isfinite(gamma) \
            or gamma <= 0:
        raise ValueError(f"gamma must be a finite number > 0, or None for 1 / D; got {gamma!r}")
    if isinstance(coef0, bool) or not isinstance(coef0, (int, float, np.floating)) or not np.isfinite(coef0):
        raise ValueError(f"coef0 must be a finite number (1 for KID); got {coef0!r}")
    return degree, float(gamma), float(coef0)


def polynomial_mmd2(x: Any, y: Any, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> float:
    """Unbiased estimate of MMD^2 between the distributions of x (m, D) and y (n, D) under the
    polynomial kernel k(a, b) = (gamma a.b + coef0)^degree, gamma = 1 / D by default:

        sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1)) - 2 mean k(x_i, y_j)

    Needs m, n >= 2; can be slightly negative when the distributions are equal."""
    x, y = _pair(x, y, ("x", "y"), min_rows=2)
    return _mmd2(x, y, *_kernel_params(x.shape[1], degree, gamma, coef0))


def kernel_inception_distance(gen: Any, ref: Any, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
                              gamma: float | None = None, coef0: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """KID between generated and reference features (N_gen, D) and (N_ref, D): the unbiased MMD^2
    (``polynomial_mmd2``) with the cubic kernel k(a, b) = (a.b / D + 1)^3 (the defaults of degree,
    gamma = 1 / D and coef0; pass them to change the kernel), averaged over ``subsets``
    random subsets, returned as (mean, std) with the population std (ddof=0) as torch-fidelity and
    torchmetrics report it. The std is the spread over subsets, not a standard error of the mean.

    Each subset draws m rows without replacement from each set independently (numpy Generator from
    ``seed``; different seeds give different subsets, so numbers match other tools only in
    expectation). ``subset_size`` is clipped to m = min(subset_size, N_gen, N_ref) instead of raising
    as torchmetrics does; KID is unbiased for any m but its variance grows as m shrinks, so report m
    with the score. When both sets have exactly m rows every subset is the whole set: the value is
    computed once and std is 0. Each set needs at least 2 rows.
    Cost: 3 (m x D) @ (D x m) float64 products per subset."""
    x, y = _pair(gen, ref, ("gen", "ref"), min_rows=2)
    subsets, subset_size = whole_number(subsets, "subsets", 1), whole_number(subset_size, "subset_size", 2)
    params = _kernel_params(x.shape[1], degree, gamma, coef0)
    m = min(subset_size, len(x), len(y))
    if len(x) == m and len(y) == m:  # every subset is a permutation of everything; MMD^2 is permutation-invariant
        return _mmd2(x, y, *params), 0.0
    rng = np.random.default_rng(seed)
    values = np.array([_mmd2(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)],
                             *params) for _ in range(subsets)])
    return float(values.mean()), float(values.std())


# --- improved precision / recall -------------------------------------------------------------------
def _squared_distances(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """|a_i - b_j|^2 as |a|^2 + |b|^2 - 2 a.b, clamped at 0, in place in one (len(a), len(b)) buffer
    (inputs are already centred, see below)."""
    out = a @ b.T
    out *= -2.0
    out += (a * a).sum(axis=1)[:, None]
    out += b_sq[None, :]
    return np.maximum(out, 0.0, out=out)


def _knn_radii(x: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Squared distance from each row of x to its k-th nearest other row (the row itself, at
    distance 0, is sorted position 0; a duplicate row counts as a neighbour at distance 0)."""
    x_sq = (x * x).sum(axis=1)
    radii = np.empty(len(x))
    for start in range(0, len(x), batch_size):
        block = _squared_distances(x[start:start + batch_size], x, x_sq)
        rows = np.arange(len(block))
        block[rows, rows + start] = 0.0  # exact self-distance, whatever the round-off of the expansion
        radii[start:start + batch_size] = np.partition(block, k, axis=1)[:, k]
    return radii


def precision_recall(gen: Any, ref: Any, k: int = 3, batch_size: int = 1024) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of generated features (N_gen, D)
    against reference features (N_ref, D).

    Each set's manifold is the union of balls around its points with radius the distance to the
    point's k-th nearest neighbour in the same set. precision = fraction of generated points inside
    the reference manifold (quality); recall = fraction of reference points inside the generated
    manifold (coverage). Boundaries count as inside (<=), as in the authors' code. Each set needs
    more than k rows; the paper uses k = 3 with 50k samples per set and VGG-16 features.

    Distances are computed in float64 in row blocks of ``batch_size``: peak memory is about
    batch_size x max(N_gen, N_ref) x ~20 bytes (~200 MB for 10k x 10k at the default), and the work is
    three (N x D) @ (D x N) products. Both sets are centred on the reference mean first (distances are
    unchanged, round-off is smaller)."""
    x, y = _pair(gen, ref, ("gen", "ref"))
    k, batch_size = whole_number(k, "k", 1), whole_number(batch_size, "batch_size", 1)
    for name, rows in (("gen", len(x)), ("ref", len(y))):
        if rows <= k:
            raise ValueError(f"{name} has {rows} sample(s); k={k} nearest neighbours need more than k rows "
                             "(lower k or add samples)")
    centre = y.mean(axis=0)
    x, y = x - centre, y - centre
    gen_radii, ref_radii = _knn_radii(x, k, batch_size), _knn_radii(y, k, batch_size)
    y_sq = (y * y).sum(axis=1)
    in_ref = np.empty(len(x), dtype=bool)
    ref_covered = np.zeros(len(y), dtype=bool)
    for start in range(0, len(x), batch_size):
        block = _squared_distances(x[start:start + batch_size], y, y_sq)  # (B, N_ref)
        in_ref[start:start + batch_size] = (block <= ref_radii[None, :]).any(axis=1)
        ref_covered |= (block <= gen_radii[start:start + batch_size, None]).any(axis=0)
    return {"precision": float(in_ref.mean()), "recall": float(ref_covered.mean())}


# --- Vendi score ------------------------------------------------------------------------------------
def _entropy_exp(eigenvalues: np.ndarray) -> float:
    """exp(-sum p log p) over eigenvalues of a unit-trace PSD matrix; round-off negatives and 0 log 0 -> 0."""
    p = np.clip(eigenvalues, 0.0, None)
    p = p[p > 0] / p.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def vendi_score_from_kernel(K: Any) -> float:
    """Vendi score (Friedman & Dieng 2023) of an (n, n) similarity matrix K: exp of the Shannon
    entropy of the eigenvalues of K / n. K must be symmetric positive semi-definite with K_ii = 1
    (each sample is fully similar to itself); the score is then between 1 (all samples identical)
    and n (all mutually dissimilar), an "effective number of distinct samples"."""
    k = _as_float64(K, "K")
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] == 0:
        raise ValueError(f"K must be a non-empty square (n, n) similarity matrix; got shape {k.shape}")
    if float(np.abs(np.diag(k) - 1).max()) > DIAGONAL_TOLERANCE:
        raise ValueError("K must have ones on the diagonal (k(x, x) = 1); normalise it as K / sqrt(outer(diag, diag))")
    if float(np.abs(k - k.T).max()) > SYMMETRY_TOLERANCE * max(float(np.abs(k).max()), 1.0):
        raise ValueError("K is not symmetric; pass a similarity matrix K[i, j] = k(x_i, x_j)")
    return _entropy_exp(np.linalg.eigvalsh((k + k.T) / (2 * len(k))))


def vendi_score(features: Any, kernel: str = "cosine") -> float:
    """Vendi score of (n, D) features with the cosine-similarity kernel K = X X^T on L2-normalised
    rows X (see ``vendi_score_from_kernel``). Needs no n x n matrix when D < n: the non-zero
    eigenvalues of X X^T / n are those of the (D, D) matrix X^T X / n. Negative cosines are kept, as in
    the paper's reference code (the kernel is still PSD). n orthogonal directions score n; n copies
    of one direction score 1. Rows must be non-zero."""
    if kernel != "cosine":
        raise ValueError(f"kernel must be 'cosine'; got {kernel!r} (use vendi_score_from_kernel for other kernels)")
    x = _normalise_rows(_features(features, "features"), "features")
    n, d = x.shape
    gram = x.T @ x if d < n else x @ x.T
    return _entropy_exp(np.linalg.eigvalsh((gram + gram.T) / (2 * n)))


# --- CLIP score -------------------------------------------------------------------------------------
def paired_cosine(a: Any, b: Any) -> np.ndarray:
    """Cosine similarity of row pairs (a_i, b_i) of two (N, D) arrays, float64, no clipping or scaling."""
    x, y = _pair(a, b, ("a", "b"))
    if len(x) != len(y):
        raise ValueError(f"a and b must hold the same number of rows (one pair per row); got {len(x)} and {len(y)}")
    return (_normalise_rows(x, "a") * _normalise_rows(y, "b")).sum(axis=1)


def clip_score(image_features: Any, text_features: Any, scale: float = 100.0) -> tuple[float, np.ndarray]:
    """CLIP score of paired image and text embeddings (N, D) (row i of each belongs to sample i):

        per_pair = scale * max(cos(image_i, text_i), 0),   mean = per_pair.mean()

    Clipping at 0 is always applied (for every ``scale``), per pair, as in CLIPScore (Hessel et al.
    2021, which uses scale = 2.5). The default scale = 100 is the convention of diffusion papers and
    torchmetrics, whose documented formula is max(100 cos, 0); note torchmetrics' code clamps the mean
    of the unclipped scores instead, which gives the same number whenever no pair has a negative
    cosine (the normal case for CLIP, where matched pairs score ~0.2-0.35). For the raw, unclipped
    cosine use ``paired_cosine``. Embeddings are L2-normalised here; all-zero rows are an error."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) or not np.isfinite(scale) \
            or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0 (100 for the usual CLIP score); got {scale!r}")
    x, y = _pair(image_features, text_features, ("image_features", "text_features"))
    if len(x) != len(y):
        raise ValueError(f"image_features and text_features must hold the same number of rows (one caption per "
                         f"image); got {len(x)} and {len(y)}")
    cosine = (_normalise_rows(x, "image_features") * _normalise_rows(y, "text_features")).sum(axis=1)
    per_pair = float(scale) * np.maximum(cosine, 0.0)
    return float(per_pair.mean()), per_pair


__all__ = ["kernel_inception_distance", "polynomial_mmd2", "precision_recall", "vendi_score",
           "vendi_score_from_kernel", "clip_score", "paired_cosine"]
