"""Image webdataset shards as a captioned dataset: what ``microdiff data download`` writes, or any
folder of ``.tar`` files holding ``<key>.<image ext>`` + ``<key>.txt`` (caption) + ``<key>.json`` (meta).

    ImageShardDataset("data/web", ImageTransform(64))[i] -> {"image", "caption", "key", "meta"} or None

A download folder (it has ``download.json``) is read only when the download finished: every
``NNNNN.tar`` has its status file, no ``.partial`` file is left and ``report.json`` counts the same
shards; otherwise one line says to rerun the download (it resumes). Other folders: every ``*.tar``.

Indexing reads each tar's member headers and its small caption/meta members once; images are read
by offset when an item is loaded, so the dataset is map-style (random access, exact-resume batches,
replacement of bad items, corruption, ``min_quality``) like a folder. Per sample: the caption is the
``.txt`` member (else the JSON's "caption"/"text"/"prompt"), ``meta`` the JSON object without its
caption and key, ``key`` the JSON's "key" (what download writes: the source row, zero-padded) or the
member key. Problems of one sample (no image member, a caption that is not UTF-8, a malformed JSON,
a missing caption) are reported skips like a folder's; a truncated or unreadable tar is an error
naming it.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..utils.errors import UserError
from .captioned import CAPTION_COLUMNS, IMAGE_SUFFIXES, CaptionedDataset, Entry, Transform, unique_keys, validate_meta

DOWNLOAD_SETTINGS = "download.json"
DOWNLOAD_REPORT = "report.json"
LATENT_INFO = "dataset.json"
IMAGE_EXTENSIONS = {s.lstrip(".") for s in IMAGE_SUFFIXES}


@dataclass(frozen=True)
class Member:
    """Where one image is: a tar file and the byte range of the member's data."""

    tar: str
    offset: int
    size: int


def is_image_shards(path: str | os.PathLike) -> bool:
    """A download folder, a ``.tar`` file, or a folder of ``.tar`` files with no images of its own
    beside them (and no ``dataset.json``: that is a precomputed latent folder)."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".tar"
    if not path.is_dir() or (path / LATENT_INFO).is_file():
        return False
    if (path / DOWNLOAD_SETTINGS).is_file():
        return True
    names = [p for p in path.iterdir() if not p.name.startswith(".")]
    return any(p.suffix == ".tar" for p in names) and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in names)


def download_shards(root: Path) -> list[Path]:
    """The tars of a finished download folder, in order; one line if the download is not finished."""
    try:
        settings = json.loads((root / DOWNLOAD_SETTINGS).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{root / DOWNLOAD_SETTINGS}: unreadable ({err}); rerun `microdiff data download` with "
                        f"--out {root} to rewrite it") from None
    status = str(settings.get("status_format", "jsonl"))
    tars = sorted(p for p in root.glob("[0-9]*.tar") if p.stem.isdigit())
    problems = [f"{p.name} has no status file {p.stem}.{status}" for p in tars
                if not (root / f"{p.stem}.{status}").is_file()]
    problems += [f"{p.name} is left from an interrupted run" for p in sorted(root.glob("*.partial"))]
    report = root / DOWNLOAD_REPORT
    if not report.is_file():
        problems.append(f"there is no {DOWNLOAD_REPORT} yet")
    else:
        try:
            counted = int(json.loads(report.read_text()).get("shards", -1))
        except (ValueError, json.JSONDecodeError, AttributeError):
            counted = -1
        if counted != len(tars):
            problems.append(f"{DOWNLOAD_REPORT} counts {counted} shards, the folder has {len(tars)}")
    if problems:
        raise UserError(f"{root}: the download is not finished ({problems[0]}); rerun `microdiff data download` "
                        f"with the same arguments and --out {root} to finish it (it resumes)")
    return tars


def shard_files(source: str | os.PathLike) -> list[Path]:
    root = Path(source)
    if root.is_file():
        return [root]
    if (root / DOWNLOAD_SETTINGS).is_file():
        return download_shards(root)
    tars = sorted(root.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"{root}: no .tar shards in this folder")
    return tars


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    return b"" if handle is None else handle.read()


def index_tar(path: Path) -> list[dict[str, Any]]:
    """Per sample of one tar, in file order: ``{"key", "image": Member | None, "image_name", "txt": bytes
    | None, "json": bytes | None}``. A truncated or corrupt tar is a UserError naming it."""
    size = path.stat().st_size
    if size % 512:
        raise UserError(f"{path}: {size} bytes is not a whole number of 512-byte tar blocks: the shard is truncated; "
                        "delete it (and its status file) and rerun `microdiff data download` to fetch it again")
    samples: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or stem.startswith("._"):
                    continue
                key = f"{folder}/{stem}" if folder else stem
                sample = samples.setdefault(key, {"key": key, "image": None, "image_name": None, "txt": None,
                                                  "json": None})
                ext = ext.lower()
                if ext in IMAGE_EXTENSIONS and sample["image"] is None:
                    sample["image"] = Member(str(path), member.offset_data, member.size)
                    sample["image_name"] = member.name
                elif ext in ("txt", "caption.txt"):
                    sample["txt"] = _read(tar, member)
                elif ext in ("json", "meta.json"):
                    sample["json"] = _read(tar, member)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UserError(f"{path}: truncated or corrupt tar ({type(err).__name__}: {err}); delete it (and its status "
                        "file) and rerun `microdiff data download` to fetch it again") from None
    for sample in samples.values():
        if sample["image"] is not None and sample["image"].offset + sample["image"].size > size:
            sample["image"] = replace(sample["image"], size=max(size - sample["image"].offset, 0))  # read what is there
    return list(samples.values())


class ImageShardDataset(CaptionedDataset):
    """The samples of image webdataset tars (see the module docstring)."""

    def __init__(self, source: str | os.PathLike, transform: Transform, **kwargs: Any):
        super().__init__(transform, name=kwargs.pop("name", str(source)), **kwargs)
        self.root = Path(source)
        self.tars = shard_files(source)
        for tar in self.tars:
            for sample in index_tar(tar):
                entry = self._index_sample(tar, sample)
                if entry is not None:
                    self.entries.append(entry)
        unique_keys(self.entries, self.name)

    def _index_sample(self, tar: Path, sample: dict[str, Any]) -> Entry | None:
        label = f"{tar}:{sample['image_name'] or sample['key']}"
        if sample["image"] is None:
            self._skip(label, "missing image", "the sample has no image member (.jpg/.png/.webp/...)")
            return None
        meta: dict[str, Any] = {}
        if sample["json"] is not None:
            try:
                meta = json.loads(sample["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                self._skip(label, "bad sidecar", f"{sample['key']}.json is not valid JSON: {err}")
                return None
            if not isinstance(meta, dict):
                self._skip(label, "bad sidecar", f"{sample['key']}.json must hold a JSON object")
                return None
        caption = None
        if sample["txt"] is not None:
            try:
                caption = sample["txt"].decode("utf-8")
            except UnicodeDecodeError as err:
                self._skip(label, "bad caption file", f"{sample['key']}.txt is not UTF-8 text: {err}")
                return None
        field_name = next((c for c in CAPTION_COLUMNS if c in meta), None)
        value = meta.pop(field_name) if field_name else None
        if caption is None or not caption.strip():  # no .txt, or an empty one: the JSON's caption
            caption = value if value is not None else caption
        key = meta.pop("key", None)
        key = str(key) if isinstance(key, (str, int)) and str(key).strip() else sample["key"]
        meta = validate_meta(meta, label)
        caption = self._caption_or_skip(caption, label, f"add a caption to {sample['key']}.txt")
        return None if caption is None else Entry(key, sample["image"], caption, meta, label)

    def _entry(self, index: int) -> Entry:
        entry = self.entries[index]
        member: Member = entry.image
        with open(member.tar, "rb") as f:
            f.seek(member.offset)
            data = f.read(member.size)
        return replace(entry, image=data)

    def caption_meta(self, index: int) -> tuple[Any, dict[str, Any]]:
        entry = self.entries[index]
        return entry.caption, dict(entry.meta)


__all__ = ["ImageShardDataset", "is_image_shards", "shard_files", "download_shards", "index_tar", "Member"]
