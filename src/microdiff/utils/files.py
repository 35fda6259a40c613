"""Output files that never end half-written and folders checked before any work starts.

``write_text_atomic`` / ``write_png_atomic`` write to a hidden temporary file beside the target and
rename it into place, so a killed process leaves the old file or the new one, never a torn one.
``output_folder`` turns a bad ``--out`` (a file, a place that cannot be written) into one line
naming the option, before hours of work are spent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from .errors import UserError


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """JSON (indented, keys sorted) through a temporary file and a rename (readers never see half a file)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def save_torch_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and a rename (the folder is created if needed)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_png_atomic(image, path: str | os.PathLike, text: Mapping[str, Any] | None = None) -> None:
    """Save ``image`` (PIL) as a PNG with ``text`` as ``microdiff:<key>`` text chunks, atomically."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(f"microdiff:{key}", str(value))
    path = Path(path)
    tmp = _tmp(path)
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def output_folder(path: str | os.PathLike, field: str = "--out") -> Path:
    """Create ``path`` (and its parents) as an output folder, or one UserError naming ``field``: it is
    a file, or it cannot be created or written."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{field} {path}: a file, not a folder; pass a folder to write into")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{field} {path}: cannot create this folder ({err.strerror or err}); pass a folder "
                        "you can write to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{field} {path}: this folder is not writable; pass a folder you can write to")
    return path


__all__ = ["write_text_atomic", "write_json_atomic", "save_torch_atomic", "write_png_atomic", "output_folder"]
