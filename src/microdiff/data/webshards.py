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
a missing caption) are reported skips like a folder's.

A damaged tar (truncated, a header that does not check, or bytes after the last member that are not
the end-of-archive marker: tarfile would silently stop there and the rest of the shard would vanish)
is a "corrupt shard". Training refuses it in one line naming it (``corrupt_shards="raise"``): it holds
a whole shard of items, so going on would train on less data than the user has without saying so, and
the fix is cheap (a rerun of the download fetches that shard again). ``data check`` and ``data inspect``
report it (``corrupt_shards="report"``: reason "corrupt shard", with the count of images the
download's status file says it held) and go on with the other shards. ``microdiff data download``
writes ``NNNNN.sha256`` beside each shard (``sha256sum -c`` reads it); ``verify=True`` (data check)
compares every tar with it, which also catches damage inside an image member.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..utils.errors import UserError
from ..utils.hashing import file_sha256
from .captioned import CAPTION_COLUMNS, IMAGE_SUFFIXES, CaptionedDataset, Entry, Transform, unique_keys, validate_meta

DOWNLOAD_SETTINGS = "download.json"
DOWNLOAD_REPORT = "report.json"
LATENT_INFO = "dataset.json"
IMAGE_EXTENSIONS = {s.lstrip(".") for s in IMAGE_SUFFIXES}
CORRUPT = "corrupt shard"


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


class CorruptShard(UserError):
    """A tar that cannot be read to its end (the message names it and the fix)."""


def hash_sidecar(tar: Path) -> Path:
    """``NNNNN.sha256`` beside ``NNNNN.tar``: the shard's SHA-256 as ``sha256sum`` writes it."""
    return tar.with_suffix(".sha256")


def recorded_hash(tar: Path) -> str | None:
    """The SHA-256 (hex) the download recorded for ``tar``, or None when it recorded none."""
    try:
        text = hash_sidecar(tar).read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    return text[0].lower() if text and len(text[0]) == 64 else None


def _fix(path: Path) -> str:
    if (path.parent / DOWNLOAD_SETTINGS).is_file():
        return (f"rerun `microdiff data download` with the same arguments and --out {path.parent}: it fetches this "
                "shard's rows again")
    return "recreate the shard or move it out of the folder"


def _after_last_member(f, end: int, size: int) -> bool:
    """True when the bytes from ``end`` (where tarfile stopped) to the end are the end-of-archive marker:
    at least two zero blocks, and nothing but zeros."""
    if size - end < 1024:
        return False
    f.seek(end)
    while chunk := f.read(1 << 16):
        if chunk.count(0) != len(chunk):
            return False
    return True


def index_tar(path: Path) -> list[dict[str, Any]]:
    """Per sample of one tar, in file order: ``{"key", "image": Member | None, "image_name", "txt": bytes
    | None, "json": bytes | None}``. A truncated or corrupt tar is a :class:`CorruptShard` naming it."""
    size = path.stat().st_size
    if size % 512:
        raise CorruptShard(f"{path}: {size} bytes is not a whole number of 512-byte tar blocks: the shard is "
                           f"truncated; {_fix(path)}")
    samples: dict[str, dict[str, Any]] = {}
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
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
            end = tar.offset
            complete = _after_last_member(f, end, size)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise CorruptShard(f"{path}: truncated or corrupt tar ({type(err).__name__}: {err}); {_fix(path)}") from None
    if not complete:
        raise CorruptShard(f"{path}: corrupt tar: reading stopped at byte {end} of {size} (a damaged member header "
                           f"after {len(samples)} sample(s), or a truncated end); {_fix(path)}")
    for sample in samples.values():
        if sample["image"] is not None and sample["image"].offset + sample["image"].size > size:
            sample["image"] = replace(sample["image"], size=max(size - sample["image"].offset, 0))  # read what is there
    return list(samples.values())


def check_hash(tar: Path) -> None:
    """A :class:`CorruptShard` when ``tar`` differs from the SHA-256 its download recorded (none: no check)."""
    want = recorded_hash(tar)
    if want is not None and file_sha256(tar) != want:
        raise CorruptShard(f"{tar}: content hash mismatch with {hash_sidecar(tar).name} (the shard was changed or "
                           f"damaged after it was downloaded); {_fix(tar)}")


def _images_held(tar: Path) -> int | None:
    """The images a download's status file (jsonl) says ``tar`` holds, or None if it cannot say."""
    try:
        lines = tar.with_suffix(".jsonl").read_text(encoding="utf-8").splitlines()
        return sum(json.loads(line).get("status") == "success" for line in lines if line.strip())
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None


class ImageShardDataset(CaptionedDataset):
    """The samples of image webdataset tars (see the module docstring)."""

    def __init__(self, source: str | os.PathLike, transform: Transform, corrupt_shards: str = "raise",
                 verify: bool = False, **kwargs: Any):
        super().__init__(transform, name=kwargs.pop("name", str(source)), **kwargs)
        if corrupt_shards not in ("raise", "report"):
            raise ValueError(f"corrupt_shards must be 'raise' or 'report', got {corrupt_shards!r}")
        self.root = Path(source)
        self.tars = shard_files(source)
        self.corrupt: list[Path] = []
        for tar in self.tars:
            try:
                if verify:
                    check_hash(tar)
                samples = index_tar(tar)
            except CorruptShard as err:
                if corrupt_shards == "raise":
                    raise
                self.corrupt.append(tar)
                held = _images_held(tar)
                self._skip(str(tar), CORRUPT, str(err) + ("" if held is None else f" (it holds {held} images)"))
                continue
            for sample in samples:
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


__all__ = ["ImageShardDataset", "is_image_shards", "shard_files", "download_shards", "index_tar", "Member",
           "CorruptShard", "CORRUPT", "hash_sidecar", "recorded_hash", "check_hash"]
