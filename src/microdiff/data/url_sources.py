"""The rows the downloader reads: a URL manifest (``.jsonl`` / ``.csv`` / ``.tsv`` / ``.parquet``) or a
Hugging Face dataset (hub name, ``save_to_disk`` folder or a folder of data files).

``open_source(path)`` -> :class:`Source` (``columns``, ``num_rows``, ``rows()``);
``resolve_columns(columns, url_column, caption_column)`` picks the URL and caption columns.

Text manifests must be UTF-8 (a byte-order mark, as Excel writes, is fine). A CSV that is not UTF-8
is refused at once, naming its first bad line: a URL decoded with a guessed encoding would silently
point elsewhere. In a JSONL file each line stands alone, so a line that is not UTF-8 or not a JSON
object becomes a "bad row" of the report and the others are downloaded.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils.errors import UserError

URL_COLUMNS = ("url", "URL", "image_url")
CAPTION_COLUMNS = ("caption", "text", "TEXT")
MANIFEST_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet")
ERROR_KEY = "__error__"  # a row that cannot be parsed is {ERROR_KEY: message}


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
        first, problem = None, None
        for row in _iter_jsonl(path):
            if ERROR_KEY not in row:
                first = row
                break
            problem = problem or row[ERROR_KEY]
        if first is None and problem is not None:
            raise UserError(f"{path}: no line is a JSON object with columns ({problem})")
        with path.open("rb") as f:
            count = sum(1 for line in f if line.strip())
        return Source(str(path), list(first) if first else [], count, lambda: _iter_jsonl(path))
    if suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else ","
        header, count = _scan_csv(path, delimiter)
        return Source(str(path), header, count, lambda: _iter_csv(path, delimiter))
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # lazily: the [data] extra

        try:
            meta = pq.ParquetFile(path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]}); "
                            "check the file, or give a .jsonl/.csv manifest") from e
        return Source(str(path), list(meta.schema_arrow.names), meta.metadata.num_rows, lambda: _iter_parquet(path))
    raise UserError(f"{path}: unknown manifest type {suffix!r}; use .jsonl, .csv, .tsv or .parquet")


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                row = json.loads(line)
            except UnicodeDecodeError as e:
                row = {ERROR_KEY: f"{path.name} line {number}: not UTF-8 (byte {raw[e.start]:#04x} at column "
                                  f"{e.start + 1}); save the manifest as UTF-8"}
            except json.JSONDecodeError as e:
                row = {ERROR_KEY: f"{path.name} line {number}: {e}"}
            yield row if isinstance(row, dict) else {ERROR_KEY: f"{path.name} line {number}: not a JSON object"}


def _scan_csv(path: Path, delimiter: str) -> tuple[list[str], int]:
    """The header and the number of data rows; a file that is not UTF-8 is refused here, at once."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: line {number} is not UTF-8 text (byte {raw[e.start]:#04x}); save the "
                                "manifest as UTF-8 (in Excel: CSV UTF-8)") from None
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, [])
        return header, sum(1 for _ in reader)


def _iter_csv(path: Path, delimiter: str) -> Iterator[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
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
                    raise UserError(f"{name}: no split {split!r}; it has {', '.join(ds)} (use --split)")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split)
    except (ValueError, ImportError):
        raise
    except Exception as e:  # the hub / builder errors are many; say what we tried
        detail = (str(e).strip().splitlines() or [""])[0]
        raise FileNotFoundError(f"{name}: not a manifest file, and loading it as a Hugging Face dataset "
                                f"(split {split!r}) failed: {type(e).__name__}: {detail}") from e
    return Source(name, list(ds.column_names), len(ds), lambda: iter(ds))


def resolve_columns(columns: Sequence[str], url_column: str | None = None, caption_column: str | None = None,
                    source: str = "source") -> tuple[str, str | None]:
    """The URL and caption columns: the given names (which must exist) or the first default present.

    ``caption_column="none"`` downloads without captions (empty ``.txt``)."""
    available = ", ".join(columns) or "(none)"
    if url_column is not None:
        if url_column not in columns:
            raise UserError(f"{source}: no URL column {url_column!r}; its columns are: {available} "
                            "(pick one with --url-column)")
    else:
        url_column = next((c for c in URL_COLUMNS if c in columns), None)
        if url_column is None:
            raise UserError(f"{source}: found no URL column (tried {', '.join(URL_COLUMNS)}); its columns are: "
                            f"{available} (pick one with --url-column)")
    if caption_column is not None and caption_column.lower() == "none":
        return url_column, None
    if caption_column is not None:
        if caption_column not in columns:
            raise UserError(f"{source}: no caption column {caption_column!r}; its columns are: {available} "
                            "(pick one with --caption-column, or --caption-column none)")
        return url_column, caption_column
    caption_column = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if caption_column is None:
        raise UserError(f"{source}: found no caption column (tried {', '.join(CAPTION_COLUMNS)}); its columns "
                        f"are: {available} (pick one with --caption-column, or --caption-column none)")
    return url_column, caption_column


def row_fields(record: dict[str, Any], url_column: str, caption_column: str | None
               ) -> tuple[Any, str | None, dict[str, Any]]:
    """``(url, caption, other columns)`` of one source row, as the downloader stores them."""
    meta = {k: v for k, v in record.items() if k not in (url_column, caption_column)}
    caption = record.get(caption_column) if caption_column else None
    return record.get(url_column), caption if caption is None or isinstance(caption, str) else str(caption), meta


__all__ = ["Source", "open_source", "resolve_columns", "row_fields", "URL_COLUMNS", "CAPTION_COLUMNS",
           "MANIFEST_SUFFIXES", "ERROR_KEY"]
