"""Training batches with an exact resume point, split across ranks and gradient-accumulation steps.

Two kinds of source (``data.source`` in the config):

- map-style datasets (built by ``data.sources.build_dataset``): ``shapes:N``, image folders, manifests,
  ``hf:NAME``, image shard folders such as ``microdiff data download``'s (images + captions, encoded
  on the fly) and ``mds:PATH`` (micro_diffusion's precomputed latents). The global order
  is an endless concatenation of permutations seeded by (seed, epoch); the global batch of step s
  is ``order[s*G : (s+1)*G]``; rank r takes the contiguous slice ``[r*G/W, (r+1)*G/W)`` of it and
  cuts it into micro-batches. So one process with batch G sees exactly the samples that W
  processes see together, and the resume point is just the step. An item the dataset skips (a
  corrupt file, ...) is replaced by one chosen from (data.seed, index) alone (``data/skips.py``), so
  every micro-batch is full, on every rank, after every resume; the skipped items are counted by
  reason in ``batches.skips()`` (the tally travels with the batches from the DataLoader workers).
- shard folders written by ``microdiff data precompute`` (a ``dataset.json`` beside webdataset
  tars): a :class:`~microdiff.data.shards.ShardStream` per rank, whose state (epoch and samples
  consumed per reader) is the resume point.

Each step yields this rank's micro-batches as ``(global_offset, batch)`` pairs, where
``global_offset`` is the position of the micro-batch's first sample in the global batch (so the
per-sample noise drawn for the global batch can be sliced to match).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
import torch

from ..data.captioned import collate_records
from ..data.report import SkipReport
from ..data.shards import ShardStream, StreamLoader, collate_latents
from ..data.skips import SKIPS, ReplaceSkipped, fetch, lift_skips, tally
from ..data.sources import (CachedDataset, Subset, build_dataset, is_latent_shards, keep_quality, key_meta,
                            scan_records, skip_report)
from .config import DataConfig


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a host-to-GPU copy goes through page-locked memory without blocking the host."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def global_batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Dataset indices of the global batch of ``step``: positions [step*batch, (step+1)*batch) of
    the endless order made of per-epoch permutations."""
    out, pos = [], step * batch
    while len(out) < batch:
        epoch, start = divmod(pos, n)
        take = min(batch - len(out), n - start)
        out.extend(int(i) for i in epoch_permutation(n, seed, epoch)[start:start + take])
        pos += take
    return out


def split_batch(global_batch: int, world_size: int, rank: int, micro: int) -> list[tuple[int, int]]:
    """(offset, size) of this rank's micro-batches inside the global batch."""
    if global_batch % world_size:
        raise ValueError(f"train.batch_size={global_batch} must be divisible by the number of processes ({world_size})")
    per_rank = global_batch // world_size
    if per_rank % micro:
        raise ValueError(f"train.micro_batch_size={micro} must divide the per-process batch {per_rank} "
                         f"(train.batch_size / processes)")
    start = rank * per_rank
    return [(start + k, micro) for k in range(0, per_rank, micro)]


is_shard_folder = is_latent_shards  # a folder written by `microdiff data precompute`


def build_map_dataset(config: DataConfig, progress: bool = True):
    """The map-style dataset ``config`` names (``data.sources.build_dataset``, kept for callers of this name)."""
    return build_dataset(config, progress=progress)


def collate(batch: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Latent samples (precomputed) or image records, stacked; ``batch[SKIPS]``: per replaced slot, the
    skipped items it stands for (``data/skips.py``), so they reach the main process with the batch."""
    batch = list(batch)
    lifted = lift_skips(batch)
    kept = [b for b in batch if b is not None]
    out = collate_latents(kept) if kept and "latent" in kept[0] else collate_records(batch)
    if out is not None:
        out[SKIPS] = lifted
    return out


class _MicroBatches(torch.utils.data.Sampler):
    def __init__(self, n: int, config: DataConfig, global_batch: int, splits: list[tuple[int, int]],
                 start_step: int, total_steps: int):
        self.n, self.config, self.global_batch, self.splits = n, config, global_batch, splits
        self.start_step, self.total_steps = start_step, total_steps

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            indices = global_batch_indices(self.n, self.global_batch, step, self.config.seed)
            for offset, size in self.splits:
                yield indices[offset:offset + size]

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * len(self.splits)


class MapBatches:
    """Per-step micro-batches of a map-style dataset; ``state_dict`` is the next step (and the skips so far).

    Every micro-batch is full: an item the dataset skips is replaced by ``data.skips.fetch`` (a choice
    that depends on (data.seed, index) alone). :meth:`skips` is this rank's tally of skipped items by
    reason: what the index left out plus what the batches brought along from the workers."""

    def __init__(self, dataset, config: DataConfig, global_batch: int, splits: list[tuple[int, int]],
                 pin_memory: bool = False, log_skips: bool = True):
        if len(dataset) == 0:
            raise ValueError(f"data.source={config.source!r}: the dataset is empty")
        self.dataset, self.config, self.global_batch, self.splits = dataset, config, global_batch, splits
        self.pin_memory = pin_memory
        self.next_step = 0
        self.tally = SkipReport(config.source, warn_first=10 if log_skips else 0)
        self._merge_index_skips()

    def _merge_index_skips(self) -> None:
        """What the dataset skipped while indexing; from now on the tally (in this process) logs new skips."""
        base = skip_report(self.dataset)
        if base is not None:
            self.tally.merge(base)
            base.quiet()

    def _loader(self, start_step: int, total_steps: int):
        sampler = _MicroBatches(len(self.dataset), self.config, self.global_batch, self.splits, start_step, total_steps)
        items = ReplaceSkipped(self.dataset, self.config.seed, source=self.config.source)
        return torch.utils.data.DataLoader(items, batch_sampler=sampler, num_workers=self.config.num_workers,
                                           collate_fn=collate, pin_memory=self.pin_memory)

    def steps(self, start_step: int, total_steps: int) -> Iterator[list[tuple[int, dict]]]:
        micro: list[tuple[int, dict]] = []
        self.next_step = start_step
        for batch in self._loader(start_step, total_steps):
            tally(self.tally, batch.pop(SKIPS, []))
            micro.append((self.splits[len(micro)][0], batch))
            if len(micro) == len(self.splits):
                yield micro
                micro = []
                self.next_step += 1

    def skips(self) -> SkipReport:
        """This rank's skipped items by reason (merge the ranks' with ``SkipReport.merged``)."""
        return self.tally

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "map", "next_step": self.next_step, "n": len(self.dataset), "seed": self.config.seed,
                "skips": self.tally.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "map" or state.get("n") != len(self.dataset):
            raise ValueError(f"checkpoint data position is for {state.get('n')} samples ({state.get('kind')}), this "
                             f"run's data.source has {len(self.dataset)}: resume with the same data")
        if "skips" in state:
            self.tally.load_state_dict(state["skips"])
            self._merge_index_skips()


class ShardBatches:
    """Per-step micro-batches from precomputed shards; resumes through the stream's own state."""

    def __init__(self, config: DataConfig, global_batch: int, splits: list[tuple[int, int]], rank: int, world_size: int,
                 pin_memory: bool = False):
        self.source = config.source
        self.stream = ShardStream(config.source, shuffle_buffer=config.shuffle_buffer, seed=config.seed,
                                  rank=rank, world_size=world_size)
        self.splits = splits
        self.loader = StreamLoader(self.stream, batch_size=splits[0][1], num_workers=config.num_workers,
                                   pin_memory=pin_memory)

    def steps(self, start_step: int, total_steps: int) -> Iterator[list[tuple[int, dict]]]:
        step = start_step
        while step < total_steps:
            micro: list[tuple[int, dict]] = []
            produced = False
            for batch in self.loader:
                produced = True
                micro.append((self.splits[len(micro)][0], batch))
                if len(micro) == len(self.splits):
                    yield micro
                    micro, step = [], step + 1
                    if step >= total_steps:
                        return
            if not produced:
                raise ValueError(f"{self.stream.urls[0]}: the shards yield no samples for this process")
            self.stream.set_epoch(self.stream.epoch + 1)  # an epoch ended: the partial micro-batches are dropped

    def skips(self) -> SkipReport:
        """Nothing: a damaged shard is an error (``data.shards.ShardError``), never a skip."""
        return SkipReport(self.source)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "shards", **self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "shards":
            raise ValueError("checkpoint data position is not for shards: resume with the same data.source")
        self.stream.load_state_dict({k: v for k, v in state.items() if k != "kind"})


class _SigmaFirst(torch.utils.data.Sampler):
    """Micro-batches of (index, sigma) pairs: the step's sigmas first, then eligible samples."""

    def __init__(self, chooser: Callable[[int], tuple[list[int], torch.Tensor]], splits, start_step, total_steps):
        self.chooser, self.splits = chooser, splits
        self.start_step, self.total_steps = start_step, total_steps

    def __iter__(self) -> Iterator[list[tuple[int, float]]]:
        for step in range(self.start_step, self.total_steps):
            indices, sigma = self.chooser(step)
            for offset, size in self.splits:
                yield [(indices[j], float(sigma[j])) for j in range(offset, offset + size)]

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * len(self.splits)


class _WithSigma(torch.utils.data.Dataset):
    """(index, sigma) -> (record, sigma); a skipped item is replaced by one eligible at that sigma."""

    def __init__(self, dataset, seed: int, source: str, eligible: Callable[[float], np.ndarray]):
        self.dataset, self.seed, self.source, self.eligible = dataset, seed, source, eligible

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, pair: tuple[int, float]):
        index, sigma = pair
        record = self.dataset[index]
        if record is None:
            record = fetch(self.dataset, index, self.seed, self.eligible(sigma), self.source)
        return record, sigma


def collate_with_sigma(pairs: list[tuple[dict | None, float]]) -> dict[str, Any] | None:
    batch = collate([item for item, _ in pairs])
    if batch is not None:
        batch["sigma"] = torch.tensor([s for _, s in pairs], dtype=torch.float32)
    return batch


class SigmaFirstBatches(MapBatches):
    """Map-style batches whose samples are chosen for the step's sigmas (ambient ``sigma_first``):
    ``chooser(step)`` returns the global batch's indices and sigmas; ``eligible(sigma)`` the indices
    usable at ``sigma``, from which a skipped item's replacement is drawn. Resumes from the step."""

    def __init__(self, dataset, config: DataConfig, global_batch: int, splits, chooser, pin_memory: bool = False, *,
                 eligible: Callable[[float], np.ndarray], log_skips: bool = True):
        super().__init__(dataset, config, global_batch, splits, pin_memory, log_skips)
        self.chooser, self.eligible = chooser, eligible

    def _loader(self, start_step: int, total_steps: int):
        sampler = _SigmaFirst(self.chooser, self.splits, start_step, total_steps)
        items = _WithSigma(self.dataset, self.config.seed, self.config.source, self.eligible)
        return torch.utils.data.DataLoader(items, batch_sampler=sampler, num_workers=self.config.num_workers,
                                           collate_fn=collate_with_sigma, pin_memory=self.pin_memory)


def build_batches(config: DataConfig, global_batch: int, splits: list[tuple[int, int]], rank: int, world_size: int,
                  progress: bool = True, pin_memory: bool = False):
    """Batches of ``config.source``; ``pin_memory``: collate into page-locked memory (async GPU copies)."""
    if is_latent_shards(config.source):
        for name in ("min_quality", "corruption", "caption_column", "image_column"):
            if getattr(config, name) not in (None, {}):
                raise ValueError(f"data.{name} applies to map-style sources, and {config.source} is a folder of "
                                 "precomputed latent shards; apply it when writing them (microdiff data precompute)")
        return ShardBatches(config, global_batch, splits, rank, world_size, pin_memory)
    main = rank == 0
    dataset = build_dataset(config, progress=main and progress, log_skips=main)
    return MapBatches(dataset, config, global_batch, splits, pin_memory, log_skips=main)


__all__ = ["build_batches", "to_device", "CachedDataset", "SigmaFirstBatches", "Subset", "scan_records", "key_meta",
           "keep_quality", "build_map_dataset", "MapBatches", "ShardBatches", "global_batch_indices", "split_batch",
           "epoch_permutation", "collate", "is_shard_folder"]
