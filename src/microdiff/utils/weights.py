"""Reading weights so that nothing is ever silently initialised, and content hashes of files.

Every place in microdiff that puts saved weights into a module goes through two calls:

    state = read_safetensors(path)          # a missing, empty, truncated or damaged file: one line naming it
    load_strict(module, state, path)        # missing / unexpected keys or a shape mismatch: one line naming it

safetensors checks a file's header and sizes, but not the bytes of the tensors: a file with bytes
flipped in the middle of its tensor data loads without complaint. Folders we write therefore
record ``file_digest`` of each file, and readers compare it (``check_digest``) before loading.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import UserError
from .hashing import DIGEST, file_digest, path_digest

def check_digest(path: str | os.PathLike, expected: str, recorded_in: str | os.PathLike, fix: str) -> None:
    """Refuse ``path`` unless it exists and its digest equals ``expected`` (as recorded in ``recorded_in``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing; {recorded_in} lists it as part of the folder; {fix}")
    algorithm = str(expected).partition(":")[0]
    if algorithm != DIGEST:
        raise UserError(f"{recorded_in}: unknown content hash {expected!r} for {path.name}; "
                        f"this microdiff writes {DIGEST}:<hex>")
    if file_digest(path) != expected:
        raise UserError(f"{path}: damaged or changed since it was written (its content hash differs from the one "
                        f"{recorded_in} records); {fix}")


def read_safetensors(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on the CPU; a missing, empty, truncated or otherwise
    unreadable file raises a one-line UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such {what}" + (" (it is a folder)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the {what} is empty (0 bytes; an interrupted copy or a full disk?); "
                        "restore it or write it again")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - SafetensorError and OSError alike: the file is unusable
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable safetensors {what} ({reason}); it is truncated or damaged, "
                        "restore it or write it again") from None


def read_torch_file(path: str | os.PathLike, what: str = "file", fix: str = "restore it or write it again") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, refusing a damaged file in one line naming it.

    torch's zip reader checks nothing, so bytes flipped inside a tensor load as garbage. The format is a
    zip archive whose entries carry CRC-32s, though: :func:`zipfile.ZipFile.testzip` reads every entry and
    compares them (about 1 GB/s), which catches flipped, truncated and swapped bytes before anything is
    unpickled. A missing, empty or non-zip file, or one torch cannot read, is one line as well."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such {what}" + (" (it is a folder)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the {what} is empty (0 bytes; an interrupted copy or a full disk?); {fix}")
    if zipfile.is_zipfile(path):  # torch.save's format since 1.6; older pickles have no checksums to test
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise UserError(f"{path}: the {what} is damaged ({err}); {fix}") from None
        if bad is not None:
            raise UserError(f"{path}: the {what} is damaged (entry {bad} fails its CRC check); {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors, truncated zips, a foreign format: unusable
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: cannot be read as a {what} with torch.load(weights_only=True) ({reason}); "
                        f"{fix}") from None


def non_finite(tensors: Mapping[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """(name, non-finite count, size) of the first floating tensor holding NaN or inf, or None: weights
    like that make NaN outputs (black images) without any error, so writers and diagnoses refuse them."""
    for name, tensor in tensors.items():
        if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all()):
            return name, int((~torch.isfinite(tensor)).sum()), tensor.numel()
    return None


def state_mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                   ignore_shape: tuple[str, ...] = ()) -> str | None:
    """What differs between a module's own state dict and ``state`` (None when the keys and shapes
    agree): counts and the first key of each kind. Keys ending in ``ignore_shape`` may differ in shape."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
              and not k.endswith(ignore_shape or ("\0",))]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape (first: {k} is {tuple(state[k].shape)} there, "
                     f"{tuple(expected[k].shape)} here)")
    return ", ".join(parts) or None


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike,
                what: str | None = None, fix: str = "these are the weights of another model",
                ignore_shape: tuple[str, ...] = ()) -> None:
    """``module.load_state_dict(state, strict=True)``, or one line naming ``source``, ``what`` the weights
    should match (default: the module's class) and what differs (missing or unexpected keys, shapes)
    instead of torch's multi-line RuntimeError. Keys ending in
    ``ignore_shape`` may differ in shape (a module that rebuilds them itself, like MicroDiT's
    positional table)."""
    what = what or f"a {type(module).__name__}"
    problem = state_mismatch(module.state_dict(), state, ignore_shape)
    if problem is None:
        try:
            module.load_state_dict(state, strict=True)
            return
        except RuntimeError as err:  # e.g. a dtype that cannot be copied
            problem = str(err).strip().splitlines()[-1].strip()
    raise UserError(f"{source}: weights do not match {what} ({problem}); {fix}")


__all__ = ["DIGEST", "file_digest", "path_digest", "check_digest", "read_safetensors", "read_torch_file", "non_finite",
           "state_mismatch", "load_strict"]
