"""Encode a captioned dataset once: images -> latents, captions -> text states, into resumable shards.

    shard k = dataset items [k * shard_size, (k + 1) * shard_size)        (see :mod:`.shards`)
    rank r of world_size writes the shards with k % world_size == r      (torchrun: env RANK, ...)

Each shard is written to a hidden temporary file and renamed when complete, then its record
``shard-<k>.json`` (counts, skipped items, a content hash of its inputs) is written: that record
marks it done, so a rerun skips finished shards and redoes only the rest. Items the dataset returns
as ``None`` (corrupt images it reported and skipped) are counted per shard and listed in
``dataset.json``. Whichever rank finds all shards done after its own writes ``dataset.json``
(atomically; no torch.distributed needed).

Reruns never keep stale shards: a shard's record holds ``inputs``, a hash of the fingerprints of its
items (``data.sources.item_fingerprint``: key, caption, meta and the image's bytes, or what a
procedural item is a function of), and a rerun whose items hash otherwise (a caption was edited, an
image replaced, items added or removed) redoes that shard and says so; shards past the new end are
removed, and ``dataset.json`` is rewritten. Settings that change every shard (encoders, dtype, shard
size, and ``compare``: the resolution, seed, corruption, ... a command passes) are refused in one
line naming what changed. A folder that holds other files and no precompute output is refused too.
A dataset with no item, or one whose every item is skipped, is an error naming the source.

Nor damaged ones: each record holds the size and SHA-256 of its tar (``file``, copied into
``dataset.json``'s shard list), and a rerun checks every finished shard against it before keeping
it; a damaged or truncated tar is redone and the run says so (``data check`` compares them too).

One writer per shard: each process locks ``--out`` for its rank (``.precompute-rank<r>.lock``, a
``utils.locks.FolderLock``) for the whole run, so a second run into the same folder is refused in one
line naming the process that holds it, while the ranks of one torchrun job share the folder (a second
torchrun job is refused at its rank 0, and torchrun then stops its other ranks).

Encoders follow :mod:`microdiff.encoders.base`: ``Autoencoder.encode(images) -> latents`` and
``TextEncoder.encode(captions) -> TextEncoding``; their ``identifier`` goes into every record so that
training can check it uses the same ones, and a rerun refuses to mix shards of other encoders.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..ambient.dataset import parse_mixture
from ..encoders.image import load_autoencoder, resolve_dtype
from ..encoders.text import load_text_encoder
from ..utils.devices import resolve_device, resolve_dist
from ..utils.errors import UserError
from ..utils.hashing import check_file, file_record
from ..utils.locks import FolderLock
from .report import Skip, SkipReport
from .shards import (FORMAT, INFO_NAME, ShardError, encode_sample, iter_tar, remove_stale_temporaries, shard_name,
                     write_json_atomic, write_shard)
from .sources import (IMAGE_KINDS, DataSpec, add_source_arguments, build_dataset, check_out_path, item_fingerprint,
                      nonnegative_int, positive_int, refuse_unused, require_images, skip_report)

RECORD_FIELDS = ("image", "caption", "key", "meta")
CHECKED = ("autoencoder", "text_encoder", "shard_size", "dtype", "compare")
OURS = ("shard-*.tar", "shard-*.json", INFO_NAME, ".shard-*", f".{INFO_NAME}.tmp-*", ".precompute-rank*.lock")


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    dtype = resolve_dtype(dtype)
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"dtype {dtype}: shards store float16 or float32 (.npy has no bfloat16)")
    return dtype


def _record_path(out: Path, k: int) -> Path:
    return out / shard_name(k).replace(".tar", ".json")


def _done(out: Path, k: int) -> bool:
    return _record_path(out, k).is_file() and (out / shard_name(k)).is_file()


def lock_name(rank: int) -> str:
    """The lock one process holds on ``--out`` while it writes: one per rank, so the ranks of a torchrun job
    share the folder, and a second run into it (rank 0 of its own) is refused naming the holder."""
    return f".precompute-rank{rank}.lock"


def shard_damage(out: Path, k: int, record: dict[str, Any]) -> str | None:
    """What is wrong with finished shard ``k``'s tar, or None when it is intact: it must match the size
    and SHA-256 its record holds (``file``). A record of an older version, without them, is checked by
    reading the tar through (every sample there, the count the record says) and gets them now."""
    tar = out / shard_name(k)
    if "file" in record:
        return check_file(tar, record["file"])
    try:
        count = sum(1 for _ in iter_tar(str(tar)))
    except ShardError as err:
        return str(err).removeprefix(f"{tar}: ").split(";")[0]
    if count != record.get("samples"):
        return f"it holds {count} samples, its record says {record.get('samples')}"
    write_json_atomic(_record_path(out, k), {**record, "file": file_record(tar)})
    return None


def _check_record(record: dict[str, Any], want: dict[str, Any], path: Path) -> None:
    wrong = []
    for name in CHECKED:
        had, now = record.get(name), want[name]
        if name == "compare":
            had = had or {}
            wrong += [f"{k} {had.get(k)!r} (now {now.get(k)!r})" for k in sorted(set(had) | set(now))
                      if had.get(k) != now.get(k)]
        elif had != now:
            wrong.append(f"{name} {had!r} (now {now!r})")
    if wrong:
        raise UserError(f"{path}: this folder holds shards made with {', '.join(wrong)}; write to another "
                        "--out folder, or delete the old shards to redo them")


def _check_out_folder(out: Path) -> None:
    """Refuse a folder that holds files but none of precompute's: another tool's or the user's data."""
    if not out.is_dir():
        return
    ours = {p for pattern in OURS for p in out.glob(pattern)}
    others = sorted(p.name for p in out.iterdir() if p not in ours)
    if others and not ours:
        raise UserError(f"--out {out}: the folder exists and holds other files (e.g. {others[0]}) but no precompute "
                        "shards; choose a new or empty folder")


def shard_inputs(dataset, begin: int, end: int) -> str:
    """A hash of the fingerprints of items [begin, end): equal hashes, equal shard contents."""
    digest = hashlib.sha256(f"{begin}:{end}".encode())
    for i in range(begin, end):
        digest.update(item_fingerprint(dataset, i).encode())
    return digest.hexdigest()


def _remove_shard(out: Path, k: int) -> None:
    (out / shard_name(k)).unlink(missing_ok=True)
    _record_path(out, k).unlink(missing_ok=True)


def _keep_list(batch: list[Any]) -> list[Any]:
    return batch


def _why_skipped(dataset, index: int) -> dict[str, Any]:
    """Index, path and reason of an item the dataset returned as None (asked again through its
    ``probe``, when it has one: CaptionedDataset does; reports made inside DataLoader workers do
    not reach this process)."""
    entry: dict[str, Any] = {"index": index}
    probe = getattr(dataset, "probe", None)
    if callable(probe):
        try:
            skip = probe(index)
        except Exception as e:  # noqa: BLE001 - a reason is all we want here
            skip = None
            entry["reason"] = f"{type(e).__name__}: {e}"
        if skip is not None:
            entry.update(path=str(getattr(skip, "path", "")), reason=str(getattr(skip, "reason", skip)))
    return entry


def _check_record_fields(record: Any, index: int) -> None:
    if not isinstance(record, dict) or "image" not in record or "caption" not in record:
        have = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"dataset item {index}: expected a dict with 'image' and 'caption' (and 'key', 'meta'); "
                         f"got {have}")
    image = record["image"]
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or not image.is_floating_point():
        raise ValueError(f"dataset item {index}: 'image' must be a float tensor (3, H, W) in [-1, 1]; got "
                         f"{type(image).__name__} {tuple(getattr(image, 'shape', ()))}")
    if not isinstance(record["caption"], str):
        raise ValueError(f"dataset item {index}: 'caption' must be a str, got {type(record['caption']).__name__}")
    for name, value in record.items():
        if name not in RECORD_FIELDS and not isinstance(value, (torch.Tensor, np.ndarray)):
            raise ValueError(f"dataset item {index}: field {name!r} ({type(value).__name__}) has no place in a "
                             "shard; put it in the record's 'meta' (array fields are stored as <name>.npy)")


class _ShardEncoder:
    """Encodes the items of one shard batch by batch and turns them into tar samples."""

    def __init__(self, dataset, autoencoder, text_encoder, device: torch.device, dtype: torch.dtype, bar):
        self.dataset, self.autoencoder, self.text_encoder = dataset, autoencoder, text_encoder
        self.device, self.np_dtype, self.bar = device, np.dtype("float16" if dtype == torch.float16 else "float32"), bar
        self.skipped: list[int] = []
        self.reasons: list[dict[str, Any]] = []
        self.latent_shape: list[int] | None = None
        self.text_length = 0
        self.text_lengths: set[int] = set()
        self.text_dim: int | None = None
        self.extra_fields: set[str] = set()

    def _extra(self, value: torch.Tensor | np.ndarray) -> np.ndarray:
        """Array fields other than the image (e.g. an ambient pixel mask): floats in the storage dtype."""
        value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        return value.astype(self.np_dtype) if value.dtype.kind == "f" else value

    def _cast(self, x: torch.Tensor, what: str, indices: list[int]) -> np.ndarray:
        with np.errstate(over="ignore"):  # overflow is reported just below, with a remedy
            out = x.detach().to("cpu", torch.float32).numpy().astype(self.np_dtype)
        if not np.isfinite(out).all():
            raise ValueError(f"{what} of dataset items {indices[0]}..{indices[-1]} are not finite in {self.np_dtype} "
                             "(overflow or NaN from the encoder); precompute with dtype=float32 or check the encoder")
        return out

    @torch.inference_mode()
    def samples(self, batches: Iterator[tuple[list[int], list[Any]]]) -> Iterator[dict[str, Any]]:
        for indices, records in batches:
            kept = [(i, r) for i, r in zip(indices, records) if r is not None]
            for i, r in zip(indices, records):
                if r is None:
                    self.skipped.append(i)
                    self.reasons.append(_why_skipped(self.dataset, i))
            if not kept:
                self.bar.update(len(indices))
                continue
            for i, r in kept:
                _check_record_fields(r, i)
            shapes = {tuple(r["image"].shape) for _, r in kept}
            if len(shapes) > 1:
                raise ValueError(f"dataset items {kept[0][0]}..{kept[-1][0]} have images of different sizes "
                                 f"{sorted(shapes)}; resize them to one resolution (e.g. --resolution)")
            images = torch.stack([r["image"] for _, r in kept]).to(self.device, torch.float32)
            ids = [i for i, _ in kept]
            latents = self._cast(self.autoencoder.encode(images), "latents", ids)
            enc = self.text_encoder.encode([r["caption"] for _, r in kept])
            states = self._cast(enc.states, "text states", ids)
            pooled = self._cast(enc.pooled, "pooled text", ids)
            mask = enc.mask.detach().to("cpu", torch.bool).numpy()
            if self.latent_shape is None:
                self.latent_shape = list(latents.shape[1:])
            elif list(latents.shape[1:]) != self.latent_shape:
                raise ValueError(f"dataset items {ids[0]}..{ids[-1]}: latents {list(latents.shape[1:])} differ "
                                 f"from earlier {self.latent_shape}; resize all images to one resolution")
            self.text_length = max(self.text_length, states.shape[1])
            self.text_lengths.add(int(states.shape[1]))
            self.text_dim = int(states.shape[2])
            for b, (i, r) in enumerate(kept):
                extras = {name: self._extra(value) for name, value in r.items() if name not in RECORD_FIELDS}
                self.extra_fields.update(extras)
                yield encode_sample(i, latents[b], states[b], mask[b], pooled[b], r["caption"], r.get("meta") or {},
                                    r.get("key"), extras)
            self.bar.update(len(indices))


def precompute(dataset, autoencoder, text_encoder, out_dir: str | os.PathLike, shard_size: int = 1000,
               batch_size: int = 32, device: str | torch.device | None = "cpu",
               dtype: torch.dtype | str = torch.float16,
               rank: int | None = None, world_size: int | None = None, progress: bool = True, num_workers: int = 0,
               settings: dict[str, Any] | None = None, compare: dict[str, Any] | None = None) -> dict[str, Any]:
    """Encode ``dataset`` (map-style: ``len`` and ``[i]`` -> record dict or None) into shards in
    ``out_dir``; see the module docstring. ``rank``/``world_size`` None: torchrun's env (else 0/1).
    ``settings``: extra creation settings to keep in dataset.json (e.g. the source spec).
    ``compare``: settings a rerun must share (JSON values; a change is refused naming it).

    Returns a report: shards total / written now / already done / redone because their inputs
    changed / redone because their tar was damaged (shard -> what is wrong) / removed past the end,
    samples and skipped items written now, whether the folder is
    complete, the dataset.json path (None until complete), seconds.
    """
    start_time = time.time()
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ValueError(f"precompute needs a map-style dataset (len() and [i]); got {type(dataset).__name__}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1; got {shard_size}, {batch_size}")
    dtype = _resolve_dtype(dtype)
    rank, world_size = resolve_dist(rank, world_size)
    device = resolve_device(device)
    name = str((settings or {}).get("source", out_dir))
    out = check_out_path(out_dir)
    _check_out_folder(out)
    n = len(dataset)
    if n == 0:
        raise UserError(f"{name}: the dataset has no items, so there is nothing to precompute")
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, lock_name(rank), "data precompute"):
        return _precompute_locked(dataset, autoencoder, text_encoder, out, n, name, shard_size, batch_size, device,
                                  dtype, rank, world_size, progress, num_workers, settings, compare, start_time)


def _precompute_locked(dataset, autoencoder, text_encoder, out: Path, n: int, name: str, shard_size: int,
                       batch_size: int, device: torch.device, dtype: torch.dtype, rank: int, world_size: int,
                       progress: bool, num_workers: int, settings: dict[str, Any] | None,
                       compare: dict[str, Any] | None, start_time: float) -> dict[str, Any]:
    """:func:`precompute` once ``out`` is locked for this rank."""
    num_shards = math.ceil(n / shard_size)
    common = {"autoencoder": autoencoder.identifier, "text_encoder": text_encoder.identifier,
              "shard_size": int(shard_size), "num_items": n, "dtype": str(dtype).removeprefix("torch."),
              "compare": json.loads(json.dumps(compare or {}, default=str))}
    records = {}
    for path in sorted(out.glob("shard-*.json")):
        k = path.stem.removeprefix("shard-")
        if k.isdigit():
            records[int(k)] = _read_record(path)
            _check_record(records[int(k)], common, path)
    removed = [k for k in records if k >= num_shards and k % world_size == rank]
    for k in removed:  # items were removed: these shards lie past the end now
        _remove_shard(out, k)
    mine = [k for k in range(rank, num_shards, world_size)]
    inputs = {}
    redone, damaged = [], {}
    for k in mine:
        if _done(out, k):
            begin, end = k * shard_size, min(n, (k + 1) * shard_size)
            problem = shard_damage(out, k, records[k])
            if problem is not None:
                damaged[k] = problem
                continue
            inputs[k] = shard_inputs(dataset, begin, end)
            if records[k].get("inputs") != inputs[k] or records[k].get("items") != [begin, end]:
                redone.append(k)
    todo = [k for k in mine if not _done(out, k) or k in redone or k in damaged]
    if todo or removed:  # the folder changes: it is not complete until the last shard is written again
        (out / INFO_NAME).unlink(missing_ok=True)

    for model in (autoencoder, text_encoder):
        if isinstance(model, torch.nn.Module):
            model.to(device).eval()
    total = sum(min(n, (k + 1) * shard_size) - k * shard_size for k in todo)
    samples_written, skipped_now = 0, 0
    with tqdm(total=total, desc=f"precompute rank {rank}/{world_size}", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        for k in todo:
            begin, end = k * shard_size, min(n, (k + 1) * shard_size)
            remove_stale_temporaries(out / shard_name(k))
            remove_stale_temporaries(_record_path(out, k))
            _record_path(out, k).unlink(missing_ok=True)  # not done until rewritten (a redone shard's old record)
            shard_hash = inputs.get(k) or shard_inputs(dataset, begin, end)
            subset = torch.utils.data.Subset(dataset, range(begin, end))
            loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers,
                                                 collate_fn=_keep_list)
            batches = ((list(range(begin + b * batch_size, begin + b * batch_size + len(rec))), rec)
                       for b, rec in enumerate(loader))
            encoder = _ShardEncoder(dataset, autoencoder, text_encoder, device, dtype, bar)
            count = write_shard(out / shard_name(k), encoder.samples(batches))
            record = {**common, "name": shard_name(k), "shard": k, "items": [begin, end], "inputs": shard_hash,
                      "samples": count,
                      "skipped": len(encoder.skipped), "skipped_items": encoder.skipped, "skipped_why": encoder.reasons,
                      "latent_shape": encoder.latent_shape,
                      "text_shape": None if encoder.text_dim is None else [encoder.text_length, encoder.text_dim],
                      "text_lengths": sorted(encoder.text_lengths), "extra_fields": sorted(encoder.extra_fields)}
            record["file"] = file_record(out / shard_name(k))  # what a rerun checks the tar against
            write_json_atomic(_record_path(out, k), record)
            samples_written += count
            skipped_now += len(encoder.skipped)

    run_settings = {"batch_size": batch_size, "device": str(device), "world_size": world_size, **(settings or {})}
    complete = all(_done(out, k) for k in range(num_shards))
    info_path = write_dataset_info(out, num_shards, common, run_settings, name) if complete else None
    return {"out_dir": str(out), "rank": rank, "world_size": world_size, "num_items": n, "shards_total": num_shards,
            "shards_mine": len(mine), "shards_written": len(todo), "shards_already_done": len(mine) - len(todo),
            "shards_redone": redone, "shards_damaged": damaged, "shards_removed": sorted(removed),
            "samples_written": samples_written, "skipped_written": skipped_now, "complete": complete,
            "dataset_json": None if info_path is None else str(info_path), "seconds": time.time() - start_time}


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable shard record ({err}); delete it and its .tar to redo that shard") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: not a shard record; delete it and its .tar to redo that shard")
    return record


def write_dataset_info(out: Path, num_shards: int, common: dict[str, Any], settings: dict[str, Any],
                       name: str = "") -> Path:
    """Merge the shard records into ``dataset.json`` (all shards must be done). A dataset of which no
    sample was written is an error naming ``name`` (the source), and no dataset.json is written."""
    records = [json.loads(_record_path(out, k).read_text()) for k in range(num_shards)]
    if not sum(r["samples"] for r in records):
        skipped = sum(r["skipped"] for r in records)
        why = ", ".join(f"{r}: {n}" for r, n in SkipReport(name).merge(_skips_of(records)).counts.items())
        raise UserError(f"{name or out}: every one of its {skipped} items was skipped ({why}), "
                        f"so no sample was written to {out}; run `microdiff data check {name or 'SOURCE'}` to "
                        "list them")
    latent_shapes = {tuple(r["latent_shape"]) for r in records if r["latent_shape"] is not None}
    if len(latent_shapes) > 1:
        raise ValueError(f"{out}: shards hold latents of different shapes {sorted(latent_shapes)}; precompute "
                         "at one resolution")
    text_dims = {r["text_shape"][1] for r in records if r["text_shape"] is not None}
    if len(text_dims) > 1:
        raise ValueError(f"{out}: shards hold text states of different widths {sorted(text_dims)}")
    lengths = sorted({length for r in records for length in r["text_lengths"]})
    info = {
        "format": FORMAT, "version": 1, **common,
        "latent_shape": list(latent_shapes.pop()) if latent_shapes else None,
        "text_shape": [max(lengths), text_dims.pop()] if lengths else None,
        "text_length_varies": len(lengths) > 1,
        "extra_fields": sorted({f for r in records for f in r.get("extra_fields", [])}),
        "num_shards": num_shards,
        "num_samples": sum(r["samples"] for r in records),
        "num_skipped": sum(r["skipped"] for r in records),
        "shards": [{"name": r["name"], "samples": r["samples"], "skipped": r["skipped"], "items": r["items"],
                    **({"file": r["file"]} if "file" in r else {})} for r in records],
        "skipped_items": [i for r in records for i in r["skipped_items"]],
        "skipped_why": [w for r in records for w in r.get("skipped_why", [])],
        "settings": {"shard_size": common["shard_size"], "dtype": common["dtype"], **settings},
    }
    write_json_atomic(out / INFO_NAME, info)
    return out / INFO_NAME


def _skips_of(records: list[dict[str, Any]]) -> list[Skip]:
    """The skipped items the shard records list (index, path, reason), as Skips."""
    return [Skip(str(w.get("path") or f"item {w['index']}"), str(w.get("reason") or "skipped by the dataset"))
            for r in records for w in r.get("skipped_why", [])]


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("source", help="dataset: an image folder, a .jsonl/.csv/.parquet manifest, hf:<name>, "
                                       "a save_to_disk folder, an image shard folder (microdiff data download), "
                                       "or shapes:N for the built-in set")
    parser.add_argument("--out", required=True, help="output folder for the shards and dataset.json (new, empty, "
                                                     "or an earlier precompute of this source: it resumes, and "
                                                     "redoes shards whose inputs changed or whose tar is damaged); "
                                                     "a second run into a folder in use is refused")
    parser.add_argument("--autoencoder", required=True, help="autoencoder identifier, e.g. identity or "
                                                             "diffusers-kl:stabilityai/sd-vae-ft-ema")
    parser.add_argument("--text-encoder", required=True, help="text encoder identifier")
    parser.add_argument("--resolution", type=positive_int, default=256, help="image side in pixels (default: 256)")
    parser.add_argument("--shard-size", type=positive_int, default=1000, help="dataset items per shard (default: 1000)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="encoder batch size (default: 32)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: auto = "
                                                         "cuda:LOCAL_RANK when available, else cpu)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                        help="storage dtype of latents and text states (default: float16)")
    parser.add_argument("--workers", type=nonnegative_int, default=0,
                        help="DataLoader worker processes reading images (default: 0: in this process)")
    parser.add_argument("--seed", type=nonnegative_int, default=0,
                        help="data seed: shapes:N content and the --corruption draws; refused where it does "
                             "nothing (default: 0)")
    parser.add_argument("--corruption", type=_mixture, default=None, metavar="MIXTURE",
                        help="corrupt the images as training's data.corruption does, e.g. noise:0.3@0.5,blur:1.5@0.25")
    add_source_arguments(parser, filters=True)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _mixture(text: str):
    try:
        return parse_mixture(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def run(args) -> int:
    """``microdiff data precompute``: 0 once this rank's shards are written (every skip counted)."""
    require_images(args.source, "data precompute")
    refuse_unused(args.source, {"--seed": (args.seed, 0, ("shapes",) if args.corruption is None else IMAGE_KINDS,
                                           "it seeds shapes:N content and the --corruption draws")})
    check_out_path(args.out)
    spec = DataSpec(source=args.source, resolution=args.resolution, seed=args.seed, corruption=args.corruption,
                    min_quality=args.min_quality, caption_column=args.caption_column, image_column=args.image_column)
    rank, world_size = resolve_dist(None, None)
    dataset = build_dataset(spec, needs="images", command="data precompute", progress=not args.no_progress,
                            log_skips=rank == 0)
    device = resolve_device(args.device)
    compare = {"resolution": args.resolution, "seed": args.seed, "corruption": args.corruption,
               "min_quality": args.min_quality, "caption_column": args.caption_column,
               "image_column": args.image_column}
    report = precompute(dataset, load_autoencoder(args.autoencoder, device=device),
                        load_text_encoder(args.text_encoder, device=device),
                        args.out, shard_size=args.shard_size, batch_size=args.batch_size, device=device,
                        dtype=args.dtype, progress=not args.no_progress, num_workers=args.workers,
                        settings={"source": args.source, "resolution": args.resolution, "seed": args.seed},
                        compare=compare)
    for k, problem in report["shards_damaged"].items():
        print(f"{shard_name(k)}: {problem}: redone")
    for k in report["shards_redone"]:
        print(f"{shard_name(k)}: its inputs changed since it was written (captions, images or metadata): redone")
    if report["shards_removed"]:
        print(f"removed {len(report['shards_removed'])} shard(s) past the dataset's new end "
              f"({shard_name(report['shards_removed'][0])}, ...)")
    print(f"rank {report['rank']}/{world_size}: wrote {report['shards_written']} shards "
          f"({report['samples_written']} samples, {report['skipped_written']} skipped items), "
          f"{report['shards_already_done']} were already done, intact and up to date")
    if report["complete"]:
        info = json.loads(Path(report["dataset_json"]).read_text())
        skips = SkipReport(args.source).merge(skip_report(dataset) or [], _skips_of([info]))
        print(f"all {report['shards_total']} shards done ({info['num_samples']} samples): {report['dataset_json']}")
        print(skips.summary())
    else:
        print("other ranks' shards are not all done yet; the last rank to finish writes dataset.json")
    return 0


__all__ = ["precompute", "write_dataset_info", "shard_inputs", "resolve_dist", "resolve_device", "add_arguments",
           "run"]
