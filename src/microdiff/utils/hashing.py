"""Content hashes of files: what a checkpoint or a folder records about itself so that a later read can
tell an intact file from a damaged, truncated or swapped one."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB chunks (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | Path) -> dict[str, int | str]:
    """``{"bytes": size, "sha256": hex}`` of a file, as manifests store it."""
    path = Path(path)
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def check_file(path: str | Path, record: dict) -> str | None:
    """None if ``path`` matches ``record`` (from :func:`file_record`), else what is wrong in a few words."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size == 0:
        return "empty"
    if "bytes" in record and size != int(record["bytes"]):
        return f"{'truncated' if size < int(record['bytes']) else 'wrong size'}: {size} bytes, {record['bytes']} expected"
    if "sha256" in record and file_sha256(path) != record["sha256"]:
        return "content hash mismatch (the file was changed or damaged after it was written)"
    return None


__all__ = ["file_sha256", "file_record", "check_file"]
