"""The run folder as something a run owns: who may write to it, what may be continued, what a resume may change.

- **One writer.** ``RunLock`` holds an exclusive ``flock`` on ``RUN/.lock`` while a run trains; a second run
  into the same folder is refused in one line naming the process that holds it. The kernel drops the lock
  when its process dies (kill -9 included), so a lock left by a dead run is taken over, and said so.
- **Nothing overwritten.** ``check_folder`` refuses ``--resume never`` into a folder that already holds a
  run (or anything else), and any resume into a non-empty folder that is not a microdiff run.
- **Exact resume or an explicit choice.** ``config_changes`` lists the keys a resumed run changed against
  the config its checkpoint was trained with. Keys in ``RESUME_SAFE`` (more steps, logging, checkpoint
  cadence, sampling defaults, loader workers) leave the numbers of an exact resume alone; any other change
  is refused unless the user passes ``--allow-config-change``. Either way the change is appended to
  ``RUN/config_history.jsonl``; ``RUN/config.yaml`` stays the config the run was started with.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import yaml

from ..utils.errors import UserError
from ..utils.files import output_folder
from ..utils.locks import FolderLock

LOCK_NAME = ".lock"
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config_history.jsonl"

# keys (or section prefixes ending in ".") whose change keeps an exact resume exact
RESUME_SAFE = ("name", "train.steps", "train.threads", "log.", "checkpoint.", "sampling.", "data.num_workers",
               "data.pin_memory", "data.cache", "ema.export", "distributed.backend")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_writable(out: Path) -> None:
    """``out`` is (or can become) a folder this process can write, else one line saying why not."""
    output_folder(out, "--out")


def is_run_folder(out: Path) -> bool:
    return (out / CONFIG_FILE).is_file() or (out / "checkpoints").is_dir() or (out / "metrics.jsonl").is_file()


def check_folder(out: Path, resume: str | None) -> None:
    """Refuse a start that would overwrite or mix with what ``out`` already holds (see the module docstring)."""
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.is_dir() else []
    if not entries:
        return
    if resume in (None, "", "never"):
        what = "a training run" if is_run_folder(out) else f"{len(entries)} other file(s) ({', '.join(entries[:3])})"
        raise UserError(f"--out {out} already holds {what}, and --resume never would overwrite it; pass a new --out, "
                        "or --resume auto to continue that run")
    if not is_run_folder(out):
        raise UserError(f"--out {out}: the folder is not empty ({', '.join(entries[:3])}) and holds no microdiff run "
                        f"(no {CONFIG_FILE}); pass a new or empty --out")


class RunLock(FolderLock):
    """The training run's lock on ``RUN/.lock`` (utils/locks.py)."""

    def __init__(self, out: Path):
        super().__init__(out, LOCK_NAME, "training run")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: data}


def _resume_safe(key: str) -> bool:
    return any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in RESUME_SAFE)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """Each key whose value differs between two config dicts: ``{"key", "old", "new", "safe"}``."""
    a, b = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        if key in a and key in b and _same(a[key], b[key]):
            continue
        changes.append({"key": key, "old": a.get(key), "new": b.get(key), "safe": _resume_safe(key)})
    return changes


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
        return float(x) == float(y)
    return json.dumps(x, sort_keys=True, default=str) == json.dumps(y, sort_keys=True, default=str)


def refuse_unsafe(changes: list[dict[str, Any]], against: str) -> None:
    unsafe = [c for c in changes if not c["safe"]]
    if unsafe:
        listed = ", ".join(f"{c['key']} {c['old']!r} -> {c['new']!r}" for c in unsafe[:6])
        more = f" and {len(unsafe) - 6} more" if len(unsafe) > 6 else ""
        raise UserError(f"the config differs from the one {against} was trained with, which breaks an exact resume: "
                        f"{listed}{more}; restore those values, pass a new --out to start a new run, or "
                        "--allow-config-change to continue with them (recorded in config_history.jsonl)")


def read_run_config(path: Path) -> dict[str, Any] | None:
    """A run folder's config.yaml as a dict; a damaged one is one line naming it."""
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]}); restore it from a checkpoint's "
                        "config.json, or pass a new --out") from None
    return data if isinstance(data, dict) else None


def record_history(out: Path, step: int, changes: list[dict[str, Any]], forced: bool) -> None:
    row = {"time": _now(), "step": int(step), "allowed_by": "--allow-config-change" if forced else "resume-safe keys",
           "changes": changes}
    with open(out / HISTORY_FILE, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


__all__ = ["RunLock", "check_writable", "check_folder", "is_run_folder", "config_changes", "refuse_unsafe", "read_run_config",
           "record_history", "RESUME_SAFE", "LOCK_NAME", "CONFIG_FILE", "HISTORY_FILE"]
