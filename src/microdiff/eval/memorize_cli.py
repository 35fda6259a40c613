"""``microdiff eval memorization``: does the model copy its training images? For every generated
image, its k most cosine-similar training images in a feature space (DINOv2 by default, as Ambient
Diffusion's memorisation study), a count of near-copies above each threshold, and pictures.

    microdiff eval memorization --gen samples/ --train data/images --features dinov2
    microdiff eval memorization --gen samples/ --train shapes:2000 --features dinov2 --resolution 32 --out runs/mem
    microdiff eval memorization --gen samples/ --train data/images --save-train-features train-dino.npz
    microdiff eval memorization --gen samples2/ --train train-dino.npz            # the training set featurised once
    torchrun --nproc_per_node 8 -m microdiff eval memorization --gen samples/ --train data/images --out runs/mem

``--train`` is any map-style source the trainer reads (image folder, manifest, ``shapes:N``, ``hf:NAME``;
built by ``data.sources.build_dataset`` at ``--resolution``), so training index i here is the
trainer's sample i; or a features file written by ``--save-train-features`` (``.npz``: ``feats`` plus
the feature space ``features``, ``resolution``, ``source`` and the dataset ``index`` of each row), or a
plain ``.npy`` (N, D) array whose row i is training sample i.

Generated images go through the training transform (``ImageTransform(resolution)``: shorter side
resized to ``--resolution`` with PIL bicubic, centre crop), so a generated file that is a copy of a
training image gives bit-identical pixels and similarity exactly 1. ``--resolution`` defaults to the
shorter side of the first generated image. Both sets are then mapped to [0, 1] and featurised.

Output in ``--out``: memorization.json (counts / fractions / distinct training images above each
threshold, top-1 statistics, the closest pairs with file names, skipped files), top_k.csv (gen,
rank, train, similarity, gen_file, train_file), top1_hist.png and closest_pairs.png; and a
one-paragraph summary on stdout. ``gen`` indices count the readable generated files in sorted order.
``--out`` must be new, empty, or an earlier report of this command made with the same settings
(``settings_of``: it is computed again and replaced); a report made with other settings is refused in
one line listing what changed, and so is a folder holding anything else. Rank 0 locks the folder
(``.lock``) while it works. memorization.json is written last and stamped ``written_by``.

Bad input: generated files are read through eval.images (the one reader of every eval command: an
unreadable file is the same one line as in eval fid, and ``--skip-bad`` leaves it out and lists it);
NaN/inf or all-zero features name the image (or the features file and row).

Many processes (torchrun): both sets are cut into whole ``--batch-size`` batches and each rank
featurises a contiguous run of them (``shard_range`` over batches), so every image is featurised in
the same batch as in one process; ``distributed_top_k`` then merges exactly. Rank 0 fetches the few
images closest_pairs.png shows by index and writes everything. The result equals one process's
bit for bit (on the same kind of device).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.sources import DataSpec, build_dataset, skip_totals
from ..utils.errors import debug_enabled
from .errors import USER_ERRORS, first_line as _first_line, report_error
from ..utils.argtypes import Parser, non_negative_int, positive_int
from ..utils.files import WRITTEN_BY, output_file, output_folder, stamp, write_text_atomic, written_by
from ..utils.locks import FolderLock
from .features import check_finite, quiet_hub_progress, spec_of
from .images import UnreadableImage, none_readable, open_checked, skipped_line
from .memorization import THRESHOLDS, memorization_report, save_report, shard_range

FEATURE_FILE_SUFFIXES = (".npy", ".npz")
COMMAND = "eval memorization"
REPORT_FILES = ("memorization.json", "top_k.csv", "top1_hist.png", "closest_pairs.png")  # the json first
LOCK_NAME = ".lock"
DESCRIPTION = ("Does the model copy its training images? For every generated image, its k most cosine-similar "
               "training images in a feature space (DINOv2 by default), counts of near-copies above thresholds, "
               "a histogram and the closest pairs side by side.")
ERRORS = USER_ERRORS
EXAMPLES = ["microdiff eval memorization --gen samples/ --train data/images --features dinov2",
            "microdiff eval memorization --gen samples/ --train shapes:2000 --resolution 32 --features dinov2 "
            "--save-train-features shapes-dino.npz",
            "microdiff eval memorization --gen samples/ --train shapes-dino.npz --thresholds 0.97,0.95 --out runs/mem",
            "torchrun --nproc_per_node 4 -m microdiff eval memorization --gen samples/ --train data/images"]


# ----------------------------------------------------------------------------- arguments
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gen", required=True, help="folder of generated images (searched recursively)")
    parser.add_argument("--train", required=True,
                        help="training source as the trainer reads it (image folder, manifest, image shards, "
                             "shapes:N, hf:NAME) or "
                             "a features file (.npz from --save-train-features, or an (N, D) .npy)")
    parser.add_argument("--features", default="dinov2",
                        help="dinov2[:ID_OR_DIR] | clip[:ID_OR_DIR] | inception[:WEIGHTS] | shapes[:RES] | "
                             "pixels[:SIZE] | package.module:callable (default dinov2, i.e. facebook/dinov2-large)")
    parser.add_argument("--k", type=positive_int, default=5, help="nearest training images kept per generated image (default 5)")
    parser.add_argument("--thresholds", default=",".join(f"{t:g}" for t in THRESHOLDS),
                        help="comma list of top-1 cosine similarities counted as (near-)copies (default 0.95,0.9,0.85)")
    parser.add_argument("--resolution", type=positive_int, default=None,
                        help="side both image sets are brought to, as training does (default: the shorter side of "
                             "the first generated image, or the resolution recorded in a features file)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per feature batch (default 64)")
    parser.add_argument("--out", default="memorization",
                        help="report folder (default ./memorization): new, empty, or an earlier report of this "
                             "command with the same settings (replaced); other settings or files are refused")
    parser.add_argument("--pairs", type=non_negative_int, default=24,
                        help="closest pairs shown in closest_pairs.png (0: none)")
    parser.add_argument("--save-train-features", default=None, metavar="FILE.npz",
                        help="also write the training features here, to pass as --train next time (a file this "
                             "command wrote is replaced, any other is refused)")
    parser.add_argument("--train-seed", type=non_negative_int, default=None,
                        help="data.seed of the training config, for --train shapes:N (it sets their content; "
                             "default 0)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave unreadable images out (listed in memorization.json) instead of stopping")
    parser.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader workers reading images (default 0)")
    parser.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if there is CUDA) | cpu | cuda[:N]")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or not all(-1.0 <= v <= 1.0 for v in values):
        raise ValueError(f"--thresholds {text!r}: write cosine similarities in [-1, 1] separated by commas, e.g. "
                         "0.95,0.9,0.85")
    return values


def _check_args(args: argparse.Namespace) -> list[float]:
    """The thresholds, or one line for an option that would be ignored or a file that must not be replaced."""
    is_file = Path(args.train).suffix.lower() in FEATURE_FILE_SUFFIXES
    if args.train_seed is not None and (is_file or not str(args.train).startswith("shapes:")):
        what = "a features file, which records the seed it was made with" if is_file else "not a shapes:N source"
        raise ValueError(f"--train-seed: applies to --train shapes:N only (it sets their content), and --train "
                         f"{args.train} is {what}; leave --train-seed out")
    out = Path(args.out).expanduser().resolve()
    for flag in ("--gen", "--train"):
        folder = Path(getattr(args, flag[2:])).expanduser()
        if folder.is_dir() and (out == folder.resolve() or folder.resolve() in out.parents):
            raise ValueError(f"--out {args.out}: inside {flag} {folder}, whose images are read recursively, so the "
                             f"report's PNGs would count as {flag[2:]} images next time; pass --out outside it")
    if args.save_train_features is not None:
        if is_file:
            raise ValueError(f"--save-train-features: --train {args.train} is already a features file; pass the "
                             "training source (image folder, manifest, shapes:N) to featurise it")
        if Path(args.save_train_features).suffix.lower() != ".npz":
            raise ValueError(f"--save-train-features {args.save_train_features}: name it FILE.npz (it records the "
                             "feature space and resolution beside the features)")
        output_file(args.save_train_features, "--save-train-features", COMMAND)
    return _thresholds(args.thresholds)


# ----------------------------------------------------------------------------- the report folder
def settings_of(args: argparse.Namespace, features_name: str, resolution: int, thresholds: list[float]) -> dict:
    """What a report depends on (REPORT_SETTINGS); a rerun into the same --out must ask the same."""
    def where(text: str) -> str:
        local = Path(text).expanduser()
        return str(local.resolve()) if local.exists() else str(text)

    return {"gen": where(args.gen), "train": where(args.train), "features": features_name, "resolution": resolution,
            "k": args.k, "thresholds": [float(t) for t in thresholds], "pairs": args.pairs,
            "train_seed": args.train_seed or 0, "skip_bad": bool(args.skip_bad)}


def check_report_folder(out: Path, settings: dict[str, Any]) -> None:
    """``--out`` must be new, empty, or this command's earlier report made with the same settings (it is
    then replaced by the same computation); a report with other settings or files of anyone else are
    refused in one line, before any work, and nothing is changed."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a folder; pass a folder for the report")
    if not out.is_dir():
        return
    entries = sorted(e.name for e in out.iterdir() if e.name != LOCK_NAME and not
                     (e.name.startswith(".") and e.name.endswith(".tmp")))
    foreign = [name for name in entries if name not in REPORT_FILES and not
               (name.endswith(".npz") and written_by(out / name) == stamp(COMMAND)[WRITTEN_BY])]
    report = out / REPORT_FILES[0]
    if not foreign and entries and not report.is_file() and not (out / LOCK_NAME).exists():
        foreign = entries  # report-like names, but no report and no lock of ours: not a killed run of ours
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ValueError(f"--out {out}: holds files that microdiff {COMMAND} did not write ({shown}); pass a new or "
                         "empty --out (nothing was changed)")
    if not report.is_file():
        return
    try:
        old = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        old = None
    if not isinstance(old, dict) or old.get(WRITTEN_BY) != stamp(COMMAND)[WRITTEN_BY]:
        raise ValueError(f"--out {out}: {report.name} was not written by this version of microdiff {COMMAND} (no "
                         "stamp); pass a new --out, or move the folder away (nothing was changed)")
    before = old.get("settings") or {}
    shown = lambda value: value if isinstance(value, str) else json.dumps(value)  # noqa: E731
    changed = [f"{key} {shown(before.get(key))} -> {shown(value)}" for key, value in settings.items()
               if before.get(key) != value]
    if changed:
        raise ValueError(f"--out {out} holds a report made with other settings ({'; '.join(changed)}); pass a new "
                         f"--out, or delete {out} to start over (nothing was changed)")


# ----------------------------------------------------------------------------- image sources
def _decode_as_training(path: Path):
    """A generated file decoded as the training datasets decode theirs (data.transforms.open_image: full
    decode, EXIF orientation), so a byte copy of a training image gives the same pixels."""
    from ..data.transforms import open_image

    return open_image(path)


class GeneratedImages(torch.utils.data.Dataset):
    """Generated image files through the training transform: (3, R, R) float32 in [-1, 1], or the
    :class:`~microdiff.eval.images.UnreadableImage` of a file that cannot be read (eval.images, the one
    reader of every eval command)."""

    def __init__(self, paths: list[Path], resolution: int):
        from ..data.transforms import ImageTransform

        self.paths, self.transform = paths, ImageTransform(resolution)

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int) -> torch.Tensor:
        """The image, or an UnreadableImage raised."""
        path = self.paths[index]
        return open_checked(path, lambda p: self.transform(_decode_as_training(p)))

    def __getitem__(self, index: int) -> torch.Tensor | UnreadableImage:
        try:
            return self._load(index)
        except UnreadableImage as err:
            return err


def _first_resolution(paths: list[Path]) -> int:
    """The shorter side of the first generated file that opens (the size the model generated at)."""
    for path in paths:
        try:
            return min(open_checked(path).size)
        except UnreadableImage:
            continue
    raise ValueError(f"{paths[0].parent}: none of its {len(paths)} images can be opened; check the folder")


def build_train_dataset(source: str, resolution: int, seed: int = 0):
    """The trainer's map-style dataset for ``source`` (``data.sources.build_dataset``: the same index, so
    training index i is sample i here), refused in one line when it holds latents or nothing usable."""
    return build_dataset(DataSpec(source=source, resolution=resolution, seed=seed), needs="images",
                         command="eval memorization --train", progress=False)


def train_skip_totals(source: str, dataset: Any, train_skipped: list):
    """The training set's skipped items by reason (a SkipReport): those its index left out (uncaptioned,
    ...) and the unreadable images featurising found (``(label, "reason (detail)")`` pairs, every rank's)."""
    later = [(label, str(reason).split(" (", 1)[0], "") for label, reason in train_skipped]
    return skip_totals(dataset, later, name=source)


def _image_of(record: Any, where: str) -> torch.Tensor:
    if isinstance(record, dict) and "latent" in record and "image" not in record:
        raise ValueError(f"{where} is a precomputed latent, not an image; pass the image source it was made from")
    image = record["image"] if isinstance(record, dict) else record
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        got = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
        raise ValueError(f"{where}: expected a (3, H, W) image in [-1, 1]; got {got}")
    return image


def _item_label(dataset: Any, index: int) -> str:
    entries = getattr(dataset, "entries", None)
    if entries is not None and 0 <= index < len(entries):
        return str(entries[index].label)
    return f"item {index}"


def _why_skipped(dataset: Any, index: int) -> tuple[str, str]:
    """(label, reason) of an item the training dataset returned None for."""
    skip = dataset.probe(index) if hasattr(dataset, "probe") else None
    if skip is not None:
        return skip.path, skip.reason + (f" ({skip.detail})" if skip.detail else "")
    return _item_label(dataset, index), "skipped by the dataset"


def _keep(items: list) -> list:
    return items


def featurise_shard(dataset: Any, features: Any, batch_size: int, info: Any, skip_bad: bool, workers: int,
                    progress: bool, what: str) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """This rank's part of ``dataset``: whole global batches [b*batch_size, (b+1)*batch_size) for b in
    ``shard_range(batches)``, so each image is featurised in the same batch as in one process.
    Returns (features (n, D) float64, dataset indices of the rows, skipped (label, reason))."""
    from tqdm.auto import tqdm

    from .features import Features

    n = len(dataset)
    first, last = shard_range(math.ceil(n / batch_size), info)
    batches = [list(range(b * batch_size, min((b + 1) * batch_size, n))) for b in range(first, last)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_keep)
    run = features.compute if isinstance(features, Features) else features
    rows, kept, skipped = [], [], []
    desc = f"{what} features" + (f" (rank {info.rank}/{info.world_size})" if info.distributed else "")
    with tqdm(total=sum(map(len, batches)), desc=desc, unit="img", disable=not progress or not info.is_main,
              dynamic_ncols=True) as bar:
        for indices, items in zip(batches, loader):
            images = []
            for i, item in zip(indices, items):
                if item is None or isinstance(item, UnreadableImage):
                    error = item if item is not None else UnreadableImage(*_why_skipped(dataset, i))
                    if not skip_bad:
                        raise error
                    skipped.append((error.path, error.reason))
                    continue
                images.append(_image_of(item, f"{what} item {i}"))
                kept.append(i)
            if images:
                out = run((torch.stack(images).float() + 1) / 2)
                rows.append(torch.as_tensor(out).detach().to("cpu", torch.float64))
            bar.update(len(indices))
    feats = torch.cat(rows).numpy() if rows else np.zeros((0, 0))
    _check_rows(feats, kept, dataset, what, getattr(features, "name", "features"))
    return feats, kept, skipped


def _check_rows(feats: np.ndarray, kept: list[int], dataset: Any, what: str, space: str = "features") -> None:
    """Cosine similarity needs finite, non-zero feature rows; say which image broke the rule."""
    if not len(feats):
        return
    labels = [str(dataset.paths[i]) if isinstance(dataset, GeneratedImages) else _item_label(dataset, i) for i in kept]
    check_finite(feats, labels, space)
    zero = np.flatnonzero(np.abs(feats).max(axis=1) == 0)
    if len(zero):
        raise ValueError(f"{labels[int(zero[0])]}: {what} image has all-zero {space} features; cosine similarity needs "
                         "non-zero features (an all-black image under pixels features is zero): use other --features")


# ----------------------------------------------------------------------------- features files
class FeatureFile:
    """A training-features file: ``feats`` (N, D) (a memmap for .npy), the dataset ``index`` of each
    row, and what .npz files record: feature space ``name``, ``resolution``, ``source``, ``seed``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"--train {self.path}: no such features file; write one with "
                                    "--save-train-features FILE.npz, or pass the training source")
        self.name = self.resolution = self.source = None
        self.seed, self.skipped = 0, []
        try:
            if self.path.suffix.lower() == ".npy":
                self.feats = np.load(self.path, mmap_mode="r", allow_pickle=False)
                self.index = np.arange(len(self.feats), dtype=np.int64) if self.feats.ndim == 2 else None
            else:
                with np.load(self.path, allow_pickle=False) as z:
                    arrays = {key: z[key] for key in z.files}
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"--train {self.path}: not a readable numpy features file ({_first_line(err)})") from None
        if self.path.suffix.lower() == ".npz":
            if "feats" not in arrays:
                raise ValueError(f"--train {self.path}: no 'feats' array (it holds {', '.join(arrays) or 'nothing'}); "
                                 "write the file with --save-train-features")
            self.feats = arrays["feats"]
            self.index = arrays["index"].astype(np.int64) if "index" in arrays else np.arange(len(self.feats))
            self.name = str(arrays["features"]) if "features" in arrays else None
            self.resolution = int(arrays["resolution"]) if "resolution" in arrays else None
            self.source = str(arrays["source"]) if "source" in arrays else None
            self.seed = int(arrays["seed"]) if "seed" in arrays else 0
            self.skipped = json.loads(str(arrays["skipped"])) if "skipped" in arrays else []
        if self.feats.ndim != 2 or self.feats.shape[0] == 0 or self.feats.shape[1] == 0:
            raise ValueError(f"--train {self.path}: 'feats' must be (N, D) with one row per training image; got shape "
                             f"{tuple(self.feats.shape)}")
        if self.index is None or len(self.index) != len(self.feats):
            raise ValueError(f"--train {self.path}: 'index' must give one dataset index per row of 'feats'")

    def check_space(self, name: str, resolution: int | None) -> None:
        if self.name is not None and self.name != name:
            raise ValueError(f"--train {self.path} holds {self.name} features, --features gives {name}; pass "
                             f"--features {spec_of(self.name)} or recompute the file with --save-train-features")
        if self.resolution is not None and resolution is not None and self.resolution != resolution:
            raise ValueError(f"--train {self.path} was featurised at {self.resolution} px, --resolution is "
                             f"{resolution}; pass --resolution {self.resolution} or recompute the file")

    def check_finite(self, start: int, end: int, block: int = 65536) -> None:
        """Rows [start, end) (this rank's part) hold finite features, read a block at a time (a memmap)."""
        for first in range(start, end, block):
            rows = np.asarray(self.feats[first:min(first + block, end)])
            bad = ~np.isfinite(rows).all(axis=1)
            if bad.any():
                row = first + int(np.flatnonzero(bad)[0])
                raise ValueError(f"--train {self.path}: row {row} holds NaN or infinite features ({int(bad.sum())} such "
                                 f"rows in {first}..{first + len(rows) - 1}); recompute the file with "
                                 "--save-train-features from the training source")
            zero = np.abs(rows).max(axis=1) == 0
            if zero.any():
                row = first + int(np.flatnonzero(zero)[0])
                raise ValueError(f"--train {self.path}: row {row} is all zeros; cosine similarity needs non-zero "
                                 "features: recompute the file with other --features")

    def check_dim(self, dim: int, name: str) -> None:
        if self.feats.shape[1] != dim:
            space = f"{self.name} " if self.name else ""
            raise ValueError(f"--train {self.path} holds D={self.feats.shape[1]} {space}features, --features {name} "
                             f"gives D={dim}; pass the feature space the file was made with or recompute it with "
                             "--save-train-features")


def save_train_features(path: str | Path, feats: np.ndarray, index: np.ndarray, name: str, resolution: int,
                        source: str, seed: int, skipped: list) -> None:
    """Write the training features (float32 when that is lossless, else float64) and what they are."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    narrow = feats.astype(np.float32)
    feats = narrow if np.array_equal(narrow.astype(np.float64), feats) else feats
    local = Path(source).expanduser()
    source = str(local.resolve()) if local.exists() else source
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, feats=feats, index=np.asarray(index, dtype=np.int64), features=np.array(name),
             resolution=np.array(resolution), source=np.array(source), seed=np.array(seed),
             skipped=np.array(json.dumps(skipped)), **{WRITTEN_BY: np.array(stamp(COMMAND)[WRITTEN_BY])})
    tmp.replace(path)


# ----------------------------------------------------------------------------- running
def run(args: argparse.Namespace) -> int:
    """``microdiff eval memorization``: bad input ends with a one-line error and exit status 2
    (printed by rank 0; every rank returns the same status)."""
    from ..train.distributed import setup_distributed, teardown

    try:
        info = setup_distributed(args.device, "auto", field="--device")
    except ERRORS as err:
        if _debug(args):
            raise
        return report_error("eval memorization", _first_line(err))
    try:
        return _run(args, info)
    except ERRORS as err:
        if _debug(args):
            raise
        if info.is_main:
            report_error("eval memorization", _first_line(err))
        return 2
    finally:
        teardown(info)


def _debug(args: argparse.Namespace) -> bool:
    """--debug / MICRODIFF_DEBUG=1: the traceback instead of the one line."""
    return bool(getattr(args, "debug", False)) or debug_enabled()


def _agree(info: Any, mine: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``mine``; if any rank failed, raise its error on all of them (nobody waits forever)."""
    from ..train.distributed import gather_objects

    everyone = gather_objects(mine, info)
    errors = [m["error"] for m in everyone if m.get("error")]
    if errors:
        raise ValueError(errors[0])
    return everyone


def _run(args: argparse.Namespace, info: Any) -> int:
    with contextlib.ExitStack() as held:  # rank 0's lock on --out, held until the report is written
        return _search_and_report(args, info, held)


def _search_and_report(args: argparse.Namespace, info: Any, held: contextlib.ExitStack) -> int:
    from .features import load_features
    from .images import image_paths

    progress = not args.quiet
    local: dict[str, Any] = {"error": None}
    train_file = dataset = None
    try:
        thresholds = _check_args(args)
        gen_paths = image_paths(args.gen)
        if Path(args.train).suffix.lower() in FEATURE_FILE_SUFFIXES:
            train_file = FeatureFile(args.train)
        resolution = args.resolution or (train_file.resolution if train_file else None) or _first_resolution(gen_paths)
        if args.quiet:
            quiet_hub_progress()
        features = load_features(args.features, device=info.device)
        if train_file is not None:
            train_file.check_space(features.name, resolution)
            if features.dim is not None:
                train_file.check_dim(features.dim, features.name)
        settings = settings_of(args, features.name, resolution, thresholds)
        check_report_folder(Path(args.out), settings)  # every rank reads; rank 0 then locks and checks again
        if train_file is None:
            dataset = build_train_dataset(args.train, resolution, args.train_seed or 0)
        n_train = len(dataset) if dataset is not None else len(train_file.feats)
        if n_train < args.k:
            raise ValueError(f"--k {args.k}: the training set holds {n_train} image(s); pass --k {n_train} or less")
        if info.is_main:
            output_folder(args.out, "--out")
            held.enter_context(FolderLock(args.out, LOCK_NAME, f"microdiff {COMMAND}"))
            check_report_folder(Path(args.out), settings)
        generated = GeneratedImages(gen_paths, resolution)
        gen_feats, gen_kept, gen_skipped = featurise_shard(generated, features, args.batch_size, info, args.skip_bad,
                                                           args.workers, progress, "generated")
        if dataset is not None:
            bank, bank_index, train_skipped = featurise_shard(dataset, features, args.batch_size, info, args.skip_bad,
                                                              args.workers, progress, "training")
        else:
            start, end = shard_range(len(train_file.feats), info)
            train_file.check_finite(start, end)
            bank, bank_index, train_skipped = train_file.feats[start:end], train_file.index[start:end], []
        local.update(gen_rows=len(gen_kept), gen_kept=gen_kept, gen_skipped=gen_skipped, bank_rows=len(bank),
                     bank_index=list(map(int, bank_index)) if dataset is not None else None,
                     train_skipped=train_skipped, dim=gen_feats.shape[1] if len(gen_feats) else None)
    except ERRORS as err:
        if _debug(args) and not info.distributed:
            raise
        local["error"] = _first_line(err)
    everyone = _agree(info, local)

    # what every rank now knows alike
    gen_kept = [i for m in everyone for i in m["gen_kept"]]
    gen_skipped = [tuple(s) for m in everyone for s in m["gen_skipped"]]
    if not gen_kept:
        raise none_readable(f"--gen {args.gen}", len(gen_paths), gen_skipped)
    dim = next(m["dim"] for m in everyone if m["dim"] is not None)
    if dataset is not None:
        index_of_row = np.array([i for m in everyone for i in m["bank_index"]], dtype=np.int64)
        train_skipped = [tuple(s) for m in everyone for s in m["train_skipped"]]
        if not len(index_of_row):
            raise none_readable(f"--train {args.train}", len(dataset), train_skipped)
    else:
        train_file.check_dim(dim, features.name)
        index_of_row, train_skipped = train_file.index, [tuple(s) for s in train_file.skipped]
    if not len(gen_feats):
        gen_feats = np.zeros((0, dim))
    if not len(bank):
        bank = np.zeros((0, dim))
    offset = sum(m["bank_rows"] for m in everyone[:info.rank])

    from .memorization import distributed_top_k

    sims, rows = distributed_top_k(gen_feats, bank, offset, args.k, info, queries_sharded=True)
    sims, rows = sims.cpu().numpy(), rows.cpu().numpy()
    train_index = index_of_row[rows]

    if args.save_train_features:  # every rank's rows, to rank 0 (a collective: all ranks take part)
        from ..train.distributed import gather_objects

        parts = gather_objects(np.asarray(bank), info)
    status: dict[str, Any] = {"error": None}
    if info.is_main:
        try:
            if args.save_train_features:
                save_train_features(args.save_train_features, np.concatenate(parts), index_of_row, features.name,
                                    resolution, args.train, args.train_seed or 0, [list(s) for s in train_skipped])
            report, paths = _write_report(args, thresholds, features.name, resolution, gen_paths, gen_kept,
                                          gen_skipped, sims, train_index, index_of_row, train_skipped, dataset,
                                          train_file, settings)
            print(summary(report, paths))
        except ERRORS as err:
            if _debug(args) and not info.distributed:
                raise
            status["error"] = _first_line(err)
    _agree(info, status)
    return 0


def _write_report(args, thresholds, feature_name, resolution, gen_paths, gen_kept, gen_skipped, sims, train_index,
                  index_of_row, train_skipped, dataset, train_file, settings) -> tuple[dict[str, Any], dict[str, Path]]:
    notes = []
    report = memorization_report(sims, train_index, thresholds, n_closest=args.pairs)
    if dataset is None and args.pairs:  # images of a features file: rebuild its source, if it can be read here
        source = train_file.source
        try:
            if source is None:
                raise ValueError(f"{train_file.path} does not record its source")
            dataset = build_train_dataset(source, resolution, train_file.seed)
        except ERRORS as err:
            notes.append(f"closest_pairs.png not drawn: the training images cannot be read ({_first_line(err)})")
    if dataset is not None:
        totals = train_skip_totals(str(args.train), dataset, train_skipped)
        if totals.total:
            notes.append(f"training set {totals.summary()}")
    gen_images = train_images = None
    if dataset is not None and args.pairs:
        generated = GeneratedImages(gen_paths, resolution)
        gen_images = {p["gen"]: generated._load(gen_kept[p["gen"]]) for p in report["closest_pairs"]}
        train_images = {p["train"]: dataset[p["train"]] for p in report["closest_pairs"]}
    for pair in report["closest_pairs"]:
        pair["gen_file"] = str(gen_paths[gen_kept[pair["gen"]]])
        record = train_images.get(pair["train"]) if train_images else None
        if isinstance(record, dict) and "key" in record:
            pair["train_key"] = str(record["key"])
    full = {**stamp(COMMAND), "settings": settings, "gen_folder": str(args.gen), "train_source": str(args.train),
            "features": feature_name,
            "resolution": resolution, "n_train": int(len(index_of_row)), **report,
            "gen_skipped": [list(s) for s in gen_skipped], "train_skipped": [list(s) for s in train_skipped],
            "notes": notes}
    paths = save_report(args.out, full, (sims, train_index), gen_images, train_images, args.pairs,
                        value_range=(-1.0, 1.0))
    _add_file_columns(paths["csv"], [str(gen_paths[i]) for i in gen_kept], dataset)
    return full, paths


def _add_file_columns(csv_path: Path, gen_files: list[str], dataset: Any) -> None:
    """top_k.csv with gen_file (and train_file, where the dataset knows its files) appended."""
    with csv_path.open(newline="") as f:
        rows = list(csv.reader(f))
    entries = getattr(dataset, "entries", None)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(rows[0] + ["gen_file", "train_file"])
    for row in rows[1:]:
        t = int(row[2])
        writer.writerow(row + [gen_files[int(row[0])], entries[t].label if entries is not None else ""])
    write_text_atomic(csv_path, text.getvalue())


def summary(report: dict[str, Any], paths: dict[str, Path]) -> str:
    """One paragraph: how many generated images are near-copies at each threshold, and the median top-1."""
    n = report["n_generated"]
    counts = "; ".join(f">= {t['threshold']:g}: {t['count']} ({100 * t['fraction']:.1f}%, copying "
                       f"{t['distinct_train']} distinct training image{'s' if t['distinct_train'] != 1 else ''})"
                       for t in report["thresholds"])
    skipped = [skipped_line(report[key], f"{what}: ")
               for key, what in (("gen_skipped", "generated"), ("train_skipped", "training")) if report[key]]
    text = (f"Memorization: {n} generated image{'s' if n != 1 else ''} from {report['gen_folder']} against "
            f"{report['n_train']} training images ({report['train_source']}, {report['resolution']} px), "
            f"{report['features']} features, k={report['k']}. Generated images whose nearest training image has "
            f"cosine similarity {counts}. Top-1 similarity: median {report['top1_median']:.4f}, mean "
            f"{report['top1_mean']:.4f}, max {report['top1_max']:.4f}.")
    for line in skipped + report["notes"]:
        text += f" Note: {line}."
    folder = paths["json"].parent
    return text + f" Report in {folder}/: {', '.join(p.name for p in paths.values())}."


def main(argv: list[str] | None = None) -> int:
    """``python -m microdiff.eval.memorize_cli ...`` (what torchrun runs)."""
    parser = Parser(prog="microdiff eval memorization", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES))
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = ["add_arguments", "run", "main", "summary", "featurise_shard", "build_train_dataset", "GeneratedImages",
           "FeatureFile", "save_train_features", "EXAMPLES"]

if __name__ == "__main__":
    sys.exit(main())
