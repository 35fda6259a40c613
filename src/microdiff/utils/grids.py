"""Contact sheets: many images in one PNG, optionally with a caption under each."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def to_pil_list(images) -> list[Image.Image]:
    """(B,3,H,W) float in [0,1] -> PIL images; a list of PIL images passes through."""
    if isinstance(images, torch.Tensor):
        arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(a), "RGB") for a in arrays]
    return list(images)


def image_grid(images, columns: int | None = None) -> Image.Image:
    """Images of one size -> one image, ``columns`` wide (default: about square)."""
    images = to_pil_list(images)
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % columns) * w, (i // columns) * h))
    return grid


def captioned_grid(images, captions: Sequence[str] | None = None, columns: int | None = None,
                   cell: int = 128) -> Image.Image:
    """Each image scaled by an integer factor (nearest) to about ``cell`` px, its caption below."""
    images = to_pil_list(images)
    n = len(images)
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / columns))
    size = images[0].size[0]
    scale = max(1, round(cell / size))
    side = size * scale
    font, line_h = _font(11), 13
    lines = [textwrap.wrap(c, max(8, side // 6)) for c in captions] if captions else [[] for _ in images]
    text_h = max((len(w) for w in lines), default=0) * line_h + (4 if captions else 0)
    pad = 4
    sheet = Image.new("RGB", (columns * (side + pad) + pad, rows * (side + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (img, wrapped) in enumerate(zip(images, lines)):
        x, y = pad + (i % columns) * (side + pad), pad + (i // columns) * (side + text_h + pad)
        sheet.paste(img.resize((side, side), Image.NEAREST), (x, y))
        for k, line in enumerate(wrapped):
            draw.text((x, y + side + 2 + k * line_h), line, fill=(0, 0, 0), font=font)
    return sheet


__all__ = ["image_grid", "captioned_grid", "to_pil_list"]
