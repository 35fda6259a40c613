"""Image loading and the training transform: any file Pillow reads -> float tensor (3, R, R) in [-1, 1].

    open_image(path | bytes)  decode fully (so truncation shows here), apply EXIF orientation;
                              failures become ImageDecodeError with a short reason
    to_rgb(image)             every Pillow mode -> 8-bit RGB: alpha (RGBA, LA, La, PA, P or L/RGB with
                              a transparent colour) is composited on white; 16-bit ("I;16*") and
                              32-bit "I" are read as 0..65535, "F" as 0..1 (or 0..255 if any value
                              exceeds 1); CMYK, YCbCr, LAB, HSV and 1-bit use Pillow's conversions
    ImageTransform            short side -> ``resolution`` with Pillow's antialiased bicubic resize,
                              center or random crop, optional horizontal flip, -> [-1, 1]
    transform_mask(mask, params)  the same resize (nearest), crop and flip for a 0/1 pixel mask
    crop_meta(params, w, h)   the JSON dict datasets store as ``meta["crop"]``

Resizing uses Pillow, not ``torch.nn.functional.interpolate``: Pillow's ``Image.resize`` with
``BICUBIC`` is antialiased when it shrinks (its kernel widens with the scale factor), works on the
8-bit image decoders give us without a float copy of a large photo, and is what most pipelines
(torchvision on PIL inputs, img2dataset) use, so our crops match theirs. ``reducing_gap=None`` (the
default here) resizes exactly; a value like 3.0 first shrinks by an integer factor (faster on huge
images, visually the same, not bit-identical).

Random crops and flips draw from a ``numpy.random.Generator`` passed per call; the datasets derive
one per (seed, epoch, index), so a run is reproducible whatever the number of DataLoader workers.

Masks move with their image: ``transform_mask`` applies the image's :class:`CropParams` to a mask of
the image's original size, resizing by nearest neighbour at pixel centres (Pillow's NEAREST rule,
so a mask stays 0/1), then the same crop and flip. Where the image is resized, its bicubic filter
mixes pixels across a mask edge; the mask marks each resized pixel by the source pixel at its centre.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["ImageError", "ImageTooSmall", "ImageDecodeError", "open_image", "to_rgb", "CropParams",
           "ImageTransform", "resized_size", "transform_mask", "crop_meta"]

ALPHA_MODES = {"RGBA", "LA", "La", "RGBa", "PA"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageError(ValueError):
    """An image that cannot become a training sample; ``reason`` is a short category for reports."""

    reason = "bad image"

    def __init__(self, message: str, reason: str | None = None, path: str | None = None):
        super().__init__(f"{path}: {message}" if path else message)
        self.detail, self.path = message, path  # ``detail``: the message without the path
        if reason is not None:
            self.reason = reason

    def __reduce__(self):
        return type(self), (self.detail, self.reason, self.path)


class ImageTooSmall(ImageError):
    """The short side is below the ``min_size`` of the transform."""

    reason = "image too small"


class ImageDecodeError(ImageError):
    """The file is missing, empty, not an image, truncated or otherwise undecodable."""

    reason = "corrupt image"


def open_image(source: str | os.PathLike | bytes) -> Image.Image:
    """Open and fully decode an image from a path or bytes; EXIF orientation is applied.

    Animated images give their first frame. Every failure is an :class:`ImageDecodeError` whose
    ``reason`` is one of "missing file", "empty file", "not an image", "corrupt image".
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "<bytes>"
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise ImageDecodeError("no such file", "missing file", name)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ImageDecodeError(f"cannot read the file ({err.strerror or err})", "unreadable file", name) from None
    if not data:
        raise ImageDecodeError("the file is empty (0 bytes)", "empty file", name)
    try:
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("Pillow does not recognise this as an image", "not an image", name) from None
    except (OSError, ValueError, SyntaxError) as err:  # a header cut short ("Truncated File Read") and the like
        raise ImageDecodeError(str(err) or "the image header is damaged", "corrupt image", name) from None
    try:
        image.seek(0)
        image.load()  # decode now: a truncated JPEG fails here, not later inside resize
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(str(err), "image too large", name) from None
    except Exception as err:  # Pillow's plugins raise OSError, SyntaxError, ValueError, EOFError...
        raise ImageDecodeError(f"{type(err).__name__}: {err}", "corrupt image", name) from None
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block: the pixels are fine, keep them as stored
        return image


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit "RGB" (see the module docstring for each mode's rule)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "La":  # premultiplied alpha, which Pillow cannot convert: un-premultiply by hand
        l, a = (np.asarray(image.getchannel(i), dtype=np.float64) for i in (0, 1))
        straight = np.where(a > 0, l * 255.0 / np.maximum(a, 1), 0)
        image = Image.merge("LA", [Image.fromarray(np.clip(np.rint(straight), 0, 255).astype(np.uint8)),
                                   image.getchannel(1)])
        mode = "LA"
    if mode in ALPHA_MODES or "transparency" in image.info:
        return _on_white(image)
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ImageDecodeError(f"cannot convert mode {mode!r} to RGB: {err}", "unsupported image mode") from None


class CropParams(NamedTuple):
    """Where one transform call crops (in the resized image's pixels) and whether it flips."""

    top: int
    left: int
    size: int
    flip: bool


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) with the short side equal to ``resolution`` and the aspect ratio kept."""
    if width <= height:
        return resolution, max(resolution, round(height * resolution / width))
    return max(resolution, round(width * resolution / height)), resolution


_resized_size = resized_size


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """For each of ``n_out`` output pixels, the input pixel under its centre: floor((i + 0.5) * n_in / n_out),
    in exact integer arithmetic."""
    return ((2 * np.arange(n_out, dtype=np.int64) + 1) * n_in) // (2 * n_out)


def transform_mask(mask: np.ndarray | torch.Tensor, params: CropParams) -> np.ndarray | torch.Tensor:
    """Move a mask (H, W) or (C, H, W), given at the image's original size (after EXIF rotation), as
    :meth:`ImageTransform.apply` moves the image: resize the short side to ``params.size`` (nearest,
    at pixel centres: no new values, a 0/1 mask stays 0/1), crop at (top, left), flip if ``flip``.
    Returns the same type and dtype, (params.size, params.size) in the last two axes."""
    if not isinstance(mask, (np.ndarray, torch.Tensor)) or mask.ndim not in (2, 3):
        raise ValueError("transform_mask: mask must be a numpy array or tensor (H, W) or (C, H, W); got "
                         f"{getattr(mask, 'shape', type(mask).__name__)}")
    h, w = mask.shape[-2:]
    new_w, new_h = resized_size(w, h, params.size)
    if not (0 <= params.top <= new_h - params.size and 0 <= params.left <= new_w - params.size):
        raise ValueError(f"transform_mask: crop {params} does not fit a {w}x{h} mask resized to {new_w}x{new_h}; "
                         "pass the mask at the image's original size")
    rows = _nearest_index(h, new_h)[params.top:params.top + params.size]
    cols = _nearest_index(w, new_w)[params.left:params.left + params.size]
    if params.flip:
        cols = cols[::-1].copy()
    if isinstance(mask, torch.Tensor):
        return mask.index_select(-2, torch.from_numpy(rows).to(mask.device)).index_select(
            -1, torch.from_numpy(cols).to(mask.device))
    return np.take(np.take(mask, rows, axis=-2), cols, axis=-1)


def crop_meta(params: CropParams, width: int, height: int) -> dict[str, object]:
    """What a dataset records in ``meta["crop"]`` for an image of this original size: the crop's
    ``top``, ``left``, ``size`` and ``flip``, and ``frame`` = [height, width] of the resized image
    the crop was taken from (top/left are in its pixels)."""
    new_w, new_h = resized_size(width, height, params.size)
    return {"top": int(params.top), "left": int(params.left), "size": int(params.size), "flip": bool(params.flip),
            "frame": [new_h, new_w]}


class ImageTransform:
    """PIL image -> float32 tensor (3, resolution, resolution) in [-1, 1].

    Args:
        resolution: side of the square output.
        crop: "center" (offsets rounded down) or "random" (uniform over all offsets).
        flip: flip horizontally with probability 1/2.
        min_size: images whose short side is below this raise :class:`ImageTooSmall` (None: no limit;
            smaller images are upsampled).
        reducing_gap: passed to ``Image.resize`` (None = exact; see the module docstring).
        seed: seeds the fallback generator used when a call passes no ``rng``.
    """

    def __init__(self, resolution: int, crop: Literal["center", "random"] = "center", flip: bool = False,
                 min_size: int | None = None, reducing_gap: float | None = None, seed: int = 0):
        if int(resolution) < 1:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if min_size is not None and int(min_size) < 1:
            raise ValueError(f"min_size must be a positive integer or None, got {min_size!r}")
        self.resolution, self.crop, self.flip = int(resolution), crop, bool(flip)
        self.min_size = None if min_size is None else int(min_size)
        self.reducing_gap = reducing_gap
        self._rng = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return (f"ImageTransform(resolution={self.resolution}, crop={self.crop!r}, flip={self.flip}, "
                f"min_size={self.min_size})")

    def check_size(self, width: int, height: int) -> None:
        if self.min_size is not None and min(width, height) < self.min_size:
            raise ImageTooSmall(f"short side {min(width, height)} px (image {width}x{height}) is below "
                                f"min_size={self.min_size}")

    def sample_params(self, width: int, height: int, rng: np.random.Generator | None = None) -> CropParams:
        """Where to crop the resized image and whether to flip, for an input of this size."""
        rng = self._rng if rng is None else rng
        new_w, new_h = _resized_size(width, height, self.resolution)
        r = self.resolution
        if self.crop == "center":
            top, left = (new_h - r) // 2, (new_w - r) // 2
        else:
            top, left = int(rng.integers(0, new_h - r + 1)), int(rng.integers(0, new_w - r + 1))
        flip = bool(rng.random() < 0.5) if self.flip else False
        return CropParams(top, left, r, flip)

    def apply(self, image: Image.Image, params: CropParams) -> torch.Tensor:
        """Resize, crop and flip as ``params`` say; returns (3, R, R) float32 in [-1, 1]."""
        image = to_rgb(image)
        size = _resized_size(*image.size, self.resolution)
        if size != image.size:
            image = image.resize(size, Image.BICUBIC, reducing_gap=self.reducing_gap)
        image = image.crop((params.left, params.top, params.left + params.size, params.top + params.size))
        if params.flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32)  # (R, R, 3) in 0..255
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)) / np.float32(127.5) - np.float32(1.0))

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None,
                 return_params: bool = False) -> torch.Tensor | tuple[torch.Tensor, CropParams]:
        self.check_size(*image.size)
        params = self.sample_params(*image.size, rng=rng)
        out = self.apply(image, params)
        return (out, params) if return_params else out
