"""Corrupt the records of any dataset on the fly, identically for a sample in every epoch.

    CorruptedDataset(dataset, mixture, seed=0)  wraps a map-style dataset of records
                                   {"image" (C, R, R) in [-1, 1], "caption", "key", "meta"}
                                   (CaptionedDataset, ShapesDataset, ...); None records pass through
    corrupt_record(record, mixture, seed=0)     the same for one record (pure: returns a new record)
    pick_corruption(mixture, u)                 the spec of a mixture that u in [0, 1) falls on

``mixture`` is what ``ShapesDataset(corruption=...)`` accepts: None, a spec dict, ``"noise:0.2"``,
or ``[(probability, spec or None), ...]`` with the probability left over going to clean records.
A corrupted record's meta gets ``quality`` 0.0, ``corruption`` (the name), ``corruption_params``
(the operator's meta) and, for noise, ``sigma_tn``; mask corruptions add ``record["mask"]``
(1 = observed, multiplied into a mask the record already has). When the mixture can mask, every
record carries a mask (ones if clean), with C channels for every record if it has a per-element dust.

Determinism: record ``key`` -> ``sample_generator(key, seed)`` -> first a uniform number that picks
the spec, then the operator's randomness. A sample gets the same corruption (the same mask, the
same noise realisation) in every epoch, whatever the order, worker or process.

Coherence with augmentation: the corruption is drawn in the record's canonical frame and moved
like the image, so augmentation never reveals what the corruption hid. The frame comes from
``meta["crop"]`` (written by CaptionedDataset with an ImageTransform: top, left, size, flip and
``frame`` [H, W], the resized image before cropping):
  - masks and noise (random fields) are drawn on the whole resized frame (short side = the output
    resolution R), un-flipped, then cropped at (top, left) and flipped like the image. With a centre
    crop of a square image that is simply the R x R output in its un-flipped orientation; with random
    crops a hidden pixel of the resized image stays hidden whatever window an epoch shows (a box or
    kept patch may fall partly or wholly outside this epoch's window). Sizes and positions in
    ``corruption_params`` are in frame pixels, un-flipped.
  - image operators (blur, jpeg, downup, colour_shift) are applied to the output crop, un-flipped
    first and flipped back, so a flipped epoch sees the mirror image of the same corruption.
A record without ``meta["crop"]`` is taken as un-augmented (frame = the image itself); a dataset
whose own transform flips or crops without saying so in ``meta["crop"]`` cannot be made coherent.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

import numpy as np
import torch
from torch.utils.data import Dataset

from .corruptions import MASK_CORRUPTIONS, apply_corruption, check_spec, parse_corruption, sample_generator

__all__ = ["CorruptedDataset", "corrupt_record", "pick_corruption", "as_mixture", "Mixture", "parse_mixture"]

MIN_SIDE = 8  # the smallest image a mixture's specs are tried on

Mixture = list[tuple[float, "dict[str, Any] | None"]]


def as_mixture(corruption: Any, resolution: int = MIN_SIDE) -> Mixture:
    """None | spec | "noise:0.2" | [(probability, spec or None), ...] -> a list of (p, spec); the
    probability left over (1 - sum) goes to clean images. Every spec is tried once on a
    ``resolution`` x ``resolution`` image, so bad values (e.g. a box larger than the image) fail now."""
    if corruption is None:
        return []
    if isinstance(corruption, (str, dict)):
        corruption = [(1.0, corruption)]
    mixture = []
    for entry in corruption:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise ValueError(f"corruption must be None, a spec dict, 'name:value' or a list of (probability, spec) "
                             f"pairs; got the entry {entry!r}")
        if isinstance(entry[0], bool) or not isinstance(entry[0], (int, float)):
            raise ValueError(f"corruption: the probability of {entry[1]!r} must be a number in [0, 1], "
                             f"got {entry[0]!r}")
        p, spec = float(entry[0]), entry[1]
        spec = parse_corruption(spec) if isinstance(spec, str) else spec
        if spec is not None:  # check names and values now, not later inside a DataLoader worker
            apply_corruption(torch.zeros(1, 3, resolution, resolution), check_spec(spec), torch.Generator())
        if p < 0:
            raise ValueError(f"corruption probabilities must be >= 0; got {p} for {spec}")
        mixture.append((p, spec))
    if sum(p for p, _ in mixture) > 1 + 1e-9:
        raise ValueError(f"corruption probabilities sum to {sum(p for p, _ in mixture):.4g} > 1; the rest "
                         "(1 - sum) is clean, so they must sum to at most 1")
    return mixture


def parse_mixture(text: str) -> list[tuple[float, Any]]:
    """``SPEC[@P][,SPEC@P...]`` (e.g. ``noise:0.3@0.5,blur:1.5@0.25``; a single bare SPEC means half the
    images) or a YAML list of [probability, spec] pairs -> a ShapesDataset corruption mixture."""
    text = text.strip()
    if text.startswith("["):
        try:
            mixture = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"--corruption {text!r}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(mixture, list):
            raise ValueError(f"--corruption {text!r}: write a YAML list of [probability, spec] pairs")
        return mixture
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError("--corruption is empty; write e.g. noise:0.3@0.5")
    mixture = []
    for item in items:
        spec, at, p = item.partition("@")
        if not at and len(items) > 1:
            raise ValueError(f"--corruption {text!r}: give every entry its fraction, e.g. noise:0.3@0.5,blur:1.5@0.25")
        try:
            fraction = float(p) if at else 0.5
        except ValueError:
            raise ValueError(f"--corruption {item!r}: the fraction after @ must be a number in [0, 1]") from None
        if not 0 <= fraction <= 1:
            raise ValueError(f"--corruption {item!r}: the fraction after @ must be in [0, 1]")
        mixture.append((fraction, parse_corruption(spec)))
    return mixture


def pick_corruption(mixture: Mixture, u: float) -> dict[str, Any] | None:
    """The spec whose probability interval holds ``u`` (in [0, 1)); None (clean) past their sum."""
    total = 0.0
    for p, spec in mixture:
        total += p
        if u < total:
            return spec
    return None


def _frame(record: dict[str, Any]) -> tuple[tuple[int, int], int, int, bool]:
    """((frame height, width), top, left, flip) of a record's image, from its meta["crop"]."""
    _, h, w = record["image"].shape
    crop = record["meta"].get("crop")
    if crop is None:
        return (h, w), 0, 0, False
    try:
        (fh, fw), top, left, flip = crop["frame"], int(crop["top"]), int(crop["left"]), bool(crop["flip"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"record {record['key']!r}: meta['crop'] must hold top, left, size, flip and frame [H, W]; "
                         f"got {crop!r}") from None
    if not (0 <= top <= fh - h and 0 <= left <= fw - w):
        raise ValueError(f"record {record['key']!r}: meta['crop'] {crop} does not hold its {h}x{w} image")
    return (int(fh), int(fw)), top, left, flip


def _view(field: torch.Tensor, top: int, left: int, h: int, w: int, flip: bool) -> torch.Tensor:
    """Crop a frame-sized (C, FH, FW) field like the image, then flip it like the image."""
    field = field[:, top:top + h, left:left + w]
    return field.flip(-1) if flip else field


def _corrupt_image(image: torch.Tensor, spec: dict[str, Any], generator: torch.Generator,
                   frame: tuple[tuple[int, int], int, int, bool]) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """One image (C, H, W) corrupted in its canonical frame: (image, mask or None, the operator's meta)."""
    (fh, fw), top, left, flip = frame
    c, h, w = image.shape
    name = spec["name"]
    if name in MASK_CORRUPTIONS or name == "noise":  # random fields: drawn on the whole un-flipped frame
        is_mask = name in MASK_CORRUPTIONS
        canvas = (torch.ones if is_mask else torch.zeros)((1, c, fh, fw), dtype=image.dtype, device=image.device)
        result = apply_corruption(canvas, spec, generator)
        field = _view((result.mask if is_mask else result.images)[0], top, left, h, w, flip)
        meta = dict(result.meta[0])
        if not is_mask:
            return image + field, None, meta  # the operator's own x + sigma * n
        if "observed_fraction" in meta:
            meta["observed_fraction"] = float(field.mean())  # of what this record shows
        return image * field, field, meta
    canonical = image.flip(-1) if flip else image
    result = apply_corruption(canonical[None], spec, generator)
    out = result.images[0]
    return (out.flip(-1) if flip else out), None, dict(result.meta[0])


def corrupt_record(record: dict[str, Any], mixture: Mixture, seed: int = 0) -> dict[str, Any]:
    """A new record: ``record`` corrupted by the spec of ``mixture`` (already normalised by
    ``as_mixture``) that its key's generator picks; clean records come back as a shallow copy."""
    generator = sample_generator(record["key"], seed)
    spec = pick_corruption(mixture, float(torch.rand((), generator=generator, dtype=torch.float64)))
    out = dict(record, meta=dict(record["meta"]))
    if spec is None:
        return out
    image, mask, params = _corrupt_image(record["image"], spec, generator, _frame(record))
    params.pop("corruption", None)
    out["image"] = image
    out["meta"].update(quality=0.0, corruption=spec["name"], corruption_params=params)
    if spec["name"] == "noise":
        out["meta"]["sigma_tn"] = params["sigma"]
    if mask is not None:
        out["mask"] = mask if record.get("mask") is None else record["mask"] * mask
    return out


def _resolution_of(dataset: Any) -> int | None:
    for holder in (dataset, getattr(dataset, "transform", None)):
        resolution = getattr(holder, "resolution", None)
        if isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool):
            return int(resolution)
    return None


class CorruptedDataset(Dataset):
    """``dataset`` with every record corrupted per ``mixture``, seeded per record key (see the module
    docstring for the determinism and augmentation rules).

    Args:
        dataset: a map-style dataset of records (None records, i.e. skipped items, pass through).
        mixture: None, a spec, ``"name:value"`` or ``[(probability, spec or None), ...]``.
        seed: mixes into every record's generator; another seed, other corruptions.
        resolution: the side of the dataset's images, to check pixel sizes in the mixture now;
            default: ``dataset.resolution`` or ``dataset.transform.resolution``.
    """

    def __init__(self, dataset: Any, mixture: Any, seed: int = 0, *, resolution: int | None = None):
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError("CorruptedDataset wraps a map-style dataset (with __getitem__ and __len__); "
                            f"got {dataset!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"CorruptedDataset: seed must be an integer >= 0; got {seed!r}")
        resolution = _resolution_of(dataset) if resolution is None else resolution
        if resolution is None:
            raise ValueError(f"CorruptedDataset: cannot tell the image size of {type(dataset).__name__}; pass "
                             "resolution=... (the side of its images) so the mixture's sizes are checked now")
        self.dataset, self.seed = dataset, int(seed)
        self.mixture = as_mixture(mixture, int(resolution))
        specs = [spec for _, spec in self.mixture if spec is not None]
        self.has_mask = any(spec["name"] in MASK_CORRUPTIONS for spec in specs)
        self.per_element = any(spec["name"] == "dust" and spec.get("per_element") for spec in specs)

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"CorruptedDataset({self.dataset!r}, mixture={self.mixture!r}, seed={self.seed})"

    @property
    def report(self) -> Any:
        """The wrapped dataset's skip report (None if it has none)."""
        return getattr(self.dataset, "report", None)

    def set_epoch(self, epoch: int) -> None:
        """Passed on to the wrapped dataset (its crops and flips); the corruptions do not change."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def probe(self, index: int) -> Any:
        """Why the wrapped dataset skips item ``index`` (None if it does not, or cannot say)."""
        probe = getattr(self.dataset, "probe", None)
        return probe(index) if callable(probe) else None

    def fingerprint(self, index: int) -> str:
        """The wrapped item's fingerprint with the mixture and seed: what the corrupted record is made from."""
        inner = getattr(self.dataset, "fingerprint", None)
        base = inner(index) if callable(inner) else None
        if base is None:  # a dataset that cannot say: its decoded record
            record = self.dataset[index]
            base = "<skipped>" if record is None else hashlib.sha256(
                record["image"].contiguous().numpy().tobytes() + json.dumps(
                    [record.get("caption"), record.get("key"), record.get("meta")], default=str).encode()).hexdigest()
        return hashlib.sha256(json.dumps([base, self.mixture, self.seed], default=str).encode()).hexdigest()

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.dataset[index]
        if record is None:
            return None
        out = corrupt_record(record, self.mixture, self.seed)
        if self.has_mask:  # every record carries a mask of one shape, so batches stack
            image = out["image"]
            channels = image.shape[0] if self.per_element else 1
            mask = out.get("mask")
            mask = torch.ones((channels, *image.shape[1:]), dtype=image.dtype) if mask is None else mask
            out["mask"] = mask.expand(max(channels, mask.shape[0]), -1, -1).contiguous()
        return out
