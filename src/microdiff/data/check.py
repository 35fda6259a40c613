"""``microdiff data check SOURCE``: what of a source training would skip, and why, before training.

Image sources (folder, manifest, Hugging Face dataset, image shards such as a download folder,
``shapes:N``) are built exactly as training builds them (``data/sources.py``) and every image is
decoded once through the training transform; the report lists every skipped item with its reason,
those found while indexing (missing captions, bad sidecars) and those found while decoding (corrupt,
empty, too small, ...). Latent sources (a precompute folder, ``mds:``) have no images: every sample of
every shard is read and decoded instead, and a damaged shard is reported by name. Every shard is also
compared with the content hash its writer recorded (precompute's shard records, download's
``NNNNN.sha256``), which finds damage inside a member that the tar format itself does not see. A
damaged shard (training stops at it) or a source with nothing usable exits 2 after the report is
written. Options that would do nothing for the source (``--seed`` for a folder, ``--min-size`` for
latents, ...) are refused in one line.

Writes ``OUT.json`` (stamped ``written_by``, the source, summary, totals by reason, items) and
``OUT.csv`` (path, reason, detail), and prints one summary line with the totals; an existing OUT is
replaced only when it is an earlier report of the same source.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..utils.errors import UserError
from ..utils.files import WRITTEN_BY, stamp
from ..utils.hashing import check_file
from .captioned import check_dataset
from .mds import MDSLatentDataset
from .report import SkipReport
from .shards import ShardError, decode_sample, iter_tar, list_shards
from .sources import (DataSpec, add_source_arguments, build_dataset, check_out_path, found_nothing, nonnegative_int,
                      positive_int, refuse_unused, source_kind)
from .webshards import DOWNLOAD_SETTINGS

COMMAND = "data check"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``microdiff data check``: decode every image of a dataset and report what fails."""
    parser.description = ("Decode every image of a dataset through the training transform and write a "
                          "report of what would be skipped, and why (latent shards: read every sample). Examples:\n"
                          "  microdiff data check images/ --resolution 256 --min-size 128 --out skips\n"
                          "  microdiff data check train.jsonl --image-root /data/imgs --workers 4\n"
                          "  microdiff data check data/web            # a `microdiff data download` folder")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("source", help="image folder, .jsonl/.csv/.parquet manifest, hf:<name>, save_to_disk folder, "
                                       "image shard folder (data download), latent shard folder, mds:PATH or shapes:N")
    parser.add_argument("--resolution", type=positive_int, default=256, help="training resolution (default 256)")
    parser.add_argument("--min-size", type=positive_int, default=None, help="skip images whose short side is smaller")
    parser.add_argument("--image-root", default=None, help="manifests: folder relative image paths start from")
    parser.add_argument("--split", default=None, help="Hugging Face datasets: split (default train)")
    parser.add_argument("--allow-missing-captions", action="store_true", help="use '' for missing captions")
    add_source_arguments(parser)
    parser.add_argument("--workers", type=nonnegative_int, default=0,
                        help="DataLoader worker processes decoding images (default 0: in this process)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of a shapes:N source (default 0)")
    parser.add_argument("--out", default="skip_report", help="writes OUT.json and OUT.csv (default skip_report; "
                                                             "an existing folder: OUT/skip_report.json and .csv); "
                                                             "replaces only an earlier report of the same source")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _is_report_of(path: Path, source: str) -> bool:
    """An earlier ``data check`` report of the same ``source`` (a report of another source, or any other
    file, is not replaced)."""
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(previous, dict):
        return False
    ours = previous.get(WRITTEN_BY) == f"microdiff {COMMAND}" or {"summary", "counts", "items"} <= set(previous)
    return ours and previous.get("source", previous.get("name")) == source


def check_report_path(out: str, source: str) -> Path:
    """``--out``: refuse what a rerun must not overwrite: a folder, a file that is not a skip report, or
    the report of another source (one line naming --out)."""
    if not out.strip() or Path(out).name in ("", ".", ".."):
        raise UserError(f"--out {out!r}: give a file name prefix such as skips (writes skips.json and skips.csv)")
    base = Path(out) / "skip_report" if Path(out).is_dir() else Path(out)  # a folder: the report goes inside
    check_out_path(base.parent, "--out")
    for path in (base.with_suffix(".json"), base.with_suffix(".csv")):
        if path.is_dir():
            raise UserError(f"--out {out}: {path} is a folder; give a file name prefix such as {out}/skips")
    json_path, csv_path = base.with_suffix(".json"), base.with_suffix(".csv")
    if json_path.is_file() and not _is_report_of(json_path, source):
        raise UserError(f"--out {out}: {json_path} exists and is not a skip report of {source} (another source's "
                        "report, or someone else's file); choose another --out")
    if csv_path.is_file() and not json_path.is_file():
        raise UserError(f"--out {out}: {csv_path} exists and no data check report beside it says it is one; "
                        "choose another --out")
    return base


def check_latents(source: str, kind: str, progress: bool, resolution: int = 256) -> tuple[SkipReport, int]:
    """Read and decode every sample of latent shards (or MDS samples); damaged ones are reported."""
    report = SkipReport(source)
    count = 0
    if kind == "mds":
        if not [r for r in source[4:].split(",") if r]:
            raise UserError(f"{source}: write mds:FOLDER[,FOLDER...] with the folders that hold index.json")
        dataset = MDSLatentDataset([r for r in source[4:].split(",") if r], resolution=resolution)
        for i in tqdm(range(len(dataset)), desc=f"checking {source}", unit="sample", disable=not progress):
            try:
                dataset[i]
                count += 1
            except ValueError as err:
                report.add(f"{source}[{i}]", "corrupt sample", str(err))
        return report, count
    urls, info = list_shards(source)
    expected = {Path(s["name"]).name: int(s["samples"]) for s in (info or {}).get("shards", [])}
    hashes = {Path(s["name"]).name: s["file"] for s in (info or {}).get("shards", []) if "file" in s}
    for url in tqdm(urls, desc=f"checking {source}", unit="shard", disable=not progress):
        seen = 0
        local = Path(url).name in hashes and Path(url).is_file()  # remote shards are checked by reading them
        damage = check_file(url, hashes[Path(url).name]) if local else None
        if damage is not None:  # damage inside a member: the tar reads, the latents are wrong
            report.add(url, "corrupt shard", f"{damage}; recreate it (rerun precompute: it redoes damaged shards)")
            continue
        try:
            for key, fields in iter_tar(url):
                decode_sample(url, key, fields)
                seen += 1
        except ShardError as err:
            report.add(url, "corrupt shard", str(err))
            continue
        want = expected.get(Path(url).name)
        if want is not None and seen != want:
            report.add(url, "wrong sample count", f"read {seen} samples, dataset.json says {want}")
        count += seen
    return report, count


def refuse_unused_options(args: argparse.Namespace) -> None:
    """One line for an option that would do nothing for this source (instead of ignoring it)."""
    decoded = ("folder", "manifest", "hf", "image-shards")  # the sources whose images are decoded and can fail
    refuse_unused(args.source, {
        "--resolution": (args.resolution, 256, (*decoded, "shapes", "mds")),
        "--min-size": (args.min_size, None, decoded),
        "--allow-missing-captions": (args.allow_missing_captions, False, decoded),
        "--workers": (args.workers, 0, decoded),
        "--seed": (args.seed, 0, ("shapes",)),
        "--caption-column": (args.caption_column, None, ("manifest", "hf")),
        "--image-column": (args.image_column, None, ("manifest", "hf")),
        "--image-root": (args.image_root, None, ("manifest", "hf")),
        "--split": (args.split, None, ("hf",)),
    })


def run(args: argparse.Namespace) -> int:
    """``microdiff data check``: 0 with the report written (a source with nothing usable, or a damaged
    shard, which training would stop at, is an error after the report is written)."""
    refuse_unused_options(args)
    out = check_report_path(args.out, args.source)
    kind = source_kind(args.source)
    progress = not args.no_progress
    if kind in ("latent-shards", "mds"):
        report, count = check_latents(args.source, kind, progress, args.resolution)
        what = f"{count} samples read"
    else:
        spec = DataSpec(source=args.source, resolution=args.resolution, seed=args.seed,
                        caption_column=args.caption_column, image_column=args.image_column)
        options: dict[str, Any] = {"split": args.split, "image_root": args.image_root, "min_size": args.min_size,
                                   "allow_missing_captions": args.allow_missing_captions}
        dataset = build_dataset(spec, needs="images", command="data check", progress=progress, allow_empty=True,
                                corrupt_shards="report", verify_shards=True, **options)
        if hasattr(dataset, "probe"):
            report = check_dataset(dataset, num_workers=args.workers, progress=progress)
            decoded_skips = report.total - dataset.report.total  # the index already left the others out
        else:  # shapes:N renders every item: nothing can be skipped
            report, decoded_skips = SkipReport(args.source), 0
        count = len(dataset) - decoded_skips
        what = f"{len(dataset)} items indexed, {count} usable"
    json_path, csv_path = report.write(out, **stamp(COMMAND), source=args.source)
    print(f"{report.summary()}; {what}; report: {json_path}, {csv_path}")
    damaged = [s for s in report.items if s.reason in ("corrupt shard", "corrupt sample", "wrong sample count")]
    if damaged:  # not skipped in training: a damaged shard stops it
        fix = ("rerun precompute (it redoes damaged shards)" if kind in ("latent-shards", "mds") else
               "rerun the download (it fetches damaged shards again)" if Path(args.source, DOWNLOAD_SETTINGS).is_file()
               else "recreate them or move them out of the folder")
        raise UserError(f"{args.source}: {len(damaged)} damaged shard(s) or sample(s) (first: {damaged[0].path}); "
                        f"training stops at them: {fix}; see {json_path}")
    if count == 0:
        if not report.total:
            raise UserError(found_nothing(args.source))
        raise UserError(f"{args.source}: nothing in it is usable ({report.summary()}); see {json_path}")
    return 0


__all__ = ["add_arguments", "run", "check_latents", "check_report_path"]
