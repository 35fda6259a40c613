"""``microdiff data inspect``: what is in a dataset, without decoding its images.

The source is indexed exactly as training indexes it (``data/sources.py``): the counts are the
samples training would use and the items it would skip while indexing, by reason (missing or blank
captions, captions that are not UTF-8, malformed JSON sidecars, hidden files left out, ...). Images
are not decoded here, so a corrupt image still counts as a sample: ``microdiff data check`` decodes
them. Captions and metadata come from sidecar ``.txt``/``.json`` files of an image folder, the rows of
a manifest (jsonl / csv / parquet), the members of image shards (a ``microdiff data download``
folder), the ``caption.txt``/``meta.json`` members of precomputed latent shards, MDS rows, or the
attributes of the built-in ``shapes:N``. Prints counts, caption length statistics and the mix of
sources, quality and corruptions, and can write the summary as JSON plus a caption-length histogram.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..utils.errors import UserError
from ..utils.files import output_file, stamp, write_json_atomic
from ..utils.plots import histogram
from .report import SkipReport
from .shards import ShardError, iter_tar, list_shards, read_dataset_info
from .sources import (DataSpec, add_source_arguments, build_dataset, caption_meta, found_nothing, nonnegative_int,
                      refuse_unused, skip_report, source_kind)

COMMAND = "data inspect"
INSPECT_RESOLUTION = 16  # what datasets are built at here (images are not decoded; shapes:N renders small)


# ----------------------------------------------------------------------------- readers
def iter_latent_shards(source: str, report: SkipReport) -> Iterator[dict[str, Any]]:
    """Caption and meta of every sample of precomputed shards (their arrays are not decoded)."""
    urls, _ = list_shards(source)
    for url in urls:
        try:
            for key, fields in iter_tar(url, keep=None):
                try:
                    caption = fields["caption.txt"].decode("utf-8")
                    meta = json.loads(fields.get("meta.json", b"{}"))
                except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as err:
                    report.add(f"{url}:{key}", "corrupt sample", f"{type(err).__name__}: {err}")
                    continue
                yield {"caption": caption, "meta": meta}
        except ShardError as err:
            report.add(url, "damaged shard (training stops there)", str(err))


def iter_source(source: str, spec: DataSpec | None = None, report: SkipReport | None = None,
                progress: bool = False) -> Iterator[dict[str, Any]]:
    """``{"caption", "meta"}`` of every sample training would use; what it would skip goes to ``report``."""
    report = report if report is not None else SkipReport(source)
    spec = spec or DataSpec(source=source, resolution=INSPECT_RESOLUTION)
    if source_kind(source) == "latent-shards":
        yield from iter_latent_shards(source, report)
        return
    dataset = build_dataset(spec, command="data inspect", progress=progress, allow_empty=True, log_skips=False,
                            corrupt_shards="report")
    index_skips = skip_report(dataset)
    if index_skips is not None:
        report.merge(index_skips)
    for i in tqdm(range(len(dataset)), desc=f"reading {source}", unit="item", disable=not progress, leave=False):
        caption, meta = caption_meta(dataset, i)
        yield {"caption": caption, "meta": meta}


# ----------------------------------------------------------------------------- summary
def summarise(samples: Iterator[dict[str, Any]], report: SkipReport | None = None) -> dict[str, Any]:
    words, chars, missing, count = [], [], 0, 0
    sources, corruptions, quality = Counter(), Counter(), []
    for sample in samples:
        count += 1
        caption, meta = sample["caption"], sample["meta"] or {}
        options = caption if isinstance(caption, list) else [caption]
        options = [c for c in options if isinstance(c, str) and c.strip()]
        if not options:
            missing += 1  # allowed here (allow_missing_captions): trains with the empty caption
        for text in options:  # every caption of a sample that has several (one is drawn per epoch)
            words.append(len(text.split()))
            chars.append(len(text))
        sources[str(meta.get("source", "unknown"))] += 1
        corruptions[_corruption_name(meta.get("corruption"))] += 1
        if isinstance(meta.get("quality"), (int, float)) and not isinstance(meta.get("quality"), bool):
            quality.append(float(meta["quality"]))
    skipped = report.counts if report is not None else {}
    return {
        "samples": count,
        "skipped": sum(skipped.values()),
        "skipped_by_reason": skipped,
        "missing_captions": skipped.get("missing caption", 0) + missing,
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
    skipped = summary.get("skipped_by_reason", {})
    reasons = ", ".join(f"{k}: {v}" for k, v in skipped.items())
    head = f"{source}: {summary['samples']} samples"
    head += f", {summary['skipped']} skipped ({reasons})" if skipped else ", nothing skipped"
    lines = [head + " (images not decoded: `microdiff data check` finds unreadable ones)"]
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


def inspect_source(source: str, json_path: str | None = None, plot_path: str | None = None,
                   spec: DataSpec | None = None, progress: bool = False) -> dict[str, Any]:
    """Summarise ``source`` (see the module docstring); ``json_path`` / ``plot_path``: also write the
    summary (stamped) and a caption-length histogram there: a new file, or one an earlier inspect wrote
    (anything else is refused before the source is read)."""
    json_file = output_file(json_path, "--json", COMMAND) if json_path else None
    plot_file = output_file(plot_path, "--plot", COMMAND) if plot_path else None
    report = SkipReport(source, warn_first=0)  # the summary lists the reasons
    summary = summarise(iter_source(source, spec, report, progress), report)
    words = summary.pop("_caption_words")
    if source_kind(source) == "latent-shards":  # precomputed shards say which encoders made them
        info = read_dataset_info(source)
        summary["shards"] = {k: v for k, v in info.items() if not isinstance(v, (list, dict)) or k.endswith("encoder")}
    if json_file is not None:
        write_json_atomic(json_file, {**stamp(COMMAND), "source": source, **summary})
    summary["plot"] = None
    if plot_file is not None and words:
        histogram(words, plot_file, bins=min(40, max(words) - min(words) + 1),
                  title=f"caption length ({summary['samples']} samples)", xlabel="words", text=stamp(COMMAND))
        summary["plot"] = str(plot_file)
    return summary


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("source", help="image folder, manifest (.jsonl/.csv/.parquet), hf:NAME, image shard folder "
                                       "(microdiff data download), latent shard folder, mds:PATH or shapes:N")
    parser.add_argument("--json", help="also write the summary to this JSON file (a new file, or one an earlier "
                                       "data inspect wrote)")
    parser.add_argument("--plot", help="also write a caption-length histogram PNG here (a new file, or one an "
                                       "earlier data inspect wrote)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of a shapes:N source (default 0)")
    add_source_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    spec = DataSpec(source=args.source, resolution=INSPECT_RESOLUTION, seed=args.seed,
                    caption_column=args.caption_column, image_column=args.image_column)
    refuse_unused(args.source, {"--seed": (args.seed, 0, ("shapes",)),
                                 "--caption-column": (args.caption_column, None, ("manifest", "hf")),
                                 "--image-column": (args.image_column, None, ("manifest", "hf"))})
    summary = inspect_source(args.source, args.json, args.plot, spec, progress=not args.no_progress)
    print(format_summary(args.source, summary))
    if args.plot and summary["plot"] is None:
        print(f"--plot {args.plot}: not written: no sample has a caption to measure")
    if summary["samples"] == 0:
        if not summary["skipped"]:
            raise UserError(found_nothing(args.source))
        raise UserError(f"{args.source}: training would use none of its items (see the reasons above)")
    return 0


__all__ = ["iter_source", "summarise", "format_summary", "inspect_source", "add_arguments", "run"]
