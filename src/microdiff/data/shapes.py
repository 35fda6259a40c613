"""The built-in procedural dataset ``shapes``: coloured circles, squares and triangles with captions.

Every sample is a pure function of ``(seed, index)``: its attributes, caption and corruption are
drawn from ``numpy.random.SeedSequence([seed, index])``, so images do not depend on ``n``, on the
order of access or on the worker that renders them. Any resolution from 8 px up works; shapes are
anti-aliased by their coverage of each pixel (exact for squares, 4 x 4 samples otherwise).

    one (or two, non-overlapping) object(s): shape x colour x size x position, with continuous
    jitter of centre, size and colour inside each bin; a plain black, white or gray background.
    caption: always colour + shape; size, position and background in varied phrasings.
    meta: the attributes (centre / radius in pixels), source "shapes", quality 1.0, and for
    corrupted variants corruption, corruption_params (+ sigma_tn for noise).

Geometry, in pixels with pixel (row i, column j) covering [j, j+1) x [i, i+1) and y pointing down:
``radius`` is the radius of the disc with the object's area (a circle's own radius; a square's side
is radius * sqrt(pi); a triangle is upright and equilateral), so "small" and "large" mean the same
area for every shape. ``centre`` is the centroid of the object.

    ShapesDataset(n, resolution=64, seed=0, objects=1, corruption=None)[i]
        -> {"image" (3,H,W) in [-1,1], "caption", "key", "meta"} (+ "mask" (1,H,W) for pixel masks,
           (3,H,W) when the mixture has a per-element dust mask)
    write_shapes_folder(out_dir, n, ...)  -> 00000.png + 00000.txt + 00000.json (+ .npy, see there)
    shapes_grid(16, 64, seed=0)           -> a PIL contact sheet with captions, to look at
    microdiff data shapes --out DIR --n 1000 --resolution 64 [--objects 2] [--corruption noise:0.2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..ambient.corruptions import (MASK_CORRUPTIONS, SHORT_EXAMPLES, apply_corruption, from_uint8, parse_corruption,
                                   to_uint8)
from ..ambient.dataset import as_mixture
from ..utils.errors import UserError
from ..utils.files import output_file, stamp, write_png_atomic, write_text_atomic
from ..utils.folders import claim_folder

# ----------------------------------------------------------------------------- vocabulary and geometry
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (225, 30, 35), "green": (35, 175, 55), "blue": (30, 75, 230),
           "yellow": (245, 215, 20), "purple": (140, 45, 200), "orange": (250, 130, 10)}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
SIZES = {"small": (0.06, 0.095), "large": (0.16, 0.22)}  # equal-area radius, fraction of the side
POSITIONS = ("center", "left", "right", "top", "bottom")
COLOUR_JITTER = 10  # +- per channel, object colours
BACKGROUND_JITTER = 8  # +- gray level, towards the inside of [0, 255]
CENTRE_BOX = 0.04  # "center": centre within 0.5 +- this
SIDE_LIMIT = 0.37  # "left": centre x <= this (mirrored for right/top/bottom)
CROSS_JITTER = 0.06  # "left": centre y within 0.5 +- this
MARGIN = 0.02  # minimum distance of any object from the image border
GAP = 0.03  # minimum distance between the bounding discs of two objects
SUPERSAMPLE = 4  # coverage samples per pixel and axis
MIN_RESOLUTION = 8
RENDERER_VERSION = 1  # part of every item's fingerprint: raise it when rendering or captions change

_SQUARE_HALF = math.sqrt(math.pi) / 2  # half side of the square with area pi (radius 1)
_TRIANGLE_R = math.sqrt(4 * math.pi / (3 * math.sqrt(3)))  # circumradius of the equilateral triangle, area pi


def extents(shape: str, radius: float) -> dict[str, float]:
    """Half-width, extent above and below the centre, and circumradius of an object."""
    if shape == "circle":
        return {"x": radius, "up": radius, "down": radius, "outer": radius}
    if shape == "square":
        h = _SQUARE_HALF * radius
        return {"x": h, "up": h, "down": h, "outer": h * math.sqrt(2)}
    if shape == "triangle":
        r = _TRIANGLE_R * radius
        return {"x": r * math.sqrt(3) / 2, "up": r, "down": r / 2, "outer": r}
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def _subset(values: Sequence[str] | None, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    if values is None:
        return tuple(allowed)
    values = (values,) if isinstance(values, str) else tuple(values)
    for v in values:
        if v not in allowed:
            raise ValueError(f"unknown {what} {v!r}; choose from {', '.join(allowed)}")
    if not values:
        raise ValueError(f"the {what} list is empty; give at least one of {', '.join(allowed)}")
    return values


# ----------------------------------------------------------------------------- attributes
def _centre(position: str, ext: dict[str, float], rng: np.random.Generator) -> list[float]:
    lo_x, hi_x = ext["x"] + MARGIN, 1 - ext["x"] - MARGIN
    lo_y, hi_y = ext["up"] + MARGIN, 1 - ext["down"] - MARGIN
    box = {"center": ((0.5 - CENTRE_BOX, 0.5 + CENTRE_BOX), (0.5 - CENTRE_BOX, 0.5 + CENTRE_BOX)),
           "left": ((lo_x, SIDE_LIMIT), (0.5 - CROSS_JITTER, 0.5 + CROSS_JITTER)),
           "right": ((1 - SIDE_LIMIT, hi_x), (0.5 - CROSS_JITTER, 0.5 + CROSS_JITTER)),
           "top": ((0.5 - CROSS_JITTER, 0.5 + CROSS_JITTER), (lo_y, SIDE_LIMIT)),
           "bottom": ((0.5 - CROSS_JITTER, 0.5 + CROSS_JITTER), (1 - SIDE_LIMIT, hi_y))}[position]
    return [float(rng.uniform(*box[0])), float(rng.uniform(*box[1]))]


def _jitter_rgb(rgb: Sequence[int], rng: np.random.Generator, amount: int) -> list[int]:
    return [int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb]


def _sample_object(rng: np.random.Generator, shapes, colours, sizes, positions) -> dict[str, Any]:
    shape, colour = str(rng.choice(shapes)), str(rng.choice(colours))
    size, position = str(rng.choice(sizes)), str(rng.choice(positions))
    radius = float(rng.uniform(*SIZES[size]))
    return {"shape": shape, "colour": colour, "rgb": _jitter_rgb(COLOURS[colour], rng, COLOUR_JITTER),
            "size": size, "position": position, "centre": _centre(position, extents(shape, radius), rng),
            "radius": radius}


def _apart(a: dict[str, Any], b: dict[str, Any]) -> bool:
    distance = math.dist(a["centre"], b["centre"])
    return (a["position"] != b["position"] and (a["shape"], a["colour"]) != (b["shape"], b["colour"])
            and distance >= extents(a["shape"], a["radius"])["outer"] + extents(b["shape"], b["radius"])["outer"] + GAP)


def sample_attributes(rng: np.random.Generator, objects: int = 1, *, shapes: Sequence[str] | None = None,
                      colours: Sequence[str] | None = None, sizes: Sequence[str] | None = None,
                      positions: Sequence[str] | None = None,
                      backgrounds: Sequence[str] | None = None) -> dict[str, Any]:
    """Draw one image's attributes; lengths are fractions of the image side (resolution-free).

    Returns ``{"background", "background_rgb", "objects": [{"shape", "colour", "rgb", "size",
    "position", "centre": [x, y], "radius"}]}``. With ``objects=2`` the two differ in position and in
    (shape, colour), and their bounding discs are at least ``GAP`` apart. The keyword lists restrict
    the vocabulary (e.g. to hold out combinations)."""
    if objects not in (1, 2):
        raise ValueError(f"objects must be 1 or 2; got {objects!r}")
    shapes, colours = _subset(shapes, SHAPES, "shape"), _subset(colours, tuple(COLOURS), "colour")
    sizes, positions = _subset(sizes, tuple(SIZES), "size"), _subset(positions, POSITIONS, "position")
    backgrounds = _subset(backgrounds, tuple(BACKGROUNDS), "background")
    if objects == 2 and len(positions) < 2:
        raise ValueError(f"objects=2 needs at least two positions; got {list(positions)}")
    if objects == 2 and len(shapes) * len(colours) < 2:
        raise ValueError("objects=2 needs two different (shape, colour) pairs; allow more shapes or colours")
    background = str(rng.choice(backgrounds))
    level = BACKGROUNDS[background][0]  # jitter towards the inside of [0, 255]
    low, high = {0: (0, 1), 255: (-1, 0)}.get(level, (-1, 1))
    shift = int(rng.integers(low * BACKGROUND_JITTER, high * BACKGROUND_JITTER + 1))
    attributes = {"background": background, "background_rgb": [level + shift] * 3}
    for _ in range(10_000):
        drawn = [_sample_object(rng, shapes, colours, sizes, positions) for _ in range(objects)]
        if objects == 1 or _apart(*drawn):
            return attributes | {"objects": drawn}
    raise ValueError(f"could not place {objects} non-overlapping objects with sizes {list(sizes)} and positions "
                     f"{list(positions)}; allow 'small' or more positions")


# ----------------------------------------------------------------------------- rendering
def coverage(shape: str, centre: Sequence[float], radius: float, resolution: int) -> np.ndarray:
    """(H, W) float64 fraction of each pixel the object covers: exact for squares, SUPERSAMPLE^2
    samples per pixel for circles and triangles. ``centre`` and ``radius`` are in pixels."""
    ext = extents(shape, radius)
    cx, cy = centre
    s = SUPERSAMPLE
    out = np.zeros((resolution, resolution))
    x0, x1 = max(0, math.floor(cx - ext["x"])), min(resolution, math.ceil(cx + ext["x"]) + 1)
    y0, y1 = max(0, math.floor(cy - ext["up"])), min(resolution, math.ceil(cy + ext["down"]) + 1)
    if x0 >= x1 or y0 >= y1:
        return out
    if shape == "square":  # axis-aligned: exact area coverage, a product of interval overlaps
        def overlap(lo: int, hi: int, c: float) -> np.ndarray:
            edges = np.arange(lo, hi)
            return np.clip(np.minimum(edges + 1, c + ext["x"]) - np.maximum(edges, c - ext["x"]), 0, 1)

        out[y0:y1, x0:x1] = np.outer(overlap(y0, y1, cy), overlap(x0, x1, cx))
        return out
    offsets = (np.arange(s) + 0.5) / s
    xs = (np.arange(x0, x1)[:, None] + offsets).reshape(1, -1) - cx
    ys = (np.arange(y0, y1)[:, None] + offsets).reshape(-1, 1) - cy
    if shape == "circle":
        inside = xs**2 + ys**2 <= radius**2
    else:  # upright equilateral triangle, apex up, centroid at the centre
        inside = (ys <= ext["down"]) & (np.abs(xs) <= (ys + ext["up"]) / math.sqrt(3))
    out[y0:y1, x0:x1] = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return out


def _check_resolution(resolution: Any) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution must be an integer >= {MIN_RESOLUTION} pixels; got {resolution!r}")
    return int(resolution)


def render_shapes(attributes: dict[str, Any], resolution: int) -> Image.Image:
    """Draw ``attributes`` (from :func:`sample_attributes`) as an RGB image of side ``resolution``.
    Objects are composited in order with their anti-aliased coverage."""
    resolution = _check_resolution(resolution)
    background = attributes.get("background")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; choose from {', '.join(BACKGROUNDS)}")
    rgb = attributes.get("background_rgb", BACKGROUNDS[background])
    image = np.broadcast_to(np.asarray(rgb, np.float64), (resolution, resolution, 3)).copy()
    for obj in attributes["objects"]:
        _subset([obj["colour"]], tuple(COLOURS), "colour")
        alpha = coverage(obj["shape"], [c * resolution for c in obj["centre"]], obj["radius"] * resolution,
                         resolution)[..., None]
        image = image * (1 - alpha) + np.asarray(obj.get("rgb", COLOURS[obj["colour"]]), np.float64) * alpha
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- captions
PREFIXES = ("", "", "", "", "an image of ", "a picture of ", "a drawing of ")
SIZE_WORDS = {"small": ("small", "small", "little"), "large": ("large", "large", "big")}
POSITION_WORDS = {"center": ("in the center", "in the middle", "at the center"),
                  "left": ("on the left", "at the left", "on the left side"),
                  "right": ("on the right", "at the right", "on the right side"),
                  "top": ("at the top", "near the top", "at the top of the image"),
                  "bottom": ("at the bottom", "near the bottom", "at the bottom of the image")}
BACKGROUND_FORMS = ("{obj}, {bg} background", "{obj} on a {bg} background", "{obj} against a {bg} background",
                    "{obj} with a {bg} background", "{bg} background, {obj}")
P_ARTICLE, P_SIZE, P_POSITION, P_BACKGROUND = 0.85, 0.75, 0.75, 0.75


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption_for(attributes: dict[str, Any], rng: np.random.Generator) -> str:
    """A caption that always names each object's colour and shape and, by chance, its size and
    position and the background, in one of several phrasings (all choices from ``rng``)."""
    prefix = str(rng.choice(PREFIXES))
    article = bool(prefix) or rng.random() < P_ARTICLE
    phrases = []
    for obj in attributes["objects"]:
        words = [str(rng.choice(SIZE_WORDS[obj["size"]]))] if rng.random() < P_SIZE else []
        phrase = " ".join(words + [obj["colour"], obj["shape"]])
        phrase = _with_article(phrase) if article else phrase
        if rng.random() < P_POSITION:
            phrase += " " + str(rng.choice(POSITION_WORDS[obj["position"]]))
        phrases.append(phrase)
    text = prefix + " and ".join(phrases)
    if rng.random() < P_BACKGROUND:
        text = str(rng.choice(BACKGROUND_FORMS)).format(obj=text, bg=attributes["background"])
    return text


# ----------------------------------------------------------------------------- dataset
def _meta_objects(attributes: dict[str, Any], resolution: int) -> list[dict[str, Any]]:
    out = []
    for obj in attributes["objects"]:
        r = obj["radius"] * resolution
        out.append({"shape": obj["shape"], "colour": obj["colour"], "rgb": obj["rgb"], "size": obj["size"],
                    "position": obj["position"], "centre_px": [c * resolution for c in obj["centre"]],
                    "radius_px": r, "area_px": math.pi * r * r})
    return out


class ShapesDataset(torch.utils.data.Dataset):
    """``n`` procedural images; item ``i`` depends on ``(seed, i)`` alone.

    corruption: None (clean), a spec such as ``{"name": "noise", "sigma": 0.2}`` or ``"noise:0.2"``
    (every image), or ``[(0.5, None), (0.3, "noise:0.2"), (0.2, {"name": "mask", "keep_prob": 0.5})]``
    (per-image choice; probability left over is clean). When a pixel mask can occur (any name in
    ``MASK_CORRUPTIONS``), every item carries "mask" (1, H, W) (all ones where nothing was masked;
    (3, H, W) for every item if the mixture has a per-element dust mask), so batches stack.
    Noise is not clipped: noisy images leave [-1, 1]. Keyword lists (shapes, colours, sizes,
    positions, backgrounds) restrict the vocabulary."""

    def __init__(self, n: int, resolution: int = 64, seed: int = 0, objects: int = 1, corruption: Any = None,
                 **vocabulary: Sequence[str] | None):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n (number of samples) must be an integer >= 0; got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
        unknown = set(vocabulary) - {"shapes", "colours", "sizes", "positions", "backgrounds"}
        if unknown:
            raise ValueError(f"unknown ShapesDataset options {sorted(unknown)}; the vocabulary options are "
                             "shapes, colours, sizes, positions, backgrounds")
        self.n, self.resolution, self.seed, self.objects = int(n), _check_resolution(resolution), int(seed), objects
        self.vocabulary = vocabulary
        self.mixture = as_mixture(corruption, self.resolution)
        sample_attributes(np.random.default_rng(0), objects, **vocabulary)  # validate now, not in a worker
        specs = [spec for _, spec in self.mixture if spec is not None]
        self.has_mask = any(spec["name"] in MASK_CORRUPTIONS for spec in specs)
        self.mask_channels = 3 if any(spec["name"] == "dust" and spec.get("per_element") for spec in specs) else 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for ShapesDataset of {self.n} samples")
        index = int(index) % self.n
        attr_seq, caption_seq, corruption_seq = np.random.SeedSequence([self.seed, index]).spawn(3)
        attributes = sample_attributes(np.random.default_rng(attr_seq), self.objects, **self.vocabulary)
        pil = render_shapes(attributes, self.resolution)
        image = from_uint8(np.asarray(pil)[None])[0]
        objects = _meta_objects(attributes, self.resolution)
        meta: dict[str, Any] = {"source": "shapes", "seed": self.seed, "index": index,
                                "resolution": self.resolution, "quality": 1.0, "corruption": "none",
                                "background": attributes["background"],
                                "background_rgb": attributes["background_rgb"]}
        # the first (or only) object's attributes at the top level, every object under "objects"
        meta |= {k: objects[0][k] for k in ("shape", "colour", "size", "position", "centre_px", "radius_px")}
        meta["objects"] = objects
        item = {"image": image, "caption": caption_for(attributes, np.random.default_rng(caption_seq)),
                "key": f"shapes-{self.seed}-{index:06d}", "meta": meta}
        mask = torch.ones(self.mask_channels, self.resolution, self.resolution) if self.has_mask else None
        rng = np.random.default_rng(corruption_seq)
        spec = self._pick(rng)
        if spec is not None:
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
            result = apply_corruption(image[None], spec, generator)
            item["image"] = result.images[0]
            params = {k: v for k, v in result.meta[0].items() if k != "corruption"}
            meta.update(quality=0.0, corruption=spec["name"], corruption_params=params)
            if spec["name"] == "noise":
                meta["sigma_tn"] = params["sigma"]
            if result.mask is not None:
                mask = result.mask[0].expand(self.mask_channels, -1, -1).contiguous()
        if mask is not None:
            item["mask"] = mask
        return item

    def fingerprint(self, index: int) -> str:
        """A hash of everything item ``index`` is a function of (it is rendered from these alone)."""
        settings = [RENDERER_VERSION, self.seed, int(index) % max(self.n, 1), self.resolution, self.objects,
                    self.vocabulary, self.mixture]
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()

    def _pick(self, rng: np.random.Generator) -> dict[str, Any] | None:
        u, total = rng.random(), 0.0
        for p, spec in self.mixture:
            total += p
            if u < total:
                return spec
        return None


def collate_shapes(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader collate: stack images (and masks, ones where an item has none); captions, keys
    and metadata stay lists."""
    out = {"image": torch.stack([b["image"] for b in batch]), "caption": [b["caption"] for b in batch],
           "key": [b["key"] for b in batch], "meta": [b["meta"] for b in batch]}
    if any("mask" in b for b in batch):
        out["mask"] = torch.stack([b.get("mask", torch.ones_like(b["image"][:1])) for b in batch])
    return out


# ----------------------------------------------------------------------------- files
# the settings a shapes folder was written with (utils/folders.claim_folder); hidden, so that a glob of the
# *.json sidecars does not meet it
SHAPES_MARKER = ".shapes.json"
COMMAND = "data shapes"


def shapes_settings(n: int, resolution: int, seed: int, objects: int, corruption: Any,
                    vocabulary: dict[str, Any]) -> dict[str, Any]:
    """What a shapes folder is a function of: a rerun must give the same to resume it."""
    mixture = as_mixture(corruption, _check_resolution(resolution))
    return {"n": int(n), "resolution": int(resolution), "seed": int(seed), "objects": int(objects),
            "corruption": [[p, spec] for p, spec in mixture], "vocabulary": dict(vocabulary),
            "renderer": RENDERER_VERSION}


def files_per_item(corruption: Any, resolution: int) -> int:
    """Files one item takes: .png, .txt, .json, plus .npy (noise) and .mask.npy (pixel masks)."""
    names = {spec["name"] for _, spec in as_mixture(corruption, resolution) if spec is not None}
    return 3 + ("noise" in names) + bool(names & set(MASK_CORRUPTIONS))


def check_room(out: Path, n: int, resolution: int, corruption: Any = None) -> None:
    """Refuse, before writing, a folder whose file system cannot take ``n`` items: fewer free inodes than
    files, or fewer free bytes than a lower bound (each file takes at least one block; a PNG at least
    its pixels / 8, what the flattest shapes image compresses to)."""
    probe = next((q for q in [out, *out.parents] if q.exists()), Path("."))
    try:
        fs = os.statvfs(probe)
    except (OSError, AttributeError):
        return
    files = n * files_per_item(corruption, resolution)
    block = fs.f_frsize or 4096
    need = files * block + n * max(0, resolution * resolution * 3 // 8 - block)
    free = fs.f_bavail * block
    if fs.f_files and files > fs.f_favail:
        raise UserError(f"--n {n}: {files} files would not fit on the file system of {probe} ({fs.f_favail} free "
                        "inodes); lower --n or choose another --out")
    if need > free:
        raise UserError(f"--n {n}: needs at least {need / 2**30:.3g} GiB at {resolution} px and {probe} has "
                        f"{free / 2**30:.3g} GiB free; lower --n or choose another --out")


def write_shapes_folder(out_dir: str | Path, n: int, resolution: int = 64, seed: int = 0, objects: int = 1,
                        corruption: Any = None, *, progress: bool = True,
                        **vocabulary: Sequence[str] | None) -> list[Path]:
    """Write ``n`` samples as ``00000.png`` + ``00000.txt`` (caption) + ``00000.json`` (meta).

    A PNG holds 8 bits in [0, 255]: noisy images are clipped and rounded there, so for noise the
    exact float32 image (values outside [-1, 1] included) is also written as ``00000.npy`` and the
    meta says ``"exact": "00000.npy"`` and which fraction of values the PNG clipped. Pixel masks (every
    name in ``MASK_CORRUPTIONS``) go to ``00000.mask.npy`` (uint8 (H, W), 1 = observed; (C, H, W) for a
    per-element dust mask; ``"mask_file"`` in the meta), which ``ImageFolderDataset`` reads back.

    The folder must be new, empty or an earlier shapes folder of the same settings (``.shapes.json``
    records them; other settings, or another tool's files, are refused in one line): a rerun resumes,
    skipping the items already written (each item's ``.json`` is written last, atomically, like every
    file here), so a killed run never leaves a torn file or a mixed dataset. The folder is locked while
    it is written. Returns the PNG paths."""
    from tqdm import tqdm

    data = ShapesDataset(n, resolution, seed, objects, corruption, **vocabulary)
    settings = shapes_settings(n, resolution, seed, objects, corruption, vocabulary)
    out = Path(out_dir)
    if not (out / SHAPES_MARKER).is_file():
        check_room(out, n, resolution, corruption)
    width = max(5, len(str(max(n - 1, 0))))
    paths = []
    with claim_folder(out, COMMAND, SHAPES_MARKER, settings):
        for i in tqdm(range(n), desc=f"shapes -> {out}", unit="img", disable=not progress, dynamic_ncols=True):
            name = f"{i:0{width}d}"
            paths.append(out / f"{name}.png")
            if (out / f"{name}.json").is_file():  # written by an earlier run of these settings
                continue
            item = data[i]
            meta, image = dict(item["meta"], key=item["key"]), item["image"]
            if meta["corruption"] == "noise":
                _save_npy(out / f"{name}.npy", image.numpy().astype(np.float32))
                meta["exact"] = f"{name}.npy"
                meta["clipped_fraction"] = float((image.abs() > 1).float().mean())
            if meta["corruption"] in MASK_CORRUPTIONS:
                mask = item["mask"]
                mask = mask[0] if bool((mask == mask[:1]).all()) else mask  # (H, W) unless per-element
                _save_npy(out / f"{name}.mask.npy", mask.numpy().astype(np.uint8))
                meta["mask_file"] = f"{name}.mask.npy"
            write_png_atomic(Image.fromarray(to_uint8(image[None])[0], "RGB"), out / f"{name}.png")
            write_text_atomic(out / f"{name}.txt", item["caption"] + "\n")
            write_text_atomic(out / f"{name}.json", json.dumps(meta, indent=1))
    return paths


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def shapes_grid(n: int = 16, resolution: int = 64, seed: int = 0, *, objects: int = 1, corruption: Any = None,
                captions: bool = True, columns: int | None = None, cell: int = 160) -> Image.Image:
    """A contact sheet of the first ``n`` samples, each scaled by an integer factor (nearest) to
    about ``cell`` px, with its caption below when ``captions``. Images are shown clipped to 8 bits."""
    from ..utils.grids import captioned_grid

    data = ShapesDataset(n, resolution, seed, objects, corruption)
    items = [data[i] for i in range(n)]
    tiles = [Image.fromarray(to_uint8(item["image"][None])[0], "RGB") for item in items]
    return captioned_grid(tiles, [item["caption"] for item in items] if captions else None, columns, cell)


# ----------------------------------------------------------------------------- CLI
def _cli_resolution(text: str) -> int:
    try:
        return _check_resolution(int(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _cli_corruption(text: str) -> dict[str, Any]:
    try:
        return parse_corruption(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _cli_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"--corrupt-fraction must be in [0, 1]; got {text}")
    return value


def _cli_count(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--n must be a whole number >= 1; got {text!r}")
    return int(text)


def _cli_seed(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"--seed must be a whole number >= 0; got {text!r}")
    return int(text)


def check_shapes_out(out: Path) -> None:
    """``--out`` is not a file and can be made; what it may hold is checked by ``write_shapes_folder``."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is an existing file; give a folder")
    parent = next((q for q in [out, *out.parents] if q.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {parent} is not a writable folder; choose another --out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder: new, empty, or an earlier shapes folder of the "
                                                     "same settings (.shapes.json records them): it resumes; other "
                                                     "settings or another tool's files are refused")
    parser.add_argument("--n", type=_cli_count, default=1000, help="number of images, >= 1 (default: 1000); refused "
                                                                   "when the file system has no room for them")
    parser.add_argument("--resolution", type=_cli_resolution, default=64,
                        help="image side in pixels, >= 8 (default: 64)")
    parser.add_argument("--seed", type=_cli_seed, default=0,
                        help="dataset seed; image i depends on (seed, i) only (default: 0)")
    parser.add_argument("--objects", type=int, choices=(1, 2), default=1,
                        help="objects per image; 2 gives compositional captions (default: 1)")
    parser.add_argument("--corruption", type=_cli_corruption, default=None, metavar="SPEC",
                        help=f"corrupt images, e.g. {SHORT_EXAMPLES}")
    parser.add_argument("--corrupt-fraction", type=_cli_fraction, default=None, metavar="P",
                        help="with --corruption: fraction of images corrupted, the rest stay clean (default: 1.0)")
    parser.add_argument("--grid", default=None, metavar="PNG",
                        help="also write a captioned preview grid of the first 16 images (a new file, or one an "
                             "earlier data shapes wrote)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    if args.corrupt_fraction is not None and args.corruption is None:
        raise UserError(f"--corrupt-fraction {args.corrupt_fraction:g}: is the fraction of images --corruption "
                        "corrupts, and no --corruption is given; add --corruption SPEC (e.g. noise:0.2) or leave "
                        "it out")
    check_shapes_out(Path(args.out))
    grid = output_file(args.grid, "--grid", COMMAND) if args.grid else None
    fraction = 1.0 if args.corrupt_fraction is None else args.corrupt_fraction
    corruption = None if args.corruption is None else [(fraction, args.corruption)]
    paths = write_shapes_folder(args.out, args.n, args.resolution, args.seed, args.objects, corruption,
                                progress=not args.no_progress)
    print(f"wrote {len(paths)} shapes images ({args.resolution}px) with .txt captions and .json metadata to {args.out}")
    if grid is not None:
        image = shapes_grid(min(16, max(args.n, 1)), args.resolution, args.seed, objects=args.objects,
                            corruption=corruption)
        write_png_atomic(image, grid, stamp(COMMAND))
        print(f"preview grid: {grid}")
    return 0


__all__ = ["SHAPES", "COLOURS", "BACKGROUNDS", "SIZES", "POSITIONS", "extents", "sample_attributes", "coverage",
           "render_shapes", "caption_for", "ShapesDataset", "collate_shapes", "write_shapes_folder", "shapes_grid",
           "add_arguments", "run"]
