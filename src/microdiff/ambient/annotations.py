"""Per-sample quality annotations: which noise levels a sample may be trained at.

An annotations file is a CSV with the header ``key,sigma_tn,sigma_max``, one row per sample key
(the ``key`` of a dataset record). ``sigma_tn`` ("use only above", >= 0, 0 = clean) and
``sigma_max`` ("use only below", empty = no upper limit) are in the units of the space the model
trains in (pixels in [-1, 1] for pixel models, latents for latent models).

``microdiff annotate`` writes such a file; training reads it with ``ambient.annotations: PATH``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

HEADER = ("key", "sigma_tn", "sigma_max")


def _level(text: str, where: str, column: str, allow_empty: bool) -> float | None:
    text = (text or "").strip()
    if not text:
        if allow_empty:
            return None
        raise ValueError(f"{where}: {column} is empty; write a number >= 0 (0 = clean)")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: {column} must be a number >= 0; got {text!r}") from None
    if not value >= 0 or math.isnan(value):
        raise ValueError(f"{where}: {column} must be a number >= 0; got {text!r}")
    return value


def read_annotations(path: str | Path) -> dict[str, dict[str, float | None]]:
    """``{key: {"sigma_tn": float, "sigma_max": float | None}}`` from an annotations CSV."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ambient.annotations={path}: no such file; write one with `microdiff annotate`")
    out: dict[str, dict[str, float | None]] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "key" not in reader.fieldnames or "sigma_tn" not in reader.fieldnames:
            raise ValueError(f"{path}: an annotations file needs the header key,sigma_tn[,sigma_max]; "
                             f"got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            key = (row.get("key") or "").strip()
            if not key:
                raise ValueError(f"{where}: empty key")
            if key in out:
                raise ValueError(f"{where}: key {key!r} appears twice; keep one row per sample")
            sigma_tn = _level(row["sigma_tn"], where, "sigma_tn", allow_empty=False)
            sigma_max = _level(row.get("sigma_max") or "", where, "sigma_max", allow_empty=True)
            if sigma_max is not None and sigma_max <= sigma_tn:
                raise ValueError(f"{where}: sigma_max={sigma_max} must be above sigma_tn={sigma_tn} "
                                 "(no noise level would be left to train this sample at)")
            out[key] = {"sigma_tn": sigma_tn, "sigma_max": sigma_max}
    return out


def write_annotations(path: str | Path, rows: Mapping[str, Mapping[str, float | None]] | Iterable) -> Path:
    """Write ``{key: {"sigma_tn": .., "sigma_max": ..}}`` (or (key, sigma_tn[, sigma_max]) tuples)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = rows.items() if isinstance(rows, Mapping) else ((r[0], {"sigma_tn": r[1], "sigma_max": r[2] if len(r) > 2
                                                                      else None}) for r in rows)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        for key, levels in items:
            sigma_max = levels.get("sigma_max")
            writer.writerow([key, repr(float(levels["sigma_tn"])), "" if sigma_max is None else repr(float(sigma_max))])
    tmp.replace(path)
    return path


__all__ = ["read_annotations", "write_annotations", "HEADER"]
