"""Reading image folders for evaluation, and clean-fid-style resizing.

Every eval command reads image files here, so a damaged file is the same one-line error everywhere
(``UnreadableImage``: "PATH: unreadable image (reason); ... pass --skip-bad ...") and ``--skip-bad``
means the same everywhere (``readable``: the file is left out and listed, with its reason, in the
command's report and summary).

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
from typing import Any, Callable, Iterator

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


class UnreadableImage(ValueError):
    """An image file that cannot be decoded (missing, empty, not an image, truncated, ...). Every eval
    command reports it with this one message, and leaves the file out under ``--skip-bad``."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: unreadable image ({reason}); remove it or pass --skip-bad to leave unreadable "
                         "files out (they are listed in the report)")
        self.path, self.reason = str(path), reason

    def __reduce__(self):  # DataLoader workers send it back to the main process
        return type(self), (self.path, self.reason)


def _pil_decode(path: Path):
    from PIL import Image

    if path.is_file() and path.stat().st_size == 0:
        raise ValueError("the file is empty (0 bytes)")
    with Image.open(path) as image:
        image.load()
        return image.copy() if image.mode == "RGB" else image.convert("RGB")


def open_checked(path: str | Path, decode: Callable[[Path], Any] | None = None) -> Any:
    """The decoded image at ``path`` (PIL RGB, fully loaded, so truncation shows here), or ``decode(path)``
    for a command that decodes its own way (memorization: as training does). Any failure of the file
    itself becomes an :class:`UnreadableImage` naming it."""
    path = Path(path)
    try:
        return (decode or _pil_decode)(path)
    except UnreadableImage:
        raise
    except Exception as err:  # noqa: BLE001 - Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        raise UnreadableImage(path, getattr(err, "detail", None) or first_line(err)) from None


def read_image(path: Path, size: int | None) -> np.ndarray:
    """(3, H, W) float32 in [0, 255]; resized with ``clean_resize`` when ``size`` is given."""
    image = open_checked(path)
    if size is not None:
        return clean_resize(image, size)
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1).copy()


def readable(paths: list[Path], read: Callable[[Path], Any], on_error: str = "raise",
             skipped: list[tuple[str, str]] | None = None) -> Iterator[tuple[int, Any]]:
    """(index, read(path)) of each path whose image can be read: the one --skip-bad policy of every eval
    command. An :class:`UnreadableImage` is raised (``on_error="raise"``) or appended to ``skipped`` as
    (path, reason) and left out (``on_error="skip"``)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}: choose 'raise' or 'skip'")
    for index, path in enumerate(paths):
        try:
            value = read(path)
        except UnreadableImage as err:
            if on_error == "raise":
                raise
            if skipped is not None:
                skipped.append((err.path, err.reason))
            continue
        yield index, value


def none_readable(what: str, count: int, skipped: list) -> UnreadableImage | ValueError:
    """The error for a set of ``count`` images of which none could be read (``skipped`` says why)."""
    first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
    return ValueError(f"{what}: none of its {count} images could be read{first}; nothing to compare, check the "
                      "folder")


def skipped_line(skipped: list, what: str = "") -> str:
    """The summary line every eval command prints for the files --skip-bad left out."""
    return (f"{what}{len(skipped)} unreadable image(s) left out (--skip-bad), first {skipped[0][0]} "
            f"({skipped[0][1]}); all are listed in the report")


def image_batches(paths: list[Path], size: int | None, batch_size: int = 64, on_error: str = "raise",
                  skipped: list[tuple[str, str]] | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(indices into ``paths``, batch (B, 3, H, W) float32 in [0, 1]) of the readable images, in order
    (``readable``'s policy for unreadable ones). Without ``size`` every image must have the first one's size."""
    indices: list[int] = []
    batch: list[np.ndarray] = []
    shape = None
    for index, array in readable(paths, lambda p: read_image(p, size), on_error, skipped):
        if shape is None:
            shape = array.shape
        elif array.shape != shape:
            raise ValueError(f"{paths[index]}: size {array.shape[1]}x{array.shape[2]} differs from the first image's "
                             f"{shape[1]}x{shape[2]}; pass --resolution to resize every image to one size")
        indices.append(index)
        batch.append(array)
        if len(batch) == batch_size:
            yield indices, torch.from_numpy(np.stack(batch)) / 255
            indices, batch = [], []
    if batch:
        yield indices, torch.from_numpy(np.stack(batch)) / 255


def iterate_images(paths: list[Path], size: int | None, batch_size: int = 64, on_error: str = "raise",
                   skipped: list[tuple[str, str]] | None = None) -> Iterator[torch.Tensor]:
    """Batches (B, 3, H, W) float32 in [0, 1] of ``image_batches``, without the indices."""
    for _, batch in image_batches(paths, size, batch_size, on_error, skipped):
        yield batch


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


__all__ = ["IMAGE_SUFFIXES", "UnreadableImage", "open_checked", "readable", "none_readable", "skipped_line", "as_image_batch",
           "image_paths", "clean_resize", "read_image", "image_batches", "iterate_images", "load_images"]
