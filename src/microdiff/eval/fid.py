"""``microdiff eval fid``: Fréchet distance (and KID, precision/recall, Vendi) between a folder of
generated images and a reference folder or statistics file, in any feature space.

    microdiff eval fid --gen samples/ --ref data/val/ --features inception
    microdiff eval fid --gen samples/ --ref coco-val.npz --features inception:pt_inception.pth
    microdiff eval fid --gen samples/ --ref data/val/ --features dinov2 --metrics fd,kid,pr,vendi --out fid.json
    microdiff eval fid --ref data/val/ --save-ref-stats val-dinov2.npz --features dinov2   # statistics only

Images are resized to the feature network's input size with clean-fid's float bicubic resize
(eval.images.clean_resize), or to ``--resolution``. The reference statistics (``mu``, ``sigma``:
pytorch-fid / clean-fid layout) record the feature space and resolution, and a score refuses to mix
them. Output: one line per metric with the image counts, and ``--out`` JSON with everything.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.argtypes import positive_int
from ..utils.files import output_file, stamp, write_text_atomic
from .features import check_finite, extract, quiet_hub_progress
from .images import image_batches, image_paths, none_readable, skipped_line

METRICS = ("fd", "kid", "pr", "vendi")
COMMAND = "eval fid"
DEFAULT_K = 3
MIN_IMAGES = 2  # a covariance (and KID's unbiased estimate) needs at least two images


def folder_features(folder: str | Path, features, resolution: int | None, batch_size: int, skip_bad: bool,
                    progress: bool, field: str = "--gen") -> tuple[np.ndarray, list[tuple[str, str]], list[Path]]:
    """Features (N, D) float64 of the readable images under ``folder`` (given as ``field``), the (path,
    reason) of the files --skip-bad left out, and the paths of the rows. Fewer than MIN_IMAGES readable
    images, or NaN/inf features, are one line naming the folder or file."""
    paths = image_paths(folder)
    skipped: list[tuple[str, str]] = []
    kept: list[Path] = []

    def batches():
        for indices, batch in image_batches(paths, resolution, batch_size, "skip" if skip_bad else "raise", skipped):
            kept.extend(paths[i] for i in indices)
            yield batch

    feats = extract(features, batches(), batch_size, progress, total=len(paths))
    if not len(feats):
        raise none_readable(f"{field} {folder}", len(paths), skipped)
    if len(feats) < MIN_IMAGES:
        left = f" ({len(skipped)} unreadable left out)" if skipped else ""
        raise ValueError(f"{field} {folder}: {len(feats)} readable image{'s' if len(feats) != 1 else ''}{left}; "
                         f"Fréchet statistics need at least {MIN_IMAGES} (thousands for a meaningful score); add images")
    check_finite(feats, [str(p) for p in kept], features.name)
    return feats, skipped, kept


def input_resolution(features, override: int | None) -> int | None:
    """The size images are resized to: ``--resolution``, else the feature network's own input size."""
    return override if override else getattr(features, "input_size", None)


def score(gen_feats: np.ndarray, reference, metrics: tuple[str, ...], k: int = DEFAULT_K) -> dict[str, Any]:
    from .frechet import frechet_distance, feature_statistics
    from .metrics import kernel_inception_distance, precision_recall, vendi_score

    out: dict[str, Any] = {}
    if "fd" in metrics:
        out["fd"] = frechet_distance(*feature_statistics(gen_feats), reference.mu, reference.sigma)
    needs_ref = [m for m in ("kid", "pr") if m in metrics]
    if needs_ref and reference.feats is None:
        raise ValueError(f"--metrics {','.join(needs_ref)} need the reference's features, which this statistics "
                         "file does not hold; pass the reference folder, or save stats with --keep-features")
    if "kid" in metrics:
        out["kid"], out["kid_std"] = kernel_inception_distance(gen_feats, reference.feats)
    if "pr" in metrics:
        out.update(precision_recall(gen_feats, reference.feats, k=k))
    if "vendi" in metrics:
        out["vendi"] = vendi_score(gen_feats)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gen", help="folder of generated images (omit to only write --save-ref-stats)")
    parser.add_argument("--ref", required=True, help="reference image folder, or a .npz with mu and sigma "
                        "(ours, pytorch-fid's or clean-fid's)")
    parser.add_argument("--features", default="inception",
                        help="inception[:WEIGHTS] | dinov2[:ID_OR_DIR] | clip[:ID_OR_DIR] | shapes[:RES] | "
                             "pixels[:SIZE] | package.module:callable (default inception)")
    parser.add_argument("--metrics", default=None, help=f"comma list of {', '.join(METRICS)} (default fd); needs "
                        "--gen")
    parser.add_argument("--resolution", type=positive_int, default=None,
                        help="resize every image to this size (default: the feature network's input size)")
    parser.add_argument("--save-ref-stats", default=None, metavar="FILE.npz",
                        help="write the reference statistics to this .npz (a file this command wrote is replaced, "
                             "any other is refused)")
    parser.add_argument("--keep-features", action="store_true",
                        help="store the raw reference features in --save-ref-stats (for kid / pr later)")
    parser.add_argument("--k", type=positive_int, default=None,
                        help=f"neighbours for precision/recall (default {DEFAULT_K}); needs --metrics with pr")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-bad", action="store_true", help="leave unreadable images out (listed in the summary "
                        "and in --out)")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON here (a file "
                        "this command wrote is replaced, any other is refused)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """``microdiff eval fid``: bad input ends with a one-line error and exit status 2."""
    from .errors import run_reporting

    return run_reporting(COMMAND, _run, args)


def _ours_json(path: Path) -> bool:
    """A JSON report this command wrote (its stamp), whatever the file is called."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("written_by") == stamp(COMMAND)["written_by"]


def check_options(args: argparse.Namespace) -> tuple[tuple[str, ...], int]:
    """The metrics and k, or one line for an option that would be ignored or a file that must not be
    overwritten (checked before any image is read)."""
    metrics = tuple(m.strip() for m in (args.metrics or "fd").split(",") if m.strip())
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"--metrics {','.join(unknown) or repr(args.metrics)}: unknown; choose from {', '.join(METRICS)}")
    if args.gen is None and args.save_ref_stats is None:
        raise ValueError("give --gen (images to score) or --save-ref-stats (statistics only)")
    if args.gen is None and args.metrics is not None:
        raise ValueError("--metrics: scores need --gen images; leave --metrics out to only write --save-ref-stats")
    if args.keep_features and args.save_ref_stats is None:
        raise ValueError("--keep-features: applies to --save-ref-stats only (the reference features kept in the "
                         "file); pass --save-ref-stats FILE.npz, or leave --keep-features out")
    if args.k is not None and "pr" not in metrics:
        raise ValueError(f"--k {args.k}: applies to precision/recall only; add pr to --metrics, or leave --k out")
    if args.save_ref_stats is not None:
        if Path(args.save_ref_stats).suffix != ".npz":
            raise ValueError(f"--save-ref-stats {args.save_ref_stats}: name it FILE.npz (the pytorch-fid / clean-fid "
                             "layout)")
        output_file(args.save_ref_stats, "--save-ref-stats", COMMAND)
    if args.out is not None:
        if args.save_ref_stats is not None and Path(args.out).resolve() == Path(args.save_ref_stats).resolve():
            raise ValueError(f"--out {args.out}: the same file as --save-ref-stats; pass another --out FILE.json")
        output_file(args.out, "--out", COMMAND, ours=_ours_json)
    return metrics, args.k or DEFAULT_K


def _check_result(result: dict[str, Any], metrics: tuple[str, ...], args: argparse.Namespace) -> None:
    """A metric that came out NaN or infinite is refused (never printed as a score)."""
    for key in ("fd", "kid", "kid_std", "precision", "recall", "vendi"):
        value = result.get(key)
        if value is not None and not math.isfinite(float(value)):
            raise ValueError(f"--gen {args.gen}: {key} came out {value} against --ref {args.ref} ({result['features']} "
                             "features); the features or statistics are degenerate, check both inputs")


def _run(args: argparse.Namespace) -> int:
    from ..utils.devices import resolve_device
    from .features import load_features
    from .stats import Statistics, check_compatible, load_statistics, save_statistics

    metrics, k = check_options(args)
    if args.quiet:
        quiet_hub_progress()
    features = load_features(args.features, device=resolve_device(args.device))
    resolution = input_resolution(features, args.resolution)
    progress = not args.quiet
    result: dict[str, Any] = {**stamp(COMMAND), "features": features.name, "resolution": resolution, "notes": []}
    ref_path = Path(args.ref)
    if ref_path.is_file() and ref_path.suffix != ".npz":
        raise ValueError(f"--ref {ref_path}: a file but not a .npz statistics file; pass a reference image folder or "
                         "the FILE.npz that --save-ref-stats wrote")
    if ref_path.suffix == ".npz":
        reference = load_statistics(ref_path)
        result["ref_skipped"] = []
    else:
        feats, skipped, _ = folder_features(ref_path, features, resolution, args.batch_size, args.skip_bad, progress,
                                            "--ref")
        reference = Statistics.of(feats, features.name, resolution, keep_features=True)
        result["ref_skipped"] = skipped
    result["ref_count"] = reference.count
    if args.gen is not None:
        gen_feats, skipped, kept = folder_features(args.gen, features, resolution, args.batch_size, args.skip_bad,
                                                   progress, "--gen")
        generated = Statistics.of(gen_feats, features.name, resolution)
        result["notes"] += check_compatible(reference, generated, str(ref_path))
        _check_sizes(metrics, k, gen_feats, reference, kept, args)
        result.update(gen_count=len(gen_feats), gen_skipped=skipped, **score(gen_feats, reference, metrics, k))
        if "pr" in metrics:
            result["k"] = k
        _check_result(result, metrics, args)
    if args.save_ref_stats:
        kept_feats = reference.feats if args.keep_features else None
        save_statistics(args.save_ref_stats, Statistics(reference.mu, reference.sigma, reference.features,
                                                        reference.count, reference.resolution, kept_feats))
        result["ref_stats"] = str(args.save_ref_stats)
    print(summary_lines(result))
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=1, default=float))
    return 0


def _check_sizes(metrics, k, gen_feats, reference, kept, args) -> None:
    """Options that cannot work on these sets, named before a metric fails with a message about arrays."""
    if "pr" in metrics:
        for field, folder, count in (("--gen", args.gen, len(gen_feats)), ("--ref", args.ref, len(reference.feats))):
            if count <= k:
                raise ValueError(f"--k {k}: precision/recall needs more than k images on each side, and {field} "
                                 f"{folder} has {count}; pass a smaller --k or more images")
    if "vendi" in metrics:
        zero = np.flatnonzero(np.abs(gen_feats).max(axis=1) == 0)
        if len(zero):
            raise ValueError(f"{kept[int(zero[0])]}: all-zero {reference.features or 'image'} features; Vendi's cosine "
                             "kernel needs non-zero features (an all-black image is zero under pixels features): "
                             "pass other --features or drop vendi from --metrics")


def summary_lines(result: dict[str, Any]) -> str:
    counts = f"{result.get('gen_count', 0)} generated vs {result.get('ref_count')} reference images"
    lines = []
    if "fd" in result:
        lines.append(f"FD ({result['features']}, {result['resolution'] or 'native'} px): {result['fd']:.4f}  [{counts}]")
    if "kid" in result:
        lines.append(f"KID: {result['kid']:.6f} +- {result['kid_std']:.6f}")
    if "precision" in result:
        lines.append(f"precision {result['precision']:.4f}, recall {result['recall']:.4f} (k={result.get('k')})")
    if "vendi" in result:
        lines.append(f"Vendi: {result['vendi']:.3f}")
    for key in ("gen_skipped", "ref_skipped"):
        if result.get(key):
            lines.append(skipped_line(result[key], f"{key.split('_')[0]}: "))
    if result.get("ref_stats"):
        lines.append(f"reference statistics written to {result['ref_stats']}")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


__all__ = ["folder_features", "score", "add_arguments", "run", "METRICS"]
