"""Training batches with an exact resume point, split across ranks and gradient-accumulation steps.

Two kinds of source (``data.source`` in the config):

- map-style datasets: ``shapes:N``, image folders, manifests, ``hf:NAME`` (images + captions,
  encoded on the fly) and ``mds:PATH`` (micro_diffusion's precomputed latents). The global order
  is an endless concatenation of permutations seeded by (seed, epoch); the global batch of step s
  is ``order[s*G : (s+1)*G]``; rank r takes the contiguous slice ``[r*G/W, (r+1)*G/W)`` of it and
  cuts it into micro-batches. So one process with batch G sees exactly the samples that W
  processes see together, and the resume point is just the step.
- shard folders written by ``microdiff data precompute`` (a ``dataset.json`` beside webdataset
  tars): a :class:`~microdiff.data.shards.ShardStream` per rank, whose state (epoch and samples
  consumed per reader) is the resume point.

Each step yields this rank's micro-batches as ``(global_offset, batch)`` pairs, where
``global_offset`` is the position of the micro-batch's first sample in the global batch (so the
per-sample noise drawn for the global batch can be sliced to match).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

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


def is_shard_folder(source: str) -> bool:
    path = Path(source)
    return (path.is_dir() and (path / "dataset.json").is_file()) or source.endswith("dataset.json")


def build_map_dataset(config: DataConfig):
    """The map-style dataset ``config.source`` names."""
    source = config.source  # mds:ROOT[,ROOT...] reads several MDS folders as one dataset
    if source.startswith("shapes:"):
        from ..data.shapes import ShapesDataset

        count = source.split(":", 1)[1]
        if not count.isdigit():
            raise ValueError(f"data.source={source!r}: write shapes:N with N the number of images, e.g. shapes:2000")
        return ShapesDataset(int(count), resolution=config.resolution, seed=config.seed,
                             corruption=config.corruption, **config.vocabulary)
    if config.vocabulary:
        raise ValueError("data.vocabulary applies to shapes:N sources only")
    if source.startswith("mds:"):
        if config.corruption is not None:
            raise ValueError("data.corruption corrupts images; mds: sources hold latents")
        from ..data.mds import MDSLatentDataset

        return MDSLatentDataset([r for r in source[4:].split(",") if r], resolution=config.resolution)
    from ..data.captioned import make_dataset

    dataset = make_dataset(source, resolution=config.resolution)
    if config.corruption is not None:  # corrupt on the fly, the same way every epoch (seeded per record key)
        from ..ambient.dataset import CorruptedDataset

        dataset = CorruptedDataset(dataset, config.corruption, seed=config.seed, resolution=config.resolution)
    return dataset


def collate(batch: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Latent samples (precomputed) or image records, stacked."""
    kept = [b for b in batch if b is not None]
    if kept and "latent" in kept[0]:
        from ..data.shards import collate_latents

        return collate_latents(kept)
    from ..data.captioned import collate_records

    return collate_records(batch)


class CachedDataset(torch.utils.data.Dataset):
    """Keeps each decoded sample after its first use (small datasets that are slow to decode or render)."""

    def __init__(self, dataset):
        self.dataset, self.items = dataset, {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if index not in self.items:
            self.items[index] = self.dataset[index]
        return self.items[index]

    def key_meta(self, index: int):
        if index in self.items or not hasattr(self.dataset, "key_meta"):
            item = self[index]
            return None if item is None else (str(item["key"]), dict(item["meta"]))
        return self.dataset.key_meta(index)


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
    """Per-step micro-batches of a map-style dataset; ``state_dict`` is the next step."""

    def __init__(self, dataset, config: DataConfig, global_batch: int, splits: list[tuple[int, int]],
                 pin_memory: bool = False):
        if len(dataset) == 0:
            raise ValueError(f"data.source={config.source!r}: the dataset is empty")
        self.dataset, self.config, self.global_batch, self.splits = dataset, config, global_batch, splits
        self.pin_memory = pin_memory
        self.next_step = 0

    def _loader(self, start_step: int, total_steps: int):
        sampler = _MicroBatches(len(self.dataset), self.config, self.global_batch, self.splits, start_step, total_steps)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.config.num_workers,
                                           collate_fn=collate, pin_memory=self.pin_memory)

    def steps(self, start_step: int, total_steps: int) -> Iterator[list[tuple[int, dict]]]:
        micro: list[tuple[int, dict]] = []
        self.next_step = start_step
        for batch in self._loader(start_step, total_steps):
            micro.append((self.splits[len(micro)][0], batch))
            if len(micro) == len(self.splits):
                yield micro
                micro = []
                self.next_step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "map", "next_step": self.next_step, "n": len(self.dataset), "seed": self.config.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "map" or state.get("n") != len(self.dataset):
            raise ValueError(f"checkpoint data position is for {state.get('n')} samples ({state.get('kind')}), this "
                             f"run's data.source has {len(self.dataset)}: resume with the same data")


class ShardBatches:
    """Per-step micro-batches from precomputed shards; resumes through the stream's own state."""

    def __init__(self, config: DataConfig, global_batch: int, splits: list[tuple[int, int]], rank: int, world_size: int,
                 pin_memory: bool = False):
        from ..data.shards import ShardStream, StreamLoader

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

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "shards", **self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "shards":
            raise ValueError("checkpoint data position is not for shards: resume with the same data.source")
        self.stream.load_state_dict({k: v for k, v in state.items() if k != "kind"})


def scan_records(dataset, what: str, progress: bool = True) -> list[tuple[str, dict] | None]:
    """(key, meta) of every item (None for items the dataset skips), with a progress bar: what
    sample selection by quality or noise level needs to know before training."""
    from tqdm import tqdm

    out = []
    for i in tqdm(range(len(dataset)), desc=what, unit="item", disable=not progress, dynamic_ncols=True,
                  leave=False):
        out.append(key_meta(dataset, i))
    return out


def key_meta(dataset, index: int) -> tuple[str, dict] | None:
    """(key, meta) of one item: cheaply when the dataset can say it without decoding (``key_meta``)."""
    if hasattr(dataset, "key_meta"):
        return dataset.key_meta(index)
    item = dataset[index]
    return None if item is None else (str(item["key"]), dict(item["meta"]))


class Subset(torch.utils.data.Dataset):
    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]

    def key_meta(self, index: int):
        return key_meta(self.dataset, self.indices[index])


def keep_quality(dataset, min_quality: float, source: str, progress: bool = True):
    """The samples whose meta ``quality`` (absent = 1) is at least ``min_quality``."""
    records = scan_records(dataset, f"data.min_quality={min_quality}", progress)
    keep = [i for i, r in enumerate(records) if r is not None and float(r[1].get("quality", 1.0)) >= min_quality]
    if not keep:
        raise ValueError(f"data.source={source!r}: no sample has quality >= data.min_quality={min_quality}")
    return Subset(dataset, keep)


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
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, pair: tuple[int, float]):
        index, sigma = pair
        return self.dataset[index], sigma


def collate_with_sigma(pairs: list[tuple[dict | None, float]]) -> dict[str, Any] | None:
    kept = [(item, s) for item, s in pairs if item is not None]
    batch = collate([item for item, _ in kept])
    if batch is not None:
        batch["sigma"] = torch.tensor([s for _, s in kept], dtype=torch.float32)
    return batch


class SigmaFirstBatches(MapBatches):
    """Map-style batches whose samples are chosen for the step's sigmas (ambient ``sigma_first``):
    ``chooser(step)`` returns the global batch's indices and sigmas. Resumes from the step."""

    def __init__(self, dataset, config: DataConfig, global_batch: int, splits, chooser, pin_memory: bool = False):
        super().__init__(dataset, config, global_batch, splits, pin_memory)
        self.chooser = chooser

    def _loader(self, start_step: int, total_steps: int):
        sampler = _SigmaFirst(self.chooser, self.splits, start_step, total_steps)
        return torch.utils.data.DataLoader(_WithSigma(self.dataset), batch_sampler=sampler,
                                           num_workers=self.config.num_workers, collate_fn=collate_with_sigma,
                                           pin_memory=self.pin_memory)


def build_batches(config: DataConfig, global_batch: int, splits: list[tuple[int, int]], rank: int, world_size: int,
                  progress: bool = True, pin_memory: bool = False):
    """Batches of ``config.source``; ``pin_memory``: collate into page-locked memory (async GPU copies)."""
    if is_shard_folder(config.source):
        if config.min_quality is not None:
            raise ValueError("data.min_quality applies to map-style sources; filter shards when writing them")
        return ShardBatches(config, global_batch, splits, rank, world_size, pin_memory)
    dataset = build_map_dataset(config)
    dataset = CachedDataset(dataset) if config.cache else dataset
    if config.min_quality is not None:
        dataset = keep_quality(dataset, config.min_quality, config.source, progress=rank == 0 and progress)
    return MapBatches(dataset, config, global_batch, splits, pin_memory)


__all__ = ["build_batches", "to_device", "CachedDataset", "SigmaFirstBatches", "Subset", "scan_records", "key_meta", "keep_quality", "build_map_dataset", "MapBatches", "ShardBatches", "global_batch_indices", "split_batch",
           "epoch_permutation", "collate", "is_shard_folder"]
