"""Captioned image datasets: records ``{"image", "caption", "key", "meta"}`` from three sources.

    ImageFolderDataset(root, transform)     x.jpg + x.txt (caption) and/or x.json ("caption" + meta)
    ManifestDataset(path, transform)        .jsonl / .csv / .parquet rows: image path + caption + meta
    HFImageDataset(name_or_path, transform=...)   a Hugging Face ``datasets`` dataset (hub name,
                                            loader script/"imagefolder", or a save_to_disk folder)
    make_dataset(spec, ...)                 picks one from a string: folder, manifest file,
                                            "hf:<name>" or a saved HF dataset folder
                                            (commands use data/sources.py, the one home of
                                            "source string -> dataset", which builds on these)

Manifests are read as UTF-8 (a byte-order mark dropped) or, failing that, Windows-1252/Latin-1 with
a warning (:func:`read_text`); repeated keys are made unique with a warning (:func:`unique_keys`).

A record's ``image`` is float32 (3, R, R) in [-1, 1], ``caption`` a str, ``key`` a stable id and
``meta`` a dict with the source's other fields, among them the ones ambient training reads:
``source`` (str), ``quality`` (number in [0, 1], 1 = clean), ``sigma_tn`` (number >= 0, the known
noise level of a noisy sample) and ``corruption`` (str or dict). These are validated when the
dataset is built; a bad value is a ValueError naming the file, row and column.

Bad items follow ``on_error``: with "raise" a :class:`~microdiff.data.report.DataError` names the
path and reason; with "skip" the item is recorded in ``dataset.report``. Items that can be judged
without decoding (missing caption) are judged when the dataset is built and are not in its index;
images are judged when loaded, and ``__getitem__`` then returns None. **A DataLoader over these
datasets must use ``collate_fn=collate_records``**, which drops the Nones (and counts them).
``check_dataset`` decodes everything once, with a progress bar, and returns the full report.

Random crops, flips and the choice among several captions draw from a generator seeded by
(seed, epoch, index): call ``set_epoch`` each epoch; results do not depend on worker count. With an
:class:`~microdiff.data.transforms.ImageTransform` the record's ``meta["crop"]`` says what was done:
``{"top", "left", "size", "flip", "frame": [H, W] of the resized image the crop came from}``.

Pixel masks (ambient training): a record whose meta has ``"mask_file"`` (a .npy uint8 array (H, W),
or (C, H, W), 1 = observed, 0/1 only, at the image's size after EXIF rotation; the path relative to
the image's folder, as ``write_shapes_folder`` writes it) gets ``record["mask"]``, float (1 or C, R, R),
cropped and flipped exactly like the image (``transform_mask``). A missing, malformed or wrongly
sized mask file is a bad item (reason "bad mask"), reported under ``on_error`` like a bad image.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .report import DataError, OnError, Skip, SkipReport
from .transforms import CropParams, ImageError, ImageTransform, crop_meta, open_image, transform_mask

__all__ = ["IMAGE_SUFFIXES", "CaptionedDataset", "ImageFolderDataset", "ManifestDataset", "HFImageDataset",
           "make_dataset", "collate_records", "check_dataset", "validate_meta", "read_mask", "read_manifest",
           "read_text", "unique_keys"]

logger = logging.getLogger("microdiff.data")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MANIFEST_SUFFIXES = {".jsonl", ".csv", ".parquet"}
CAPTION_COLUMNS = ("caption", "text", "prompt", "TEXT", "txt", "captions")
PATH_COLUMNS = ("path", "file_name", "filename", "file", "image", "image_path", "img", "jpg", "png")
URL_COLUMNS = ("url", "URL", "image_url")
HF_SAVED_MARKERS = ("state.json", "dataset_dict.json")

Transform = Callable[..., torch.Tensor]  # f(pil_image, rng=numpy Generator) -> (3, R, R) tensor


# ----------------------------------------------------------------------------- metadata
def _number(value: Any, where: str, column: str, low: float, high: float) -> float:
    text = f"a number in [{low:g}, {high:g}]" if math.isfinite(high) else f"a number >= {low:g}"
    if isinstance(value, bool):
        raise ValueError(f"{where}, column {column!r}: expected {text}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}, column {column!r}: expected {text}, got {value!r}") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise ValueError(f"{where}, column {column!r}: expected {text}, got {value!r}")
    return number


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def validate_meta(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """A copy of ``meta`` with ``quality``/``sigma_tn`` as floats, ``source`` as str and ``corruption``
    as str or dict (a JSON object string is parsed); blank optional fields are dropped. Other
    fields are kept as they are. Raises ValueError naming ``where`` and the column."""
    out = dict(meta)
    for column in ("source", "quality", "sigma_tn", "corruption"):
        if column in out and _blank(out[column]):
            del out[column]
    if "quality" in out:
        out["quality"] = _number(out["quality"], where, "quality", 0.0, 1.0)
    if "sigma_tn" in out:
        out["sigma_tn"] = _number(out["sigma_tn"], where, "sigma_tn", 0.0, math.inf)
    if "source" in out and not isinstance(out["source"], str):
        raise ValueError(f"{where}, column 'source': expected a string, got {out['source']!r}")
    corruption = out.get("corruption")
    if isinstance(corruption, str) and corruption.lstrip().startswith("{"):
        try:
            out["corruption"] = corruption = json.loads(corruption)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}, column 'corruption': not valid JSON ({err})") from None
    if corruption is not None and not isinstance(corruption, (str, dict)):
        raise ValueError(f"{where}, column 'corruption': expected a string or an object, got {corruption!r}")
    return out


# where users set the columns: the config key, the command-line option, the class argument
_OPTION_NAMES = {"caption_column": "data.caption_column (--caption-column; caption_column=...)",
                 "path_column": "data.image_column (--image-column; path_column=...)",
                 "image_column": "data.image_column (--image-column; image_column=...)"}


def _first_present(columns: Iterable[str], candidates: Iterable[str]) -> str | None:
    present = set(columns)
    return next((c for c in candidates if c in present), None)


def _pick_column(columns: list[str], requested: str | None, candidates: tuple[str, ...], what: str,
                 where: str, option: str) -> str | None:
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"{where}: no {what} column {requested!r}; the columns are {', '.join(columns)}; "
                             f"choose one with {_OPTION_NAMES.get(option, option + '=...')}")
        return requested
    return _first_present(columns, candidates)


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().lower().startswith(("http://", "https://"))


def _url_error(where: str, value: str) -> ValueError:
    return ValueError(f"{where}: the image is a URL ({value[:80]}); images are not downloaded here: run "
                      "`microdiff data download MANIFEST --out DIR` first and use DIR (its shard folder) as the source")


def read_text(path: Path) -> str:
    """A text file as UTF-8 (a leading byte-order mark, as Excel writes, is dropped); a file that is not
    UTF-8 is read as Windows-1252 (Latin-1 with the printable 0x80-0x9F range), with a warning naming
    the first byte that is not UTF-8, because that is what spreadsheet programs write otherwise."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        logger.warning("%s is not UTF-8 (byte 0x%02x on line %d); reading it as Windows-1252/Latin-1. Save it as "
                       "UTF-8 to be sure the captions are read as written", path, data[err.start], line)
    return data.decode("cp1252", errors="strict") if _is_cp1252(data) else data.decode("latin-1")


def _is_cp1252(data: bytes) -> bool:
    return not any(b in data for b in (b"\x81", b"\x8d", b"\x8f", b"\x90", b"\x9d"))  # undefined in cp1252


def unique_keys(entries: list["Entry"], name: str) -> int:
    """Make the keys of ``entries`` unique in place: the first entry with a key keeps it, the n-th
    later one becomes ``key#n``. Keys seed each sample's corruption and noise and name its ambient
    annotation, so two rows sharing a key would share both; unique keys keep every row its own
    sample. Logs one warning with the counts; returns the number of renamed entries."""
    seen: Counter[str] = Counter(e.key for e in entries)
    repeated = {k: n for k, n in seen.items() if n > 1}
    if not repeated:
        return 0
    taken, count = set(seen), Counter()
    renamed = 0
    for entry in entries:
        if entry.key not in repeated:
            continue
        count[entry.key] += 1
        if count[entry.key] == 1:
            continue
        n = count[entry.key]
        while f"{entry.key}#{n}" in taken:
            n += 1
        entry.key = f"{entry.key}#{n}"
        taken.add(entry.key)
        renamed += 1
    example = next(iter(repeated))
    logger.warning("%s: %d key%s occur more than once (%d rows, e.g. %r); the repeats are renamed key#2, key#3, ... "
                   "so each row gets its own corruption, noise and annotation. Give every row its own key to choose "
                   "the names yourself", name, len(repeated), "s" if len(repeated) != 1 else "", sum(repeated.values()),
                   example)
    return renamed


# ----------------------------------------------------------------------------- the dataset family
@dataclass
class Entry:
    """One indexed item: where its image is (a path, or bytes with a path/name for reports)."""

    key: str
    image: str | bytes
    caption: str | list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    label: str = ""  # what reports call it (the image path, or "<dataset>[row]")


class CaptionedDataset(Dataset):
    """Shared behaviour: records, the ``on_error`` policy, the report and per-sample generators.

    Subclasses fill ``self.entries`` (or override ``_entry`` and ``__len__``).
    """

    def __init__(self, transform: Transform, *, on_error: OnError | str = "skip",
                 allow_missing_captions: bool = False, seed: int = 0, report: SkipReport | None = None,
                 name: str = "", progress: bool = True):
        if not callable(transform):
            raise TypeError(f"transform must be callable (e.g. ImageTransform(256)), got {transform!r}")
        self.transform, self.on_error = transform, OnError.parse(on_error)
        self.allow_missing_captions, self.seed, self.epoch = allow_missing_captions, int(seed), 0
        self.name, self.progress = name, progress
        self.report = report if report is not None else SkipReport(name)
        self.entries: list[Entry] = []

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} items, on_error={self.on_error.value!r})"

    def set_epoch(self, epoch: int) -> None:
        """Change the random crops/flips/caption choices for a new epoch (same seed, same epoch -> same)."""
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def _entry(self, index: int) -> Entry:
        return self.entries[index]

    def _skip(self, label: str, reason: str, detail: str = "") -> None:
        """Apply the policy to a bad item: raise a DataError, or record it in the report."""
        if self.on_error is OnError.RAISE:
            raise DataError(label, reason, detail)
        self.report.add(label, reason, detail)

    def _caption_or_skip(self, caption: Any, label: str, detail: str) -> str | list[str] | None:
        """The caption, or "" if missing and allowed, or None after applying the policy."""
        if isinstance(caption, (list, tuple)):
            caption = [c.strip() for c in caption if isinstance(c, str) and c.strip()]
            if caption:
                return caption
        elif isinstance(caption, str) and caption.strip():
            return caption.strip()
        elif not _blank(caption):
            raise ValueError(f"{label}: the caption must be a string or a list of strings, got {caption!r}")
        if self.allow_missing_captions:
            return ""
        self._skip(label, "missing caption", detail + "; or pass allow_missing_captions=True")
        return None

    def _transform(self, pil: Any, rng: np.random.Generator) -> tuple[torch.Tensor, CropParams | None]:
        """The transformed image and, for an ImageTransform, the crop/flip it applied (else None)."""
        if isinstance(self.transform, ImageTransform):
            return self.transform(pil, rng=rng, return_params=True)
        return self.transform(pil, rng=rng), None

    def _load(self, index: int) -> dict[str, Any]:
        """The record for ``index``; bad images (and bad mask files) raise ImageError."""
        entry = self._entry(index)
        rng = self.rng(index)
        pil = open_image(entry.image)
        image, params = self._transform(pil, rng)
        caption = entry.caption
        if isinstance(caption, list):
            caption = caption[int(rng.integers(len(caption)))]
        meta = dict(entry.meta)
        if params is not None:
            meta["crop"] = crop_meta(params, *pil.size)
        record = {"image": image, "caption": caption, "key": entry.key, "meta": meta}
        if not _blank(entry.meta.get("mask_file")):
            record["mask"] = self._mask(entry, pil.size, params)
        return record

    def _mask(self, entry: Entry, size: tuple[int, int], params: CropParams | None) -> torch.Tensor:
        """The entry's mask sidecar, checked against the image's (width, height) and moved like the image."""
        name = entry.meta["mask_file"]
        if params is None:
            raise ValueError(f"{entry.label}: its mask_file {name!r} can only follow the image through an "
                             f"ImageTransform (to crop and flip it alike); got transform {self.transform!r}")
        if not isinstance(entry.image, str) or not isinstance(name, str):
            raise ValueError(f"{entry.label}: mask_file {name!r} is found relative to the image's folder, so the "
                             "image must be a file path (not bytes) and mask_file a string")
        return torch.from_numpy(transform_mask(read_mask(Path(entry.image).parent / name, size), params)
                                .astype(np.float32))

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            return self._load(index)
        except ImageError as err:
            self._skip(self._entry(index).label, err.reason, err.detail)
            return None

    def caption_meta(self, index: int) -> tuple[str | list[str], dict[str, Any]]:
        """The item's caption (or its list of captions) and meta, without decoding its image."""
        entry = self._entry(index)
        return entry.caption, dict(entry.meta)

    def fingerprint(self, index: int) -> str:
        """A content hash of what item ``index`` is made from: key, caption(s), meta, the image's bytes,
        its mask file's bytes, and the transform. Equal fingerprints, equal records."""
        entry = self._entry(index)
        digest = hashlib.sha256(json.dumps([entry.key, entry.caption, repr(self.transform)], default=str).encode())
        digest.update(json.dumps(entry.meta, sort_keys=True, default=str).encode())
        digest.update(_content(entry.image))
        mask = entry.meta.get("mask_file")
        if isinstance(mask, str) and isinstance(entry.image, str):
            digest.update(_content(str(Path(entry.image).parent / mask)))
        return digest.hexdigest()

    def probe(self, index: int) -> Skip | None:
        """Load item ``index`` and say why it would be skipped (None if it is fine); records nothing."""
        try:
            self._load(index)
        except ImageError as err:
            return Skip(self._entry(index).label, err.reason, err.detail)
        return None


def _content(image: str | bytes) -> bytes:
    """Bytes of an image (a file's, or the bytes themselves) for a fingerprint; a marker if unreadable."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    try:
        return Path(image).read_bytes()
    except OSError as err:
        return f"<unreadable: {err.strerror or err}>".encode()


def read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A mask sidecar: .npy uint8 (or bool) 0/1, (H, W) -> (1, H, W) or (C, H, W), with (W, H) == ``size``.
    Problems raise ImageError (reason "bad mask") naming the file."""
    def bad(message: str) -> ImageError:
        return ImageError(f"mask file {path.name}: {message}", "bad mask", str(path))

    if not path.is_file():
        raise bad("no such file (mask_file is relative to the image's folder)")
    try:
        mask = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise bad(f"not a .npy array ({err})") from None
    if mask.dtype not in (np.uint8, np.bool_) or mask.ndim not in (2, 3):
        raise bad(f"expected a uint8 array (H, W) or (C, H, W) of 0/1, got {mask.dtype} {mask.shape}")
    if mask.size and mask.max() > 1:
        raise bad(f"values must be 0 (hidden) or 1 (observed), found {int(mask.max())}")
    mask = mask[None] if mask.ndim == 2 else mask
    if (mask.shape[2], mask.shape[1]) != tuple(size):
        raise bad(f"it is {mask.shape[2]}x{mask.shape[1]} (W x H) but the image is {size[0]}x{size[1]}; "
                  "write the mask at the image's size")
    return mask.astype(np.uint8)


def collate_records(batch: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Drop skipped items (None) and stack the rest.

    Returns ``{"image": (B,3,R,R), "caption": [str], "key": [str], "meta": [dict], "quality": (B,)
    (1.0 where absent), "sigma_tn": (B,) (0.0 where absent), "skipped": number dropped}`` and, when
    any record carries a pixel mask, ``"mask"`` (B, 1, R, R) (ones for records without one), or None
    when every item of the batch was skipped (a training loop should just go on to the next batch).
    """
    records = [r for r in batch if r is not None]
    if not records:
        return None
    shapes = {tuple(r["image"].shape) for r in records}
    if len(shapes) > 1:
        raise ValueError(f"cannot stack images of different shapes {sorted(shapes)}; use a transform that "
                         "crops to one resolution (ImageTransform)")
    metas = [r["meta"] for r in records]
    out = {"image": torch.stack([r["image"] for r in records]),
           "caption": [r["caption"] for r in records],
           "key": [r["key"] for r in records],
           "meta": metas,
           "quality": torch.tensor([float(m.get("quality", 1.0)) for m in metas], dtype=torch.float32),
           "sigma_tn": torch.tensor([float(m.get("sigma_tn", 0.0)) for m in metas], dtype=torch.float32),
           "skipped": len(batch) - len(records)}
    if any("mask" in r for r in records):
        out["mask"] = torch.stack([r["mask"] if "mask" in r else torch.ones_like(r["image"][:1]) for r in records])
    return out


class _Probe(Dataset):
    def __init__(self, dataset: CaptionedDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Skip | None:
        return self.dataset.probe(index)


def _keep(items: list) -> list:
    return items


def check_dataset(dataset: CaptionedDataset, *, num_workers: int = 0, progress: bool = True) -> SkipReport:
    """Decode every item once and return a report of all skips: those found when the dataset was
    built plus every image that fails to load. Workers' findings come back to this process."""
    report = SkipReport(dataset.report.name, warn_first=dataset.report.warn_first).merge(dataset.report)
    loader = torch.utils.data.DataLoader(_Probe(dataset), batch_size=16, num_workers=num_workers,
                                         collate_fn=_keep)
    with tqdm(total=len(dataset), desc=f"checking {dataset.name}", unit="img", disable=not progress) as bar:
        for found in loader:
            for skip in found:
                if skip is not None:
                    report.add(skip.path, skip.reason, skip.detail)
            bar.update(len(found))
    return report


# ----------------------------------------------------------------------------- (a) image folders
class ImageFolderDataset(CaptionedDataset):
    """Every image under ``root`` (recursively, hidden files and folders excluded) with its sidecars:
    ``x.txt`` holds the caption; ``x.json`` holds an object whose "caption" (or "text"/"prompt") is
    the caption unless x.txt exists, and whose other fields go to ``meta``. The key is the path
    relative to ``root`` without its suffix (with it, where two images share a stem)."""

    def __init__(self, root: str | os.PathLike, transform: Transform, **kwargs: Any):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such folder; pass a folder of images with .txt/.json captions")
        super().__init__(transform, name=kwargs.pop("name", str(root)), **kwargs)
        self.root = root
        images = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            names = set(files)
            images += [(Path(folder), f, names) for f in sorted(files)
                       if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
        stems = [str((folder / f).relative_to(root).with_suffix("").as_posix()) for folder, f, _ in images]
        shared = {stem for stem, n in Counter(stems).items() if n > 1}
        for (folder, f, names), stem in tqdm(list(zip(images, stems)), desc=f"indexing {root}", unit="img",
                                             disable=not self.progress):
            entry = self._index_one(folder / f, names, stem if stem not in shared else stem + Path(f).suffix)
            if entry is not None:
                self.entries.append(entry)

    def _index_one(self, image: Path, names: set[str], key: str) -> Entry | None:
        txt, side = image.with_suffix(".txt"), image.with_suffix(".json")
        caption, meta = None, {}
        if side.name in names:
            try:
                meta = json.loads(side.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                self._skip(str(image), "bad sidecar", f"{side.name} is not valid JSON: {err}")
                return None
            if not isinstance(meta, dict):
                self._skip(str(image), "bad sidecar", f"{side.name} must hold a JSON object")
                return None
            field_name = _first_present(meta, CAPTION_COLUMNS)
            caption = meta.pop(field_name) if field_name else None
            meta = validate_meta(meta, str(side))
        if txt.name in names:
            try:
                caption = txt.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                self._skip(str(image), "bad caption file", f"{txt.name} is not UTF-8 text: {err}")
                return None
        caption = self._caption_or_skip(caption, str(image), f"add {txt.name} or a \"caption\" in {side.name}")
        return None if caption is None else Entry(key, str(image), caption, meta, str(image))


# ----------------------------------------------------------------------------- (b) manifests
def read_manifest(path: Path) -> tuple[list[dict[str, Any]], list[str], str]:
    """Rows, column names (in file order) and the word for a row ("line" for jsonl, "row")."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows, columns = [], {}
        for n, line in enumerate(read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {n}: not valid JSON ({err})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
            columns.update(dict.fromkeys(row))
            rows.append(row)
        return rows, list(columns), "line"
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
        try:
            rows = list(reader)
        except csv.Error as err:
            raise ValueError(f"{path}, row {reader.line_num}: not valid CSV ({err})") from None
        return rows, list(reader.fieldnames or []), "row"
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading .parquet manifests needs pyarrow: "
                              "pip install 'microdiff[data]' (or pyarrow)") from None
        try:
            table = pq.read_table(path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises its own types for damaged files
            raise ValueError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None
        return table.to_pylist(), list(table.column_names), "row"
    raise ValueError(f"{path}: unknown manifest type {suffix!r}; use .jsonl, .csv or .parquet")


class ManifestDataset(CaptionedDataset):
    """Rows of a .jsonl / .csv / .parquet manifest.

    Args:
        path: the manifest.
        image_root: folder that relative image paths start from (default: the manifest's folder).
        path_column: the image column (default: the first of path, file_name, filename, file, image,
            image_path, img, jpg, png). Values are paths, or (parquet) image bytes or
            ``{"bytes", "path"}`` structs as Hugging Face writes them. URLs are an error.
        caption_column: default: the first of caption, text, prompt, TEXT, txt, captions. A list of
            captions is allowed: one is drawn per sample.
        A "key" column, if any, gives the keys; every other column goes to ``meta``.
    """

    def __init__(self, path: str | os.PathLike, transform: Transform, image_root: str | os.PathLike | None = None,
                 *, path_column: str | None = None, caption_column: str | None = None, **kwargs: Any):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such manifest; pass a .jsonl, .csv or .parquet file")
        super().__init__(transform, name=kwargs.pop("name", str(path)), **kwargs)
        self.path = path
        self.image_root = Path(image_root) if image_root is not None else path.parent
        rows, columns, unit = read_manifest(path)
        listed = ", ".join(columns) or "(none)"
        self.path_column = _pick_column(columns, path_column, PATH_COLUMNS, "image path", str(path), "path_column")
        if self.path_column is None:
            url = _first_present(columns, URL_COLUMNS)
            if url is not None:
                raise _url_error(f"{path}, column {url!r}", str(next((r[url] for r in rows if r.get(url)), "")))
            raise ValueError(f"{path}: no image path column (tried {', '.join(PATH_COLUMNS)}); the columns are "
                             f"{listed}; choose one with {_OPTION_NAMES['path_column']}")
        self.caption_column = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", str(path),
                                           "caption_column")
        if self.caption_column is None and not self.allow_missing_captions:
            raise ValueError(f"{path}: no caption column (tried {', '.join(CAPTION_COLUMNS)}); the columns are "
                             f"{listed}; choose one with {_OPTION_NAMES['caption_column']}")
        for n, row in enumerate(tqdm(rows, desc=f"indexing {path.name}", unit="row", disable=not self.progress), 1):
            entry = self._index_row(row, f"{path}, {unit} {n}", n)
            if entry is not None:
                self.entries.append(entry)
        unique_keys(self.entries, str(path))

    def _index_row(self, row: dict[str, Any], where: str, n: int) -> Entry | None:
        row = dict(row)
        value = row.pop(self.path_column, None)
        caption = row.pop(self.caption_column, None) if self.caption_column else None
        key = row.pop("key", None)
        meta = validate_meta(row, where)
        if _is_url(value):
            raise _url_error(f"{where}, column {self.path_column!r}", value)
        if isinstance(value, dict):  # Hugging Face image struct
            value = value.get("bytes") or value.get("path")
        if _blank(value) or not isinstance(value, (str, bytes)):
            self._skip(where, "missing image path", f"column {self.path_column!r} is {value!r}")
            return None
        if isinstance(value, bytes):
            image, label = value, where
            key = key if not _blank(key) else f"row{n:08d}"
        else:
            image = str(value if Path(value).is_absolute() else self.image_root / value)
            label = image
            key = key if not _blank(key) else Path(value).with_suffix("").as_posix()
        caption = self._caption_or_skip(caption, label, f"fill column {self.caption_column!r} ({where})")
        return None if caption is None else Entry(str(key), image, caption, meta, label)


# ----------------------------------------------------------------------------- (c) Hugging Face datasets
def _is_saved_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in HF_SAVED_MARKERS)


class HFImageDataset(CaptionedDataset):
    """A Hugging Face ``datasets`` dataset (map-style) with an image column and a caption column.

    Args:
        name_or_path: a folder written by ``save_to_disk`` (read with ``load_from_disk``), a hub name,
            a loader such as "imagefolder" (with ``data_dir``/``data_files``), or a ``datasets.Dataset``.
        split: the split to use (of a DatasetDict or of ``load_dataset``).
        image_column: default: the first column with an ``Image`` feature, else the first of the
            usual path column names (paths relative to ``image_root``, default the current folder).
        caption_column: default: the first of caption, text, prompt, TEXT, txt, captions.
        load_kwargs: more keyword arguments for ``load_dataset`` (cache_dir, revision, ...).
    Images are decoded here (the column is cast to ``Image(decode=False)``), so a corrupt one is a
    reported skip rather than an exception inside ``datasets``.
    """

    def __init__(self, name_or_path: Any, split: str = "train", image_column: str | None = None,
                 caption_column: str | None = None, *, transform: Transform, data_dir: str | None = None,
                 data_files: Any = None, image_root: str | os.PathLike | None = None,
                 load_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        try:
            import datasets
        except ImportError:
            raise ImportError("HFImageDataset needs the datasets package: "
                              "pip install 'microdiff[data]' (or datasets)") from None
        ds = self._open(datasets, name_or_path, split, data_dir, data_files, load_kwargs or {})
        name = kwargs.pop("name", f"{name_or_path}[{split}]" if isinstance(name_or_path, (str, os.PathLike))
                          else f"dataset[{split}]")
        super().__init__(transform, name=name, **kwargs)
        columns = list(ds.column_names)
        listed = ", ".join(columns)
        if image_column is None:
            image_column = next((c for c in columns if isinstance(ds.features[c], datasets.Image)), None)
        self.image_column = _pick_column(columns, image_column, PATH_COLUMNS, "image", name, "image_column")
        if self.image_column is None:
            raise ValueError(f"{name}: no image column (no Image feature and none of {', '.join(PATH_COLUMNS)}); "
                             f"the columns are {listed}; choose one with {_OPTION_NAMES['image_column']}")
        self.caption_column = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", name,
                                           "caption_column")
        if self.caption_column is None and not self.allow_missing_captions:
            raise ValueError(f"{name}: no caption column (tried {', '.join(CAPTION_COLUMNS)}); the columns are "
                             f"{listed}; choose one with {_OPTION_NAMES['caption_column']}")
        if isinstance(ds.features[self.image_column], datasets.Image):
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        self.dataset, self.image_root = ds, None if image_root is None else Path(image_root)
        self._validate_columns(ds)
        self.rows = self._index_captions(ds)
        self.keys = self._index_keys(ds)

    def _index_keys(self, ds: Any) -> list[str] | None:
        """Unique keys of the kept rows from a "key" column (see :func:`unique_keys`), or None without one."""
        if "key" not in ds.column_names:
            return None
        raw = ds.with_format("arrow")["key"].to_pylist()
        entries = [Entry(str(raw[r]) if not _blank(raw[r]) else f"{r:08d}", b"", "") for r in self.rows]
        unique_keys(entries, self.name)
        return [e.key for e in entries]

    @staticmethod
    def _open(datasets: Any, name_or_path: Any, split: str, data_dir: Any, data_files: Any,
              load_kwargs: dict[str, Any]) -> Any:
        if isinstance(name_or_path, datasets.IterableDataset):
            raise ValueError("streaming (Iterable) datasets are not supported here; load it as a map-style "
                             "dataset or convert it to shards first")
        if isinstance(name_or_path, datasets.Dataset):
            return name_or_path
        if isinstance(name_or_path, datasets.DatasetDict):
            ds = name_or_path
        elif _is_saved_hf_dataset(Path(name_or_path)):
            ds = datasets.load_from_disk(str(name_or_path))
        else:
            extra = {k: v for k, v in (("data_dir", data_dir), ("data_files", data_files)) if v is not None}
            return datasets.load_dataset(str(name_or_path), split=split, **extra, **load_kwargs)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{name_or_path}: no split {split!r}; the splits are {', '.join(ds)}")
            ds = ds[split]
        return ds

    def _validate_columns(self, ds: Any) -> None:
        """Check source/quality/sigma_tn/corruption of every row now (reads only those columns)."""
        fields = [c for c in ("source", "quality", "sigma_tn", "corruption") if c in ds.column_names]
        columns = {c: ds.with_format("arrow")[c].to_pylist() for c in fields}
        for row in range(len(ds) if fields else 0):
            validate_meta({c: values[row] for c, values in columns.items()}, f"{self.name}, row {row}")

    def _index_captions(self, ds: Any) -> np.ndarray:
        if self.caption_column is None:
            return np.arange(len(ds))
        captions = ds.with_format("arrow")[self.caption_column].to_pylist()
        keep = []
        for row, caption in enumerate(tqdm(captions, desc=f"indexing {self.name}", unit="row",
                                           disable=not self.progress)):
            if self._caption_or_skip(caption, f"{self.name}[{row}]",
                                     f"fill column {self.caption_column!r}") is not None:
                keep.append(row)
        return np.asarray(keep, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def _entry(self, index: int) -> Entry:
        row = int(self.rows[index])
        values = dict(self.dataset[row])
        value = values.pop(self.image_column)
        caption = values.pop(self.caption_column, "") if self.caption_column else ""
        key = values.pop("key", None)
        label = f"{self.name}[{row}]"
        if isinstance(value, dict):  # Image(decode=False): {"bytes": ..., "path": ...}
            if value.get("path"):
                label = f"{label} {value['path']}"
            value = value.get("bytes") or value.get("path")
        elif isinstance(value, str):
            value = str(self.image_root / value) if self.image_root and not Path(value).is_absolute() else value
        if _is_url(value):
            raise _url_error(f"{self.name}, row {row}, column {self.image_column!r}", value)
        if not isinstance(value, (str, bytes)):
            value = b""  # decoded as an empty file: reported, not crashed on
        caption = caption.strip() if isinstance(caption, str) else (caption or "")  # rows with none were dropped
        meta = validate_meta(values, f"{self.name}, row {row}")
        key = self.keys[index] if self.keys is not None else f"{row:08d}"
        return Entry(key, value, caption, meta, label)


# ----------------------------------------------------------------------------- choosing a source
def make_dataset(spec: str | os.PathLike, transform: Transform | None = None, *, resolution: int | None = None,
                 **kwargs: Any) -> CaptionedDataset:
    """The captioned dataset a string names (commands go through ``data.sources.build_dataset``, which
    calls this for these kinds and adds the other sources and filters): an image folder, a
    .jsonl/.csv/.parquet manifest, ``hf:<name>``
    (a hub dataset or loader, e.g. ``hf:imagefolder`` with ``data_dir=...``) or a folder written by
    ``save_to_disk``. Give a ``transform`` or a ``resolution`` (then a center-crop ImageTransform);
    other keyword arguments go to the dataset class."""
    if transform is None:
        if resolution is None:
            raise ValueError("make_dataset needs transform=... or resolution=...")
        transform = ImageTransform(resolution, min_size=kwargs.pop("min_size", None))
    text = str(spec)
    if text.startswith("hf:"):
        if not text[3:]:
            raise ValueError("'hf:' needs a dataset name or path after it, e.g. hf:user/dataset")
        return HFImageDataset(text[3:], transform=transform, **kwargs)
    path = Path(spec)
    if path.is_dir():
        if _is_saved_hf_dataset(path):
            return HFImageDataset(path, transform=transform, **kwargs)
        return ImageFolderDataset(path, transform, **kwargs)
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return ManifestDataset(path, transform, **kwargs)
    if not path.exists() and path.suffix == "":
        raise ValueError(f"unknown dataset source {text!r}: no such folder, and not hf:<name>; use an image folder, "
                         "a .jsonl/.csv/.parquet manifest, hf:<name>, or a folder saved with datasets' save_to_disk")
    raise ValueError(f"{text}: not a dataset source (suffix {path.suffix!r}); use an image folder, a "
                     ".jsonl/.csv/.parquet manifest, hf:<name>, or a folder saved with datasets' save_to_disk")
