"""Full batches from data with bad items: a skipped item is replaced, deterministically.

    record = fetch(dataset, index, seed)                  # dataset[index], or its replacement
    record = fetch(dataset, index, seed, pool=eligible)   # the replacement drawn from ``pool`` only

Training needs every micro-batch full: a rank that steps with fewer samples than the others puts
their collectives out of step, and a batch of only bad items has nothing to stack. So when
``dataset[index]`` is None (an item the dataset skipped: a corrupt or unreadable image, a bad mask,
an image too small, ...), :func:`fetch` returns the first usable item of a fixed sequence of
candidates drawn from ``numpy.random.default_rng([seed, index, SALT])``: first ``RANDOM_TRIES``
uniform draws from the pool, then the whole pool in order from a random start. The replacement
depends only on (seed, index) and the pool, never on the rank count, the worker count or the point
a run resumed from, so a resumed or distributed run sees the same samples as an uninterrupted one.
A ``pool`` restricts the candidates (ambient ``sigma_first``: the samples eligible at the slot's
sigma; an autoencoder's training split). Only when no item of the pool is usable does it stop,
with one line naming the source and the reasons.

The replaced record carries ``record[SKIPS]``: the :class:`~.report.Skip` of every bad item tried on
the way. The collate function lifts them out of the batch, so they travel from DataLoader workers
to the main process with the batch, where :class:`~.report.SkipReport` counts them by reason.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..utils.errors import UserError
from .report import Skip, SkipReport

SKIPS = "skips"  # record / batch field: the skipped items a replacement stands for
SALT = 0x5E1EC7  # names this stream: no other use of (seed, index) draws the same numbers
RANDOM_TRIES = 16  # uniform draws before the sequential scan of the pool


class NothingUsable(UserError):
    """No item of the pool is usable. Raised inside a DataLoader worker, PyTorch rebuilds it in the main
    process from "Caught NothingUsable in DataLoader worker process N. Original Traceback ...": the
    constructor takes the original one-line message back out of that text."""

    def __init__(self, message: str):
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def why_skipped(dataset: Any, index: int) -> Skip:
    """The dataset's reason for skipping item ``index`` (its ``probe``), or a generic one."""
    probe = getattr(dataset, "probe", None)
    skip = probe(index) if callable(probe) else None
    if isinstance(skip, Skip):
        return skip
    return Skip(f"item {index}", "skipped by the dataset")


def candidates(pool_size: int, seed: int, index: int) -> Iterator[int]:
    """Positions in the pool, in the order they are tried as replacements for item ``index``."""
    rng = np.random.default_rng([int(seed), int(index), SALT])
    for _ in range(RANDOM_TRIES):
        yield int(rng.integers(pool_size))
    start = int(rng.integers(pool_size))
    for k in range(pool_size):
        yield (start + k) % pool_size


def fetch(dataset: Any, index: int, seed: int, pool: Sequence[int] | None = None, source: str = "") -> dict:
    """``dataset[index]``, or the first usable of its replacements (see the module docstring)."""
    record = dataset[index]
    if record is not None:
        return record
    skips = {(s.path, s.reason): s for s in [why_skipped(dataset, index)]}
    size = len(dataset) if pool is None else len(pool)
    tried = {int(index)}
    for position in candidates(size, seed, index) if size else ():
        candidate = position if pool is None else int(pool[position])
        if candidate in tried:
            continue
        tried.add(candidate)
        record = dataset[candidate]
        if record is not None:
            return {**record, SKIPS: list(skips.values())}
        skip = why_skipped(dataset, candidate)
        skips[(skip.path, skip.reason)] = skip
    reasons = ", ".join(f"{r}: {n}" for r, n in SkipReport(source).merge(skips.values()).counts.items())
    where = "eligible " if pool is not None else ""
    raise NothingUsable(f"{source or 'the data'}: none of the {len(tried)} {where}items tried in place of item "
                        f"{index} is usable ({reasons}): (nearly) everything is unreadable; run "
                        f"`microdiff data check {source or 'SOURCE'}` to list the bad files")


class ReplaceSkipped:
    """A map-style view of ``dataset`` whose ``[i]`` never is None: :func:`fetch` with a fixed pool.

    ``raw`` is the dataset itself (for reads that must not be replaced, e.g. a held-out split)."""

    def __init__(self, dataset: Any, seed: int, pool: Sequence[int] | None = None, source: str = ""):
        self.raw, self.seed, self.pool, self.source = dataset, int(seed), pool, source

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> dict:
        return fetch(self.raw, index, self.seed, self.pool, self.source)

    def with_pool(self, pool: Sequence[int]) -> "ReplaceSkipped":
        """The same view with replacements drawn from ``pool`` only."""
        return ReplaceSkipped(self.raw, self.seed, list(pool), self.source)

    @property
    def report(self) -> SkipReport | None:
        return getattr(self.raw, "report", None)


def lift_skips(records: list[dict]) -> list[list[Skip]]:
    """Take ``SKIPS`` out of the records of a batch (one list per replaced slot), so collate never sees it."""
    lifted = []
    for k, record in enumerate(records):
        if isinstance(record, dict) and SKIPS in record:
            record = dict(record)
            lifted.append(record.pop(SKIPS))
            records[k] = record
    return lifted


def tally(report: SkipReport, lifted: list[list[Skip]]) -> None:
    """Count the skips a batch brought along (:func:`lift_skips`) into ``report``."""
    for skips in lifted:
        report.replaced += 1
        for skip in skips:
            report.add(skip.path, skip.reason, skip.detail)


__all__ = ["SKIPS", "NothingUsable", "fetch", "candidates", "why_skipped", "ReplaceSkipped", "lift_skips", "tally"]
