"""What a dataset could not use, and why: the ``on_error`` policy and the :class:`SkipReport`.

Every dataset takes ``on_error``: "raise" stops at the first bad item with a :class:`DataError` that
names its path and reason; "skip" records the item in the dataset's ``report`` and goes on. Nothing
vanishes silently: each skip is counted by reason, the first ``warn_first`` of them are logged at
WARNING on the ``microdiff.data`` logger, and ``write()`` saves the full list as JSON and CSV.

DataLoader workers each hold a copy of the dataset, so each keeps its own report. Reports merge
(``a.merge(b)``; an item skipped twice, e.g. in two epochs, is counted once). Training collects the
skips of worker processes by sending them with each batch (``data/skips.py``) and the ranks' reports
by gathering them (``SkipReport.merged``); totals per reason count distinct items, so they do not
depend on worker count, rank count or how often an item is revisited. ``replaced`` counts the batch
slots that were filled with a replacement for a skipped item (a sum over ranks). Another way to
collect the skips of worker processes: give the report a ``journal`` file: every skip is also
appended to it as one JSON line (one ``O_APPEND`` write, safe across processes), and
``SkipReport.from_journal(path)`` in the main process rebuilds the merged report.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import threading
from collections import Counter
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Iterable

from ..utils.files import write_text_atomic

__all__ = ["OnError", "DataError", "Skip", "SkipReport"]

logger = logging.getLogger("microdiff.data")


class OnError(str, Enum):
    """What a dataset does with an item it cannot use."""

    SKIP = "skip"
    RAISE = "raise"

    @classmethod
    def parse(cls, value: "OnError | str") -> "OnError":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"on_error must be 'skip' or 'raise', got {value!r}") from None


class DataError(ValueError):
    """One item a dataset cannot use, raised under ``on_error="raise"``."""

    def __init__(self, path: str, reason: str = "", detail: str = ""):
        self.path, self.reason, self.detail = str(path), reason, detail
        if not reason:  # rebuilt from its message alone (as DataLoader workers re-raise errors)
            super().__init__(str(path))
            return
        more = f" ({detail})" if detail else ""
        super().__init__(f"{path}: {reason}{more}; fix or remove it, or pass on_error='skip' to skip and "
                         "report such items")

    def __reduce__(self):
        return type(self), (self.path, self.reason, self.detail)


@dataclass(frozen=True)
class Skip:
    path: str
    reason: str
    detail: str = ""


class SkipReport:
    """Skipped items with their reasons; thread-safe, picklable, mergeable.

    Args:
        name: what the report is about (a dataset path), shown in ``summary()``.
        warn_first: log this many skips at WARNING, then only count them.
        journal: optional JSON-lines file every new skip is appended to (see the module docstring);
            it is emptied when the report is created.
    """

    def __init__(self, name: str = "", *, warn_first: int = 10, journal: str | os.PathLike | None = None):
        self.name, self.warn_first = str(name), int(warn_first)
        self.journal = None if journal is None else Path(journal)
        self._items: dict[tuple[str, str], Skip] = {}
        self.replaced = 0  # batch slots filled with a replacement for a skipped item
        self._logged = 0
        self._lock = threading.Lock()
        if self.journal is not None:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            self.journal.write_text("")

    # --- recording -------------------------------------------------------------------------------
    def add(self, path: str | os.PathLike, reason: str, detail: str = "") -> bool:
        """Record one skip; returns False if this (path, reason) was already recorded."""
        skip = Skip(str(path), str(reason), str(detail))
        with self._lock:
            if (skip.path, skip.reason) in self._items:
                return False
            self._items[(skip.path, skip.reason)] = skip
            log = self._logged < self.warn_first
            self._logged += log
            last = self._logged == self.warn_first and log
        if log:
            more = f" ({skip.detail})" if skip.detail else ""
            tail = "; further skips are counted but not logged (totals by reason at the end)" if last else ""
            logger.warning("skipped %s: %s%s%s", skip.path, skip.reason, more, tail)
        if self.journal is not None:
            line = (json.dumps(asdict(skip), ensure_ascii=False) + "\n").encode("utf-8")
            fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        return True

    def merge(self, *others: "SkipReport | Iterable[Skip]") -> "SkipReport":
        """Add the items of other reports (or iterables of :class:`Skip`) without logging them again;
        ``replaced`` counts add up (each rank fills its own batch slots)."""
        for other in others:
            items = other.items if isinstance(other, SkipReport) else list(other)
            with self._lock:
                for skip in items:
                    self._items.setdefault((skip.path, skip.reason), skip)
                if isinstance(other, SkipReport):
                    self.replaced += other.replaced
        return self

    @classmethod
    def merged(cls, reports: Iterable["SkipReport"], name: str | None = None) -> "SkipReport":
        """One report of several (e.g. every rank's, from ``gather_objects``); the name of the first."""
        reports = list(reports)
        first = name if name is not None else (reports[0].name if reports else "")
        return cls(first, warn_first=0).merge(*reports)

    def quiet(self) -> None:
        """Log no further skips (they are still counted): another report logs them from now on."""
        with self._lock:
            self.warn_first = min(self.warn_first, self._logged)

    def state_dict(self) -> dict:
        """Plain lists and numbers (a checkpoint's ``weights_only`` loader takes them)."""
        return {"items": [[s.path, s.reason, s.detail] for s in self.items], "replaced": int(self.replaced)}

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            self._items = {(p, r): Skip(p, r, d) for p, r, d in state.get("items", [])}
            self.replaced = int(state.get("replaced", 0))

    @classmethod
    def from_journal(cls, path: str | os.PathLike, name: str = "") -> "SkipReport":
        """The merged report of every process that appended to the journal ``path``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no skip journal here; pass journal=... to the dataset's report")
        skips = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    skips.append(Skip(**json.loads(line)))
                except (json.JSONDecodeError, TypeError) as err:
                    raise ValueError(f"{path}, line {n}: not a skip journal entry ({err})") from None
        return cls(name or str(path)).merge(skips)

    # --- reading ---------------------------------------------------------------------------------
    @property
    def items(self) -> list[Skip]:
        with self._lock:
            return list(self._items.values())

    @property
    def total(self) -> int:
        return len(self._items)

    @property
    def counts(self) -> dict[str, int]:
        """Skips per reason, most frequent first."""
        return dict(Counter(skip.reason for skip in self.items).most_common())

    def totals(self) -> dict[str, int]:
        """Distinct skipped items per reason (the same as ``counts``)."""
        return self.counts

    def summary(self) -> str:
        """One line: ``<name>: skipped 3 items (corrupt image: 2, missing caption: 1)``, plus how many
        batch slots were filled with replacements when there were any."""
        head = f"{self.name}: " if self.name else ""
        if not self.total:
            return f"{head}nothing skipped"
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.counts.items())
        more = f"; {self.replaced} batch slot{'s' if self.replaced != 1 else ''} filled with replacements" \
            if self.replaced else ""
        return f"{head}skipped {self.total} item{'s' if self.total != 1 else ''} ({reasons}){more}"

    def to_dict(self) -> dict:
        return {"name": self.name, "total": self.total, "counts": self.counts, "replaced": self.replaced,
                "items": [asdict(skip) for skip in sorted(self.items, key=lambda s: (s.reason, s.path))]}

    def to_json(self, **extra: Any) -> str:
        return json.dumps({**extra, "summary": self.summary(), **self.to_dict()}, indent=2, ensure_ascii=False) + "\n"

    def write(self, path: str | os.PathLike, **extra: Any) -> tuple[Path, Path]:
        """Write ``<path>.json`` (``extra`` such as a ``files.stamp``, summary, counts, items) and
        ``<path>.csv`` (path, reason, detail), each atomically."""
        path = Path(path)
        json_path, csv_path = path.with_suffix(".json"), path.with_suffix(".csv")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "reason", "detail"])
        writer.writerows((s.path, s.reason, s.detail) for s in self.items)
        write_text_atomic(csv_path, buffer.getvalue())
        write_text_atomic(json_path, self.to_json(**extra))
        return json_path, csv_path

    def __repr__(self) -> str:
        return f"SkipReport({self.summary()!r})"

    # --- pickling (DataLoader workers with the spawn start method) -------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
