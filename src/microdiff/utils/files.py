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
from typing import Any, Callable, Mapping

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


WRITTEN_BY = "written_by"  # the key (JSON, .npz) or PNG text chunk that says which command made a file


def stamp(command: str) -> dict[str, str]:
    """``{"written_by": "microdiff <command>"}``: put it into every JSON report a command writes, so that a
    rerun knows the file is its own (replaceable) and not something the user made (never overwritten)."""
    return {WRITTEN_BY: f"microdiff {command}"}


def written_by(path: str | os.PathLike) -> str | None:
    """Which microdiff command wrote ``path`` (from its stamp), or None for a file of anyone else."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return data.get(WRITTEN_BY) if isinstance(data, dict) else None
        if path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as image:
                return image.text.get(f"microdiff:{WRITTEN_BY}") if hasattr(image, "text") else None
        if path.suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as data:
                return str(data[WRITTEN_BY]) if WRITTEN_BY in data.files else None
    except (OSError, ValueError, UnicodeDecodeError, SyntaxError):
        return None
    return None


def output_file(path: str | os.PathLike, field: str, command: str,
                ours: Callable[[Path], bool] | None = None) -> Path:
    """A file a command is about to write at ``path`` (given as ``field``): its folder is created, and an
    existing file is replaced only when this command wrote it (``written_by`` or the ``ours`` test), else
    one UserError naming the field; a folder or an unwritable place is one line too."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{field} {path}: a folder, not a file; pass a file path")
    if path.exists():
        mine = ours(path) if ours is not None else written_by(path) == f"microdiff {command}"
        if not mine:
            raise UserError(f"{field} {path}: the file exists and was not written by microdiff {command}; pass "
                            "another path, or move it away first")
    output_folder(path.parent, field)
    return path


__all__ = ["stamp", "written_by", "output_file", "WRITTEN_BY", "write_text_atomic", "write_json_atomic", "save_torch_atomic", "write_png_atomic", "output_folder"]
