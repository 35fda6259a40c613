"""Content hashes of files: what a checkpoint or a folder records about itself so that a later read can
tell an intact file from a damaged, truncated or swapped one."""

from __future__ import annotations

import hashlib
from pathlib import Path

DIGEST = "sha256"
CHUNK = 1 << 22


def file_digest(path: str | Path) -> str:
    """``"sha256:<hex>"`` of a file's bytes (streamed, so any size)."""
    h = hashlib.new(DIGEST)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return f"{DIGEST}:{h.hexdigest()}"


def path_digest(path: str | Path) -> str:
    """``"sha256:<hex>"`` of a file, or of a folder: every file in it (hidden ones too), by relative
    name and content, so renaming, changing, adding or removing a file changes it."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    h = hashlib.new(DIGEST)
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(item.relative_to(path).as_posix().encode() + b"\0" + file_digest(item).encode() + b"\0")
    return f"{DIGEST}:{h.hexdigest()}"


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    return file_digest(path).partition(":")[2]


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


__all__ = ["DIGEST", "file_digest", "path_digest", "file_sha256", "file_record", "check_file"]
