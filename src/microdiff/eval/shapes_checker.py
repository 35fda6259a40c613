"""Which colour and which shape does a ``shapes`` image show? A deterministic judge that reads pixels.

The ``microdiff demo`` trains on the built-in ``shapes`` dataset (:mod:`microdiff.data.shapes`), so
prompt alignment can be scored without a learned model: read the colour and the shape off the
pixels and compare them with the words of the prompt. One object per image is assumed (with two,
the larger one is judged).

    1. background  per-channel median of the one-pixel border ring; named after the nearest
                   BACKGROUNDS colour, None when further than BACKGROUND_TOLERANCE.
    2. object      pixels further than SEED_DISTANCE from the background (RGB distance, 0..255),
                   largest 4-connected component (labelled in numpy: specks elsewhere drop out).
    3. colour      median colour of the component's half furthest from the background (its
                   interior when sharp, still its middle when blurred). Each pixel's coverage ``alpha`` is its
                   position on the line background -> object colour (clipped to [0, 1]); the object
                   is the largest component of alpha > 0.5 grown by one pixel (its anti-aliased rim).
                   Its name is the nearest COLOURS entry, None when far from all (COLOUR_TOLERANCE)
                   or about as near to two (COLOUR_AMBIGUITY).
    4. shape       soft IoU (sum of min / sum of max) of alpha against each shape's coverage
                   (shapes.coverage) with the object's area and centroid, which is how shapes.py
                   defines radius and centre, best over a few scales and template blurs (generated
                   images have soft edges). None when the best IoU is below MIN_IOU or the
                   runner-up is within IOU_MARGIN.

    judge_image(image)                -> {"colour", "shape", "background", "object_pixels", ...}
    judge_prompt("a big red circle")  -> {"colour": "red", "shape": "circle", ...}
    prompt_alignment(images, prompts) -> {"alignment", "colour_accuracy", "shape_accuracy", "n", "items"}

Accuracy on clean ``ShapesDataset`` images and under mild degradation is measured in
tests/test_shapes_checker.py. Objects need a few pixels of radius: 'large' works from 32 px,
'small' from 64 px.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

BORDER = 1  # width of the border ring (pixels) the background is estimated from
BACKGROUND_TOLERANCE = 48.0  # RGB distance (0..255) within which the border is named a background
SEED_DISTANCE = 60.0  # RGB distance from the background above which a pixel seeds the object
MIN_OBJECT_PIXELS = 6  # fewer object pixels (alpha > 0.5) than max(this, MIN_OBJECT_FRACTION * H * W): no object
MIN_OBJECT_FRACTION = 0.002
COLOUR_TOLERANCE = 90.0  # the object's colour must be this near (RGB distance) to a palette colour...
COLOUR_AMBIGUITY = 0.75  # ... and nearer than this fraction of the distance to the runner-up
MIN_IOU = 0.6  # the best shape template must overlap the object at least this much...
IOU_MARGIN = 0.02  # ... and beat the runner-up by this much
SCALE_STEPS = (0.95, 1.0, 1.05)  # radius search, factors of the equal-area radius
BLUR_STEPS = (0.0, 0.6, 1.2)  # templates are also compared blurred by these Gaussian stds (pixels)

NEGATIVE_LIMIT = -0.5  # float images with values below this are taken for [-1, 1] images: an error
_SYNONYMS = {"grey": "gray"}


def _vocabulary():
    from ..data import shapes  # lazily: keeps `import microdiff.eval` light

    return shapes


# ----------------------------------------------------------------------------- pixels
def _unit_to_255(array: np.ndarray) -> np.ndarray:
    low = float(array.min())
    if low < NEGATIVE_LIMIT:
        raise ValueError(f"image has values down to {low:.2f} but must be in [0, 1]; convert [-1, 1] images "
                         "(the dataset's) with (x + 1) / 2")
    return np.clip(array, 0, 1) * 255


def _to_rgb(image: Any) -> np.ndarray:
    """A (3, H, W) float tensor in [0, 1], a PIL image or a uint8 (H, W, 3) array -> float64 (H, W, 3)
    in 0..255."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if hasattr(image, "detach"):  # torch tensor
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image: a tensor must be (3, H, W); got shape {tuple(image.shape)}")
        array = image.detach().cpu()
        if array.is_floating_point():
            return _unit_to_255(array.double().numpy().transpose(1, 2, 0))
        if str(array.dtype) == "torch.uint8":
            return array.numpy().transpose(1, 2, 0).astype(np.float64)
        raise ValueError(f"image: a tensor must be float in [0, 1] or uint8; got {array.dtype}")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image: an array must be (H, W, 3); got shape {image.shape}")
        if image.dtype == np.uint8:
            return image.astype(np.float64)
        if np.issubdtype(image.dtype, np.floating):
            return _unit_to_255(image.astype(np.float64))
        raise ValueError(f"image: an array must be uint8 in 0..255 or float in [0, 1]; got {image.dtype}")
    raise ValueError(f"image must be a (3, H, W) float tensor in [0, 1], a PIL image or a uint8 (H, W, 3) "
                     f"array; got {type(image).__name__}")


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean (H, W) mask (empty when the mask is).

    Each pixel starts labelled with its own flat index; labels shrink to the minimum over
    4-neighbours in the mask, with pointer jumping, until nothing changes."""
    h, w = mask.shape
    if not mask.any():
        return mask.copy()
    outside = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), outside)
    while True:
        new = labels.copy()
        np.minimum(new[1:], labels[:-1], out=new[1:])
        np.minimum(new[:-1], labels[1:], out=new[:-1])
        np.minimum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        new = np.where(mask, new, outside)
        new[mask] = new.reshape(-1)[new[mask]]  # a label names a pixel of the same component: jump to its label
        if np.array_equal(new, labels):
            break
        labels = new
    counts = np.bincount(labels[mask])
    return labels == int(np.argmax(counts))


def _grow(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel (8-neighbourhood)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    grown = out.copy()
    grown[:, 1:] |= out[:, :-1]
    grown[:, :-1] |= out[:, 1:]
    return grown


def _nearest(colour: np.ndarray, palette: dict[str, Sequence[int]]) -> tuple[str, dict[str, float]]:
    distances = {name: float(np.linalg.norm(colour - np.asarray(rgb, np.float64))) for name, rgb in palette.items()}
    return min(distances, key=distances.get), distances


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix of a 1-D Gaussian blur with std ``sigma`` pixels (3-sigma taps, zero outside)."""
    if sigma == 0:
        return np.eye(n)
    r = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    return np.where(np.abs(offsets) <= r, taps[np.clip(offsets + r, 0, 2 * r)], 0.0) / taps.sum()


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / union) if union > 0 else 0.0


def _shape_scores(alpha: np.ndarray) -> dict[str, float]:
    """Best soft IoU of ``alpha`` against each shape's coverage with the same area and centroid,
    searched over a small range of scales and of blurs of the template (soft edges of generated images)."""
    S = _vocabulary()
    h, w = alpha.shape
    area = alpha.sum()
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
    radius = float(np.sqrt(area / np.pi))
    # work in a crop holding the object's support and every template (the triangle reaches furthest)
    reach = 1.6 * max(SCALE_STEPS) * radius + 3 * max(BLUR_STEPS) + 1
    rows, cols = np.nonzero(alpha)
    y0, y1 = max(0, min(rows.min(), int(cy - reach))), min(h, max(rows.max() + 1, int(np.ceil(cy + reach))))
    x0, x1 = max(0, min(cols.min(), int(cx - reach))), min(w, max(cols.max() + 1, int(np.ceil(cx + reach))))
    crop = alpha[y0:y1, x0:x1]
    side = max(y1 - y0, x1 - x0)
    blurs = [(_blur_matrix(y1 - y0, s), _blur_matrix(x1 - x0, s)) for s in BLUR_STEPS]
    scores = {}
    for shape in S.SHAPES:
        best = 0.0
        for scale in SCALE_STEPS:
            template = S.coverage(shape, (cx - x0, cy - y0), radius * scale, side)[:y1 - y0, :x1 - x0]
            for blur_rows, blur_cols in blurs:
                best = max(best, _soft_iou(crop, blur_rows @ template @ blur_cols.T))
        scores[shape] = best
    return scores


# ----------------------------------------------------------------------------- judging
def judge_image(image: Any) -> dict[str, Any]:
    """Read the colour, shape and background of a single-object ``shapes`` image.

    image: a float tensor (3, H, W) in [0, 1] (one image of ``Pipeline.generate``), a PIL image or a
    uint8 (H, W, 3) array. Returns a JSON-serialisable dict: ``colour`` (a COLOURS name or None),
    ``shape`` (a SHAPES name or None), ``background`` (a BACKGROUNDS name or None), ``object_pixels``
    (pixels with coverage > 0.5), ``object_rgb`` (median colour, 0..255), ``colour_distances`` (RGB
    distance to each palette colour) and ``shape_scores`` (soft IoU with each shape's template).
    None means no object, or an ambiguous answer, never a guess."""
    S = _vocabulary()
    rgb = _to_rgb(image)
    h, w, _ = rgb.shape
    if min(h, w) < S.MIN_RESOLUTION:
        raise ValueError(f"image: {h} x {w} pixels is too small to judge; give at least "
                         f"{S.MIN_RESOLUTION} x {S.MIN_RESOLUTION}")
    ring = np.concatenate([rgb[:BORDER].reshape(-1, 3), rgb[-BORDER:].reshape(-1, 3),
                           rgb[:, :BORDER].reshape(-1, 3), rgb[:, -BORDER:].reshape(-1, 3)])
    bg = np.median(ring, axis=0)
    name, bg_distances = _nearest(bg, S.BACKGROUNDS)
    result: dict[str, Any] = {"colour": None, "shape": None,
                              "background": name if bg_distances[name] <= BACKGROUND_TOLERANCE else None,
                              "object_pixels": 0, "background_rgb": [round(float(c), 1) for c in bg],
                              "object_rgb": None, "colour_distances": {}, "shape_scores": {}}
    min_pixels = max(MIN_OBJECT_PIXELS, MIN_OBJECT_FRACTION * h * w)
    seed = _largest_component(np.linalg.norm(rgb - bg, axis=-1) > SEED_DISTANCE)
    if seed.sum() < min_pixels:
        return result
    # the object's colour: median of the seed's pixels furthest from the background (its upper half),
    # its interior on a sharp image, still its middle on a blurred one
    distance = np.linalg.norm(rgb[seed] - bg, axis=-1)
    colour = np.median(rgb[seed][distance >= np.median(distance)], axis=0)
    direction = colour - bg
    alpha = np.clip((rgb - bg) @ direction / float(direction @ direction), 0, 1)
    body = _largest_component(alpha > 0.5)
    result["object_pixels"] = int(body.sum())
    result["object_rgb"] = [round(float(c), 1) for c in colour]
    if body.sum() < min_pixels:
        return result
    alpha = np.where(_grow(body), alpha, 0.0)

    nearest, distances = _nearest(colour, S.COLOURS)
    runner_up = min(d for c, d in distances.items() if c != nearest)
    result["colour_distances"] = {c: round(d, 2) for c, d in distances.items()}
    if distances[nearest] <= COLOUR_TOLERANCE and distances[nearest] < COLOUR_AMBIGUITY * runner_up:
        result["colour"] = nearest

    scores = _shape_scores(alpha)
    result["shape_scores"] = {s: round(v, 4) for s, v in scores.items()}
    ranked = sorted(scores, key=scores.get, reverse=True)
    if scores[ranked[0]] >= MIN_IOU and scores[ranked[0]] - scores[ranked[1]] >= IOU_MARGIN:
        result["shape"] = ranked[0]
    return result


def judge_prompt(prompt: str) -> dict[str, Any]:
    """The colour, shape, size and background words of a ``shapes`` prompt (None when absent).

    "a big red circle on the left, gray background" -> {"colour": "red", "shape": "circle",
    "size": "large", "background": "gray", "objects": [["red", "circle"]]}. ``objects`` lists every
    (colour, shape) pair named ("... and a blue square" adds one); ``colour`` and ``shape`` are the
    first object's. A background is a BACKGROUNDS word followed by "background"; "grey" = "gray"."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string; got {type(prompt).__name__}")
    S = _vocabulary()
    words = [_SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", prompt.lower())]
    words = [w[:-1] if w.endswith("s") and w[:-1] in S.SHAPES else w for w in words]  # "circles"
    size_words = {word: size for size, forms in S.SIZE_WORDS.items() for word in forms}
    background = next((w for w, nxt in zip(words, words[1:]) if w in S.BACKGROUNDS and nxt == "background"), None)
    colours = [w for w in words if w in S.COLOURS]
    shapes = [w for w in words if w in S.SHAPES]
    objects, pending = [], None
    for word in words:
        if word in S.COLOURS:
            pending = word
        elif word in S.SHAPES:
            objects.append([pending, word])
            pending = None
    return {"colour": objects[0][0] if objects and objects[0][0] else (colours[0] if colours else None),
            "shape": shapes[0] if shapes else None,
            "size": next((size_words[w] for w in words if w in size_words), None),
            "background": background, "objects": objects}


def _as_list(images: Any) -> list[Any]:
    if hasattr(images, "detach") and images.ndim == 4:
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    raise ValueError("images must be a (B, 3, H, W) tensor in [0, 1] or a list of images; got "
                     f"{type(images).__name__} of shape {tuple(getattr(images, 'shape', ()))}")


def prompt_alignment(images: Any, prompts: str | Sequence[str]) -> dict[str, Any]:
    """How many images show the colour and the shape their prompt asks for.

    images: a (B, 3, H, W) tensor in [0, 1], a (B, H, W, 3) uint8 array or a list of images (see
    :func:`judge_image`); prompts:
    one per image, or one string for all. Returns a JSON-serialisable dict: ``alignment`` (fraction
    with colour AND shape right), ``colour_accuracy``, ``shape_accuracy``, ``n`` and ``items``, one
    row per image with its prompt, the wanted and the judged values. A judged None counts as wrong."""
    images = _as_list(images)
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"prompts: got {len(prompts)} prompts for {len(images)} images; give one per image "
                         "or a single string")
    if not images:
        raise ValueError("images is empty; give at least one image")
    items = []
    for index, (image, prompt) in enumerate(zip(images, prompts)):
        wanted = judge_prompt(prompt)
        if wanted["colour"] is None or wanted["shape"] is None:
            missing = "colour" if wanted["colour"] is None else "shape"
            raise ValueError(f"prompts[{index}] = {prompt!r} names no {missing}; prompt alignment needs a colour "
                             "and a shape word of the shapes vocabulary, e.g. 'a red circle'")
        judged = judge_image(image)
        colour_ok, shape_ok = judged["colour"] == wanted["colour"], judged["shape"] == wanted["shape"]
        items.append({"index": index, "prompt": prompt,
                      "wanted": {"colour": wanted["colour"], "shape": wanted["shape"]},
                      "judged": {k: judged[k] for k in ("colour", "shape", "background", "object_pixels")},
                      "colour_ok": colour_ok, "shape_ok": shape_ok, "aligned": colour_ok and shape_ok})
    n = len(items)
    return {"alignment": sum(i["aligned"] for i in items) / n,
            "colour_accuracy": sum(i["colour_ok"] for i in items) / n,
            "shape_accuracy": sum(i["shape_ok"] for i in items) / n, "n": n, "items": items}


__all__ = ["judge_image", "judge_prompt", "prompt_alignment"]
