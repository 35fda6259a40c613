"""Checkpoints of a run folder: atomic writes, content hashes, keep-last-N, and the newest intact one
for ``--resume auto``.

    RUN/checkpoints/step-00000500/state.pt     full training state (torch.save; loaded with
                                                weights_only=True): model, ema, optimizer, step,
                                                data position, RNG states, monitor window, config
    RUN/checkpoints/step-00000500/config.json  the run config the state was trained with (read
                                                without loading the state)
    RUN/checkpoints/step-00000500/DONE         written last: {"step", "files": {name: {bytes, sha256}}}
    RUN/pipeline/                              the EMA weights as a loadable pipeline folder

A checkpoint folder is written under a temporary name and renamed into place, so a run killed
mid-write leaves either the old set or the new one, never a half-written checkpoint. What the disk
does later (a flipped byte, a truncated copy, an emptied file) is caught by the hashes in ``DONE``:
torch's zip reader checks nothing, so a damaged ``state.pt`` would otherwise load garbage silently.
``--resume auto`` takes the newest checkpoint whose files match their hashes, says which ones it
passed over, and stops if none is intact. Checkpoints from before the hashes (``DONE`` holding only
the step) still load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from ..utils.errors import UserError
from ..utils.hashing import check_file, file_record
from ..utils.weights import read_torch_file

STEP_RE = re.compile(r"step-(\d{8})$")
STATE_NAME = "state.pt"
CONFIG_NAME = "config.json"
DONE_NAME = "DONE"


class CheckpointDamaged(UserError):
    """A checkpoint whose files do not match what its ``DONE`` manifest recorded, or cannot be read."""


def checkpoint_dir(run: str | Path) -> Path:
    return Path(run) / "checkpoints"


def list_checkpoints(run: str | Path) -> list[tuple[int, Path]]:
    """Checkpoints of a run that were completely written (a ``DONE`` file), oldest first; whether their
    files are still intact is :func:`verify_checkpoint`'s question."""
    root = checkpoint_dir(run)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = STEP_RE.match(path.name)
        if m and (path / DONE_NAME).is_file():
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
    """Write ``state`` as RUN/checkpoints/step-NNNNNNNN (atomically, with content hashes), then prune."""
    root = checkpoint_dir(run)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / STATE_NAME)
    files = [STATE_NAME]
    if "config" in state:
        (tmp / CONFIG_NAME).write_text(json.dumps(state["config"], indent=1, sort_keys=True))
        files.append(CONFIG_NAME)
    for name in files:
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    manifest = {"step": int(step), "files": {name: file_record(tmp / name) for name in files}}
    (tmp / DONE_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    replace_dir(tmp, final)
    prune_checkpoints(run, keep_last)
    return final


def _manifest(path: Path) -> dict[str, Any] | None:
    """The ``DONE`` manifest of a checkpoint folder; None for one written before manifests (step only)."""
    try:
        data = json.loads((path / DONE_NAME).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointDamaged(f"{path / DONE_NAME}: unreadable ({err}); the checkpoint is damaged") from None
    if isinstance(data, int):  # a checkpoint from before content hashes
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise CheckpointDamaged(f"{path / DONE_NAME}: not a checkpoint manifest; the checkpoint is damaged")
    return data


def verify_checkpoint(path: str | Path) -> str | None:
    """None if the checkpoint folder is intact, else one line naming the damaged file and what is wrong."""
    path = Path(path)
    if not (path / DONE_NAME).is_file():
        return f"{path}: incomplete (no {DONE_NAME}): it was never completely written"
    try:
        manifest = _manifest(path)
    except CheckpointDamaged as err:
        return str(err)
    records = manifest["files"] if manifest is not None else {STATE_NAME: {}}
    if STATE_NAME not in records:
        return f"{path / DONE_NAME}: lists no {STATE_NAME}; the checkpoint is damaged"
    for name, record in records.items():
        problem = check_file(path / name, record)
        if problem:
            return f"{path / name}: {problem}"
    return None


def prune_checkpoints(run: str | Path, keep_last: int) -> None:
    found = list_checkpoints(run)
    for _, path in found[: max(len(found) - max(keep_last, 1), 0)]:
        shutil.rmtree(path, ignore_errors=True)
    for stale in checkpoint_dir(run).glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_state(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The training state of a checkpoint folder (or a ``state.pt`` file), checked against its hashes."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    file = path / STATE_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no training state ({STATE_NAME}); pass a checkpoint folder or a run folder")
    if verify and (folder / DONE_NAME).is_file():
        problem = verify_checkpoint(folder)
        if problem:
            raise CheckpointDamaged(problem)
    try:
        state = read_torch_file(file, "training state", fix="the checkpoint is damaged; resume from another one")
    except UserError as err:
        raise CheckpointDamaged(str(err)) from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointDamaged(f"{file}: not a microdiff training state")
    return state


def checkpoint_config(path: str | Path) -> dict[str, Any] | None:
    """The run config a checkpoint was trained with, without loading its state when it can."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return json.loads((path / CONFIG_NAME).read_text())
    return load_state(path).get("config")


def _step_folders(run: str | Path) -> list[tuple[int, Path]]:
    """Every step-NNNNNNNN folder of a run, complete or not, oldest first (a folder without DONE was not
    written by a save, which renames complete folders into place: it was damaged or copied in part)."""
    root = checkpoint_dir(run)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir())


def _latest_intact(run: str | Path, note: Callable[[str], None]) -> Path | None:
    found = _step_folders(run)
    passed = []
    for step, path in reversed(found):
        problem = verify_checkpoint(path)
        if problem is None:
            if passed:
                note(f"resuming from {path.name}, the newest intact checkpoint ({len(passed)} newer one(s) damaged)")
            return path
        note(f"checkpoint {path.name} is damaged and is skipped: {problem}")
        passed.append(path)
    if passed:
        raise CheckpointDamaged(f"{checkpoint_dir(run)}: none of the {len(passed)} checkpoints is intact (newest: "
                                f"{verify_checkpoint(passed[0])}); restore one from a backup, or start again "
                                "with a new --out")
    return None


def resolve_resume(run: str | Path, resume: str | None, note: Callable[[str], None] = print) -> Path | None:
    """``None``/``never`` -> None; ``auto`` -> the run's newest intact checkpoint (damaged newer ones are
    reported through ``note`` and passed over) or None; a run folder -> its newest intact checkpoint; a
    checkpoint folder -> that checkpoint (an error if it is damaged)."""
    if resume in (None, "", "never"):
        return None
    if resume == "auto":
        return _latest_intact(run, note)
    path = Path(resume)
    if path.is_dir() and (path / "checkpoints").is_dir():
        latest = _latest_intact(path, note)
        if latest is None:
            raise FileNotFoundError(f"--resume {resume}: that run has no complete checkpoint yet")
        return latest
    if not (path / STATE_NAME).is_file() and not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (with {STATE_NAME}) or a run folder; "
                                "use --resume auto to continue the run in --out")
    folder = path if path.is_dir() else path.parent
    problem = verify_checkpoint(folder) if (folder / DONE_NAME).is_file() else None
    if problem:
        raise CheckpointDamaged(f"--resume {resume}: {problem}")
    return path


__all__ = ["save_checkpoint", "list_checkpoints", "latest_checkpoint", "load_state", "resolve_resume",
           "prune_checkpoints", "replace_dir", "checkpoint_dir", "verify_checkpoint", "checkpoint_config",
           "CheckpointDamaged", "STATE_NAME", "CONFIG_NAME", "DONE_NAME"]
