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
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("fd", "kid", "pr", "vendi")


def folder_features(folder: str | Path, features, resolution: int | None, batch_size: int, skip_bad: bool,
                    progress: bool) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Features (N, D) float64 of every image under ``folder`` and the (path, reason) of skipped files."""
    from .features import extract
    from .images import image_paths, iterate_images

    paths = image_paths(folder)
    skipped: list[tuple[str, str]] = []
    batches = iterate_images(paths, resolution, batch_size, "skip" if skip_bad else "raise", skipped)
    feats = extract(features, batches, batch_size, progress, total=len(paths))
    if not len(feats):
        raise ValueError(f"{folder}: none of its {len(paths)} images could be read (first: {skipped[0][0]}: "
                         f"{skipped[0][1]})")
    return feats, skipped


def input_resolution(features, override: int | None) -> int | None:
    """The size images are resized to: ``--resolution``, else the feature network's own input size."""
    return override if override else getattr(features, "input_size", None)


def score(gen_feats: np.ndarray, reference, metrics: tuple[str, ...], k: int = 3) -> dict[str, Any]:
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
    parser.add_argument("--ref", required=True, help="reference image folder, or a .npz with mu and sigma")
    parser.add_argument("--features", default="inception",
                        help="inception[:WEIGHTS] | dinov2[:ID_OR_DIR] | clip[:ID_OR_DIR] | shapes[:RES] | "
                             "pixels[:SIZE] | package.module:callable (default inception)")
    parser.add_argument("--metrics", default="fd", help=f"comma list of {', '.join(METRICS)} (default fd)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="resize every image to this size (default: the feature network's input size)")
    parser.add_argument("--save-ref-stats", default=None, help="write the reference statistics to this .npz")
    parser.add_argument("--keep-features", action="store_true",
                        help="store the raw reference features in --save-ref-stats (for kid / pr later)")
    parser.add_argument("--k", type=int, default=3, help="neighbours for precision/recall (default 3)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-bad", action="store_true", help="leave unreadable images out (listed in --out)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """``microdiff eval fid``: bad input ends with a one-line error and exit status 2."""
    from .errors import run_reporting

    return run_reporting("eval fid", _run, args)


def _run(args: argparse.Namespace) -> int:
    from ..utils.devices import resolve_device
    from .features import load_features
    from .stats import Statistics, check_compatible, load_statistics, save_statistics

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"--metrics {','.join(unknown)} unknown; choose from {', '.join(METRICS)}")
    if args.gen is None and args.save_ref_stats is None:
        raise ValueError("give --gen (images to score) or --save-ref-stats (statistics only)")
    features = load_features(args.features, device=resolve_device(args.device))
    resolution = input_resolution(features, args.resolution)
    progress = not args.quiet
    result: dict[str, Any] = {"features": features.name, "resolution": resolution, "notes": []}
    ref_path = Path(args.ref)
    if ref_path.suffix == ".npz":
        reference = load_statistics(ref_path)
        result["ref_skipped"] = []
    else:
        feats, skipped = folder_features(ref_path, features, resolution, args.batch_size, args.skip_bad, progress)
        reference = Statistics.of(feats, features.name, resolution, keep_features=True)
        result["ref_skipped"] = skipped
    result["ref_count"] = reference.count
    if args.save_ref_stats:
        kept = reference.feats if args.keep_features else None
        save_statistics(args.save_ref_stats, Statistics(reference.mu, reference.sigma, reference.features,
                                                        reference.count, reference.resolution, kept))
        result["ref_stats"] = str(args.save_ref_stats)
    if args.gen is not None:
        gen_feats, skipped = folder_features(args.gen, features, resolution, args.batch_size, args.skip_bad, progress)
        generated = Statistics.of(gen_feats, features.name, resolution)
        result["notes"] += check_compatible(reference, generated, str(ref_path))
        result.update(gen_count=len(gen_feats), gen_skipped=skipped, **score(gen_feats, reference, metrics, args.k))
    print(summary_lines(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=float))
    return 0


def summary_lines(result: dict[str, Any]) -> str:
    counts = f"{result.get('gen_count', 0)} generated vs {result.get('ref_count')} reference images"
    lines = []
    if "fd" in result:
        lines.append(f"FD ({result['features']}, {result['resolution'] or 'native'} px): {result['fd']:.4f}  [{counts}]")
    if "kid" in result:
        lines.append(f"KID: {result['kid']:.6f} +- {result['kid_std']:.6f}")
    if "precision" in result:
        lines.append(f"precision {result['precision']:.4f}, recall {result['recall']:.4f}")
    if "vendi" in result:
        lines.append(f"Vendi: {result['vendi']:.3f}")
    for key in ("gen_skipped", "ref_skipped"):
        if result.get(key):
            lines.append(f"{key.split('_')[0]}: {len(result[key])} unreadable image(s) left out, first "
                         f"{result[key][0][0]} ({result[key][0][1]})")
    if result.get("ref_stats"):
        lines.append(f"reference statistics written to {result['ref_stats']}")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


__all__ = ["folder_features", "score", "add_arguments", "run", "METRICS"]
