"""Reference statistics files for Fréchet distances: ``.npz`` with ``mu`` and ``sigma``.

The layout is the one pytorch-fid and clean-fid write (``mu`` (D,), ``sigma`` (D, D)), so their
files load here and ours load there. We add three optional entries so that a score never silently
mixes feature spaces or resolutions:

    features     the feature space's name (e.g. "inception-fid", "dinov2:facebook/dinov2-base")
    count        how many images the statistics came from
    resolution   the size the images were resized to before feature extraction (0: not resized)

and, with ``keep_features=True``, the raw ``feats`` (N, D) that KID and precision/recall need, and
``written_by`` (utils.files: the command that wrote it, so a rerun replaces its own file and never
someone else's). A file without ``features`` (written by another tool) is accepted for any feature
space of the same dimension, with a note in the result.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.files import WRITTEN_BY, stamp
from .errors import first_line
from .features import spec_of
from .frechet import feature_statistics


@dataclass
class Statistics:
    mu: np.ndarray
    sigma: np.ndarray
    features: str | None = None  # None: written by a tool that does not record it
    count: int | None = None
    resolution: int | None = None
    feats: np.ndarray | None = None

    @classmethod
    def of(cls, feats: np.ndarray, features: str, resolution: int | None, keep_features: bool = False) -> "Statistics":
        mu, sigma = feature_statistics(feats)
        return cls(mu, sigma, features, int(len(feats)), resolution, feats if keep_features else None)


def save_statistics(path: str | Path, stats: Statistics, command: str = "eval fid") -> Path:
    """Write ``stats`` to ``path`` (.npz) through a temporary file and a rename, stamped as written by
    ``microdiff <command>``. Whether an existing file may be replaced is the caller's check
    (utils.files.output_file)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: statistics files end in .npz (the pytorch-fid / clean-fid layout)")
    path.parent.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {WRITTEN_BY: np.array(stamp(command)[WRITTEN_BY])}
    if stats.features is not None:
        extra["features"] = np.array(stats.features)
    if stats.count is not None:
        extra["count"] = np.array(stats.count)
    extra["resolution"] = np.array(stats.resolution or 0)
    if stats.feats is not None:
        extra["feats"] = stats.feats
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, mu=stats.mu, sigma=stats.sigma, **extra)
    tmp.replace(path)
    return path


def load_statistics(path: str | Path) -> Statistics:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such statistics file; write one with `microdiff eval fid --ref DIR "
                                "--save-ref-stats FILE.npz`")
    try:
        with np.load(path, allow_pickle=False) as data:
            entries = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .npz statistics file ({first_line(err)}); write it again with "
                         "--save-ref-stats") from None
    if "mu" not in entries or "sigma" not in entries:
        raise ValueError(f"{path}: has {sorted(entries)} but a statistics file needs 'mu' and 'sigma' (the "
                         "pytorch-fid / clean-fid layout)")
    mu, sigma = entries["mu"], entries["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu":
        raise ValueError(f"{path}: 'mu' must be a (D,) and 'sigma' a (D, D) numeric array; got {mu.dtype} {mu.shape} "
                         f"and {sigma.dtype} {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: 'mu' or 'sigma' holds NaN or infinite values (damaged, or made from broken "
                         "features); write it again with --save-ref-stats")
    resolution = int(entries["resolution"]) if "resolution" in entries else None
    return Statistics(mu=entries["mu"].astype(np.float64), sigma=entries["sigma"].astype(np.float64),
                      features=str(entries["features"]) if "features" in entries else None,
                      count=int(entries["count"]) if "count" in entries else None,
                      resolution=resolution or None, feats=entries.get("feats"))


def check_compatible(reference: Statistics, generated: Statistics, source: str) -> list[str]:
    """One-line errors when the two sides were computed in different feature spaces or at different
    resolutions; returns notes for what cannot be checked."""
    notes = []
    if reference.mu.shape != generated.mu.shape:
        made = (f"pass --features {spec_of(reference.features)}, the space it was made with" if reference.features
                else "use the --features the reference was made with")
        raise ValueError(f"{source}: {reference.mu.shape[0]}-d statistics but the generated images give "
                         f"{generated.mu.shape[0]}-d {generated.features} features; {made}")
    if reference.features is None:
        notes.append(f"{source} does not record its feature space; assumed to be {generated.features}")
    elif reference.features != generated.features:
        raise ValueError(f"{source}: statistics of '{reference.features}' features, but --features gives "
                         f"'{generated.features}'; recompute the reference or pass --features {spec_of(reference.features)}")
    if reference.resolution and generated.resolution and reference.resolution != generated.resolution:
        raise ValueError(f"{source}: reference images were resized to {reference.resolution} px but the generated "
                         f"ones to {generated.resolution} px; pass --resolution {reference.resolution} or "
                         "recompute the reference")
    return notes


__all__ = ["Statistics", "save_statistics", "load_statistics", "check_compatible"]
