"""Memorisation check (as in Ambient Diffusion): for every generated sample, its nearest training
samples by cosine similarity of features (DINO, CLIP, Inception, ... computed elsewhere).

    top_k_similar(queries, bank, k=5)           -> (sims (Q, k) float64, indices (Q, k) int64)
    distributed_top_k(queries, shard, offset, k, dist_info)   the same, with the bank split over ranks
    memorization_report(sims, indices)          -> dict: counts/fractions above thresholds, top-1 stats
    save_report(out_dir, report, (sims, indices), gen_images, train_images)
        -> memorization.json, top_k.csv, top1_hist.png, closest_pairs.png

The bank is searched in blocks of ``batch_size`` rows (queries too), keeping a running top-k, so a
50k x 1M search needs memory for one block, not for the whole similarity matrix.

Exactness. The result must not depend on how the bank is cut into blocks or shards, nor on the
BLAS or device: a float matmul sums in a shape-dependent order, so the same pair can get a
different last bit in another block and near-ties would flip. We therefore scale each feature row by
a power of two (exact) and round it to integers of at most ``bits`` bits, with ``D * 4**bits <=
2**53``. Every dot product of such rows is an integer below 2**53, which float64 holds exactly
whatever the summation order, and the cosine ``dot / sqrt(|q|^2 |b|^2)`` is then elementwise
IEEE arithmetic: the same bits everywhere. The price is the rounding of the features (relative
2**-bits of a row's largest entry; bits = 21 for D = 768), which moves a cosine by ~1e-7 — far
below any threshold that matters here. Identical feature rows give exactly 1.0.

Ties (duplicated training images are common, and they are the ones that get memorised) go to the
lower bank index, so the order is a pure function of the data.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as tdist
from PIL import Image

from .metrics import whole_number

from ..train.distributed import DistInfo
from ..utils.files import write_png_atomic, write_text_atomic
from ..utils.grids import captioned_grid
from ..utils.plots import histogram

THRESHOLDS = (0.95, 0.9, 0.85)  # top-1 cosine similarity above which a sample counts as a (near-)copy
FINGERPRINT_WEIGHTS = 97  # row weights 1..97 in the check that every rank holds the same queries


# --- exact cosine similarity ---------------------------------------------------------------------------------------
def _rows(value: Any, name: str, device: torch.device | None = None, allow_empty: bool = False) -> torch.Tensor:
    """(N, D) float64 tensor (exact for float16/32 input), finite, or a one-line ValueError."""
    if isinstance(value, np.ndarray) and not value.flags.writeable:  # a read-only memmap: copy this block
        value = np.array(value)
    try:
        x = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be an (N, D) numeric array or tensor; got {type(value).__name__}") from None
    if x.ndim != 2 or x.shape[1] == 0 or (x.shape[0] == 0 and not allow_empty):
        raise ValueError(f"{name} must be (N, D) features, one row per sample, N and D >= 1; got shape "
                         f"{tuple(x.shape)}")
    x = x.to(device=device, dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values; check the features it came from")
    return x


def feature_bits(dim: int) -> int:
    """Bits per rounded feature such that every dot product of D of them is exact in float64."""
    return (53 - math.ceil(math.log2(dim))) // 2


def quantize(x: torch.Tensor, name: str = "features", first_row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows scaled by a power of two so their largest entry is below 2**bits, rounded to integers
    (float64), and their exact squared norms. Depends on each row alone, never on the batch."""
    maxabs = x.abs().amax(dim=1)
    if bool((maxabs == 0).any()):
        row = first_row + int(torch.nonzero(maxabs == 0)[0, 0])
        raise ValueError(f"{name} row {row} is all zeros; cosine similarity needs non-zero feature vectors")
    _, exponent = torch.frexp(maxabs)  # maxabs < 2**exponent
    shift = feature_bits(x.shape[1]) - exponent.to(torch.int64)
    if bool(((shift < -1022) | (shift > 1023)).any()):
        raise ValueError(f"{name} has rows with magnitudes near the float64 limits; rescale the features")
    scale = ((shift + 1023) << 52).view(torch.float64)  # 2**shift built from its bits: exact on any device
    q = torch.round(x * scale[:, None])
    return q, (q * q).sum(dim=1)


def _cosine(q: torch.Tensor, nq: torch.Tensor, b: torch.Tensor, nb: torch.Tensor) -> torch.Tensor:
    return (q @ b.T).div_(torch.sqrt_(nq[:, None] * nb[None, :])).clamp_(-1.0, 1.0)


# --- top-k with a deterministic tie-break --------------------------------------------------------------------------
def merge_top_k(sims: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best columns of each row: highest similarity first, equal similarities by lower index."""
    order = indices.argsort(dim=1, stable=True)
    sims, indices = sims.gather(1, order), indices.gather(1, order)
    order = sims.argsort(dim=1, descending=True, stable=True)[:, :k]
    return sims.gather(1, order), indices.gather(1, order)


def _block_top_k(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column positions of each row's k best (ties to the lower column). topk picks an arbitrary
    subset of a tie at the k-th place, so rows with such a tie are sorted in full."""
    k = min(k, sims.shape[1])
    values, cols = sims.topk(k, dim=1)
    values, cols = merge_top_k(values, cols, k)
    tied = (sims >= values[:, -1:]).sum(dim=1) > k
    if bool(tied.any()):
        rows = torch.nonzero(tied)[:, 0]
        full = sims[rows].argsort(dim=1, descending=True, stable=True)[:, :k]
        values[rows], cols[rows] = sims[rows].gather(1, full), full
    return values, cols


def _search(queries: torch.Tensor, bank: Any, k: int, batch_size: int, offset: int,
            bank_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k of float64 ``queries`` over ``bank`` rows, indices shifted by ``offset``;
    padded with (-inf, -1) where the bank has fewer than k rows."""
    device = queries.device
    best_s = torch.full((len(queries), k), -math.inf, dtype=torch.float64, device=device)
    best_i = torch.full((len(queries), k), -1, dtype=torch.int64, device=device)
    q_parts = [quantize(queries[i:i + batch_size], "queries", i) for i in range(0, len(queries), batch_size)]
    for start in range(0, len(bank), batch_size):
        block = _rows(bank[start:start + batch_size], bank_name, device)
        if block.shape[1] != queries.shape[1]:
            raise ValueError(f"{bank_name} has D={block.shape[1]} features, queries D={queries.shape[1]}; extract "
                             "both with the same network")
        b, nb = quantize(block, bank_name, start)
        for qi, (q, nq) in enumerate(q_parts):
            rows = slice(qi * batch_size, qi * batch_size + len(q))
            s, cols = _block_top_k(_cosine(q, nq, b, nb), k)
            cols += offset + start
            merged = merge_top_k(torch.cat([best_s[rows], s], 1), torch.cat([best_i[rows], cols], 1), k)
            best_s[rows], best_i[rows] = merged
    return best_s, best_i


def top_k_similar(queries: Any, bank: Any, k: int = 5, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's k most cosine-similar bank rows: (similarities (Q, k) float64, descending;
    bank indices (Q, k) int64), on the queries' device. ``bank`` may be anything sliceable into
    (n, D) rows (tensor on another device, numpy memmap); it is read ``batch_size`` rows at a time."""
    k, batch_size = whole_number(k, "k", 1), whole_number(batch_size, "batch_size", 1)
    device = queries.device if isinstance(queries, torch.Tensor) else None
    q = _rows(queries, "queries", device)
    if len(bank) < k:
        raise ValueError(f"k={k} but the bank holds {len(bank)} rows; pass k <= {len(bank)}")
    return _search(q, bank, k, batch_size, 0, "bank")


# --- many processes ------------------------------------------------------------------------------------------------
def shard_range(n: int, info: DistInfo) -> tuple[int, int]:
    """This rank's contiguous part [start, end) of n rows (the first n % world ranks get one more)."""
    per, extra = divmod(n, info.world_size)
    start = info.rank * per + min(info.rank, extra)
    return start, start + per + (info.rank < extra)


def _all_gather(x: torch.Tensor, info: DistInfo) -> list[torch.Tensor]:
    out = [torch.empty_like(x) for _ in range(info.world_size)]
    tdist.all_gather(out, x.contiguous())
    return out


def distributed_top_k(queries: Any, bank_shard: Any, shard_offset: int, k: int, dist: DistInfo, *,
                      queries_sharded: bool = False, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_k_similar`` over a bank split across ranks: this rank holds rows [shard_offset,
    shard_offset + len(bank_shard)) of it. Returns, on every rank, exactly (bit for bit) what one
    process would return for the whole bank: local top-k, all_gather, merge.

    Queries are the same on every rank, or with ``queries_sharded=True`` each rank holds its own
    part (in rank order) and the result covers all of them. Every rank must call this. Computed
    and returned on ``dist.device`` (NCCL needs CUDA tensors)."""
    k, batch_size = whole_number(k, "k", 1), whole_number(batch_size, "batch_size", 1)
    offset = whole_number(shard_offset, "shard_offset", 0)
    q = _rows(queries, "queries", dist.device, allow_empty=queries_sharded)
    if not dist.distributed:
        if len(bank_shard) < k:
            raise ValueError(f"k={k} but the bank holds {len(bank_shard)} rows; pass k <= {len(bank_shard)}")
        return _search(q, bank_shard, k, batch_size, offset, "bank_shard")
    meta = torch.tensor([len(q), q.shape[1], len(bank_shard), offset], dtype=torch.int64, device=dist.device)
    metas = [m.tolist() for m in _all_gather(meta, dist)]
    _check_layout(metas, k, queries_sharded)
    if queries_sharded:
        width = max(m[0] for m in metas)
        padded = torch.zeros(width, q.shape[1], dtype=torch.float64, device=dist.device)
        padded[:len(q)] = q
        q = torch.cat([part[:m[0]] for part, m in zip(_all_gather(padded, dist), metas)])
    else:
        _check_same_queries(q, dist)
    sims, idx = _search(q, bank_shard, k, batch_size, offset, "bank_shard")
    return merge_top_k(torch.cat(_all_gather(sims, dist), 1), torch.cat(_all_gather(idx, dist), 1), k)


def _check_layout(metas: list[list[int]], k: int, queries_sharded: bool) -> None:
    """Raised on every rank alike (they all see every rank's sizes), so no rank is left waiting."""
    if len({m[1] for m in metas}) > 1:
        raise ValueError(f"distributed_top_k: feature dimension differs across ranks ({[m[1] for m in metas]}); "
                         "extract every shard with the same network")
    if not queries_sharded and len({m[0] for m in metas}) > 1:
        raise ValueError(f"distributed_top_k: ranks hold {[m[0] for m in metas]} queries; pass the same queries "
                         "everywhere or queries_sharded=True")
    if queries_sharded and sum(m[0] for m in metas) == 0:
        raise ValueError("distributed_top_k: no rank holds any query; pass at least one query row")
    spans = sorted((m[3], m[3] + m[2], r) for r, m in enumerate(metas) if m[2])
    for (_, end, r0), (start, _, r1) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"distributed_top_k: bank shards of ranks {r0} and {r1} overlap at row {start}; give "
                             "each rank shard_offset = the first global row it holds (see shard_range)")
    total = sum(m[2] for m in metas)
    if total < k:
        raise ValueError(f"k={k} but the bank shards hold {total} rows in all; pass k <= {total}")


def _check_same_queries(q: torch.Tensor, info: DistInfo) -> None:
    """Column sums (plain and row-weighted) of the rounded queries: exact integers, so equal bit
    for bit on every rank holding the same queries in the same order."""
    qi, _ = quantize(q, "queries")
    weights = (torch.arange(len(q), device=q.device) % FINGERPRINT_WEIGHTS + 1).to(torch.float64)
    mine = torch.stack([qi.sum(0), (weights[:, None] * qi).sum(0)])
    if any(not torch.equal(mine, other) for other in _all_gather(mine, info)):
        raise ValueError("distributed_top_k: the ranks hold different queries; pass the same queries (same order) "
                         "on every rank, or queries_sharded=True if each holds its own part")


# --- report --------------------------------------------------------------------------------------------------------
def _table(value: Any, name: str, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value, dtype=dtype)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{name} must be (Q, k) as top_k_similar returns it; got shape {array.shape}")
    return array


def memorization_report(similarities: Any, indices: Any, thresholds: Sequence[float] = THRESHOLDS, *,
                        n_closest: int = 24) -> dict[str, Any]:
    """Numbers about each generated sample's nearest training sample (top-1 similarity): per threshold
    t, how many (and what fraction) reach similarity >= t and how many distinct training samples they
    copy; mean / median / min / max top-1; the ``n_closest`` most similar (generated, training) pairs."""
    sims, idx = _table(similarities, "similarities", np.float64), _table(indices, "indices", np.int64)
    if sims.shape != idx.shape:
        raise ValueError(f"similarities {sims.shape} and indices {idx.shape} must have the same shape")
    if not np.all(np.isfinite(sims)):
        raise ValueError("similarities contain NaN or infinite values; pass the output of top_k_similar")
    for t in thresholds:
        if not -1.0 <= float(t) <= 1.0:
            raise ValueError(f"thresholds must be cosine similarities in [-1, 1]; got {t}")
    top1, match = sims[:, 0], idx[:, 0]
    order = np.argsort(-top1, kind="stable")[:whole_number(n_closest, "n_closest", 0)]
    return {
        "n_generated": len(top1),
        "k": sims.shape[1],
        "thresholds": [{"threshold": float(t), "count": int((top1 >= t).sum()), "fraction": float((top1 >= t).mean()),
                        "distinct_train": len(np.unique(match[top1 >= t]))} for t in thresholds],
        "top1_mean": float(top1.mean()),
        "top1_median": float(np.median(top1)),
        "top1_min": float(top1.min()),
        "top1_max": float(top1.max()),
        "closest_pairs": [{"gen": int(g), "train": int(match[g]), "similarity": float(top1[g])} for g in order],
    }


def _to_pil(item: Any, value_range: tuple[float, float], where: str) -> Image.Image:
    """PIL image, dataset record with an 'image', uint8 (H, W, C) array, or float (C, H, W) in value_range."""
    if isinstance(item, dict) and "image" in item:
        item = item["image"]
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if item is None:
        raise ValueError(f"{where} is None (a skipped dataset item?); pass images that load")
    a = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3):
        raise ValueError(f"{where} must be an image (3, H, W), (H, W, 3) or PIL; got shape {a.shape}")
    if a.dtype != np.uint8:
        lo, hi = value_range
        a = (np.clip((a.astype(np.float64) - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.repeat(a, 3 // a.shape[2], axis=2)), "RGB")


def _cell(img: Image.Image, size: int) -> Image.Image:
    return img.resize((size, size), Image.NEAREST if max(img.size) <= size else Image.BICUBIC)


def closest_pairs_grid(sims: np.ndarray, idx: np.ndarray, gen_images: Any, train_images: Any, pairs: int = 24,
                       value_range: tuple[float, float] = (-1.0, 1.0), cell: int = 96, per_row: int = 4) -> Image.Image:
    """The ``pairs`` most similar (generated, nearest training) pairs side by side, similarity below."""
    top1 = sims[:, 0]
    cells, captions = [], []
    for g in np.argsort(-top1, kind="stable")[:pairs]:
        t = int(idx[g, 0])
        cells += [_cell(_to_pil(gen_images[int(g)], value_range, f"gen_images[{g}]"), cell),
                  _cell(_to_pil(train_images[t], value_range, f"train_images[{t}]"), cell)]
        captions += [f"gen {g}: {top1[g]:.4f}", f"train {t}"]
    return captioned_grid(cells, captions, columns=2 * min(per_row, len(cells) // 2), cell=cell)


def save_report(out_dir: Any, report: dict[str, Any], sims: Any, gen_images: Any = None, train_images: Any = None,
                pairs: int = 24, *, indices: Any = None, value_range: tuple[float, float] = (-1.0, 1.0),
                cell: int = 96) -> dict[str, Path]:
    """Write memorization.json, top_k.csv (gen, rank (1 = nearest), train, similarity), top1_hist.png
    and, given both image sets, closest_pairs.png. ``sims`` is the (similarities, indices) pair from
    top_k_similar, or the similarities with ``indices=``. Images are indexed lazily (``train_images``
    may be a dataset): PIL, uint8 HWC, or float CHW in ``value_range`` ([-1, 1], microdiff's
    convention; pass (0, 1) for pipeline outputs). Returns the paths written."""
    if indices is None:
        if not (isinstance(sims, (tuple, list)) and len(sims) == 2):
            raise ValueError("save_report: pass sims=(similarities, indices) as top_k_similar returns them, or "
                             "indices=... with the similarities")
        sims, indices = sims
    s, idx = _table(sims, "similarities", np.float64), _table(indices, "indices", np.int64)
    if s.shape != idx.shape:
        raise ValueError(f"similarities {s.shape} and indices {idx.shape} must have the same shape")
    if (gen_images is None) != (train_images is None):
        raise ValueError("save_report: closest_pairs.png needs both gen_images and train_images (or neither)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "memorization.json", "csv": out / "top_k.csv", "hist": out / "top1_hist.png"}
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["gen", "rank", "train", "similarity"])
    for g in range(len(s)):
        writer.writerows([g, r + 1, int(idx[g, r]), repr(float(s[g, r]))] for r in range(s.shape[1])
                         if idx[g, r] >= 0)
    write_text_atomic(paths["csv"], rows.getvalue())
    counts = ", ".join(f">={t['threshold']:g}: {t['count']}" for t in report.get("thresholds", []))
    histogram(s[:, 0], paths["hist"], title=f"top-1 similarity, n={len(s)}" + (f" ({counts})" if counts else ""),
              xlabel="cosine similarity to the nearest training sample")
    (out / "closest_pairs.png").unlink(missing_ok=True)  # an earlier run's grid must not outlive its report
    if gen_images is not None and whole_number(pairs, "pairs", 0):
        paths["pairs"] = out / "closest_pairs.png"
        write_png_atomic(closest_pairs_grid(s, idx, gen_images, train_images, pairs, value_range, cell), paths["pairs"])
    write_text_atomic(paths["json"], json.dumps(report, indent=2) + "\n")  # last: a report names complete files
    paths = {"json": paths.pop("json"), **paths}
    return paths


__all__ = ["top_k_similar", "distributed_top_k", "shard_range", "merge_top_k", "quantize", "feature_bits",
           "memorization_report", "save_report", "closest_pairs_grid", "THRESHOLDS"]
