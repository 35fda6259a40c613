"""``microdiff data inspect``: what is in a dataset, without decoding its images.

Reads only captions and metadata: sidecar ``.txt``/``.json`` files of an image folder, the rows of a
manifest (jsonl / csv / parquet), the ``.txt``/``.json`` members of webdataset tars (downloaded or
precomputed shards, with their ``dataset.json``), or the attributes of the built-in ``shapes:N``.
Prints counts, caption length statistics and the mix of sources, quality and corruptions, and can
write the summary as JSON plus a caption-length histogram PNG.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .captioned import CAPTION_COLUMNS, IMAGE_SUFFIXES



# ----------------------------------------------------------------------------- readers
def iter_folder(root: Path) -> Iterator[dict[str, Any]]:
    """Image files with their sidecars; an image without a caption yields caption None."""
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        meta: dict[str, Any] = {}
        side_json, side_txt = image.with_suffix(".json"), image.with_suffix(".txt")
        if side_json.exists():
            meta = json.loads(side_json.read_text())
        caption = side_txt.read_text().strip() if side_txt.exists() else _caption_of(meta)
        yield {"caption": caption, "meta": meta}


def iter_manifest(path: Path) -> Iterator[dict[str, Any]]:
    from .captioned import read_manifest  # the datasets' own reader: same columns, same errors

    rows, _, _ = read_manifest(path)
    for row in rows:
        yield {"caption": _caption_of(row), "meta": row}


def iter_tars(root: Path) -> Iterator[dict[str, Any]]:
    """Samples of webdataset tars: ``<key>.txt``/``<key>.caption.txt`` and ``<key>.json``/``<key>.meta.json``."""
    tars = sorted(root.glob("*.tar")) if root.is_dir() else [root]
    for tar_path in tars:
        samples: dict[str, dict[str, Any]] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                entry = samples.setdefault(key, {"caption": None, "meta": {}})
                if ext in ("txt", "caption.txt"):
                    entry["caption"] = tar.extractfile(member).read().decode("utf-8").strip()
                elif ext in ("json", "meta.json"):
                    entry["meta"] = json.loads(tar.extractfile(member).read())
        yield from samples.values()


def iter_shapes(n: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    from .shapes import ShapesDataset

    data = ShapesDataset(n, resolution=16, seed=seed)
    for i in range(n):
        record = data[i]
        yield {"caption": record["caption"], "meta": record["meta"]}


def iter_source(source: str) -> Iterator[dict[str, Any]]:
    if source.startswith("shapes:"):
        return iter_shapes(int(source.split(":", 1)[1]))
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file or folder (inspect takes an image folder, a manifest, "
                                "a folder of .tar shards or shapes:N)")
    if path.is_file():
        return iter_tars(path) if path.suffix == ".tar" else iter_manifest(path)
    if any(path.glob("*.tar")):
        return iter_tars(path)
    return iter_folder(path)


def _caption_of(row: dict[str, Any]) -> str | None:
    for field in CAPTION_COLUMNS:
        if isinstance(row.get(field), str):
            return row[field]
    return None


# ----------------------------------------------------------------------------- summary
def summarise(samples: Iterator[dict[str, Any]]) -> dict[str, Any]:
    words, chars, missing = [], [], 0
    sources, corruptions, quality = Counter(), Counter(), []
    for sample in samples:
        caption, meta = sample["caption"], sample["meta"] or {}
        if caption is None:
            missing += 1
        else:
            words.append(len(caption.split()))
            chars.append(len(caption))
        sources[str(meta.get("source", "unknown"))] += 1
        corruption = meta.get("corruption")
        corruptions[_corruption_name(corruption)] += 1
        if isinstance(meta.get("quality"), (int, float)):
            quality.append(float(meta["quality"]))
    count = len(words) + missing
    return {
        "samples": count,
        "missing_captions": missing,
        "caption_words": _stats(words),
        "caption_chars": _stats(chars),
        "sources": dict(sources.most_common()),
        "corruptions": dict(corruptions.most_common()),
        "quality": _stats(quality) | {"annotated": len(quality)},
        "_caption_words": words,
    }


def _corruption_name(corruption: Any) -> str:
    if corruption in (None, "", "none"):
        return "none"
    if isinstance(corruption, dict):
        return str(corruption.get("name") or corruption.get("corruption") or "unknown")
    return str(corruption)


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values, float)
    return {"min": float(a.min()), "mean": round(float(a.mean()), 3), "median": float(np.median(a)),
            "p95": float(np.percentile(a, 95)), "max": float(a.max())}


def format_summary(source: str, summary: dict[str, Any]) -> str:
    lines = [f"{source}: {summary['samples']} samples, {summary['missing_captions']} without caption"]
    for key in ("caption_words", "caption_chars", "quality"):
        stats = summary[key]
        if stats and "mean" in stats:
            lines.append(f"  {key:14s} " + "  ".join(f"{k} {v:g}" for k, v in stats.items()))
    for key, value in summary.get("shards", {}).items():
        lines.append(f"  {key:14s} {value}")
    for key in ("sources", "corruptions"):
        mix = ", ".join(f"{k} {v} ({100 * v / max(summary['samples'], 1):.0f}%)" for k, v in summary[key].items())
        lines.append(f"  {key:14s} {mix}")
    return "\n".join(lines)


def inspect_source(source: str, json_path: str | None = None, plot_path: str | None = None) -> dict[str, Any]:
    summary = summarise(iter_source(source))
    words = summary.pop("_caption_words")
    index = Path(source) / "dataset.json"
    if index.is_file():  # precomputed shards say which encoders made them
        info = json.loads(index.read_text())
        summary["shards"] = {k: v for k, v in info.items() if not isinstance(v, (list, dict)) or k.endswith("encoder")}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({"source": source, **summary}, indent=2))
    if plot_path and words:
        from ..utils.plots import histogram

        histogram(words, plot_path, bins=min(40, max(words) - min(words) + 1),
                  title=f"caption length ({summary['samples']} samples)", xlabel="words")
    return summary


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("source", help="image folder, manifest (.jsonl/.csv/.parquet), folder of .tar shards, or shapes:N")
    parser.add_argument("--json", help="also write the summary to this JSON file")
    parser.add_argument("--plot", help="also write a caption-length histogram PNG here")


def run(args) -> int:
    summary = inspect_source(args.source, args.json, args.plot)
    print(format_summary(args.source, summary))
    return 0


__all__ = ["iter_source", "summarise", "format_summary", "inspect_source", "add_arguments", "run"]
