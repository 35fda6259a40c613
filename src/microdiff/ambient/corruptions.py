"""Image corruption operators: the "bad data" that Ambient-style training learns from.

Every operator is a pure function on float images in [-1, 1] of shape (B, C, H, W). It returns the
corrupted images and one JSON-serialisable dict per sample saying exactly what was done, e.g.
``{"corruption": "noise", "sigma": 0.2}``. Randomness only comes from an explicit ``torch.Generator``.

    gaussian_blur(images, sigma_px)               separable Gaussian, scipy's "reflect" borders
    additive_noise(images, sigma, generator)      x + sigma * n, NOT clipped (ambient's sigma_tn)
    jpeg(images, quality)                         Pillow JPEG encode/decode round trip
    pixel_mask(images, keep_prob, generator)      random inpainting mask (Ambient Diffusion), 1 = observed
    apply_corruption(images, spec, generator)     the same through a spec like {"name": "noise", "sigma": 0.2}

``parse_corruption("noise:0.2")`` turns the CLI's short form into a spec.
"""

from __future__ import annotations

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


# ----------------------------------------------------------------------------- masks
def random_mask(shape: tuple[int, int, int], keep_prob: float, generator: torch.Generator | None = None,
                block: int = 1, device=None) -> torch.Tensor:
    """(B, 1, H, W) float mask, 1 = observed: each ``block`` x ``block`` square (cropped at the right
    and bottom edges) is kept independently with probability ``keep_prob``. Drawn on the
    generator's device, then moved to ``device``."""
    b, h, w = shape
    gh, gw = -(-h // block), -(-w // block)
    rng_device = generator.device if generator is not None else device
    keep = (torch.rand((b, 1, gh, gw), generator=generator, device=rng_device) < keep_prob).float().to(device)
    return keep.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)[..., :h, :w].contiguous()


def pixel_mask(images: torch.Tensor, keep_prob: float, generator: torch.Generator | None = None,
               block: int = 1) -> tuple[torch.Tensor, torch.Tensor, Meta]:
    """Ambient Diffusion's random inpainting: drop pixels (or ``block`` x ``block`` squares) with
    probability ``1 - keep_prob``; dropped pixels become 0 in every channel.

    Returns (masked images, mask (B, 1, H, W) with 1 = observed, metadata with the observed fraction)."""
    _check_images(images, "pixel_mask")
    keep_prob = float(keep_prob)
    if not 0 < keep_prob <= 1:
        raise ValueError(f"pixel_mask: keep_prob must be in (0, 1]; got {keep_prob}")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"pixel_mask: block must be an integer >= 1 pixels; got {block!r}")
    b, _, h, w = images.shape
    mask = random_mask((b, h, w), keep_prob, generator, int(block), images.device).to(images.dtype)
    meta = [{"corruption": "mask", "keep_prob": keep_prob, "block": int(block),
             "observed_fraction": float(m.mean())} for m in mask]
    return images * mask, mask, meta


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


# name -> (function(images, generator, **params), required params, optional params)
CORRUPTIONS: dict[str, tuple[Callable[..., Corrupted], tuple[str, ...], tuple[str, ...]]] = {
    "blur": (_blur, ("sigma_px",), ("truncate",)),
    "noise": (_noise, ("sigma",), ()),
    "jpeg": (_jpeg, ("quality",), ()),
    "mask": (_mask, ("keep_prob",), ("block",)),
}
# the CLI's short form "name:a[:b]" fills these parameters in order
SHORT_FORM = {"blur": ("sigma_px",), "noise": ("sigma",), "jpeg": ("quality",), "mask": ("keep_prob", "block")}


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
                         f"({', '.join(required)} required); missing {sorted(missing)}, unknown {sorted(unknown)}")
    return spec


def apply_corruption(images: torch.Tensor, spec: dict[str, Any],
                     generator: torch.Generator | None = None) -> Corrupted:
    """Run the operator that ``spec`` names, e.g. ``{"name": "mask", "keep_prob": 0.5, "block": 4}``.

    Returns ``Corrupted(images, meta, mask)``; ``mask`` is None except for "mask"."""
    check_spec(spec)
    function = CORRUPTIONS[spec["name"]][0]
    return function(images, generator, **{k: v for k, v in spec.items() if k != "name"})


def parse_corruption(text: str) -> dict[str, Any]:
    """``"noise:0.2"``, ``"blur:1.5"``, ``"jpeg:20"``, ``"mask:0.5"`` or ``"mask:0.5:4"`` -> a spec dict."""
    name, *values = text.strip().split(":")
    if name not in SHORT_FORM:
        raise ValueError(f"unknown corruption {name!r} in {text!r}; choose one of {', '.join(SHORT_FORM)} "
                         "(e.g. noise:0.2, blur:1.5, jpeg:20, mask:0.5 or mask:0.5:4)")
    fields = SHORT_FORM[name]
    if not 1 <= len(values) <= len(fields):
        raise ValueError(f"{text!r}: write {name}:" + ":".join(f"<{f}>" for f in fields) + " (later values optional)")
    spec: dict[str, Any] = {"name": name}
    for field, value in zip(fields, values):
        try:
            spec[field] = int(value) if field in ("quality", "block") else float(value)
        except ValueError:
            raise ValueError(f"{text!r}: {field} must be a number; got {value!r}") from None
    return spec


__all__ = ["Corrupted", "gaussian_kernel1d", "gaussian_blur", "additive_noise", "to_uint8", "from_uint8", "jpeg",
           "random_mask", "pixel_mask", "CORRUPTIONS", "check_spec", "apply_corruption", "parse_corruption"]
