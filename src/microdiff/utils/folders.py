"""A command's own output folder: new, empty, or made by this same command before; locked while it writes.

    with claim_folder(args.out, "data shapes", ".shapes.json", settings) as previous:
        ...   # previous: the marker an earlier run left (None for a new or empty folder)

The marker is a JSON file the command writes into its folder, stamped (``utils.files.stamp``) and with the
``settings`` that made the folder. A rerun is allowed into a folder whose marker this command wrote;
when ``settings`` are given they must be the marker's (else one line listing what changed, unless the
caller was told to replace the earlier run). A folder holding anything else (hidden files aside) is
someone else's and refused in one line: nothing the user made is overwritten or mixed with new output.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .errors import UserError
from .files import WRITTEN_BY, output_folder, stamp, write_json_atomic
from .locks import FolderLock


def read_marker(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def normalised(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` as they read back from JSON (tuples become lists, ...), so a rerun compares equal."""
    return json.loads(json.dumps(dict(settings), default=str, sort_keys=True))


def changed_settings(before: Mapping[str, Any] | None, now: Mapping[str, Any]) -> list[str]:
    """``"key old -> new"`` for each (dotted, nested) setting that differs."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, Mapping):
            return {prefix: d}
        out: dict[str, Any] = {}
        for key, value in d.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, Mapping) and value else
                       {f"{prefix}{key}": value})
        return out

    def short(value: Any) -> str:
        text = json.dumps(value, default=str)
        return text if len(text) <= 60 else text[:57] + "..."

    a, b = flat(before or {}), flat(normalised(now))
    return [f"{k} {short(a.get(k))} -> {short(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def write_marker(folder: str | os.PathLike, marker: str, command: str, settings: Mapping[str, Any],
                 **extra: Any) -> Path:
    path = Path(folder) / marker
    write_json_atomic(path, {**stamp(command), "settings": normalised(settings), **extra})
    return path


@contextmanager
def claim_folder(path: str | os.PathLike, command: str, marker: str, settings: Mapping[str, Any] | None = None, *,
                 field: str = "--out", replace: bool = False, replace_flag: str | None = None,
                 legacy: Callable[[Path], bool] | None = None, write: bool = True) -> Iterator[dict[str, Any] | None]:
    """Create and lock ``path`` for ``microdiff <command>``, refusing in one line naming ``field``:

    - a folder another live process is writing to (``FolderLock``, ``.lock`` inside it);
    - a folder that holds files (hidden ones aside) but no ``marker`` this command wrote (``legacy(folder)``
      may accept a folder of an older version that wrote no marker);
    - with ``settings``: a marker whose settings differ, unless ``replace`` (the caller's explicit flag,
      named ``replace_flag`` in the message).

    ``write``: write the marker with ``settings`` now, before any work (else the caller writes it, e.g. as
    its summary file at the end). Yields the earlier marker's content (None if there was none)."""
    who = f"microdiff {command}"
    out = output_folder(path, field)
    with FolderLock(out, ".lock", f"{who} run"):
        marker_path = out / marker
        previous = read_marker(marker_path) if marker_path.exists() else None
        if marker_path.exists() and (previous is None or previous.get(WRITTEN_BY) != who):
            raise UserError(f"{field} {out}: {marker} there was not written by {who}, so this folder is not an earlier "
                            f"run of it; choose a new or empty folder")
        if previous is None:
            theirs = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
            if theirs and not (legacy is not None and legacy(out)):
                raise UserError(f"{field} {out}: the folder holds other files ({len(theirs)} entries, e.g. "
                                f"{theirs[0]}) and is not an earlier run of {who} (no {marker}); choose a new or empty folder")
        elif settings is not None and not replace:
            changed = changed_settings(previous.get("settings"), settings)
            if changed:
                again = f", pass {replace_flag} to replace it" if replace_flag else ""
                raise UserError(f"{field} {out}: holds an earlier {who} run made with other settings "
                                f"({'; '.join(changed)}); rerun with the same ones{again}, or choose another {field}")
        if write and settings is not None:
            write_marker(out, marker, command, settings)
        yield previous


__all__ = ["claim_folder", "write_marker", "read_marker", "changed_settings", "normalised"]
