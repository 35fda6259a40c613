"""Image corruption operators: the "bad data" that Ambient-style training learns from.

Every operator is a pure function on float images in [-1, 1] of shape (B, C, H, W). It returns the
corrupted images and one JSON-serialisable dict per sample saying exactly what was done, e.g.
``{"corruption": "noise", "sigma": 0.2}``. Randomness only comes from an explicit ``torch.Generator``
(drawn on the generator's device, so a CPU generator gives the same corruption on any device).

    gaussian_blur(images, sigma_px)               separable Gaussian, scipy's "reflect" borders
    additive_noise(images, sigma, generator)      x + sigma * n, NOT clipped (ambient's sigma_tn)
    jpeg(images, quality)                         Pillow JPEG encode/decode round trip
    downup(images, factor, down, up)              down-sample then up-sample back: a resolution loss
    colour_shift(images, gain, offset, generator) per-image per-channel gain and offset (or fixed ones)

Pixel masks (Ambient Diffusion, Daras et al. 2023) return ``(masked images, mask, meta)``: the mask is
1 = observed, 0 = hidden, and hidden pixels of the images are set to 0. Masks are (B, 1, H, W) (one
mask for all channels) except ``dust(per_element=True)``, which is (B, C, H, W).

    pixel_mask(images, keep_prob, generator, block)  each block x block square kept w.p. keep_prob ("mask")
    dust(images, p, generator, per_element)          each pixel (or element) hidden w.p. p
    box(images, size, generator)                     one random square hidden per image
    fixed_box(images, size, top, left)               the same square hidden in every image
    keep_patch(images, size, generator)              only one random square observed per image

Sizes: an ``int`` is pixels, a ``float`` a fraction of the image's short side (rounded, >= 1 px).
Ambient Diffusion's *further* corruption of a mask, for its training loss, is
``further_mask(mask, delta, generator, block)`` (Ã = A ⊙ B, B keeps each element w.p. 1 - delta).

    apply_corruption(images, spec, generator)     any of the above through a spec like {"name": "noise", "sigma": 0.2}
    parse_corruption("box:0.25")                  the CLI's short form -> a spec (see SHORT_FORM)
    sample_generator(key, seed)                   a generator that depends on (seed, key) only

Per-sample determinism: ``sample_generator(record_key, seed)`` is seeded from a BLAKE2b hash of
``(seed, key)`` (not Python's salted ``hash()``), so a sample gets the same corruption (same mask,
same noise realisation) in every epoch, in any DataLoader worker or process, on any machine.
Seeing a fresh mask or noise draw of the same image every epoch would leak the hidden information
that ambient training must never see.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

Meta = list[dict[str, Any]]



class Corrupted(NamedTuple):
    """What :func:`apply_corruption` returns: images, per-sample metadata, and the mask (or None)."""

    images: torch.Tensor
    meta: Meta
    mask: torch.Tensor | None = None


def _check_images(images: torch.Tensor, what: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{what}: images must be a float tensor (B, C, H, W) in [-1, 1]; got {got}")


def _per_sample(value: float | Sequence[float] | torch.Tensor, batch: int, name: str, what: str) -> list[float]:
    """A scalar or one value per sample -> a list of ``batch`` Python floats."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().reshape(-1).tolist()
    values = [float(value)] * batch if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != batch:
        raise ValueError(f"{what}: {name} must be a number or {batch} values (one per image); got {len(values)}")
    return values


def _rng_device(generator: torch.Generator | None, images: torch.Tensor) -> torch.device:
    """Draw on the generator's device (then move), so a CPU generator gives the same numbers for
    images on any device."""
    return generator.device if generator is not None else images.device


# ----------------------------------------------------------------------------- blur
def gaussian_kernel1d(sigma: float, truncate: float = 4.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, radius ``int(truncate * sigma + 0.5)`` (scipy.ndimage's rule)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def _symmetric_index(n: int, radius: int) -> torch.Tensor:
    """Indices that pad a length-n axis by ``radius`` with half-sample symmetric reflection
    (d c b a | a b c d | d c b a), any radius, i.e. scipy.ndimage mode="reflect"."""
    i = torch.arange(-radius, n + radius) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_blur(images: torch.Tensor, sigma_px: float, truncate: float = 4.0) -> tuple[torch.Tensor, Meta]:
    """Blur every channel with a Gaussian of std ``sigma_px`` pixels (0 = unchanged), computed as two
    1-D convolutions in the images' dtype. Borders are reflected about the edge (scipy's "reflect")."""
    _check_images(images, "gaussian_blur")
    sigma_px = float(sigma_px)
    if not math.isfinite(sigma_px) or sigma_px < 0:
        raise ValueError(f"gaussian_blur: sigma_px must be >= 0 pixels; got {sigma_px}")
    meta = [{"corruption": "blur", "sigma_px": sigma_px} for _ in range(images.shape[0])]
    if sigma_px == 0:
        return images.clone(), meta
    b, c, h, w = images.shape
    k = gaussian_kernel1d(sigma_px, truncate, images.dtype).to(images.device)
    r = (k.numel() - 1) // 2
    x = images.reshape(b * c, 1, h, w)
    x = x[..., _symmetric_index(w, r).to(images.device)]
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = x[..., _symmetric_index(h, r).to(images.device), :]
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x.reshape(b, c, h, w), meta


# ----------------------------------------------------------------------------- noise
def additive_noise(images: torch.Tensor, sigma: float | Sequence[float] | torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, Meta]:
    """``x + sigma * n`` with ``n ~ N(0, I)`` drawn from ``generator`` (None: torch's global RNG).

    Not clipped: ambient training relies on the exact Gaussian model, so values leave [-1, 1].
    ``sigma`` (ambient code's sigma_tn, in the [-1, 1] image units) is a number or one per image."""
    _check_images(images, "additive_noise")
    sigmas = _per_sample(sigma, images.shape[0], "sigma", "additive_noise")
    if any(not math.isfinite(s) or s < 0 for s in sigmas):
        raise ValueError(f"additive_noise: sigma must be >= 0; got {sigmas}")
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype, device=_rng_device(generator, images))
    noise = noise.to(images.device)
    scale = torch.tensor(sigmas, dtype=images.dtype, device=images.device).view(-1, 1, 1, 1)
    return images + scale * noise, [{"corruption": "noise", "sigma": s} for s in sigmas]


# ----------------------------------------------------------------------------- jpeg
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, C, H, W) -> uint8 (B, H, W, C), clipped and rounded to the nearest level."""
    x = ((images.detach().to("cpu", torch.float64) + 1) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_uint8(array: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(array, dtype=np.uint8)).permute(0, 3, 1, 2).to(dtype) / 127.5 - 1


def jpeg(images: torch.Tensor, quality: int) -> tuple[torch.Tensor, Meta]:
    """Encode each image as JPEG with Pillow at ``quality`` (1..95) and decode it again.

    Images are first clipped to [-1, 1] and rounded to 8 bits, as any saved image would be.
    Works for 1 (grayscale) or 3 (RGB, Pillow's default 4:2:0 chroma subsampling) channels."""
    from PIL import Image

    _check_images(images, "jpeg")
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 95:
        raise ValueError(f"jpeg: quality must be an integer in 1..95; got {quality!r}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"jpeg: images need 1 or 3 channels; got {images.shape[1]}")
    out = []
    for array in to_uint8(images):
        pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array, "L" if array.shape[-1] == 1 else "RGB")
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=int(quality))
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert(pil.mode))
        out.append(decoded.reshape(array.shape))
    result = from_uint8(np.stack(out), images.dtype).to(images.device)
    return result, [{"corruption": "jpeg", "quality": int(quality)} for _ in range(images.shape[0])]


# ----------------------------------------------------------------------------- resolution and colour
DOWN_MODES, UP_MODES = ("area", "bilinear"), ("bilinear", "bicubic")


def downup(images: torch.Tensor, factor: float, down: str = "area", up: str = "bilinear") -> tuple[torch.Tensor, Meta]:
    """Lose resolution: shrink each image by ``factor`` (>= 1, integer or not) to
    ``(max(1, round(H / factor)), max(1, round(W / factor)))``, then enlarge it back to (H, W).

    down: "area" (default; adaptive average pooling: the exact box average when the factor divides
    the size, otherwise each small pixel averages the pixels its window touches) or "bilinear"
    (torch's antialiased bilinear, its kernel widened by the factor). up: "bilinear" (default) or
    "bicubic" (torch's, a = -0.75), both with ``align_corners=False``. Not clipped, so the operator
    stays linear (bicubic can overshoot [-1, 1] a little); a constant image stays that constant."""
    _check_images(images, "downup")
    if isinstance(factor, bool) or not isinstance(factor, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(factor)) or float(factor) < 1:
        raise ValueError(f"downup: factor must be a number >= 1 (how many times smaller); got {factor!r}")
    if down not in DOWN_MODES:
        raise ValueError(f"downup: down must be one of {', '.join(DOWN_MODES)}; got {down!r}")
    if up not in UP_MODES:
        raise ValueError(f"downup: up must be one of {', '.join(UP_MODES)}; got {up!r}")
    factor = float(factor)
    h, w = images.shape[-2:]
    small = (max(1, round(h / factor)), max(1, round(w / factor)))
    if down == "area":
        low = F.interpolate(images, size=small, mode="area")
    else:
        low = F.interpolate(images, size=small, mode="bilinear", align_corners=False, antialias=True)
    out = F.interpolate(low, size=(h, w), mode=up, align_corners=False)
    meta = [{"corruption": "downup", "factor": factor, "down": down, "up": up, "low_res": list(small)}
            for _ in range(images.shape[0])]
    return out, meta


def _channel_values(values: Any, channels: int, name: str) -> list[float]:
    values = [values] * channels if isinstance(values, (int, float, np.integer, np.floating)) else values
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        out = []
    if isinstance(values, (str, bytes)) or len(out) != channels or not all(map(math.isfinite, out)):
        raise ValueError(f"colour_shift: {name} must be a number or {channels} numbers (one per channel); "
                         f"got {values!r}")
    return out


def colour_shift(images: torch.Tensor, gain: float | None = None, offset: float | None = None,
                 generator: torch.Generator | None = None, *, gains: Any = None,
                 offsets: Any = None) -> tuple[torch.Tensor, Meta]:
    """A colour cast: ``clip(gains[c] * x + offsets[c], -1, 1)`` per channel c.

    Random (default): for each image and channel, ``gains = 1 + U(-gain, gain)`` and
    ``offsets = U(-offset, offset)`` drawn from ``generator`` (defaults gain = offset = 0.1).
    Fixed: pass ``gains`` and/or ``offsets`` (a number or one per channel; defaults 1 and 0) for
    the same shift of every image. Clipped to [-1, 1], as a saved image would be. The meta holds
    the applied ``gains`` and ``offsets``: ``colour_shift(x, gains=m["gains"], offsets=m["offsets"])``
    reproduces the output exactly."""
    _check_images(images, "colour_shift")
    b, c = images.shape[:2]
    fixed = gains is not None or offsets is not None
    if fixed and (gain is not None or offset is not None):
        raise ValueError("colour_shift: give random ranges (gain, offset) or fixed per-channel values "
                         "(gains, offsets), not both")
    if fixed:
        g = [_channel_values(1.0 if gains is None else gains, c, "gains")] * b
        o = [_channel_values(0.0 if offsets is None else offsets, c, "offsets")] * b
        extra: dict[str, Any] = {"mode": "fixed"}
    else:
        gain, offset = (0.1 if gain is None else float(gain)), (0.1 if offset is None else float(offset))
        if not 0 <= gain < 1:
            raise ValueError(f"colour_shift: gain (the largest relative gain change) must be in [0, 1); got {gain}")
        if not 0 <= offset <= 2:
            raise ValueError(f"colour_shift: offset (the largest shift, in [-1, 1] units) must be in [0, 2]; "
                             f"got {offset}")
        u = torch.rand((b, 2, c), generator=generator, dtype=torch.float64, device=_rng_device(generator, images))
        u = (2 * u.cpu() - 1)
        g, o = (1 + gain * u[:, 0]).tolist(), (offset * u[:, 1]).tolist()
        extra = {"mode": "random", "gain": gain, "offset": offset}
    scale = torch.tensor(g, dtype=images.dtype, device=images.device).view(b, c, 1, 1)
    shift = torch.tensor(o, dtype=images.dtype, device=images.device).view(b, c, 1, 1)
    meta = [{"corruption": "colour_shift", **extra, "gains": g[i], "offsets": o[i]} for i in range(b)]
    return (images * scale + shift).clamp(-1, 1), meta


# ----------------------------------------------------------------------------- masks
def _bernoulli_blocks(shape: Sequence[int], keep_prob: float, block: int, generator: torch.Generator | None,
                      device=None) -> torch.Tensor:
    """Float 0/1 tensor of ``shape`` (..., H, W): each ``block`` x ``block`` square of the last two
    axes (cropped at the right and bottom edges) is 1 with probability ``keep_prob``, independently
    for every leading index. Drawn on the generator's device, then moved to ``device``."""
    *lead, h, w = shape
    gh, gw = -(-h // block), -(-w // block)
    rng_device = generator.device if generator is not None else device
    keep = (torch.rand((*lead, gh, gw), generator=generator, device=rng_device) < keep_prob).float().to(device)
    return keep.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :h, :w].contiguous()


def _check_block(block: Any, what: str) -> int:
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"{what}: block must be an integer >= 1 pixels; got {block!r}")
    return int(block)


def random_mask(shape: tuple[int, int, int], keep_prob: float, generator: torch.Generator | None = None,
                block: int = 1, device=None) -> torch.Tensor:
    """(B, 1, H, W) float mask, 1 = observed: each ``block`` x ``block`` square (cropped at the right
    and bottom edges) is kept independently with probability ``keep_prob``. Drawn on the
    generator's device, then moved to ``device``."""
    b, h, w = shape
    return _bernoulli_blocks((b, 1, h, w), keep_prob, block, generator, device)


def _observed(mask: torch.Tensor) -> list[float]:
    return mask.flatten(1).mean(1).tolist()


def pixel_mask(images: torch.Tensor, keep_prob: float, generator: torch.Generator | None = None,
               block: int = 1) -> tuple[torch.Tensor, torch.Tensor, Meta]:
    """Ambient Diffusion's random inpainting: drop pixels (or ``block`` x ``block`` squares) with
    probability ``1 - keep_prob``; dropped pixels become 0 in every channel.

    Returns (masked images, mask (B, 1, H, W) with 1 = observed, metadata with the observed fraction)."""
    _check_images(images, "pixel_mask")
    keep_prob = float(keep_prob)
    if not 0 < keep_prob <= 1:
        raise ValueError(f"pixel_mask: keep_prob must be in (0, 1]; got {keep_prob}")
    block = _check_block(block, "pixel_mask")
    b, _, h, w = images.shape
    mask = random_mask((b, h, w), keep_prob, generator, block, images.device).to(images.dtype)
    meta = [{"corruption": "mask", "keep_prob": keep_prob, "block": block, "observed_fraction": f}
            for f in _observed(mask)]
    return images * mask, mask, meta


def dust(images: torch.Tensor, p: float, generator: torch.Generator | None = None,
         per_element: bool = False) -> tuple[torch.Tensor, torch.Tensor, Meta]:
    """Ambient Diffusion's "dust": every pixel is hidden independently with probability ``p`` (in [0, 1)).

    ``per_element=False``: one mask for all channels, (B, 1, H, W); True: every channel element
    independently, (B, C, H, W). Hidden elements become 0."""
    _check_images(images, "dust")
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) or not 0 <= float(p) < 1:
        raise ValueError(f"dust: p (the probability of hiding a pixel) must be in [0, 1); got {p!r}")
    if not isinstance(per_element, (bool, np.bool_)):
        raise ValueError(f"dust: per_element must be true or false; got {per_element!r}")
    p, per_element = float(p), bool(per_element)
    b, c, h, w = images.shape
    shape = (b, c, h, w) if per_element else (b, 1, h, w)
    mask = _bernoulli_blocks(shape, 1 - p, 1, generator, images.device).to(images.dtype)
    meta = [{"corruption": "dust", "p": p, "per_element": per_element, "observed_fraction": f}
            for f in _observed(mask)]
    return images * mask, mask, meta


def side_pixels(size: int | float, short: int, what: str = "size") -> int:
    """A box side in pixels: an int is pixels (1..short), a float a fraction of the short side in
    (0, 1], rounded and at least 1 px."""
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be an int (pixels) or a float (fraction of the short side); got {size!r}")
    if isinstance(size, (int, np.integer)):
        if not 1 <= size <= short:
            raise ValueError(f"{what} = {size} pixels must be in 1..{short} (the image's short side); "
                             "or give a fraction of the side as a float in (0, 1]")
        return int(size)
    if not 0 < float(size) <= 1:
        raise ValueError(f"{what} = {size}: a float is a fraction of the short side and must be in (0, 1]; "
                         "give pixels as an integer")
    return min(short, max(1, round(float(size) * short)))


def _offset(value: int | float | None, free: int, what: str) -> int:
    """Box offset: None = centred, an int pixels in 0..free, a float in [0, 1] a fraction of the free
    range (0 = at the start, 0.5 = centred, 1 = at the end)."""
    if value is None:
        return free // 2
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be an int (pixels) or a float in [0, 1] (0 = first, 1 = last position); "
                         f"got {value!r}")
    if isinstance(value, (int, np.integer)):
        if not 0 <= value <= free:
            raise ValueError(f"{what} = {value} pixels puts the box outside the image; use 0..{free}, "
                             "or a float in [0, 1]")
        return int(value)
    if not 0 <= float(value) <= 1:
        raise ValueError(f"{what} = {value}: a float is a position in [0, 1] (0 = first, 1 = last); "
                         "give pixels as an integer")
    return round(float(value) * free)


def box_masks(tops: torch.Tensor, lefts: torch.Tensor, size: int, height: int, width: int,
              inside: float = 0.0) -> torch.Tensor:
    """(B, 1, H, W) float masks: ``inside`` within the ``size`` x ``size`` square at (tops[i], lefts[i]),
    ``1 - inside`` elsewhere."""
    rows, cols = torch.arange(height), torch.arange(width)
    in_rows = (rows >= tops[:, None]) & (rows < tops[:, None] + size)
    in_cols = (cols >= lefts[:, None]) & (cols < lefts[:, None] + size)
    square = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return torch.where(square, inside, 1.0 - inside)


def _random_corners(b: int, size: int, h: int, w: int, generator, images) -> tuple[torch.Tensor, torch.Tensor]:
    device = _rng_device(generator, images)
    tops = torch.randint(0, h - size + 1, (b,), generator=generator, device=device).cpu()
    lefts = torch.randint(0, w - size + 1, (b,), generator=generator, device=device).cpu()
    return tops, lefts


def _box_result(images, mask, name, params, tops, lefts):
    mask = mask.to(images.device, images.dtype)
    meta = [{"corruption": name, **params, "top": int(t), "left": int(l), "observed_fraction": f}
            for t, l, f in zip(tops, lefts, _observed(mask))]
    return images * mask, mask, meta


def box(images: torch.Tensor, size: int | float, generator: torch.Generator | None = None
        ) -> tuple[torch.Tensor, torch.Tensor, Meta]:
    """Hide one ``size`` x ``size`` square per image (int: pixels; float: fraction of the short
    side), at a uniformly random position that keeps it inside the image. Mask (B, 1, H, W)."""
    _check_images(images, "box")
    b, _, h, w = images.shape
    side = side_pixels(size, min(h, w), "box: size")
    if side == h == w:
        raise ValueError(f"box: size {size!r} hides the whole {h}x{w} image; give a smaller size")
    tops, lefts = _random_corners(b, side, h, w, generator, images)
    mask = box_masks(tops, lefts, side, h, w, inside=0.0)
    return _box_result(images, mask, "box", {"size": size, "size_px": side}, tops, lefts)


def fixed_box(images: torch.Tensor, size: int | float, top: int | float | None = None,
              left: int | float | None = None) -> tuple[torch.Tensor, torch.Tensor, Meta]:
    """Hide the same ``size`` x ``size`` square in every image (int: pixels; float: fraction of the
    short side). ``top``/``left``: None = centred, an int = pixels, a float in [0, 1] = position in
    the free range (0 = top/left edge, 1 = bottom/right edge). Mask (B, 1, H, W)."""
    _check_images(images, "fixed_box")
    b, _, h, w = images.shape
    side = side_pixels(size, min(h, w), "fixed_box: size")
    if side == h == w:
        raise ValueError(f"fixed_box: size {size!r} hides the whole {h}x{w} image; give a smaller size")
    t, l = _offset(top, h - side, "fixed_box: top"), _offset(left, w - side, "fixed_box: left")
    tops, lefts = torch.full((b,), t), torch.full((b,), l)
    mask = box_masks(tops, lefts, side, h, w, inside=0.0)
    return _box_result(images, mask, "fixed_box", {"size": size, "size_px": side}, tops, lefts)


def keep_patch(images: torch.Tensor, size: int | float, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, Meta]:
    """Observe only one ``size`` x ``size`` square per image (int: pixels; float: fraction of the
    short side) at a uniformly random position inside the image; the rest is hidden. Mask (B, 1, H, W)."""
    _check_images(images, "keep_patch")
    b, _, h, w = images.shape
    side = side_pixels(size, min(h, w), "keep_patch: size")
    tops, lefts = _random_corners(b, side, h, w, generator, images)
    mask = box_masks(tops, lefts, side, h, w, inside=1.0)
    return _box_result(images, mask, "keep_patch", {"size": size, "size_px": side}, tops, lefts)


def further_mask(mask: torch.Tensor, delta: float, generator: torch.Generator | None = None,
                 block: int = 1) -> torch.Tensor:
    """Ambient Diffusion's further corruption: ``Ã = A ⊙ B`` where B keeps each element of ``mask``'s
    shape independently with probability ``1 - delta`` (``block`` > 1: each block x block square of
    the last two axes, e.g. a DiT's patch size, cropped at the edges). A (B, 1, H, W) mask gets one
    B per pixel, a (B, C, H, W) one per element. An element observed in A survives with probability
    ``1 - delta``; Ã <= A. Pure: ``mask`` is not modified."""
    if not isinstance(mask, torch.Tensor) or mask.ndim < 2:
        raise ValueError("further_mask: mask must be a tensor (..., H, W) with 1 = observed; got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float, np.integer, np.floating)) \
            or not 0 <= float(delta) < 1:
        raise ValueError(f"further_mask: delta (the extra drop probability) must be in [0, 1); got {delta!r}")
    block = _check_block(block, "further_mask")
    keep = _bernoulli_blocks(tuple(mask.shape), 1 - float(delta), block, generator, mask.device)
    return mask * keep.to(mask.dtype)


# ----------------------------------------------------------------------------- per-sample generators
def sample_generator(key: str, seed: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``blake2b(f"{seed}:{key}")`` (64 bits, top bit cleared).

    It depends on (seed, key) alone: not on Python's per-process hash salt, the epoch, the order of
    access or the worker, so corrupting a sample with it gives the same mask and noise every time."""
    if not isinstance(key, str):
        raise ValueError(f"sample_generator: key must be a string (a record's 'key'); got {key!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"sample_generator: seed must be an integer; got {seed!r}")
    digest = hashlib.blake2b(f"{int(seed)}:{key}".encode("utf-8"), digest_size=8, person=b"microdiff").digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


# ----------------------------------------------------------------------------- registry
def _blur(images, generator, sigma_px, truncate=4.0):
    return Corrupted(*gaussian_blur(images, sigma_px, truncate))


def _noise(images, generator, sigma):
    return Corrupted(*additive_noise(images, sigma, generator))


def _jpeg(images, generator, quality):
    return Corrupted(*jpeg(images, quality))


def _mask(images, generator, keep_prob, block=1):
    masked, mask, meta = pixel_mask(images, keep_prob, generator, block)
    return Corrupted(masked, meta, mask)


def _dust(images, generator, p, per_element=False):
    masked, mask, meta = dust(images, p, generator, per_element)
    return Corrupted(masked, meta, mask)


def _box(images, generator, size):
    masked, mask, meta = box(images, size, generator)
    return Corrupted(masked, meta, mask)


def _fixed_box(images, generator, size, top=None, left=None):
    masked, mask, meta = fixed_box(images, size, top, left)
    return Corrupted(masked, meta, mask)


def _keep_patch(images, generator, size):
    masked, mask, meta = keep_patch(images, size, generator)
    return Corrupted(masked, meta, mask)


def _downup(images, generator, factor, down="area", up="bilinear"):
    return Corrupted(*downup(images, factor, down, up))


def _colour_shift(images, generator, gain=None, offset=None, gains=None, offsets=None):
    return Corrupted(*colour_shift(images, gain, offset, generator, gains=gains, offsets=offsets))


# name -> (function(images, generator, **params), required params, optional params)
CORRUPTIONS: dict[str, tuple[Callable[..., Corrupted], tuple[str, ...], tuple[str, ...]]] = {
    "blur": (_blur, ("sigma_px",), ("truncate",)),
    "noise": (_noise, ("sigma",), ()),
    "jpeg": (_jpeg, ("quality",), ()),
    "mask": (_mask, ("keep_prob",), ("block",)),
    "dust": (_dust, ("p",), ("per_element",)),
    "box": (_box, ("size",), ()),
    "fixed_box": (_fixed_box, ("size",), ("top", "left")),
    "keep_patch": (_keep_patch, ("size",), ()),
    "downup": (_downup, ("factor",), ("down", "up")),
    "colour_shift": (_colour_shift, (), ("gain", "offset", "gains", "offsets")),
}
# the corruptions that return a pixel mask (Corrupted.mask is not None)
MASK_CORRUPTIONS = frozenset({"mask", "dust", "box", "fixed_box", "keep_patch"})
# the CLI's short form "name:a[:b...]" fills these parameters in order
SHORT_FORM = {"blur": ("sigma_px",), "noise": ("sigma",), "jpeg": ("quality",), "mask": ("keep_prob", "block"),
              "dust": ("p", "per_element"), "box": ("size",), "fixed_box": ("size", "top", "left"),
              "keep_patch": ("size",), "downup": ("factor", "down", "up"), "colour_shift": ("gain", "offset")}
SHORT_EXAMPLES = ("noise:0.2, blur:1.5, jpeg:20, mask:0.5:4, dust:0.3[:true], box:0.25 (or box:16 pixels), "
                  "fixed_box:0.25[:top:left], keep_patch:0.5, downup:4[:area:bicubic], colour_shift[:gain:offset]")


def check_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate a spec's name and parameter names (not their values); returns it unchanged."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"a corruption spec is a dict with a 'name' ({', '.join(CORRUPTIONS)}) and its "
                         f"parameters, e.g. {{'name': 'noise', 'sigma': 0.2}}; got {spec!r}")
    if spec["name"] not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {spec['name']!r}; choose one of {', '.join(CORRUPTIONS)}")
    _, required, optional = CORRUPTIONS[spec["name"]]
    params = set(spec) - {"name"}
    missing, unknown = set(required) - params, params - set(required) - set(optional)
    if missing or unknown:
        raise ValueError(f"corruption {spec['name']!r} takes {', '.join(required + optional)} "
                         f"({', '.join(required) or 'none'} required); missing {sorted(missing)}, "
                         f"unknown {sorted(unknown)}")
    return spec


def apply_corruption(images: torch.Tensor, spec: dict[str, Any],
                     generator: torch.Generator | None = None) -> Corrupted:
    """Run the operator that ``spec`` names, e.g. ``{"name": "mask", "keep_prob": 0.5, "block": 4}``.

    Returns ``Corrupted(images, meta, mask)``; ``mask`` is None except for the names in
    ``MASK_CORRUPTIONS``."""
    check_spec(spec)
    function = CORRUPTIONS[spec["name"]][0]
    return function(images, generator, **{k: v for k, v in spec.items() if k != "name"})


def _parse_value(field: str, value: str) -> Any:
    """Short-form text -> the parameter's type: ints for quality/block, int-or-float for sizes
    (an integer literal is pixels), bools for per_element, words for down/up, floats otherwise."""
    if field in ("down", "up"):
        return value
    if field == "per_element":
        words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if value.lower() not in words:
            raise ValueError(f"{field} must be true or false")
        return words[value.lower()]
    if field in ("quality", "block"):
        return int(value)
    if field in ("size", "top", "left"):
        try:
            return int(value)
        except ValueError:
            return float(value)
    return float(value)


def parse_corruption(text: str) -> dict[str, Any]:
    """``"noise:0.2"``, ``"mask:0.5:4"``, ``"box:0.25"`` (fraction) or ``"box:16"`` (pixels), ... -> a spec
    dict; the fields are ``SHORT_FORM[name]`` in order, the later ones optional."""
    name, *values = text.strip().split(":")
    if name not in SHORT_FORM:
        raise ValueError(f"unknown corruption {name!r} in {text!r}; choose one of {', '.join(SHORT_FORM)} "
                         f"(e.g. {SHORT_EXAMPLES})")
    fields, required = SHORT_FORM[name], CORRUPTIONS[name][1]
    if not len(required) <= len(values) <= len(fields):
        raise ValueError(f"{text!r}: write {name}:" + ":".join(f"<{f}>" for f in fields) + " (later values optional)")
    spec: dict[str, Any] = {"name": name}
    for field, value in zip(fields, values):
        try:
            spec[field] = _parse_value(field, value)
        except ValueError:
            kind = "true or false" if field == "per_element" else "a number"
            raise ValueError(f"{text!r}: {field} must be {kind}; got {value!r}") from None
    return spec


__all__ = ["Corrupted", "gaussian_kernel1d", "gaussian_blur", "additive_noise", "to_uint8", "from_uint8", "jpeg",
           "downup", "colour_shift", "random_mask", "pixel_mask", "dust", "box", "fixed_box", "keep_patch",
           "box_masks", "side_pixels", "further_mask", "sample_generator", "CORRUPTIONS", "MASK_CORRUPTIONS",
           "SHORT_FORM", "check_spec", "apply_corruption", "parse_corruption"]
