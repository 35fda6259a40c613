"""Reading image folders for evaluation, and clean-fid-style resizing.

FID is sensitive to how images are resized before the feature network sees them: uint8 rounding
and aliasing (nearest or bilinear without a low-pass filter) move scores by several points.
``clean_resize`` follows clean-fid's "clean" mode: each channel is resized as a float32 image with
PIL's bicubic filter, which low-passes in proportion to the scale (antialiasing), and the result
is not rounded back to uint8.

    paths = image_paths("samples/")                      # sorted; one-line error if empty
    batch = load_images(paths[:64], size=299)            # (B, 3, 299, 299) float32 in [0, 1]
    for batch in iterate_images(paths, size=299, batch_size=64, on_error="skip", skipped=report): ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def image_paths(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (sorted, so runs and processes agree on the order)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder of images; pass the folder that holds the .png/.jpg files")
    pattern = "**/*" if recursive else "*"
    paths = sorted(p for p in root.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found; check the path or generate "
                         "samples first (microdiff eval generate)")
    return paths


def clean_resize(image, size: int) -> np.ndarray:
    """A PIL RGB image -> (3, size, size) float32 in [0, 255], each channel resized in float with
    bicubic filtering (antialiased when shrinking); unchanged when already ``size`` x ``size``."""
    from PIL import Image

    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    if array.shape[0] == size and array.shape[1] == size:
        return array.transpose(2, 0, 1).copy()
    channels = [np.asarray(Image.fromarray(array[..., c], mode="F").resize((size, size), Image.Resampling.BICUBIC))
                for c in range(3)]
    return np.clip(np.stack(channels), 0, 255)


def read_image(path: Path, size: int | None) -> np.ndarray:
    """(3, H, W) float32 in [0, 255]; resized with ``clean_resize`` when ``size`` is given."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if size is not None:
            return clean_resize(image, size)
        return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1).copy()


def iterate_images(paths: list[Path], size: int | None, batch_size: int = 64, on_error: str = "raise",
                   skipped: list[tuple[str, str]] | None = None) -> Iterator[torch.Tensor]:
    """Batches (B, 3, H, W) float32 in [0, 1]. An unreadable file raises a one-line error naming it
    (``on_error="raise"``) or is appended to ``skipped`` as (path, reason) and left out
    (``on_error="skip"``). Without ``size`` every image must have the first one's size."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}: choose 'raise' or 'skip'")
    batch: list[np.ndarray] = []
    shape = None
    for path in paths:
        try:
            array = read_image(path, size)
        except (OSError, ValueError, SyntaxError) as err:
            reason = first_line(err)
            if on_error == "raise":
                raise ValueError(f"{path}: unreadable image ({reason}); remove it or pass --skip-bad to leave "
                                 "unreadable files out (they are listed in the report)") from None
            if skipped is not None:
                skipped.append((str(path), reason))
            continue
        if shape is None:
            shape = array.shape
        elif array.shape != shape:
            raise ValueError(f"{path}: size {array.shape[1]}x{array.shape[2]} differs from the first image's "
                             f"{shape[1]}x{shape[2]}; pass --resolution to resize every image to one size")
        batch.append(array)
        if len(batch) == batch_size:
            yield torch.from_numpy(np.stack(batch)) / 255
            batch = []
    if batch:
        yield torch.from_numpy(np.stack(batch)) / 255


def as_image_batch(images, name: str) -> torch.Tensor:
    """``images`` as a (B, 3, H, W) float tensor (numpy arrays accepted), or a one-line error that
    says what ``name`` needs and how to get there."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: images must be a (B, 3, H, W) tensor in [0, 1]; got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: images must have shape (B, 3, H, W); got {tuple(images.shape)} "
                         "(repeat grey images to 3 channels, move channels first)")
    if not images.is_floating_point():
        raise ValueError(f"{name}: images must be floats in [0, 1]; got {images.dtype} (divide uint8 images by 255)")
    return images


def load_images(paths: list[Path], size: int | None = None) -> torch.Tensor:
    """All of ``paths`` as one (N, 3, H, W) float32 tensor in [0, 1] (raises on unreadable files)."""
    return torch.cat(list(iterate_images(paths, size, batch_size=max(len(paths), 1))))


__all__ = ["IMAGE_SUFFIXES", "as_image_batch", "image_paths", "clean_resize", "read_image", "iterate_images", "load_images"]
