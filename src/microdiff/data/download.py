"""``microdiff data download``: fetch the images of a URL manifest into webdataset shards.

A lean, standard-library stand-in for img2dataset: a thread pool of HTTP fetches (``data/fetch.py``:
a timeout that caps each whole attempt, retries with exponential backoff for transient errors, a size
cap), content checks (a pixel cap read from the header before anything is decoded, Pillow
``verify()`` plus a full decode, a minimum short side), an on-the-fly resize (short side to
``resolution``, aspect kept, optional centre crop) and a re-encode (jpg / png / webp). Sources
(``data/url_sources.py``): a manifest (``.jsonl`` / ``.csv`` / ``.tsv`` / ``.parquet``) or a Hugging
Face dataset (hub name, ``save_to_disk`` folder or a folder of data files).

Layout of ``out_dir`` (row ``r`` of the source always lands in shard ``r // shard_size`` with key
``f"{r:09d}"``, whatever the number of workers or the order in which downloads finish)::

    00000.tar        <key>.jpg (or .png/.webp), <key>.txt (caption), <key>.json (metadata: url,
                     caption, row, key, status, original_width/height, width/height, bytes, sha256,
                     original_format, and every other source column; a column whose name clashes
                     with one of these is kept as "manifest_<name>")
    00000.sha256     the tar's SHA-256 as ``sha256sum`` writes it (``sha256sum -c 00000.sha256``)
    00000.jsonl      one status row per source row (success or failure + reason), or .parquet
    download.json    the settings that make the dataset (a rerun with other ones is refused) and
                     "runs": one entry per run with its fetch settings, start and end time, counts
    report.json      counts by status/reason over all shards; failures.csv: row, key, url, reason, detail
    .download.lock   locked while a run writes (a second run into the folder is refused)

Resume: a shard is complete once its status file exists (it is renamed into place after the tar,
both from ``.partial`` files); a rerun skips complete shards and redoes any other one from scratch.
A rerun must read the same rows: the URL and caption of every row of a complete shard are checked
against the source first, so an edited manifest is refused instead of mixed in (rows appended at the
end are fine). ``--out`` must be new, empty or a folder of this same download. Every complete shard
is checked against its ``.sha256`` first (one of an older version without it: read through, then
given one); a damaged one is fetched again like an unfinished one, and the run says so. A run that
ends with no image in the folder (every row failed) exits 2 naming ``failures.csv`` and
``report.json``, which are written all the same.

Failure reasons: "no url", "bad url", "http <code>", "timeout", "connection error", "dns error",
"ssl error", "network error", "bad response", "too large" (over the bytes cap), "opted out"
(X-Robots-Tag noai, ...), "not an image", "corrupt image", "too small", "too many pixels" (over the
pixel cap, e.g. a decompression bomb), "bad row" (unparsable manifest line), "error".

    download("urls.jsonl", "data/web", resolution=256, workers=16) -> DownloadReport
    microdiff data download urls.parquet --out data/web --resolution 256 --workers 16
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import math
import os
import sys
import tarfile
import time
import warnings
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from ..utils.errors import UserError
from ..utils.files import write_text_atomic
from ..utils.hashing import file_sha256
from ..utils.locks import FolderLock
from .fetch import OPT_OUT_DIRECTIVES, USER_AGENT, DownloadError, FetchSettings, fetch
from .shards import write_json_atomic
from .transforms import to_rgb  # one rule for every Pillow mode, shared with the training transform
from .url_sources import (CAPTION_COLUMNS, ERROR_KEY, URL_COLUMNS, Source, open_source, resolve_columns,
                          row_fields)
from .webshards import CorruptShard, hash_sidecar, index_tar, recorded_hash

IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
STATUS_FORMATS = ("jsonl", "parquet")
KEY_DIGITS = 9
SUCCESS = "success"
MAX_PIXELS = 40_000_000  # ~120 MB decoded as RGB; Pillow itself only warns up to 89 M and refuses past 179 M
SETTINGS_NAME, REPORT_NAME, FAILURES_NAME, LOCK_NAME = "download.json", "report.json", "failures.csv", ".download.lock"
STATUS_FIELDS = ("row", "key", "url", "caption", "status", "reason", "detail", "attempts", "bytes",
                 "original_width", "original_height", "width", "height", "sha256")
RESERVED = ("url", "caption", "row", "key", "status", "original_width", "original_height", "width",
            "height", "bytes", "sha256", "original_format")
# settings that change what lands in a shard: a resumed run must use the same ones
RESUME_SETTINGS = ("source", "url_column", "caption_column", "shard_size", "resolution", "crop",
                   "min_size", "image_format", "quality", "status_format")


# ----------------------------------------------------------------------------- settings and results
@dataclass(frozen=True)
class ImageSettings:
    resolution: int | None = 256  # short side after resizing; None keeps the original size
    crop: bool = False  # centre crop to resolution x resolution after the resize
    min_size: int = 32  # images whose short side is smaller are rejected ("too small")
    image_format: str = "jpg"
    quality: int = 95  # jpg / webp
    max_pixels: int = MAX_PIXELS  # images whose header declares more are refused unread ("too many pixels")

    def __post_init__(self):
        if self.image_format not in IMAGE_FORMATS:
            raise UserError(f"image_format {self.image_format!r} (--format): choose one of {', '.join(IMAGE_FORMATS)}")
        if self.resolution is not None and not (isinstance(self.resolution, int) and self.resolution >= 1):
            raise UserError(f"resolution (--resolution): must be >= 1, or None (--resolution 0) to keep the "
                            f"original size; got {self.resolution}")
        if self.crop and not self.resolution:
            raise UserError("crop (--crop) needs a resolution to crop to: give --resolution N with --crop")
        if not (isinstance(self.min_size, int) and self.min_size >= 0):
            raise UserError(f"min_size (--min-size): must be >= 0 pixels, got {self.min_size}")
        if not (isinstance(self.quality, int) and 1 <= self.quality <= 100):
            raise UserError(f"quality (--quality): must be 1 to 100, got {self.quality}")
        if not (isinstance(self.max_pixels, int) and self.max_pixels >= 1):
            raise UserError(f"max_pixels (--max-megapixels): must be >= 1 pixel, got {self.max_pixels}")


@dataclass
class SampleResult:
    row: int
    key: str
    url: str | None
    caption: str | None
    meta: dict[str, Any]
    status: str = SUCCESS
    reason: str = ""
    detail: str = ""
    attempts: int = 0
    bytes: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    original_format: str | None = None
    image: bytes | None = field(default=None, repr=False)

    def status_row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in STATUS_FIELDS}


@dataclass
class DownloadReport:
    out_dir: str
    source: str
    rows: int  # source rows covered by the shards of this output folder
    success: int
    failed_by_reason: dict[str, int]
    shards: int
    shards_resumed: int  # complete shards found on disk and skipped by this run
    rows_fetched: int  # rows this run processed (the others were in resumed shards)
    elapsed_s: float
    shards_redone: dict[str, str] = field(default_factory=dict)  # complete shards found damaged: fetched again

    @property
    def failed(self) -> int:
        return sum(self.failed_by_reason.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"failed": self.failed}

    def format_table(self) -> str:
        total = max(self.rows, 1)
        lines = [f"{name}: damaged since it was downloaded ({why}): its rows were fetched again"
                 for name, why in self.shards_redone.items()]
        lines += [f"{self.source} -> {self.out_dir}: {self.rows} rows in {self.shards} shards "
                 f"({self.shards_resumed} resumed, {self.rows_fetched} rows fetched in {self.elapsed_s:.1f} s)",
                 f"  {'status':24s} {'count':>9s} {'%':>6s}"]
        for name, count in [(SUCCESS, self.success), *sorted(self.failed_by_reason.items(), key=lambda kv: -kv[1])]:
            lines.append(f"  {name:24s} {count:9d} {100 * count / total:6.1f}")
        lines.append(f"  {'total':24s} {self.rows:9d}")
        lines.append(f"  report: {Path(self.out_dir) / REPORT_NAME}  failures: {Path(self.out_dir) / FAILURES_NAME}")
        return "\n".join(lines)


def sample_key(row: int) -> str:
    """The key of source row ``row``: zero-padded, so keys sort like rows and contain no dot."""
    return f"{row:0{KEY_DIGITS}d}"


# ----------------------------------------------------------------------------- images
def resize_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) with the short side equal to ``resolution`` and the aspect kept (round half up)."""
    if width <= height:
        return resolution, max(1, int(height * resolution / width + 0.5))
    return max(1, int(width * resolution / height + 0.5)), resolution


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    left, top = (width - size) // 2, (height - size) // 2
    return left, top, left + size, top + size


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Refuse an image of more than ``max_pixels`` pixels, by the size its header declares."""
    if width * height > max_pixels:
        raise DownloadError("too many pixels", f"{width}x{height} = {width * height} pixels > max {max_pixels} "
                                               "(--max-megapixels)")


def process_image(data: bytes, settings: ImageSettings = ImageSettings()) -> tuple[bytes, dict[str, Any]]:
    """Check that ``data`` is a complete image of the minimum size, resize and re-encode it as RGB.

    The pixel count is read from the header (Pillow opens lazily) and checked against
    ``settings.max_pixels`` before anything is decoded, so a small file declaring a huge image (a
    decompression bomb) costs no memory. Returns the encoded bytes and ``original_width/height`` (after
    EXIF rotation), ``width/height`` and ``original_format``; raises DownloadError ("not an image",
    "corrupt image", "too small", "too many pixels")."""
    if not data:
        raise DownloadError("not an image", "empty body")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            check_pixels(*probe.size, settings.max_pixels)
            probe.verify()
        image = Image.open(io.BytesIO(data))
        original_format = image.format
        if min(image.size) < settings.min_size:
            raise DownloadError("too small", f"{image.size[0]}x{image.size[1]}, short side < {settings.min_size}")
        image.load()
        image = ImageOps.exif_transpose(image)
    except DownloadError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own limit (2 x 89 M), checked when it opens the file
        raise DownloadError("too many pixels", f"{e} (--max-megapixels cannot go above Pillow's limit)") from None
    except UnidentifiedImageError:
        raise DownloadError("not an image", f"Pillow cannot identify {len(data)} bytes starting {data[:16]!r}") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... on bad files
        raise DownloadError("corrupt image", f"{type(e).__name__}: {e}") from None
    info: dict[str, Any] = {"original_width": image.width, "original_height": image.height,
                            "original_format": original_format}
    image = to_rgb(image)
    if settings.resolution:
        size = resize_size(image.width, image.height, settings.resolution)
        if size != image.size:
            shrinking = size[0] < image.width
            image = image.resize(size, Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC,
                                 reducing_gap=3.0 if shrinking else None)
        if settings.crop:
            image = image.crop(center_crop_box(image.width, image.height, settings.resolution))
    buffer = io.BytesIO()
    pil_format = IMAGE_FORMATS[settings.image_format]
    options = {"quality": settings.quality} if pil_format in ("JPEG", "WEBP") else {}
    image.save(buffer, pil_format, **options)
    info |= {"width": image.width, "height": image.height}
    return buffer.getvalue(), info


def download_row(row: int, url: Any, caption: str | None, meta: dict[str, Any],
                 fetch_settings: FetchSettings, image_settings: ImageSettings) -> SampleResult:
    """Fetch and process one source row; every failure becomes a SampleResult, never an exception."""
    result = SampleResult(row=row, key=sample_key(row), url=url if isinstance(url, str) else None,
                          caption=caption, meta=meta)
    try:
        if ERROR_KEY in meta:
            raise DownloadError("bad row", meta.pop(ERROR_KEY))
        if not isinstance(url, str) or not url.strip():
            raise DownloadError("no url", f"empty or missing URL ({url!r})")
        data, result.attempts = fetch(url.strip(), fetch_settings)
        result.bytes, result.sha256 = len(data), hashlib.sha256(data).hexdigest()
        result.image, info = process_image(data, image_settings)
        for name, value in info.items():
            setattr(result, name, value)
    except DownloadError as e:
        result.status, result.reason, result.detail = "failed", e.reason, e.detail
        result.attempts = getattr(e, "attempts", result.attempts)
        result.image = None
    except Exception as e:  # a bug or an exotic library error must not stop a million-row run
        result.status, result.reason, result.detail = "failed", "error", f"{type(e).__name__}: {e}"
        result.image = None
    return result


# ----------------------------------------------------------------------------- shards
def shard_name(shard: int) -> str:
    return f"{shard:05d}"


class ShardWriter:
    """Writes ``<shard>.tar`` and its status file through ``.partial`` files, renamed when done."""

    def __init__(self, out_dir: Path, shard: int, image_format: str, status_format: str):
        self.shard, self.image_ext, self.status_format = shard, image_format, status_format
        self.tar_path = out_dir / f"{shard_name(shard)}.tar"
        self.status_path = out_dir / f"{shard_name(shard)}.{status_format}"
        self.status_path.unlink(missing_ok=True)  # an incomplete shard is redone from scratch
        self._tar_partial = self.tar_path.with_name(self.tar_path.name + ".partial")
        self._tar = tarfile.open(self._tar_partial, "w", format=tarfile.PAX_FORMAT)
        self.rows: list[dict[str, Any]] = []

    def add(self, result: SampleResult) -> None:
        self.rows.append(result.status_row())
        if result.image is None:
            return
        meta = {f"manifest_{k}" if k in RESERVED else k: v for k, v in result.meta.items()}
        meta |= {"url": result.url, "caption": result.caption, "row": result.row, "key": result.key,
                 "status": result.status, "original_width": result.original_width,
                 "original_height": result.original_height, "width": result.width, "height": result.height,
                 "bytes": result.bytes, "sha256": result.sha256, "original_format": result.original_format}
        self._add_member(f"{result.key}.{self.image_ext}", result.image)
        self._add_member(f"{result.key}.txt", (result.caption or "").encode("utf-8"))
        self._add_member(f"{result.key}.json", json.dumps(meta, default=_jsonable, ensure_ascii=False).encode("utf-8"))

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed: same downloads, same bytes
        self._tar.addfile(info, io.BytesIO(data))

    def finish(self) -> None:
        self._tar.close()
        _fsync(self._tar_partial)
        write_hash(self.tar_path, file_sha256(self._tar_partial))  # before the tar: a complete shard has one
        os.replace(self._tar_partial, self.tar_path)
        status_partial = self.status_path.with_name(self.status_path.name + ".partial")
        write_status(status_partial, self.rows, self.status_format)
        _fsync(status_partial)
        os.replace(status_partial, self.status_path)  # this rename marks the shard complete

    def abort(self) -> None:
        self._tar.close()


def write_hash(tar: Path, sha256: str) -> Path:
    """``NNNNN.sha256`` beside ``tar`` in ``sha256sum`` format (``sha256sum -c 00000.sha256`` checks it)."""
    path = hash_sidecar(tar)
    write_text_atomic(path, f"{sha256}  {tar.name}\n")
    return path


def damaged_shards(complete: dict[int, Path], out: Path) -> dict[int, str]:
    """The complete shards whose tar is damaged: it differs from its recorded SHA-256, or (a shard of an
    older version, with no hash) it does not read to its end; what is wrong with each. An intact shard
    without a hash gets one now."""
    damaged = {}
    for shard in sorted(complete):
        tar = out / f"{shard_name(shard)}.tar"
        want = recorded_hash(tar)
        if want is not None:
            if file_sha256(tar) != want:
                damaged[shard] = f"its SHA-256 differs from {hash_sidecar(tar).name}"
            continue
        try:
            index_tar(tar)
        except CorruptShard as err:
            damaged[shard] = str(err).removeprefix(f"{tar}: ").split(";")[0]
            continue
        write_hash(tar, file_sha256(tar))
    return damaged


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _jsonable(value: Any) -> Any:
    if isinstance(value, (_dt.date, _dt.datetime, _dt.time)):
        return value.isoformat()
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    return str(value)


def write_status(path: Path, rows: list[dict[str, Any]], status_format: str) -> None:
    if status_format == "jsonl":
        path.write_text("".join(json.dumps(r, default=_jsonable, ensure_ascii=False) + "\n" for r in rows),
                        encoding="utf-8")
        return
    import pyarrow as pa  # lazily: the [data] extra
    import pyarrow.parquet as pq

    int_fields = {"row", "attempts", "bytes", "original_width", "original_height", "width", "height"}
    schema = pa.schema([(name, pa.int64() if name in int_fields else pa.string()) for name in STATUS_FIELDS])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def read_status(path: Path) -> list[dict[str, Any]]:
    """The status rows of one shard (either format)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def complete_shards(out_dir: Path, status_format: str) -> dict[int, Path]:
    """Shard index -> status file, for shards whose tar and status file are both in place."""
    found = {}
    for status in out_dir.glob(f"[0-9]*.{status_format}"):
        if status.stem.isdigit() and (out_dir / f"{status.stem}.tar").is_file():
            found[int(status.stem)] = status
    return found


# ----------------------------------------------------------------------------- the run
def download(source: str | os.PathLike, out_dir: str | os.PathLike, *, url_column: str | None = None,
             caption_column: str | None = None, split: str = "train", resolution: int | None = 256,
             crop: bool = False, min_size: int = 32, image_format: str = "jpg", quality: int = 95,
             max_pixels: int = MAX_PIXELS, workers: int = 16, timeout: float = 10.0, retries: int = 2,
             backoff: float = 0.5, max_bytes: int = 20 * 2**20, shard_size: int = 1000, status_format: str = "jsonl",
             limit: int | None = None, user_agent: str = USER_AGENT,
             opt_out_directives: Sequence[str] = OPT_OUT_DIRECTIVES, progress: bool = True) -> DownloadReport:
    """Download the images of ``source`` into webdataset shards in ``out_dir`` (see the module doc).

    Resumable: complete shards already in ``out_dir`` are checked against the source and skipped.
    Writes ``report.json`` and ``failures.csv`` covering all shards and returns the same counts as a
    DownloadReport. Bad settings, sources or output folders raise UserError before anything is written."""
    fetch_settings = FetchSettings(timeout, retries, backoff, max_bytes, user_agent, tuple(opt_out_directives))
    image_settings = ImageSettings(resolution, crop, min_size, image_format, quality, max_pixels)
    _check_run_settings(workers, shard_size, status_format, limit)
    start = time.monotonic()
    src = open_source(source, split)
    if src.num_rows == 0:
        raise UserError(f"{src.name}: no rows to download (the source is empty); give a manifest with a URL per row")
    url_col, caption_col = resolve_columns(src.columns, url_column, caption_column, src.name)
    settings = {"source": _canonical_source(source), "url_column": url_col, "caption_column": caption_col,
                "shard_size": shard_size, "resolution": resolution, "crop": crop, "min_size": min_size,
                "image_format": image_format, "quality": quality, "status_format": status_format}
    this_run = {"started": _now(), "finished": None, "workers": workers, "timeout": timeout, "retries": retries,
                "backoff": backoff, "max_bytes": max_bytes, "max_pixels": max_pixels, "limit": limit}
    with _download_folder(Path(out_dir)) as out:
        runs = _previous_runs(out, settings)
        complete = complete_shards(out, status_format)
        damaged = damaged_shards(complete, out)  # fetched again below, like a shard a killed run left unfinished
        held = _check_shards_match_source(out, src, url_col, caption_col,
                                          {k: v for k, v in complete.items() if k not in damaged}, shard_size)
        write_json_atomic(out / SETTINGS_NAME, settings | {"runs": runs + [this_run]})
        total_rows = src.num_rows if limit is None or src.num_rows is None else min(src.num_rows, limit)
        done = {shard for shard, n in held.items()  # a --limit run may have cut the last one short: redone
                if n >= (shard_size if total_rows is None else min(shard_size, total_rows - shard * shard_size))}
        fetched, resumed = _fetch_rows(src, url_col, caption_col, out, done, total_rows, limit, workers, shard_size,
                                       status_format, fetch_settings, image_settings, progress)
        report = _write_report(out, src.name, resumed, fetched, status_format, time.monotonic() - start,
                               {f"{shard_name(k)}.tar": why for k, why in damaged.items()})
        this_run |= {"finished": _now(), "rows_fetched": fetched, "shards_resumed": resumed,
                     "shards_redone": report.shards_redone}
        write_json_atomic(out / SETTINGS_NAME, settings | {"runs": runs + [this_run]})
    return report


def _fetch_rows(src: Source, url_col: str, caption_col: str | None, out: Path, done: set[int],
                total_rows: int | None, limit: int | None, workers: int, shard_size: int, status_format: str,
                fetch_settings: FetchSettings, image_settings: ImageSettings, progress: bool) -> tuple[int, int]:
    """Fetch every row of the source outside the ``done`` shards, writing shards in row order.

    Shows a progress bar (rate, ETA, ok/failed so far); returns (rows fetched, shards skipped)."""
    from tqdm.auto import tqdm

    todo = None if total_rows is None else max(total_rows - sum(
        min(shard_size, total_rows - s * shard_size) for s in done if s * shard_size < total_rows), 0)
    bar = tqdm(total=todo, unit="img", desc="download", disable=not progress, dynamic_ncols=True)
    counts: Counter[str] = Counter()
    fetched, resumed = 0, set()
    writer: ShardWriter | None = None
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="microdiff-download")
    window: deque[Future] = deque()

    def collect(future: Future) -> None:
        nonlocal writer, fetched
        result: SampleResult = future.result()
        shard = result.row // shard_size
        if writer is None or writer.shard != shard:
            if writer is not None:
                writer.finish()
            writer = ShardWriter(out, shard, image_settings.image_format, status_format)
        writer.add(result)
        fetched += 1
        counts["ok" if result.status == SUCCESS else "failed"] += 1
        bar.update(1)
        bar.set_postfix(ok=counts["ok"], failed=counts["failed"], refresh=False)

    try:
        for row, record in enumerate(src.rows()):
            if limit is not None and row >= limit:
                break
            shard = row // shard_size
            if shard in done:
                resumed.add(shard)
                continue
            url, caption, meta = row_fields(record, url_col, caption_col)
            window.append(pool.submit(download_row, row, url, caption, meta, fetch_settings, image_settings))
            while len(window) >= workers * 4:  # bounded look-ahead; results are written in row order
                collect(window.popleft())
        while window:
            collect(window.popleft())
        if writer is not None:
            writer.finish()
            writer = None
    finally:
        for future in window:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        if writer is not None:  # interrupted: leave the .partial files, the shard is redone next time
            writer.abort()
        bar.close()
    return fetched, len(resumed)


def _check_run_settings(workers, shard_size, status_format, limit) -> None:
    if status_format not in STATUS_FORMATS:
        raise UserError(f"status_format {status_format!r} (--status-format): choose one of {', '.join(STATUS_FORMATS)}")
    for name, flag, value in [("workers", "--workers", workers), ("shard_size", "--shard-size", shard_size)]:
        if not (isinstance(value, int) and value >= 1):
            raise UserError(f"{name} ({flag}): must be a whole number >= 1, got {value}")
    if limit is not None and not (isinstance(limit, int) and limit >= 1):
        raise UserError(f"limit (--limit): must be a whole number >= 1 (the rows to download), got {limit}")


def _canonical_source(source: str | os.PathLike) -> str:
    path = Path(source)
    return str(path.resolve()) if path.exists() else str(source)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- the output folder
@contextmanager
def _download_folder(out: Path) -> Iterator[Path]:
    """``out``, created if needed and locked for this run: new, empty (hidden files aside) or a download's."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out is a file, not a folder; give a new folder, or one holding this download")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the --out folder ({e.strerror or e}); "
                        "choose a path you can write") from None
    if not (out / SETTINGS_NAME).is_file():
        theirs = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if theirs:
            raise UserError(f"{out}: --out is not empty ({len(theirs)} entries, e.g. {theirs[0]}) and holds no "
                            f"{SETTINGS_NAME} of a download; choose a new or empty folder")
    with FolderLock(out, LOCK_NAME, "download"):
        yield out


def _previous_runs(out: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs recorded in ``out/download.json`` after checking that they made the same dataset."""
    path = out / SETTINGS_NAME
    if not path.is_file():
        return []
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(previous, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: damaged ({e}); the settings of this download are unknown, so it cannot be "
                        "resumed: choose a new --out") from None
    changed = [f"{k}: {previous.get(k)!r} -> {settings[k]!r}" for k in RESUME_SETTINGS if previous.get(k) != settings[k]]
    if changed:
        raise UserError(f"{out}: holds a download made with other settings ({'; '.join(changed)}); "
                        "rerun with the same ones to resume, or choose a new --out folder")
    runs = previous.get("runs")
    if isinstance(runs, list):
        return runs
    old = {k: previous[k] for k in ("timeout", "retries", "max_bytes", "limit") if k in previous}  # before "runs"
    return [old] if old else []


def _check_shards_match_source(out: Path, src: Source, url_col: str, caption_col: str | None,
                               complete: dict[int, Path], shard_size: int) -> dict[int, int]:
    """Rows held by each complete shard, after checking that they are the rows the source has now.

    Every status row of a complete shard is compared (row number, URL, caption) with the source's row:
    a manifest edited since the shard was made would otherwise mix two datasets in one folder."""
    held: dict[int, int] = {}
    if not complete:
        return held
    rows = enumerate(src.rows())
    for shard in sorted(complete):
        status = _read_status_checked(complete[shard])
        held[shard] = len(status)
        for offset, kept in enumerate(status):
            row = shard * shard_size + offset
            if kept.get("row") != row:
                raise UserError(f"{complete[shard]}: damaged status file (entry {offset} is row {kept.get('row')}, "
                                f"not {row}); delete this shard's .tar and status file to redo it")
            record = next((record for r, record in rows if r == row), None)
            if record is None:
                raise UserError(f"{out}: shard {shard_name(shard)} holds row {row}, but {src.name} now has fewer "
                                "rows; the source changed since this download: download it into a new --out")
            url, caption, _ = row_fields(record, url_col, caption_col)
            now = {"url": url if isinstance(url, str) else None, "caption": caption}
            for name, value in now.items():
                if kept.get(name) != value:
                    raise UserError(f"{out}: shard {shard_name(shard)} was downloaded from other rows than "
                                    f"{src.name} has now (row {row}: {name} {kept.get(name)!r} -> {value!r}); "
                                    "the source changed since this download: download it into a new --out")
    return held


def _read_status_checked(path: Path) -> list[dict[str, Any]]:
    try:
        return read_status(path)
    except Exception as e:  # noqa: BLE001 - json or pyarrow errors: a damaged file, said in one line
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: damaged status file ({detail}); delete this shard's .tar and status file "
                        "to redo it") from None


def _write_report(out: Path, source: str, n_resumed: int, fetched: int, status_format: str,
                  elapsed: float, redone: dict[str, str] | None = None) -> DownloadReport:
    """Aggregate the status files of every complete shard in ``out`` into report.json and failures.csv."""
    success, by_reason, failures = 0, Counter(), []
    shards = complete_shards(out, status_format)
    for shard in sorted(shards):
        for row in read_status(shards[shard]):
            if row["status"] == SUCCESS:
                success += 1
            else:
                by_reason[row["reason"]] += 1
                failures.append(row)
    report = DownloadReport(out_dir=str(out), source=source, rows=success + sum(by_reason.values()),
                            success=success, failed_by_reason=dict(by_reason.most_common()), shards=len(shards),
                            shards_resumed=n_resumed, rows_fetched=fetched, elapsed_s=round(elapsed, 3),
                            shards_redone=dict(redone or {}))
    write_json_atomic(out / REPORT_NAME, report.to_dict())
    partial = out / f".{FAILURES_NAME}.partial"
    with partial.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "key", "url", "reason", "detail"])
        for row in failures:
            writer.writerow([row["row"], row["key"], row["url"] or "", row["reason"], row["detail"]])
    os.replace(partial, out / FAILURES_NAME)
    return report


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("source", help="manifest (.jsonl/.csv/.tsv/.parquet, UTF-8), Hugging Face dataset folder, "
                                       "or hub dataset name (owner/name or hf:name)")
    parser.add_argument("--out", required=True, help="output folder for the shards and reports: new, empty, or "
                                                     "one holding this same download (then it resumes, and fetches "
                                                     "a shard whose tar no longer matches its .sha256 again)")
    parser.add_argument("--url-column", help=f"URL column (default: first of {', '.join(URL_COLUMNS)})")
    parser.add_argument("--caption-column", help=f"caption column (default: first of {', '.join(CAPTION_COLUMNS)}; "
                                                 "'none' for no captions)")
    parser.add_argument("--split", default=None, help="split of a Hugging Face dataset (default: train)")
    parser.add_argument("--resolution", type=int, default=256,
                        help="resize the short side to this, keeping the aspect (default: 256; 0 keeps the size)")
    parser.add_argument("--crop", action="store_true", help="centre crop to resolution x resolution")
    parser.add_argument("--min-size", type=int, default=32, help="reject images whose short side is smaller (default: 32)")
    parser.add_argument("--max-megapixels", type=float, default=MAX_PIXELS / 1e6,
                        help="refuse images whose header declares more pixels, before decoding them: decompression "
                             f"bombs (default: {MAX_PIXELS / 1e6:g}, about {3 * MAX_PIXELS // 10**6} MB decoded)")
    parser.add_argument("--format", dest="image_format", choices=list(IMAGE_FORMATS), default="jpg",
                        help="image encoding in the shards (default: jpg)")
    parser.add_argument("--quality", type=int, default=None, help="jpg/webp quality, 1-100 (default: 95)")
    parser.add_argument("--workers", type=int, default=16, help="parallel downloads (default: 16)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds one request attempt may take in all: connect, headers, body and redirects, "
                             "however slowly the server sends (default: 10)")
    parser.add_argument("--retries", type=int, default=2,
                        help="retries of transient failures: timeouts, 5xx, 429, resets (default: 2)")
    parser.add_argument("--max-mb", type=float, default=20.0, help="largest accepted download in MiB (default: 20)")
    parser.add_argument("--shard-size", type=int, default=1000, help="source rows per shard (default: 1000)")
    parser.add_argument("--status-format", choices=STATUS_FORMATS, default="jsonl",
                        help="per-shard status files (default: jsonl; parquet needs pyarrow)")
    parser.add_argument("--limit", type=int, help="only the first N rows of the source (N >= 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _positive(flag: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{flag}: must be a number > 0, got {value}")
    return value


def run(args) -> int:
    # this command checks pixel counts itself, below Pillow's warning threshold, and reports each refusal:
    # Pillow's own warning for 89-179 M pixel headers would only repeat that on stderr
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    max_bytes = int(_positive("--max-mb", args.max_mb) * 2**20)
    max_pixels = int(_positive("--max-megapixels", args.max_megapixels) * 1e6)
    if args.quality is not None and args.image_format == "png":
        raise UserError(f"--quality {args.quality}: applies to jpg and webp, and --format png is lossless; leave "
                        "--quality out, or choose --format jpg or webp")
    if args.split is not None and Path(args.source).is_file():
        raise UserError(f"--split {args.split}: applies to Hugging Face datasets, and {args.source} is a manifest "
                        "file; leave --split out")
    report = download(args.source, args.out, url_column=args.url_column, caption_column=args.caption_column,
                      split=args.split or "train", resolution=args.resolution or None, crop=args.crop,
                      min_size=args.min_size, image_format=args.image_format,
                      quality=95 if args.quality is None else args.quality, max_pixels=max_pixels,
                      workers=args.workers, timeout=args.timeout, retries=args.retries, max_bytes=max_bytes,
                      shard_size=args.shard_size, status_format=args.status_format, limit=args.limit,
                      progress=not args.no_progress)
    print(report.format_table())
    sys.stdout.flush()
    if report.success == 0:  # the reports are written: they say why every row failed
        why = ", ".join(f"{reason}: {n}" for reason, n in list(report.failed_by_reason.items())[:3])
        out = Path(report.out_dir)
        raise UserError(f"{out}: no image was downloaded ({report.rows} rows failed: {why}); see "
                        f"{out / FAILURES_NAME} and {out / REPORT_NAME} for each row's reason")
    return 0


__all__ = ["download", "DownloadReport", "DownloadError", "FetchSettings", "ImageSettings", "SampleResult",
           "Source", "open_source", "resolve_columns", "fetch", "process_image", "check_pixels", "resize_size",
           "center_crop_box", "download_row", "sample_key", "shard_name", "ShardWriter", "read_status",
           "write_status", "complete_shards", "URL_COLUMNS", "CAPTION_COLUMNS", "MAX_PIXELS", "add_arguments", "run"]
