"""Precomputed latent shards: webdataset tars written by :mod:`.precompute`, streamed for training.

Layout of a shard folder::

    out/
      dataset.json              encoders, shapes, counts per shard, creation settings (see below)
      shard-000000.tar          dataset items [0, S)      S = shard_size
      shard-000000.json         the shard's own record (counts, skipped items): its completion marker
      shard-000001.tar          dataset items [S, 2S) ...

Each tar holds, per sample, consecutive members named ``<key>.<field>`` where ``<key>`` is the
item's index in the source dataset, zero-padded to 9 digits (unique, sortable, dot-free)::

    <key>.latent.npy      float16 (C, h, w)  the autoencoder's latents (already scaled/shifted)
    <key>.text.npy        float16 (L, D)     the text encoder's token states
    <key>.text_mask.npy   bool (L,)          True = real token
    <key>.pooled.npy      float16 (D,)       one vector per caption
    <key>.caption.txt     UTF-8 caption
    <key>.meta.json       the record's ``meta`` dict, unchanged (source, quality, corruption, ...)
    <key>.key.txt         the record's own ``key`` (e.g. a file name; may contain dots)
    <key>.<name>.npy      any other array field of the record, e.g. ``mask`` (1, H, W) of ambient data

(``float32`` instead of ``float16`` when precompute ran with ``dtype=torch.float32``.)

``dataset.json``: ``autoencoder`` / ``text_encoder`` (identifiers; :func:`check_encoders` compares
them with the encoders a training run uses), ``latent_shape`` [C, h, w], ``text_shape`` [L, D] (L the
longest), ``dtype``, ``num_samples``, ``num_skipped``, ``num_items``, ``shard_size``, ``shards``
(``name``, ``samples``, ``skipped``, ``items`` [start, end) per shard), ``skipped_items`` and
``settings`` (how precompute ran).

Reading: :class:`ShardStream` reads tars with the standard library's ``tarfile`` in stream mode
rather than webdataset's pipeline, because exact resume and the split of samples inside a shard
need the position of every sample in a deterministic order, which we control end to end here
(webdataset's node/worker splitters and shuffle keep no resumable state). Remote shards
(``pipe:``, ``http(s)://``, ...) are opened through ``webdataset.gopen``. Writing uses
``webdataset.TarWriter`` with a fixed mtime, so equal content gives byte-identical tars.

Error policy: a truncated or corrupt shard raises :class:`ShardError` naming the shard (and the
member), never a silent skip: skipping would break "every sample exactly once" and exact resume.
Truncation is caught from tar read errors, a missing end-of-archive marker (local files), and a
sample count that differs from ``dataset.json``.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..utils.jsondata import json_data
from ..utils.files import write_json_atomic  # noqa: F401 - re-exported (shard folders use it)

INFO_NAME = "dataset.json"
FORMAT = "microdiff-latent-shards"
FIELDS = ("latent.npy", "text.npy", "text_mask.npy", "pooled.npy", "caption.txt", "meta.json")
KEY_DIGITS = 9
MTIME = 0.0  # tar member mtime: reproducible shards


class ShardError(ValueError):
    """A shard that cannot be read: truncated, corrupt, or missing fields."""


# ----------------------------------------------------------------------------- names and info
def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def read_dataset_info(path: str | os.PathLike) -> dict[str, Any]:
    """``dataset.json`` of a shard folder (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / INFO_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {INFO_NAME}; is this a folder written by "
                                "`microdiff data precompute` (it is written once all shards exist)?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it and rerun precompute to rewrite it") from e


def check_encoders(info: dict[str, Any], autoencoder: str | None = None, text_encoder: str | None = None) -> None:
    """Raise ValueError when the shards were made with other encoders than the given identifiers."""
    wrong = [f"{name}: shards have {info.get(name)!r}, you use {want!r}"
             for name, want in (("autoencoder", autoencoder), ("text_encoder", text_encoder))
             if want is not None and info.get(name) != want]
    if wrong:
        raise ValueError("encoder mismatch with the precomputed shards (" + "; ".join(wrong) +
                         "): precompute again with your encoders, or train with theirs")


# ----------------------------------------------------------------------------- writing
def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_sample(index: int, latent: np.ndarray, text: np.ndarray, text_mask: np.ndarray, pooled: np.ndarray,
                  caption: str, meta: dict[str, Any] | None = None, key: str | None = None,
                  extras: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """One sample as the ``{"__key__": ..., field: bytes}`` dict that ``webdataset.TarWriter`` writes.
    ``extras``: more arrays, stored as ``<name>.npy``."""
    text_mask = np.asarray(text_mask, dtype=bool)
    if text.ndim != 2 or text_mask.shape != text.shape[:1] or pooled.ndim != 1:
        raise ValueError(f"item {index}: text states must be (L, D) with a (L,) mask and (D,) pooled; "
                         f"got {text.shape}, {text_mask.shape}, {pooled.shape}")
    extras = extras or {}
    taken = {f.split(".")[0] for f in FIELDS} | {"key", "index", "position"}
    for name in extras:
        if name in taken or "." in name or "/" in name or not name:
            raise ValueError(f"item {index}: extra field name {name!r} is reserved or not a plain name")
    return {
        **{f"{name}.npy": _npy(np.asarray(value)) for name, value in extras.items()},
        "__key__": sample_key(index),
        "latent.npy": _npy(latent),
        "text.npy": _npy(text),
        "text_mask.npy": _npy(text_mask),
        "pooled.npy": _npy(pooled),
        "caption.txt": caption.encode("utf-8"),
        "meta.json": json.dumps(json_data(meta or {}, f"item {index} meta"), sort_keys=True).encode("utf-8"),
        "key.txt": (sample_key(index) if key is None else str(key)).encode("utf-8"),
    }


def write_shard(path: str | os.PathLike, samples: Iterable[dict[str, Any]]) -> int:
    """Write ``samples`` (dicts from :func:`encode_sample`) to the tar ``path`` atomically: into a
    hidden temporary file first, renamed to ``path`` only once complete. Returns the sample count.
    On an exception the temporary file is removed and the exception propagates."""
    import webdataset

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with open(tmp, "wb") as f:
            writer = webdataset.TarWriter(f, encoder=False, mtime=MTIME, user="microdiff", group="microdiff")
            try:
                for sample in samples:
                    writer.write(sample)
                    count += 1
            finally:
                writer.close()  # also on failure, before f closes (the file is removed below)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Delete leftovers of a killed :func:`write_shard` / :func:`write_json_atomic` for ``path``."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- reading tars
def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _open(url: str):
    if _is_remote(url):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb")


def iter_tar(url: str, keep: Any = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {field: bytes})`` per sample of a tar, in file order. ``keep(j) -> bool`` selects
    samples by position j; members of the others are skipped unread. Raises :class:`ShardError`
    naming the shard for a truncated or corrupt tar."""
    # plain local tars are checked for truncation at block level too (compressed ones by their codec)
    size = os.path.getsize(url) if not _is_remote(url) and url.endswith(".tar") else None
    if size is not None and size % 512:
        raise ShardError(f"{url}: {size} bytes is not a whole number of 512-byte tar blocks: the shard is "
                         "truncated; recreate it (rerun precompute after deleting it) or leave it out")
    position, key, fields = -1, None, {}
    try:
        with _open(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, field = base.partition(".")
                if not dot:
                    raise ShardError(f"{url}: member {member.name!r} has no '.<field>' suffix; not a sample shard")
                member_key = f"{folder}/{stem}" if folder else stem
                if member_key != key:
                    if key is not None and fields:
                        yield key, fields
                    position, key, fields = position + 1, member_key, {}
                if keep is None or keep(position):
                    fields[field] = tar.extractfile(member).read()
            if key is not None and fields:
                yield key, fields
            end = tar.offset
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ShardError(f"{url}: truncated or corrupt tar after sample {position} ({type(e).__name__}: {e}); "
                         "recreate the shard (rerun precompute after deleting it) or leave it out") from e
    if size is not None and size < end + 1024:
        raise ShardError(f"{url}: ends without the tar end-of-archive marker after sample {position}: the shard "
                         "is truncated; recreate it (rerun precompute after deleting it) or leave it out")


def decode_sample(url: str, key: str, fields: dict[str, bytes]) -> dict[str, Any]:
    """Tensors and strings of one sample (see the module docstring for the fields)."""
    missing = [f for f in FIELDS if f not in fields]
    if missing:
        raise ShardError(f"{url}: sample {key} lacks {', '.join(missing)} (has {', '.join(sorted(fields))}); "
                         "not a microdiff latent shard or a damaged one")
    try:
        arrays = {f: np.load(io.BytesIO(fields[f + ".npy"]), allow_pickle=False)
                  for f in ("latent", "text", "text_mask", "pooled")}
        caption = fields["caption.txt"].decode("utf-8")
        meta = json.loads(fields["meta.json"])
        record_key = fields["key.txt"].decode("utf-8") if "key.txt" in fields else key
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise ShardError(f"{url}: sample {key} cannot be decoded ({e}); the shard is corrupt") from e
    base = key.rpartition("/")[2]
    extras = {}
    for field in fields:
        name = field.removesuffix(".npy")
        if field.endswith(".npy") and name not in arrays:
            try:
                value = np.load(io.BytesIO(fields[field]), allow_pickle=False)
            except (ValueError, OSError) as e:
                raise ShardError(f"{url}: sample {key} field {field} cannot be decoded ({e}); the shard is "
                                 "corrupt") from e
            extras[name] = torch.from_numpy(value.astype(np.float32) if value.dtype.kind == "f" else value)
    return {
        **extras,
        "latent": torch.from_numpy(arrays["latent"].astype(np.float32)),
        "text": torch.from_numpy(arrays["text"].astype(np.float32)),
        "text_mask": torch.from_numpy(arrays["text_mask"].astype(bool)),
        "pooled": torch.from_numpy(arrays["pooled"].astype(np.float32)),
        "caption": caption,
        "meta": meta,
        "key": record_key,
        "index": int(base) if base.isdigit() else -1,
    }


# ----------------------------------------------------------------------------- splitting
def assign_shards(num_shards: int, num_slots: int, slot: int) -> list[tuple[int, int, int]]:
    """What reader ``slot`` of ``num_slots`` (ranks x workers) reads: ``(shard position, modulus,
    remainder)`` triples, meaning "samples j of that shard with j % modulus == remainder".

    With at least as many shards as slots, whole shards go round-robin (modulus 1). With fewer,
    slot s reads shard s % num_shards together with the other slots of its group, and keeps every
    g-th sample (g = the group's size). Either way each sample goes to exactly one slot.
    """
    if not 0 <= slot < num_slots:
        raise ValueError(f"slot {slot} out of range for {num_slots} slots")
    if num_shards >= num_slots:
        return [(k, 1, 0) for k in range(slot, num_shards, num_slots)]
    shard = slot % num_shards
    group = len(range(shard, num_slots, num_shards))
    return [(shard, group, slot // num_shards)]


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


def buffer_shuffle(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items (size <= 1: unchanged order)."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit arguments, else torch.distributed when initialised, else env RANK/WORLD_SIZE, else 0/1."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            d_rank, d_world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            d_rank, d_world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = d_rank if rank is None else rank
        world_size = d_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
    return rank, world_size


def list_shards(path_or_urls: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[str], dict | None]:
    """Shard URLs and the ``dataset.json`` (or None) from a folder, a ``dataset.json``, a glob, a
    brace pattern (``shard-{000000..000009}.tar``), a URL or a list of those."""
    if isinstance(path_or_urls, (str, os.PathLike)):
        path_or_urls = [path_or_urls]
    urls: list[str] = []
    info = None
    for item in path_or_urls:
        item = os.fspath(item)
        if _is_remote(item):
            urls.append(item)
        elif os.path.isdir(item) or item.endswith(INFO_NAME):
            folder = item if os.path.isdir(item) else os.path.dirname(item)
            if os.path.isfile(os.path.join(folder, INFO_NAME)):
                info = read_dataset_info(folder)
                urls += [os.path.join(folder, s["name"]) for s in info["shards"]]
            else:
                found = sorted(glob.glob(os.path.join(glob.escape(folder), "*.tar")))
                if not found:
                    raise FileNotFoundError(f"{item}: no {INFO_NAME} and no .tar shards in this folder")
                urls += found
        elif "{" in item:
            import braceexpand

            urls += list(braceexpand.braceexpand(item))
        elif any(c in item for c in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise FileNotFoundError(f"{item}: the pattern matches no file")
            urls += found
        else:
            urls.append(item)
    for url in urls:
        if not _is_remote(url) and not os.path.isfile(url):
            raise FileNotFoundError(f"{url}: shard not found (check the path, or rerun precompute to finish it)")
    if not urls:
        raise ValueError(f"{path_or_urls}: no shards given")
    return urls, info


# ----------------------------------------------------------------------------- the stream
class ShardStream(IterableDataset):
    """Decoded samples of latent shards, split across DDP ranks x DataLoader workers without
    overlap, shuffled deterministically from (seed, epoch), resumable exactly.

    Each sample: ``latent`` (C,h,w) float32, ``text`` (L,D) float32, ``text_mask`` (L,) bool,
    ``pooled`` (D,) float32, ``caption``, ``meta``, ``key`` (the record's), ``index`` (dataset
    item), ``position`` (slot, n, num_slots): reader slot = rank * num_workers + worker, n = the
    slot's sample count this epoch.

    Order per epoch: the shard list is permuted with (seed, epoch), the same on every reader; shards
    are split by :func:`assign_shards`; each slot's samples pass a ``shuffle_buffer`` seeded by
    (seed, epoch, slot). ``shuffle_buffer=0`` reads shards and samples in written order.

    Resume: consumption is counted per slot, from the ``position`` of what reached the training
    loop: by the stream itself when iterated in the main process, by :meth:`mark_consumed` (which
    :class:`StreamLoader` calls per batch) with DataLoader workers. :meth:`state_dict` holds epoch
    and counts; a stream given it with :meth:`load_state_dict` replays each slot's order and skips
    what was consumed (without decoding it), then yields exactly the remaining samples in the same
    order; :class:`StreamLoader` also rotates the workers so that the interleaving of worker
    batches continues where it stopped. Resume with the same shards, seed, world size and
    num_workers. Each rank saves and loads its own state. Call :meth:`set_epoch` between epochs
    (do not use ``persistent_workers``: workers must see the new epoch).
    """

    def __init__(self, path_or_urls: str | os.PathLike | Sequence[str | os.PathLike], shuffle_buffer: int = 1000,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, epoch: int = 0):
        self.urls, self.info = list_shards(path_or_urls)
        self.expected = ({os.path.basename(s["name"]): int(s["samples"]) for s in self.info["shards"]}
                         if self.info else {})
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        self.epoch = int(epoch)
        self.consumed: dict[int, int] = {}
        self.num_slots: int | None = None
        self.worker_offset = 0

    # -- info
    @property
    def num_samples(self) -> int | None:
        """Samples in all shards (from dataset.json), or None without it."""
        return int(self.info["num_samples"]) if self.info else None

    def check_encoders(self, autoencoder: str | None = None, text_encoder: str | None = None) -> None:
        """Raise ValueError unless the shards were made with these encoder identifiers."""
        if self.info is None:
            raise ValueError(f"{self.urls[0]}: no {INFO_NAME} beside the shards, so their encoders are unknown")
        check_encoders(self.info, autoencoder, text_encoder)

    # -- order
    def shard_order(self, epoch: int) -> list[int]:
        if self.shuffle_buffer <= 0:
            return list(range(len(self.urls)))
        return [int(i) for i in _rng(self.seed, epoch).permutation(len(self.urls))]

    def _raw_slot_stream(self, epoch: int, slot: int, num_slots: int) -> Iterator[tuple[str, str, dict]]:
        order = self.shard_order(epoch)
        for shard_pos, modulus, remainder in assign_shards(len(order), num_slots, slot):
            url = self.urls[order[shard_pos]]
            seen = 0
            for key, fields in iter_tar(url, keep=lambda j: j % modulus == remainder):
                seen += 1
                yield url, key, fields
            expected = self.expected.get(os.path.basename(url))
            if expected is not None:
                want = len(range(remainder, expected, modulus))
                if seen != want:
                    raise ShardError(f"{url}: read {seen} samples of this reader's share, dataset.json implies "
                                     f"{want} ({expected} in the shard): the shard is truncated or was replaced")

    def slot_samples(self, epoch: int, slot: int, num_slots: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """The decoded samples of one reader slot for an epoch, after skipping ``skip`` of them."""
        raw = buffer_shuffle(self._raw_slot_stream(epoch, slot, num_slots), self.shuffle_buffer,
                             _rng(self.seed, epoch, slot))
        for n, (url, key, fields) in enumerate(raw):
            if n < skip:
                continue
            sample = decode_sample(url, key, fields)
            sample["position"] = (slot, n, num_slots)
            yield sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        num_slots = self.world_size * num_workers
        if self.consumed and self.num_slots not in (None, num_slots):
            raise ValueError(f"the stream state was saved with {self.num_slots} readers (world_size x "
                             f"num_workers) and now there are {num_slots}: resume with the same world_size "
                             "and DataLoader num_workers")
        slot = self.rank * num_workers + (worker + self.worker_offset) % num_workers
        for sample in self.slot_samples(self.epoch, slot, num_slots, skip=self.consumed.get(slot, 0)):
            if info is None:  # main process: what we hand out is what the loop consumes
                self._record(*sample["position"])
            yield sample

    # -- state
    def _record(self, slot: int, n: int, num_slots: int) -> None:
        self.num_slots = num_slots
        self.consumed[slot] = max(self.consumed.get(slot, 0), n + 1)

    def mark_consumed(self, batch: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Record that the samples of ``batch`` (collated, or a list of samples) reached the training
        loop. Idempotent. Needed only with DataLoader workers (StreamLoader does it for you)."""
        positions = batch["position"] if isinstance(batch, dict) else [s["position"] for s in batch]
        for slot, n, num_slots in (torch.as_tensor(positions).reshape(-1, 3).tolist()):
            self._record(int(slot), int(n), int(num_slots))

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.epoch, self.consumed, self.num_slots, self.worker_offset = int(epoch), {}, None, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "num_shards": len(self.urls), "num_slots": self.num_slots, "worker_offset": self.worker_offset,
                "consumed": {str(k): v for k, v in sorted(self.consumed.items())}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, mine in (("seed", self.seed), ("world_size", self.world_size), ("rank", self.rank),
                           ("num_shards", len(self.urls))):
            if state.get(name, mine) != mine:
                raise ValueError(f"stream state has {name}={state[name]} but this stream has {mine}: resume "
                                 "with the same shards, seed, world size and rank")
        self.epoch = int(state["epoch"])
        self.num_slots = state.get("num_slots")
        self.worker_offset = int(state.get("worker_offset", 0))
        self.consumed = {int(k): int(v) for k, v in state.get("consumed", {}).items()}


def collate_latents(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of samples; text states are zero-padded to the longest L, the mask False there."""
    if not batch:
        raise ValueError("collate_latents got an empty batch")
    length = max(s["text"].shape[0] for s in batch)
    dim = batch[0]["text"].shape[1]
    text = torch.zeros(len(batch), length, dim, dtype=batch[0]["text"].dtype)
    mask = torch.zeros(len(batch), length, dtype=torch.bool)
    for i, s in enumerate(batch):
        n = s["text"].shape[0]
        text[i, :n] = s["text"]
        mask[i, :n] = s["text_mask"]
    out = {"latent": torch.stack([s["latent"] for s in batch]), "text": text, "text_mask": mask,
           "pooled": torch.stack([s["pooled"] for s in batch]),
           "caption": [s["caption"] for s in batch], "meta": [s["meta"] for s in batch],
           "key": [s["key"] for s in batch], "index": torch.tensor([s["index"] for s in batch])}
    if all("position" in s for s in batch):
        out["position"] = torch.tensor([list(s["position"]) for s in batch], dtype=torch.long)
    for name in batch[0].keys() - out.keys() - {"position"}:  # extra arrays, e.g. an ambient "mask"
        values = [s.get(name) for s in batch]
        same = all(isinstance(v, torch.Tensor) and v.shape == values[0].shape for v in values)
        out[name] = torch.stack(values) if same else values
    return out


class StreamLoader:
    """A DataLoader over a :class:`ShardStream` that records what it hands out, so that
    ``stream.state_dict()`` is an exact resume point. A fresh DataLoader per pass, so workers see
    the stream's current epoch and state.

        loader = StreamLoader(stream, batch_size=64, num_workers=4)
        for epoch in range(start_epoch, epochs):
            stream.set_epoch(epoch)          # skip this on the epoch you resume into
            for batch in loader: ...         # checkpoint stream.state_dict() any time
    """

    def __init__(self, stream: ShardStream, batch_size: int, num_workers: int = 0, collate_fn=collate_latents,
                 **dataloader_kwargs: Any):
        if dataloader_kwargs.get("persistent_workers"):
            raise ValueError("persistent_workers would keep a stale epoch/state in the workers; leave it off")
        self.stream, self.batch_size, self.num_workers = stream, batch_size, num_workers
        self.collate_fn, self.kwargs = collate_fn, dataloader_kwargs

    def __iter__(self) -> Iterator[Any]:
        workers = max(self.num_workers, 1)
        loader = torch.utils.data.DataLoader(self.stream, batch_size=self.batch_size, num_workers=self.num_workers,
                                             collate_fn=self.collate_fn, **self.kwargs)
        for batch in loader:
            self.stream.mark_consumed(batch)
            # the next batch comes from the worker after this one: a resumed loader starts there
            slot = int(torch.as_tensor(batch["position"]).reshape(-1, 3)[0, 0])
            self.stream.worker_offset = (slot % workers + 1) % workers
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


__all__ = ["ShardError", "ShardStream", "StreamLoader", "collate_latents", "assign_shards", "buffer_shuffle",
           "encode_sample", "write_shard", "iter_tar", "decode_sample", "list_shards", "read_dataset_info",
           "write_json_atomic", "check_encoders", "shard_name", "sample_key", "remove_stale_temporaries",
           "INFO_NAME", "FORMAT"]
