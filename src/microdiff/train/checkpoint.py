"""Checkpoints of a run folder: atomic writes, keep-last-N, find the latest for ``--resume auto``.

    RUN/checkpoints/step-00000500/state.pt   full training state (torch.save; loaded with
                                              weights_only=True): model, ema, optimizer, step,
                                              data position, RNG states, config
    RUN/checkpoints/step-00000500/DONE       written last: only complete checkpoints count
    RUN/pipeline/                            the EMA weights as a loadable pipeline folder

A checkpoint folder is written under a temporary name and renamed into place, so a run killed
mid-write leaves either the old set or the new one, never a half-written checkpoint that
``latest_checkpoint`` would pick.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

STEP_RE = re.compile(r"step-(\d{8})$")
STATE_NAME = "state.pt"
DONE_NAME = "DONE"


def checkpoint_dir(run: str | Path) -> Path:
    return Path(run) / "checkpoints"


def list_checkpoints(run: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = STEP_RE.match(path.name)
        if m and (path / DONE_NAME).is_file() and (path / STATE_NAME).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run: str | Path) -> Path | None:
    found = list_checkpoints(run)
    return found[-1][1] if found else None


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final`` (replacing it) with renames only."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_checkpoint(run: str | Path, step: int, state: dict[str, Any], keep_last: int = 2) -> Path:
    root = checkpoint_dir(run)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / STATE_NAME)
    with open(tmp / STATE_NAME, "rb") as f:
        os.fsync(f.fileno())
    (tmp / DONE_NAME).write_text(f"{step}\n")
    replace_dir(tmp, final)
    prune_checkpoints(run, keep_last)
    return final


def prune_checkpoints(run: str | Path, keep_last: int) -> None:
    found = list_checkpoints(run)
    for _, path in found[: max(len(found) - max(keep_last, 1), 0)]:
        shutil.rmtree(path, ignore_errors=True)
    for stale in checkpoint_dir(run).glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / STATE_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no training state ({STATE_NAME}); pass a checkpoint folder or a run folder")
    return torch.load(file, map_location="cpu", weights_only=True)


def resolve_resume(run: str | Path, resume: str | None) -> Path | None:
    """``None``/``never`` -> None; ``auto`` -> the run's latest complete checkpoint or None;
    a path -> that checkpoint (an error if it is not one)."""
    if resume in (None, "", "never"):
        return None
    if resume == "auto":
        return latest_checkpoint(run)
    path = Path(resume)
    if path.is_dir() and (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"--resume {resume}: that run has no complete checkpoint yet")
        return latest
    if not (path / STATE_NAME).is_file() and not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (with {STATE_NAME}) or a run folder; "
                                "use --resume auto to continue the run in --out")
    return path


__all__ = ["save_checkpoint", "list_checkpoints", "latest_checkpoint", "load_state", "resolve_resume",
           "prune_checkpoints", "replace_dir", "checkpoint_dir", "STATE_NAME"]
