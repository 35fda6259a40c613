"""``microdiff data download``: fetch the images of a URL manifest into webdataset shards.

A lean, standard-library stand-in for img2dataset: a thread pool of HTTP fetches with a timeout,
retries with exponential backoff for transient errors (timeouts, 5xx, 408/429, connection resets;
never for other 4xx), a size cap, content checks (Pillow ``verify()`` plus a full decode, a minimum
short side), an on-the-fly resize (short side to ``resolution``, aspect kept, optional centre crop)
and a re-encode (jpg / png / webp). Sources: a manifest (``.jsonl`` / ``.csv`` / ``.tsv`` /
``.parquet``) or a Hugging Face dataset (hub name, ``save_to_disk`` folder or a folder of data files).

Layout of ``out_dir`` (row ``r`` of the source always lands in shard ``r // shard_size`` with key
``f"{r:09d}"``, whatever the number of workers or the order in which downloads finish)::

    00000.tar        <key>.jpg (or .png/.webp), <key>.txt (caption), <key>.json (metadata: url,
                     caption, row, key, status, original_width/height, width/height, bytes, sha256,
                     original_format, and every other source column; a column whose name clashes
                     with one of these is kept as "manifest_<name>")
    00000.jsonl      one status row per source row (success or failure + reason), or .parquet
    download.json    the settings; a rerun with different ones is refused
    report.json      counts by status/reason over all shards; failures.csv: row, key, url, reason, detail

Resume: a shard is complete once its status file exists (it is renamed into place after the tar,
both from ``.partial`` files); a rerun skips complete shards and redoes any other one from scratch.

Failure reasons: "no url", "bad url", "http <code>", "timeout", "connection error", "dns error",
"ssl error", "network error", "bad response", "too large", "opted out" (X-Robots-Tag noai, ...),
"not an image", "corrupt image", "too small", "bad row" (unparsable manifest line), "error".

    download("urls.jsonl", "data/web", resolution=256, workers=16) -> DownloadReport
    microdiff data download urls.parquet --out data/web --resolution 256 --workers 16
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import http.client
import io
import json
import os
import re
import socket
import ssl
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from .transforms import to_rgb  # one rule for every Pillow mode, shared with the training transform

URL_COLUMNS = ("url", "URL", "image_url")
CAPTION_COLUMNS = ("caption", "text", "TEXT")
MANIFEST_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet")
IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
STATUS_FORMATS = ("jsonl", "parquet")
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")  # as img2dataset honours them
KEY_DIGITS = 9
SUCCESS = "success"
USER_AGENT = "microdiff-download/0.1 (image-text dataset downloader)"
MAX_BACKOFF_S = 30.0
CHUNK = 1 << 16
STATUS_FIELDS = ("row", "key", "url", "caption", "status", "reason", "detail", "attempts", "bytes",
                 "original_width", "original_height", "width", "height", "sha256")
RESERVED = ("url", "caption", "row", "key", "status", "original_width", "original_height", "width",
            "height", "bytes", "sha256", "original_format")
# settings that change what lands in a shard: a resumed run must use the same ones
RESUME_SETTINGS = ("source", "url_column", "caption_column", "shard_size", "resolution", "crop",
                   "min_size", "image_format", "quality", "status_format")


# ----------------------------------------------------------------------------- settings and results
@dataclass(frozen=True)
class FetchSettings:
    timeout: float = 10.0  # seconds: socket connect/read timeout and the cap on one whole attempt
    retries: int = 2  # extra attempts after a transient failure
    backoff: float = 0.5  # seconds before the first retry, doubled for each further one
    max_bytes: int = 20 * 2**20
    user_agent: str = USER_AGENT
    opt_out_directives: tuple[str, ...] = OPT_OUT_DIRECTIVES


@dataclass(frozen=True)
class ImageSettings:
    resolution: int | None = 256  # short side after resizing; None keeps the original size
    crop: bool = False  # centre crop to resolution x resolution after the resize
    min_size: int = 32  # images whose short side is smaller are rejected ("too small")
    image_format: str = "jpg"
    quality: int = 95  # jpg / webp


class DownloadError(Exception):
    """One failed sample: ``reason`` is the category counted in the report, ``detail`` the message."""

    def __init__(self, reason: str, detail: str = "", transient: bool = False):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.transient = reason, detail, transient


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

    @property
    def failed(self) -> int:
        return sum(self.failed_by_reason.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"failed": self.failed}

    def format_table(self) -> str:
        total = max(self.rows, 1)
        lines = [f"{self.source} -> {self.out_dir}: {self.rows} rows in {self.shards} shards "
                 f"({self.shards_resumed} resumed, {self.rows_fetched} rows fetched in {self.elapsed_s:.1f} s)",
                 f"  {'status':24s} {'count':>9s} {'%':>6s}"]
        for name, count in [(SUCCESS, self.success), *sorted(self.failed_by_reason.items(), key=lambda kv: -kv[1])]:
            lines.append(f"  {name:24s} {count:9d} {100 * count / total:6.1f}")
        lines.append(f"  {'total':24s} {self.rows:9d}")
        lines.append(f"  report: {Path(self.out_dir) / 'report.json'}  failures: {Path(self.out_dir) / 'failures.csv'}")
        return "\n".join(lines)


def sample_key(row: int) -> str:
    """The key of source row ``row``: zero-padded, so keys sort like rows and contain no dot."""
    return f"{row:0{KEY_DIGITS}d}"


# ----------------------------------------------------------------------------- sources
@dataclass
class Source:
    """Rows of a manifest or dataset: ``columns``, ``num_rows`` (None if unknown), ``rows()``."""

    name: str
    columns: list[str]
    num_rows: int | None
    rows: Any  # () -> Iterator[dict]; a row that cannot be parsed is {"__error__": message}


def open_source(source: str | os.PathLike, split: str = "train") -> Source:
    """A manifest file (by suffix), a local Hugging Face dataset folder or a hub dataset name."""
    text = str(source)
    if text.startswith("hf:"):
        return _hf_source(text[3:].lstrip("/"), split)
    path = Path(text)
    if path.is_file():
        return _manifest_source(path)
    if path.is_dir():
        return _hf_source(text, split)
    if path.suffix.lower() in MANIFEST_SUFFIXES + (".json", ".txt") or not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        raise FileNotFoundError(f"{text}: no such manifest file or dataset folder (give a .jsonl/.csv/.tsv/"
                                ".parquet manifest, a Hugging Face dataset folder, or a hub name like owner/name)")
    return _hf_source(text, split)


def _manifest_source(path: Path) -> Source:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        first = _first_jsonl_row(path)
        count = sum(1 for line in path.open("rb") if line.strip())
        return Source(str(path), list(first) if first else [], count, lambda: _iter_jsonl(path))
    if suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else ","
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, [])
            count = sum(1 for _ in reader)
        return Source(str(path), header, count, lambda: _iter_csv(path, delimiter))
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # lazily: the [data] extra

        meta = pq.ParquetFile(path)
        return Source(str(path), list(meta.schema_arrow.names), meta.metadata.num_rows, lambda: _iter_parquet(path))
    raise ValueError(f"{path}: unknown manifest type {suffix!r}; use .jsonl, .csv, .tsv or .parquet")


def _first_jsonl_row(path: Path) -> dict[str, Any] | None:
    for row in _iter_jsonl(path):
        if "__error__" not in row:
            return row
    return None


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                row = {"__error__": f"{path.name} line {number}: {e}"}
            yield row if isinstance(row, dict) else {"__error__": f"{path.name} line {number}: not a JSON object"}


def _iter_csv(path: Path, delimiter: str) -> Iterator[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f, delimiter=delimiter)


def _iter_parquet(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=8192):
        yield from batch.to_pylist()


def _hf_source(name: str, split: str) -> Source:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("reading a Hugging Face dataset needs `datasets`: pip install 'microdiff[data]'") from e
    path = Path(name)
    try:
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"{name}: no split {split!r}; it has {', '.join(ds)} (use --split)")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split)
    except (ValueError, ImportError):
        raise
    except Exception as e:  # the hub / builder errors are many; say what we tried
        raise FileNotFoundError(f"{name}: not a manifest file, and loading it as a Hugging Face dataset "
                                f"(split {split!r}) failed: {type(e).__name__}: {e}") from e
    return Source(name, list(ds.column_names), len(ds), lambda: iter(ds))


def resolve_columns(columns: Sequence[str], url_column: str | None = None, caption_column: str | None = None,
                    source: str = "source") -> tuple[str, str | None]:
    """The URL and caption columns: the given names (which must exist) or the first default present.

    ``caption_column="none"`` downloads without captions (empty ``.txt``)."""
    available = ", ".join(columns) or "(none)"
    if url_column is not None:
        if url_column not in columns:
            raise ValueError(f"{source}: no URL column {url_column!r}; its columns are: {available} "
                             "(pick one with --url-column)")
    else:
        url_column = next((c for c in URL_COLUMNS if c in columns), None)
        if url_column is None:
            raise ValueError(f"{source}: found no URL column (tried {', '.join(URL_COLUMNS)}); its columns are: "
                             f"{available} (pick one with --url-column)")
    if caption_column is not None and caption_column.lower() == "none":
        return url_column, None
    if caption_column is not None:
        if caption_column not in columns:
            raise ValueError(f"{source}: no caption column {caption_column!r}; its columns are: {available} "
                             "(pick one with --caption-column, or --caption-column none)")
        return url_column, caption_column
    caption_column = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if caption_column is None:
        raise ValueError(f"{source}: found no caption column (tried {', '.join(CAPTION_COLUMNS)}); its columns "
                         f"are: {available} (pick one with --caption-column, or --caption-column none)")
    return url_column, caption_column


# ----------------------------------------------------------------------------- fetching
def fetch(url: str, settings: FetchSettings = FetchSettings()) -> tuple[bytes, int]:
    """The body of ``url`` and the number of attempts it took; raises DownloadError.

    Transient failures are retried ``settings.retries`` times, sleeping ``backoff * 2**i`` between."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):  # file:// etc. would let a shared manifest read local files
        raise DownloadError("bad url", f"unsupported scheme {scheme!r} (http and https only)")
    attempts = 0
    while True:
        attempts += 1
        try:
            return _fetch_once(url, settings), attempts
        except DownloadError as e:
            if not e.transient or attempts > settings.retries:
                e.attempts = attempts
                raise
        time.sleep(min(settings.backoff * 2 ** (attempts - 1), MAX_BACKOFF_S))


_OPENER: urllib.request.OpenerDirector | None = None


def _opener() -> urllib.request.OpenerDirector:
    """urllib's opener without the file:, ftp: and data: handlers, so a redirect cannot reach them."""
    global _OPENER
    if _OPENER is None:
        r = urllib.request
        opener = r.OpenerDirector()
        for handler in (r.ProxyHandler(), r.UnknownHandler(), r.HTTPHandler(), r.HTTPSHandler(),
                        r.HTTPDefaultErrorHandler(), r.HTTPRedirectHandler(), r.HTTPErrorProcessor()):
            opener.add_handler(handler)
        _OPENER = opener
    return _OPENER


def _fetch_once(url: str, settings: FetchSettings) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": settings.user_agent,
                                                   "Accept": "image/*,*/*;q=0.8"})
    deadline = time.monotonic() + settings.timeout
    try:
        with _opener().open(request, timeout=settings.timeout) as response:
            _check_opt_out(response.headers.get_all("X-Robots-Tag") or [], settings.opt_out_directives)
            length = response.headers.get("Content-Length")
            if length and length.strip().isdigit() and int(length) > settings.max_bytes:
                raise DownloadError("too large", f"Content-Length {int(length)} > max {settings.max_bytes} bytes")
            chunks, total = [], 0
            while chunk := response.read1(CHUNK):  # read1: returns what one recv got, so the deadline holds
                total += len(chunk)
                if total > settings.max_bytes:
                    raise DownloadError("too large", f"body over max {settings.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise DownloadError("timeout", f"body not complete after {settings.timeout:g} s", transient=True)
                chunks.append(chunk)
            return b"".join(chunks)
    except DownloadError:
        raise
    except urllib.error.HTTPError as e:
        e.close()
        transient = e.code in (408, 429) or e.code >= 500
        raise DownloadError(f"http {e.code}", str(e.reason), transient=transient) from None
    except urllib.error.URLError as e:
        raise _network_error(e.reason) from None
    except http.client.IncompleteRead as e:
        raise DownloadError("connection error", f"incomplete read ({len(e.partial)} bytes)", transient=True) from None
    except http.client.HTTPException as e:
        raise DownloadError("bad response", f"{type(e).__name__}: {e}") from None
    except ValueError as e:  # malformed URL
        raise DownloadError("bad url", str(e)) from None
    except OSError as e:
        raise _network_error(e) from None


def _network_error(reason: Any) -> DownloadError:
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return DownloadError("timeout", str(reason) or "timed out", transient=True)
    if isinstance(reason, socket.gaierror):
        return DownloadError("dns error", str(reason))
    if isinstance(reason, ssl.SSLError):
        return DownloadError("ssl error", str(reason))
    if isinstance(reason, ConnectionError):
        return DownloadError("connection error", f"{type(reason).__name__}: {reason}", transient=True)
    if isinstance(reason, str) and "timed out" in reason:
        return DownloadError("timeout", reason, transient=True)
    return DownloadError("network error", f"{type(reason).__name__}: {reason}")


def _check_opt_out(values: list[str], directives: Sequence[str]) -> None:
    """X-Robots-Tag values like "noai, noimageai" or "somebot: noindex" (honoured for every bot)."""
    for value in values:
        for part in value.lower().split(","):
            token = part.rsplit(":", 1)[-1].strip()
            if token in directives:
                raise DownloadError("opted out", f"X-Robots-Tag: {value}")


# ----------------------------------------------------------------------------- images
def resize_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) with the short side equal to ``resolution`` and the aspect kept (round half up)."""
    if width <= height:
        return resolution, max(1, int(height * resolution / width + 0.5))
    return max(1, int(width * resolution / height + 0.5)), resolution


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    left, top = (width - size) // 2, (height - size) // 2
    return left, top, left + size, top + size


def process_image(data: bytes, settings: ImageSettings = ImageSettings()) -> tuple[bytes, dict[str, Any]]:
    """Check that ``data`` is a complete image of the minimum size, resize and re-encode it as RGB.

    Returns the encoded bytes and ``original_width/height`` (after EXIF rotation), ``width/height``
    and ``original_format``; raises DownloadError ("not an image", "corrupt image", "too small",
    "too large" for decompression bombs)."""
    if not data:
        raise DownloadError("not an image", "empty body")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        image = Image.open(io.BytesIO(data))
        original_format = image.format
        if min(image.size) < settings.min_size:
            raise DownloadError("too small", f"{image.size[0]}x{image.size[1]}, short side < {settings.min_size}")
        image.load()
        image = ImageOps.exif_transpose(image)
    except DownloadError:
        raise
    except Image.DecompressionBombError as e:
        raise DownloadError("too large", str(e)) from None
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
        if "__error__" in meta:
            raise DownloadError("bad row", meta.pop("__error__"))
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
        os.replace(self._tar_partial, self.tar_path)
        status_partial = self.status_path.with_name(self.status_path.name + ".partial")
        write_status(status_partial, self.rows, self.status_format)
        _fsync(status_partial)
        os.replace(status_partial, self.status_path)  # this rename marks the shard complete

    def abort(self) -> None:
        self._tar.close()


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
             workers: int = 16, timeout: float = 10.0, retries: int = 2, backoff: float = 0.5,
             max_bytes: int = 20 * 2**20, shard_size: int = 1000, status_format: str = "jsonl",
             limit: int | None = None, user_agent: str = USER_AGENT,
             opt_out_directives: Sequence[str] = OPT_OUT_DIRECTIVES, progress: bool = True) -> DownloadReport:
    """Download the images of ``source`` into webdataset shards in ``out_dir`` (see the module doc).

    Resumable: complete shards already in ``out_dir`` are skipped. Writes ``report.json`` and
    ``failures.csv`` covering all shards and returns the same counts as a DownloadReport."""
    _check_settings(image_format, status_format, quality, workers, shard_size, retries, timeout, resolution, crop,
                    limit)
    start = time.monotonic()
    src = open_source(source, split)
    url_col, caption_col = resolve_columns(src.columns, url_column, caption_column, src.name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"source": _canonical_source(source), "url_column": url_col, "caption_column": caption_col,
                "shard_size": shard_size, "resolution": resolution, "crop": crop, "min_size": min_size,
                "image_format": image_format, "quality": quality, "status_format": status_format}
    _check_resume_settings(out / "download.json", settings)
    (out / "download.json").write_text(json.dumps(settings | {"timeout": timeout, "retries": retries,
                                                              "max_bytes": max_bytes, "limit": limit}, indent=2))
    fetch_settings = FetchSettings(timeout, retries, backoff, max_bytes, user_agent, tuple(opt_out_directives))
    image_settings = ImageSettings(resolution, crop, min_size, image_format, quality)

    total_rows = src.num_rows if limit is None or src.num_rows is None else min(src.num_rows, limit)
    done = {}  # complete shards holding every row they should (a --limit run may have cut the last one)
    for shard, path in complete_shards(out, status_format).items():
        expected = shard_size if total_rows is None else min(shard_size, total_rows - shard * shard_size)
        if expected > 0 and len(read_status(path)) == expected:
            done[shard] = expected
    resumed_rows = sum(done.values())
    from tqdm.auto import tqdm

    bar = tqdm(total=None if total_rows is None else max(total_rows - resumed_rows, 0), unit="img",
               desc="download", disable=not progress, dynamic_ncols=True)
    counts: Counter[str] = Counter()
    fetched, n_shards, resumed = 0, 0, set()
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
            writer = ShardWriter(out, shard, image_format, status_format)
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
            n_shards = shard + 1
            if shard in done:
                resumed.add(shard)
                continue
            meta = {k: v for k, v in record.items() if k not in (url_col, caption_col)}
            caption = record.get(caption_col) if caption_col else None
            caption = caption if caption is None or isinstance(caption, str) else str(caption)
            window.append(pool.submit(download_row, row, record.get(url_col), caption, meta,
                                      fetch_settings, image_settings))
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
    return _write_report(out, src.name, n_shards, len(resumed), fetched, status_format, time.monotonic() - start)


def _check_settings(image_format, status_format, quality, workers, shard_size, retries, timeout, resolution, crop,
                    limit) -> None:
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format {image_format!r}: choose one of {', '.join(IMAGE_FORMATS)}")
    if status_format not in STATUS_FORMATS:
        raise ValueError(f"status_format {status_format!r}: choose one of {', '.join(STATUS_FORMATS)}")
    for name, value, low in [("workers", workers, 1), ("shard_size", shard_size, 1), ("retries", retries, 0),
                             ("quality", quality, 1)]:
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if resolution is not None and resolution < 1:
        raise ValueError(f"resolution must be >= 1 (or None to keep the original size), got {resolution}")
    if crop and not resolution:
        raise ValueError("crop needs a resolution to crop to (--resolution N with --crop)")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")


def _canonical_source(source: str | os.PathLike) -> str:
    path = Path(source)
    return str(path.resolve()) if path.exists() else str(source)


def _check_resume_settings(path: Path, settings: dict[str, Any]) -> None:
    if not path.is_file():
        return
    previous = json.loads(path.read_text())
    changed = [f"{k}: {previous.get(k)!r} -> {settings[k]!r}" for k in RESUME_SETTINGS if previous.get(k) != settings[k]]
    if changed:
        raise ValueError(f"{path.parent}: holds a download made with other settings ({'; '.join(changed)}); "
                         "rerun with the same ones to resume, or choose a new --out folder")


def _write_report(out: Path, source: str, n_shards: int, n_resumed: int, fetched: int, status_format: str,
                  elapsed: float) -> DownloadReport:
    """Aggregate the status files of shards 0..n_shards-1 into report.json and failures.csv."""
    success, by_reason, failures = 0, Counter(), []
    for shard in range(n_shards):
        for row in read_status(out / f"{shard_name(shard)}.{status_format}"):
            if row["status"] == SUCCESS:
                success += 1
            else:
                by_reason[row["reason"]] += 1
                failures.append(row)
    report = DownloadReport(out_dir=str(out), source=source, rows=success + sum(by_reason.values()),
                            success=success, failed_by_reason=dict(by_reason.most_common()), shards=n_shards,
                            shards_resumed=n_resumed, rows_fetched=fetched, elapsed_s=round(elapsed, 3))
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    with (out / "failures.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "key", "url", "reason", "detail"])
        for row in failures:
            writer.writerow([row["row"], row["key"], row["url"] or "", row["reason"], row["detail"]])
    return report


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("source", help="manifest (.jsonl/.csv/.tsv/.parquet), Hugging Face dataset folder, "
                                       "or hub dataset name (owner/name or hf:name)")
    parser.add_argument("--out", required=True, help="output folder for the shards and reports")
    parser.add_argument("--url-column", help=f"URL column (default: first of {', '.join(URL_COLUMNS)})")
    parser.add_argument("--caption-column", help=f"caption column (default: first of {', '.join(CAPTION_COLUMNS)}; "
                                                 "'none' for no captions)")
    parser.add_argument("--split", default="train", help="split of a Hugging Face dataset (default: train)")
    parser.add_argument("--resolution", type=int, default=256,
                        help="resize the short side to this, keeping the aspect (default: 256; 0 keeps the size)")
    parser.add_argument("--crop", action="store_true", help="centre crop to resolution x resolution")
    parser.add_argument("--min-size", type=int, default=32, help="reject images whose short side is smaller (default: 32)")
    parser.add_argument("--format", dest="image_format", choices=list(IMAGE_FORMATS), default="jpg",
                        help="image encoding in the shards (default: jpg)")
    parser.add_argument("--quality", type=int, default=95, help="jpg/webp quality (default: 95)")
    parser.add_argument("--workers", type=int, default=16, help="parallel downloads (default: 16)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request attempt (default: 10)")
    parser.add_argument("--retries", type=int, default=2,
                        help="retries of transient failures: timeouts, 5xx, 429, resets (default: 2)")
    parser.add_argument("--max-mb", type=float, default=20.0, help="largest accepted download in MiB (default: 20)")
    parser.add_argument("--shard-size", type=int, default=1000, help="source rows per shard (default: 1000)")
    parser.add_argument("--status-format", choices=STATUS_FORMATS, default="jsonl",
                        help="per-shard status files (default: jsonl; parquet needs pyarrow)")
    parser.add_argument("--limit", type=int, help="only the first N rows of the source")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    report = download(args.source, args.out, url_column=args.url_column, caption_column=args.caption_column,
                      split=args.split, resolution=args.resolution or None, crop=args.crop, min_size=args.min_size,
                      image_format=args.image_format, quality=args.quality, workers=args.workers,
                      timeout=args.timeout, retries=args.retries, max_bytes=int(args.max_mb * 2**20),
                      shard_size=args.shard_size, status_format=args.status_format, limit=args.limit,
                      progress=not args.no_progress)
    print(report.format_table())
    sys.stdout.flush()
    return 0


__all__ = ["download", "DownloadReport", "DownloadError", "FetchSettings", "ImageSettings", "SampleResult",
           "Source", "open_source", "resolve_columns", "fetch", "process_image", "resize_size",
           "center_crop_box", "download_row", "sample_key", "shard_name", "ShardWriter", "read_status",
           "write_status", "complete_shards", "URL_COLUMNS", "CAPTION_COLUMNS", "add_arguments", "run"]
