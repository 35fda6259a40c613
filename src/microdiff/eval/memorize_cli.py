"""``microdiff eval memorization``: does the model copy its training images? For every generated
image, its k most cosine-similar training images in a feature space (DINOv2 by default, as Ambient
Diffusion's memorisation study), a count of near-copies above each threshold, and pictures.

    microdiff eval memorization --gen samples/ --train data/images --features dinov2
    microdiff eval memorization --gen samples/ --train shapes:2000 --features dinov2 --resolution 32 --out runs/mem
    microdiff eval memorization --gen samples/ --train data/images --save-train-features train-dino.npz
    microdiff eval memorization --gen samples2/ --train train-dino.npz            # the training set featurised once
    torchrun --nproc_per_node 8 -m microdiff.eval.memorize_cli --gen samples/ --train data/images --out runs/mem

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

Many processes (torchrun): both sets are cut into whole ``--batch-size`` batches and each rank
featurises a contiguous run of them (``shard_range`` over batches), so every image is featurised in
the same batch as in one process; ``distributed_top_k`` then merges exactly. Rank 0 fetches the few
images closest_pairs.png shows by index and writes everything. The result equals one process's
bit for bit (on the same kind of device).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.sources import DataSpec, build_dataset, skip_totals
from .errors import USER_ERRORS, first_line as _first_line, report_error
from .memorization import THRESHOLDS, memorization_report, save_report, shard_range

FEATURE_FILE_SUFFIXES = (".npy", ".npz")
DESCRIPTION = ("Does the model copy its training images? For every generated image, its k most cosine-similar "
               "training images in a feature space (DINOv2 by default), counts of near-copies above thresholds, "
               "a histogram and the closest pairs side by side.")
ERRORS = USER_ERRORS
EXAMPLES = ["microdiff eval memorization --gen samples/ --train data/images --features dinov2",
            "microdiff eval memorization --gen samples/ --train shapes:2000 --resolution 32 --features dinov2 "
            "--save-train-features shapes-dino.npz",
            "microdiff eval memorization --gen samples/ --train shapes-dino.npz --thresholds 0.97,0.95 --out runs/mem",
            "torchrun --nproc_per_node 4 -m microdiff.eval.memorize_cli --gen samples/ --train data/images"]


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
    parser.add_argument("--k", type=int, default=5, help="nearest training images kept per generated image (default 5)")
    parser.add_argument("--thresholds", default=",".join(f"{t:g}" for t in THRESHOLDS),
                        help="comma list of top-1 cosine similarities counted as (near-)copies (default 0.95,0.9,0.85)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="side both image sets are brought to, as training does (default: the shorter side of "
                             "the first generated image, or the resolution recorded in a features file)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per feature batch (default 64)")
    parser.add_argument("--out", default="memorization", help="report folder (default ./memorization)")
    parser.add_argument("--pairs", type=int, default=24, help="closest pairs shown in closest_pairs.png (0: none)")
    parser.add_argument("--save-train-features", default=None, metavar="FILE.npz",
                        help="also write the training features here, to pass as --train next time")
    parser.add_argument("--train-seed", type=int, default=0, help="data.seed of the training config (shapes:N content)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave unreadable images out (listed in memorization.json) instead of stopping")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers reading images (default 0)")
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
    for name, minimum in (("k", 1), ("batch_size", 1), ("pairs", 0), ("workers", 0), ("train_seed", 0)):
        if getattr(args, name) < minimum:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a whole number >= {minimum}")
    if args.resolution is not None and args.resolution < 1:
        raise ValueError(f"--resolution {args.resolution}: must be a positive number of pixels")
    if args.save_train_features is not None:
        if Path(args.train).suffix.lower() in FEATURE_FILE_SUFFIXES:
            raise ValueError(f"--save-train-features: --train {args.train} is already a features file; pass the "
                             "training source (image folder, manifest, shapes:N) to featurise it")
        if Path(args.save_train_features).suffix.lower() != ".npz":
            raise ValueError(f"--save-train-features {args.save_train_features}: name it FILE.npz (it records the "
                             "feature space and resolution beside the features)")
    return _thresholds(args.thresholds)


# ----------------------------------------------------------------------------- image sources
class GeneratedImages(torch.utils.data.Dataset):
    """Generated image files through the training transform: (3, R, R) float32 in [-1, 1], or None
    for a file that cannot be read (``probe`` says why)."""

    def __init__(self, paths: list[Path], resolution: int):
        from ..data.transforms import ImageTransform

        self.paths, self.transform = paths, ImageTransform(resolution)

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int) -> torch.Tensor:
        from ..data.transforms import open_image

        return self.transform(open_image(self.paths[index]))

    def __getitem__(self, index: int) -> torch.Tensor | None:
        from ..data.transforms import ImageError

        try:
            return self._load(index)
        except ImageError:
            return None

    def probe(self, index: int) -> tuple[str, str]:
        from ..data.transforms import ImageError

        try:
            self._load(index)
        except ImageError as err:
            return str(self.paths[index]), f"{err.reason} ({err.detail})"
        return str(self.paths[index]), "unreadable"


def _first_resolution(paths: list[Path]) -> int:
    """The shorter side of the first generated file that opens (the size the model generated at)."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as image:
                return min(image.size)
        except (OSError, ValueError, SyntaxError):
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
    """(label, reason) of an item the dataset returned None for."""
    if isinstance(dataset, GeneratedImages):
        return dataset.probe(index)
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
                if item is None:
                    label, reason = _why_skipped(dataset, i)
                    if not skip_bad:
                        raise ValueError(f"{label}: unreadable {what} image, {reason}; remove it or pass --skip-bad "
                                         "to leave unreadable images out (they are listed in memorization.json)")
                    skipped.append((label, reason))
                    continue
                images.append(_image_of(item, f"{what} item {i}"))
                kept.append(i)
            if images:
                out = run((torch.stack(images).float() + 1) / 2)
                rows.append(torch.as_tensor(out).detach().to("cpu", torch.float64))
            bar.update(len(indices))
    feats = torch.cat(rows).numpy() if rows else np.zeros((0, 0))
    _check_rows(feats, kept, dataset, what)
    return feats, kept, skipped


def _check_rows(feats: np.ndarray, kept: list[int], dataset: Any, what: str) -> None:
    """Cosine similarity needs finite, non-zero feature rows; say which image broke the rule."""
    if not len(feats):
        return
    bad = ~np.isfinite(feats).all(axis=1)
    zero = ~bad & (np.abs(feats).max(axis=1) == 0)
    for mask, problem in ((bad, "NaN or infinite features"), (zero, "all-zero features")):
        if mask.any():
            i = kept[int(np.flatnonzero(mask)[0])]
            label = dataset.paths[i] if isinstance(dataset, GeneratedImages) else _item_label(dataset, i)
            raise ValueError(f"{label}: {what} image has {problem}; cosine similarity needs finite non-zero "
                             "features (an all-black image under pixels features is zero): use other --features")


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
                             f"--features {self.name} or recompute the file with --save-train-features")
        if self.resolution is not None and resolution is not None and self.resolution != resolution:
            raise ValueError(f"--train {self.path} was featurised at {self.resolution} px, --resolution is "
                             f"{resolution}; pass --resolution {self.resolution} or recompute the file")

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
             skipped=np.array(json.dumps(skipped)))
    tmp.replace(path)


# ----------------------------------------------------------------------------- running
def run(args: argparse.Namespace) -> int:
    """``microdiff eval memorization``: bad input ends with a one-line error and exit status 2
    (printed by rank 0; every rank returns the same status)."""
    from ..train.distributed import setup_distributed, teardown

    try:
        info = setup_distributed(args.device, "auto", field="--device")
    except ERRORS as err:
        return report_error("eval memorization", _first_line(err))
    try:
        return _run(args, info)
    except ERRORS as err:
        if info.is_main:
            report_error("eval memorization", _first_line(err))
        return 2
    finally:
        teardown(info)


def _agree(info: Any, mine: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``mine``; if any rank failed, raise its error on all of them (nobody waits forever)."""
    from ..train.distributed import gather_objects

    everyone = gather_objects(mine, info)
    errors = [m["error"] for m in everyone if m.get("error")]
    if errors:
        raise ValueError(errors[0])
    return everyone


def _run(args: argparse.Namespace, info: Any) -> int:
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
        features = load_features(args.features, device=info.device)
        if train_file is not None:
            train_file.check_space(features.name, resolution)
            if features.dim is not None:
                train_file.check_dim(features.dim, features.name)
        else:
            dataset = build_train_dataset(args.train, resolution, args.train_seed)
        n_train = len(dataset) if dataset is not None else len(train_file.feats)
        if n_train < args.k:
            raise ValueError(f"--k {args.k}: the training set holds {n_train} image(s); pass --k {n_train} or less")
        generated = GeneratedImages(gen_paths, resolution)
        gen_feats, gen_kept, gen_skipped = featurise_shard(generated, features, args.batch_size, info, args.skip_bad,
                                                           args.workers, progress, "generated")
        if dataset is not None:
            bank, bank_index, train_skipped = featurise_shard(dataset, features, args.batch_size, info, args.skip_bad,
                                                              args.workers, progress, "training")
        else:
            start, end = shard_range(len(train_file.feats), info)
            bank, bank_index, train_skipped = train_file.feats[start:end], train_file.index[start:end], []
        local.update(gen_rows=len(gen_kept), gen_kept=gen_kept, gen_skipped=gen_skipped, bank_rows=len(bank),
                     bank_index=list(map(int, bank_index)) if dataset is not None else None,
                     train_skipped=train_skipped, dim=gen_feats.shape[1] if len(gen_feats) else None)
    except ERRORS as err:
        local["error"] = _first_line(err)
    everyone = _agree(info, local)

    # what every rank now knows alike
    gen_kept = [i for m in everyone for i in m["gen_kept"]]
    gen_skipped = [tuple(s) for m in everyone for s in m["gen_skipped"]]
    if not gen_kept:
        raise ValueError(f"{args.gen}: none of its {len(gen_paths)} images could be read (first: "
                         f"{gen_skipped[0][0]}: {gen_skipped[0][1]})")
    dim = next(m["dim"] for m in everyone if m["dim"] is not None)
    if dataset is not None:
        index_of_row = np.array([i for m in everyone for i in m["bank_index"]], dtype=np.int64)
        train_skipped = [tuple(s) for m in everyone for s in m["train_skipped"]]
        if not len(index_of_row):
            raise ValueError(f"--train {args.train}: none of its {len(dataset)} images could be read (first: "
                             f"{train_skipped[0][0]}: {train_skipped[0][1]})")
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
                                    resolution, args.train, args.train_seed, [list(s) for s in train_skipped])
            report, paths = _write_report(args, thresholds, features.name, resolution, gen_paths, gen_kept,
                                          gen_skipped, sims, train_index, index_of_row, train_skipped, dataset,
                                          train_file)
            print(summary(report, paths))
        except ERRORS as err:
            status["error"] = _first_line(err)
    _agree(info, status)
    return 0


def _write_report(args, thresholds, feature_name, resolution, gen_paths, gen_kept, gen_skipped, sims, train_index,
                  index_of_row, train_skipped, dataset, train_file) -> tuple[dict[str, Any], dict[str, Path]]:
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
    full = {"gen_folder": str(args.gen), "train_source": str(args.train), "features": feature_name,
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
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(rows[0] + ["gen_file", "train_file"])
        for row in rows[1:]:
            t = int(row[2])
            writer.writerow(row + [gen_files[int(row[0])], entries[t].label if entries is not None else ""])


def summary(report: dict[str, Any], paths: dict[str, Path]) -> str:
    """One paragraph: how many generated images are near-copies at each threshold, and the median top-1."""
    n = report["n_generated"]
    counts = "; ".join(f">= {t['threshold']:g}: {t['count']} ({100 * t['fraction']:.1f}%, copying "
                       f"{t['distinct_train']} distinct training image{'s' if t['distinct_train'] != 1 else ''})"
                       for t in report["thresholds"])
    skipped = [f"{len(report[key])} unreadable {what} image(s) left out (first {report[key][0][0]})"
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
    parser = argparse.ArgumentParser(prog="microdiff eval memorization", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES))
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = ["add_arguments", "run", "main", "summary", "featurise_shard", "build_train_dataset", "GeneratedImages",
           "FeatureFile", "save_train_features", "EXAMPLES"]

if __name__ == "__main__":
    sys.exit(main())
