"""One home for "source string -> dataset": every command that reads data goes through here.

    spec = DataSpec(source="data/web", resolution=64, corruption=[[0.5, "noise:0.2"]], min_quality=0.5)
    dataset = build_dataset(spec)                       # map-style: len() and [i] -> record or None
    dataset = build_dataset(spec, needs="images", command="annotate")   # refuses latent sources

Source kinds (:func:`source_kind`) and what they hold:

    shapes:N          the built-in procedural dataset                        images (ShapesDataset)
    image folder      x.png + x.txt / x.json sidecars, recursively            images (ImageFolderDataset)
    manifest          .jsonl / .csv / .parquet rows: image path + caption     images (ManifestDataset)
    hf:NAME, a save_to_disk folder   a Hugging Face dataset                   images (HFImageDataset)
    image shards      webdataset tars of <key>.jpg + .txt + .json, e.g. what
                      `microdiff data download` writes (download.json), or a .tar file  images (ImageShardDataset)
    latent shards     a folder written by `microdiff data precompute` (dataset.json)   latents (streamed)
    mds:PATH[,PATH]   micro_diffusion's precomputed MDS latents               latents (MDSLatentDataset)

The spec's filters apply on top, in this order: ``corruption`` (image sources: every record corrupted
on the fly, seeded per key), ``cache``, ``min_quality`` (keep samples whose meta quality, absent = 1,
is at least this). Latent shard folders are streamed, not indexed: only ``train`` reads them (through
``train/data.py``); a command that needs images says so in one line for both latent kinds.

Items a dataset cannot use are reported in its ``report`` (a :class:`~.report.SkipReport`) and come
back as None from ``[i]``; ``data/skips.py`` replaces them deterministically where a full batch is
needed (training). A source with no usable item at all is an error naming it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from tqdm.auto import tqdm

from ..ambient.dataset import MIN_SIDE, CorruptedDataset, as_mixture
from ..utils.argtypes import non_negative_int as nonnegative_int, positive_int  # noqa: F401 - re-exported
from ..utils.errors import UserError
from .captioned import MANIFEST_SUFFIXES, _is_saved_hf_dataset, make_dataset
from .mds import MDSLatentDataset
from .report import SkipReport
from .shapes import ShapesDataset
from .skips import ReplaceSkipped, why_skipped
from .transforms import ImageTransform
from .webshards import ImageShardDataset, is_image_shards

IMAGE_KINDS = ("shapes", "folder", "manifest", "hf", "image-shards")
LATENT_KINDS = ("latent-shards", "mds")
SHARD_INFO = "dataset.json"  # data/shards.py INFO_NAME; read here without importing the stream's deps


# ----------------------------------------------------------------------------- the spec
@dataclass
class DataSpec:
    """What to read and how (the ``data:`` section of a training config; ``train.config.DataConfig``)."""

    source: str = "shapes:2000"  # shapes:N | image folder | manifest | hf:NAME | image/latent shard folder | mds:PATH
    resolution: int = 32  # image side in pixels (the latent side is resolution / autoencoder downsampling)
    vocabulary: dict = field(default_factory=dict)  # shapes:N only: e.g. {sizes: [large]}
    corruption: Any = None  # corruption mixture, e.g. [[0.9, 'noise:0.2']] (data/shapes.py; any image source)
    num_workers: int = 0
    pin_memory: Union[bool, None] = None  # page-locked batches for async host-to-GPU copies (null: on for CUDA)
    cache: bool = False  # map-style sources: keep decoded samples in memory after their first use
    shuffle_buffer: int = 1000  # latent shard folders only
    seed: int = 0  # data order (and shapes content, corruption draws, replacements of skipped items)
    min_quality: Union[float, None] = None  # map-style sources: keep samples whose meta quality >= this (absent = 1)
    caption_column: Union[str, None] = None  # manifests / HF datasets: the caption column (default: caption, text, ...)
    image_column: Union[str, None] = None  # manifests / HF datasets: the image path (or bytes) column

    def __post_init__(self) -> None:
        check_spec(self)


def check_spec(spec: DataSpec) -> None:
    """Range checks; a problem is a UserError ``"<field>: what is wrong; the fix"``."""
    if not isinstance(spec.source, str) or not spec.source.strip():
        raise UserError("source: empty; give shapes:N, an image folder, a manifest, hf:NAME, a shard folder or "
                        "mds:PATH")
    for name, low in (("resolution", 1), ("num_workers", 0), ("shuffle_buffer", 0), ("seed", 0)):
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{name}: must be an integer >= {low}, got {value!r}")
    if spec.min_quality is not None and not 0 <= spec.min_quality <= 1:
        raise UserError(f"min_quality: must be in [0, 1] (or null for no filter), got {spec.min_quality!r}")
    for name in ("caption_column", "image_column"):
        value = getattr(spec, name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise UserError(f"{name}: must be a column name (or null for the default), got {value!r}")
    if not isinstance(spec.vocabulary, dict):
        raise UserError(f"vocabulary: must be a mapping such as {{sizes: [large]}}, got {spec.vocabulary!r}")
    if spec.corruption is not None:
        try:
            as_mixture(spec.corruption, max(spec.resolution, MIN_SIDE))
        except (ValueError, TypeError, KeyError) as err:
            raise UserError(f"corruption: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


# ----------------------------------------------------------------------------- kinds
def parse_shapes(source: str) -> int:
    """N of ``shapes:N`` (N >= 1)."""
    count = source.split(":", 1)[1]
    if not count.isdigit() or int(count) < 1:
        raise UserError(f"{source}: write shapes:N with N >= 1 the number of images, e.g. shapes:2000")
    return int(count)


def is_latent_shards(source: str | os.PathLike) -> bool:
    """A folder written by ``microdiff data precompute`` (or its dataset.json)."""
    path = Path(source)
    return (path.is_dir() and (path / SHARD_INFO).is_file()) or str(source).endswith(SHARD_INFO)


def source_kind(source: str) -> str:
    """One of IMAGE_KINDS + LATENT_KINDS; a source that does not exist is a one-line error saying what can."""
    text = str(source)
    if text.startswith("shapes:"):
        return "shapes"
    if text.startswith("mds:"):
        return "mds"
    if text.startswith("hf:"):
        return "hf"
    path = Path(text)
    if is_latent_shards(path):
        return "latent-shards"
    if is_image_shards(path):
        return "image-shards"
    if path.is_dir():
        return "hf" if _is_saved_hf_dataset(path) else "folder"
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"{text}: no such manifest file")
        return "manifest"
    if not path.exists():
        raise FileNotFoundError(f"{text}: no such file or folder; give shapes:N, an image folder, a .jsonl/.csv/"
                                ".parquet manifest, hf:NAME, a shard folder (from `microdiff data download` or "
                                "`data precompute`) or mds:PATH")
    raise UserError(f"{text}: not a data source (a {path.suffix or 'suffix-less'} file); give an image folder, a "
                    ".jsonl/.csv/.parquet manifest, a .tar shard, hf:NAME, a shard folder or mds:PATH")


def holds_latents(source: str) -> bool:
    return source_kind(source) in LATENT_KINDS


def require_images(source: str, command: str) -> None:
    """One line when ``source`` holds precomputed latents where ``command`` needs images."""
    if holds_latents(source):
        raise UserError(f"{source}: holds precomputed latents, not images; {command} needs images: pass the "
                        "image source the latents were made from (folder, manifest, image shards, shapes:N)")


# ----------------------------------------------------------------------------- building
def build_dataset(spec: DataSpec, *, needs: str = "any", command: str = "train", progress: bool = True,
                  split: str | None = None, image_root: str | os.PathLike | None = None,
                  allow_missing_captions: bool = False, min_size: int | None = None, log_skips: bool = True,
                  allow_empty: bool = False, corrupt_shards: str = "raise", verify_shards: bool = False):
    """The map-style dataset ``spec`` names, with its filters (see the module docstring).

    ``needs="images"``: refuse latent sources in one line naming ``command``. Latent shard folders are
    streamed and have no map-style dataset: ``train`` reads them through ``train/data.build_batches``.
    ``split``, ``image_root``, ``allow_missing_captions``, ``min_size``: options of the captioned
    sources (HF split; manifests' image folder; use '' for missing captions; skip small images).
    ``log_skips``: log the first skips found while indexing (off on all but one rank).
    ``allow_empty``: return a dataset with no usable item instead of raising (``data check`` reports it).
    ``corrupt_shards`` / ``verify_shards``: image shards only (``data/webshards.py``): "raise" (training: a
    damaged tar is one line naming it) or "report" (check, inspect: a "corrupt shard" skip), and whether to
    compare every tar with the SHA-256 its download recorded.
    """
    source = spec.source
    kind = source_kind(source)
    if needs == "images":
        require_images(source, command)
    if kind == "latent-shards":
        raise UserError(f"{source}: a folder of precomputed latent shards is streamed, not indexed; {command} cannot "
                        "read it (only train does): pass the image source it was made from")
    if spec.vocabulary and kind != "shapes":
        raise UserError(f"vocabulary: applies to shapes:N sources only, and the source is {source}")
    columns = {"caption_column": spec.caption_column, "image_column": spec.image_column}
    if any(columns.values()) and kind not in ("manifest", "hf"):
        name = next(k for k, v in columns.items() if v)
        raise UserError(f"{name}: applies to manifests and Hugging Face datasets, and {source} is a {kind} source")
    if image_root is not None and kind not in ("manifest", "hf"):
        raise UserError(f"image_root (--image-root): applies to manifests and Hugging Face datasets, and {source} is "
                        f"a {kind} source")
    if split is not None and kind != "hf":
        raise UserError(f"split (--split): applies to Hugging Face datasets, and {source} is a {kind} source")
    if kind == "shapes":
        dataset = ShapesDataset(parse_shapes(source), resolution=spec.resolution, seed=spec.seed,
                                corruption=spec.corruption, **spec.vocabulary)
    elif kind == "mds":
        if not [r for r in source[4:].split(",") if r]:
            raise UserError(f"{source}: write mds:FOLDER[,FOLDER...] with the folders that hold index.json")
        if spec.corruption is not None:
            raise UserError(f"corruption: corrupts images, and {source} holds latents")
        dataset = MDSLatentDataset([r for r in source[4:].split(",") if r], resolution=spec.resolution)
    else:
        options: dict[str, Any] = {"progress": progress, "allow_missing_captions": allow_missing_captions,
                                   "report": SkipReport(source, warn_first=10 if log_skips else 0)}
        transform = ImageTransform(spec.resolution, min_size=min_size)
        if kind == "image-shards":
            dataset = ImageShardDataset(source, transform, corrupt_shards=corrupt_shards, verify=verify_shards,
                                        **options)
        else:
            if kind == "manifest":
                options.update(path_column=spec.image_column, caption_column=spec.caption_column)
                if image_root is not None:
                    options["image_root"] = image_root
            elif kind == "hf":
                options.update(image_column=spec.image_column, caption_column=spec.caption_column)
                if split is not None:
                    options["split"] = split
                if image_root is not None:
                    options["image_root"] = image_root
            dataset = make_dataset(source, transform, **options)
        if spec.corruption is not None:  # the same corruption every epoch (seeded per record key)
            dataset = CorruptedDataset(dataset, spec.corruption, seed=spec.seed, resolution=spec.resolution)
    if spec.cache:
        dataset = CachedDataset(dataset)
    if spec.min_quality is not None:
        dataset = keep_quality(dataset, spec.min_quality, source, progress=progress)
    if len(dataset) == 0 and not allow_empty:
        raise UserError(empty_message(dataset, source))
    return dataset


def build_replacing(spec: DataSpec, *, command: str, progress: bool = True) -> ReplaceSkipped:
    """An image dataset for a training loop that needs every item: ``build_dataset`` (images), with
    skipped items replaced deterministically (``data/skips.py``; ``.raw`` is the dataset itself)."""
    return ReplaceSkipped(build_dataset(spec, needs="images", command=command, progress=progress), spec.seed,
                          source=spec.source)


def skip_totals(dataset, skipped=(), replaced: int = 0, name: str | None = None) -> SkipReport:
    """One report of what ``dataset`` (or the dataset under a ReplaceSkipped view) left out while
    indexing, plus ``skipped`` ((path, reason, detail) triples or Skips found later) and the number of
    ``replaced`` batch slots: what a command prints at its end."""
    base = getattr(dataset, "raw", dataset)
    name = name or getattr(dataset, "source", None) or getattr(skip_report(base), "name", "")
    report = SkipReport(name, warn_first=0).merge(skip_report(base) or [])
    for item in skipped:
        path, reason, detail = (item.path, item.reason, item.detail) if hasattr(item, "reason") else item
        report.add(path, reason, detail)
    report.replaced += int(replaced)
    return report


def read_records(dataset, desc: str, progress: bool = True) -> tuple[list[dict[str, Any]], SkipReport]:
    """Every usable record of ``dataset`` in index order, and the report of every item left out (while
    indexing, or unreadable now): for commands that read a whole source once."""
    records, later = [], []
    for i in tqdm(range(len(dataset)), desc=desc, unit="img", disable=not progress, dynamic_ncols=True):
        record = dataset[i]
        if record is None:
            later.append(why_skipped(dataset, i))
        else:
            records.append(record)
    return records, skip_totals(dataset, later)


def found_nothing(source: str) -> str:
    """What an empty source holds, for the one line that says training would use none of it."""
    kinds = ("a source is an image folder (x.png + x.txt or x.json captions), a .jsonl/.csv/.parquet manifest, "
             "hf:NAME, a shard folder (`microdiff data download` / `data precompute`), mds:PATH or shapes:N")
    path = Path(source)
    if (path / "download.json").is_file():
        return (f"{source}: found nothing to use: the download wrote no image; see {path / 'failures.csv'} and "
                f"{path / 'report.json'} for why each row failed")
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        shown = [p for p in files if not any(part.startswith(".") for part in p.relative_to(path).parts)]
        what = ("it is empty" if not files else
                f"it holds {len(shown)} file(s) and no image with a caption"
                + (f" ({len(files) - len(shown)} hidden file(s) are left out)" if len(files) > len(shown) else ""))
        return f"{source}: found nothing to use: {what}; {kinds}"
    return f"{source}: found nothing to use: it holds no item; {kinds}"


def empty_message(dataset, source: str) -> str:
    report = getattr(dataset, "report", None)
    why = f" ({report.summary().removeprefix(f'{report.name}: ')})" if report is not None and report.total else ""
    return (f"{source}: no usable items{why}; run `microdiff data inspect {source}` to see what it holds "
            "(captions come from .txt/.json sidecars or the caption column)")


def skip_report(dataset) -> SkipReport | None:
    """The skip report of the dataset under any wrappers (None for datasets that never skip)."""
    return getattr(dataset, "report", None)


# ----------------------------------------------------------------------------- wrappers
class CachedDataset(torch.utils.data.Dataset):
    """Keeps each decoded sample after its first use (small datasets that are slow to decode or render)."""

    def __init__(self, dataset):
        self.dataset, self.items = dataset, {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if index not in self.items:
            self.items[index] = self.dataset[index]
        return self.items[index]

    @property
    def report(self) -> SkipReport | None:
        return skip_report(self.dataset)

    def probe(self, index: int):
        probe = getattr(self.dataset, "probe", None)
        return probe(index) if callable(probe) else None

    def fingerprint(self, index: int) -> str:
        return item_fingerprint(self.dataset, index)

    def caption_meta(self, index: int):
        return caption_meta(self.dataset, index)

    def key_meta(self, index: int):
        if index in self.items or not hasattr(self.dataset, "key_meta"):
            item = self[index]
            return None if item is None else (str(item["key"]), dict(item["meta"]))
        return self.dataset.key_meta(index)


class Subset(torch.utils.data.Dataset):
    """Items ``indices`` of ``dataset`` (what ``min_quality`` keeps), forwarding what the datasets can say."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]

    @property
    def report(self) -> SkipReport | None:
        return skip_report(self.dataset)

    def probe(self, index: int):
        probe = getattr(self.dataset, "probe", None)
        return probe(self.indices[index]) if callable(probe) else None

    def fingerprint(self, index: int) -> str:
        return item_fingerprint(self.dataset, self.indices[index])

    def caption_meta(self, index: int):
        return caption_meta(self.dataset, self.indices[index])

    def key_meta(self, index: int):
        return key_meta(self.dataset, self.indices[index])


def scan_records(dataset, what: str, progress: bool = True) -> list[tuple[str, dict] | None]:
    """(key, meta) of every item (None for items the dataset skips), with a progress bar: what
    sample selection by quality or noise level needs to know before training."""
    out = []
    for i in tqdm(range(len(dataset)), desc=what, unit="item", disable=not progress, dynamic_ncols=True,
                  leave=False):
        out.append(key_meta(dataset, i))
    return out


def key_meta(dataset, index: int) -> tuple[str, dict] | None:
    """(key, meta) of one item: cheaply when the dataset can say it without decoding (``key_meta``)."""
    if hasattr(dataset, "key_meta"):
        return dataset.key_meta(index)
    item = dataset[index]
    return None if item is None else (str(item["key"]), dict(item["meta"]))


def caption_meta(dataset, index: int) -> tuple[Any, dict]:
    """(caption or list of captions, meta) of one item, without decoding its image where the dataset
    can say it (``caption_meta``); else from the record (None caption for an item it skips)."""
    if hasattr(dataset, "caption_meta"):
        return dataset.caption_meta(index)
    item = dataset[index]
    return (None, {}) if item is None else (item.get("caption"), dict(item.get("meta") or {}))


def item_fingerprint(dataset, index: int) -> str:
    """A content hash of item ``index``: the dataset's own ``fingerprint`` (what the item is made from,
    without decoding it) where it has one, else a hash of the decoded record. Precompute compares
    these to tell which shards are stale."""
    fingerprint = getattr(dataset, "fingerprint", None)
    if callable(fingerprint):
        return fingerprint(index)
    return record_fingerprint(dataset[index])


def record_fingerprint(record: dict[str, Any] | None) -> str:
    """A hash of a decoded record's fields (tensors by dtype, shape and bytes; the rest as JSON)."""
    digest = hashlib.sha256()
    if record is None:
        digest.update(b"<skipped>")
        return digest.hexdigest()
    for name in sorted(record):
        value = record[name]
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous()
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.numpy().tobytes() if value.dtype != torch.bfloat16 else value.float().numpy().tobytes())
        else:
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def keep_quality(dataset, min_quality: float, source: str, progress: bool = True):
    """The samples whose meta ``quality`` (absent = 1) is at least ``min_quality``."""
    records = scan_records(dataset, f"data.min_quality={min_quality}", progress)
    keep = [i for i, r in enumerate(records) if r is not None and float(r[1].get("quality", 1.0)) >= min_quality]
    if not keep:
        raise UserError(f"{source}: no sample has quality >= min_quality={min_quality}; lower it or drop the filter")
    return Subset(dataset, keep)


# ----------------------------------------------------------------------------- command-line options
def add_source_arguments(parser: argparse.ArgumentParser, *, filters: bool = False) -> None:
    """The options every command that reads a source shares (besides the source itself)."""
    parser.add_argument("--caption-column", default=None,
                        help="manifests / HF datasets: the caption column (default: the first of caption, text, "
                             "prompt, TEXT, txt, captions)")
    parser.add_argument("--image-column", default=None,
                        help="manifests / HF datasets: the image path column (default: the first of path, "
                             "file_name, filename, file, image, image_path, img, jpg, png)")
    if filters:
        parser.add_argument("--min-quality", type=float, default=None,
                            help="keep samples whose meta quality (absent = 1) is at least this")


def refuse_unused(source: str, options: dict[str, tuple]) -> None:
    """One line for an option the user set that would do nothing for this source: ``options`` maps a
    flag to (its value, its default, the source kinds it applies to[, what it does instead of the kinds]).
    A value equal to the default changes nothing, so only a set one is refused."""
    kind = source_kind(source)
    for flag, (value, default, kinds, *what) in options.items():
        if value != default and kind not in kinds:
            applies = what[0] if what else f"it applies to {', '.join(kinds)} sources"
            raise UserError(f"{flag} {value}: has no effect on {source} (a {kind} source; {applies}); leave it out")


def check_out_path(path: str | os.PathLike, what: str = "--out") -> Path:
    """An output folder: refuse an existing file, or a parent that is a file or not writable (one line)."""
    if not str(path).strip():
        raise UserError(f"{what}: empty; give a folder")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} {out}: is an existing file; give a folder")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise UserError(f"{what} {out}: {parent} is a file, so the folder cannot be made there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what} {out}: {parent} is not writable; choose another folder")
    return out


__all__ = ["DataSpec", "check_spec", "build_dataset", "source_kind", "holds_latents", "require_images",
           "is_latent_shards", "parse_shapes", "IMAGE_KINDS", "LATENT_KINDS", "CachedDataset", "Subset",
           "scan_records", "key_meta", "caption_meta", "keep_quality", "item_fingerprint", "record_fingerprint",
           "skip_report", "empty_message", "found_nothing",
           "build_replacing", "skip_totals", "read_records",
           "positive_int", "nonnegative_int", "add_source_arguments", "check_out_path", "refuse_unused"]
