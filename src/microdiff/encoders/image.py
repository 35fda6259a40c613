"""Pretrained autoencoders behind the :class:`~microdiff.encoders.base.Autoencoder` protocol, and the
identifier registry that rebuilds any of them from one string.

    images in [-1, 1] (B,3,H,W) --encode--> latents (B,C,H/f,W/f), float32, already scaled:
        latents = (z - shift) * scale          z = posterior sample or mean (KL), encoder output (tiny)
    latents --decode--> z = latents / scale + shift --> images in [-1, 1] (clamped unless clamp=False)

``scale`` and ``shift`` come from the diffusers config (``scaling_factor``, ``shift_factor``): SD 1.x
VAEs 0.18215, SDXL 0.13025, SD3/FLUX 16-channel VAEs have a ``shift_factor`` as well. A config with
per-channel ``latents_mean`` and ``latents_std`` (Playground v2.5) gives ``shift = latents_mean`` and
``scale = scaling_factor / latents_std``, as diffusers' SDXL pipeline does. Both can be overridden
by a number or one number per channel.

TAESD (``AutoencoderTiny``): its encoder is trained to output the *scaled* latents of the VAE it
mimics (SD latents times 0.18215), so its config has ``scaling_factor=1.0`` and ``shift_factor=0.0``
and the same formula leaves them as they are. (For TAESD3/TAEF1 the config carries SD3/FLUX's
factors, and the same formula applies them.) Its encoder is deterministic: there is no posterior.

Identifiers (``identifier`` attribute; :func:`load_autoencoder` rebuilds the object from it)::

    identity | identity:4                                   pixels (channel count)
    diffusers-kl:stabilityai/sd-vae-ft-ema                  hub id (must be cached when offline)
    diffusers-kl:/abs/folder?subfolder=vae&scale=0.18215    local folder, pipeline layout, override
    diffusers-tiny:madebyollin/taesd
    microdiff-vae:<folder> | microdiff-vqgan:<folder>       our own trained autoencoders

Local folders are stored as absolute paths; only overridden ``scale``/``shift`` enter the string.
Device, dtype, ``sample`` and batching are run-time options, not part of the identifier.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

import torch
from torch import nn

from ..diffusion.rng import GeneratorSpec, randn
from ..utils.errors import UserError
from ..utils.registry import lookup
from . import autoencoder_io
from .base import Autoencoder, IdentityAutoencoder

Factor = float | Sequence[float]

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
QUERY_KEYS = ("subfolder", "scale", "shift")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``None`` -> float32; a torch float dtype as is; names like ``fp16``, ``bf16``, ``float32``."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"autoencoder dtype must be a float type, got {dtype}")
        return dtype
    return lookup(DTYPES, str(dtype).lower(), "autoencoder dtype")


# ----------------------------------------------------------------------------- wrappers

class DiffusersAutoencoder(nn.Module):
    """Shared machinery of the diffusers wrappers: chunked batches, scaling, checks, identifier.

    ``model`` is a loaded diffusers autoencoder (kept frozen, in eval mode); ``source`` is where it
    came from (hub id or folder) and, with ``subfolder`` and the overrides, makes the identifier.
    ``max_batch`` images (or latents) go through the model at a time; ``enable_tiling`` and
    ``enable_slicing`` switch on diffusers' own tiled / one-image-at-a-time processing for large
    images. ``progress`` shows a tqdm bar over the chunks.
    """

    scheme = ""
    stochastic = False

    def __init__(self, model: nn.Module, *, source: str, subfolder: str | None = None,
                 scale: Factor | None = None, shift: Factor | None = None, sample: bool = False,
                 max_batch: int = 16, clamp: bool = True, enable_tiling: bool = False,
                 enable_slicing: bool = False, progress: bool = False):
        super().__init__()
        if sample and not self.stochastic:
            raise ValueError(f"{type(self).__name__} has a deterministic encoder: sample=True has no "
                             "posterior to sample from; set sample=False")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval().requires_grad_(False)
        self.source, self.subfolder = source, subfolder
        self.sample, self.max_batch, self.clamp, self.progress = sample, max_batch, clamp, progress
        self.latent_channels = int(model.config.latent_channels)
        self.downsample = self._downsample(model.config)
        self._overrides = {"scale": scale, "shift": shift}
        default_scale, default_shift = self._config_factors(model.config)
        self.scale = self._factor(default_scale if scale is None else scale, "scale")
        self.shift = self._factor(default_shift if shift is None else shift, "shift")
        if any(s == 0 or not math.isfinite(s) for s in self.scale):
            raise ValueError(f"{self.scheme}: scale must be finite and non-zero, got {list(self.scale)}")
        if enable_tiling:
            model.enable_tiling()
        if enable_slicing:
            model.enable_slicing()

    # -- what the subclasses say
    @staticmethod
    def _downsample(config) -> int:
        raise NotImplementedError

    @staticmethod
    def _config_factors(config) -> tuple[Factor, Factor]:
        """(scale, shift) from the model config: ``scaling_factor`` and ``shift_factor``."""
        return float(config.scaling_factor), float(config.get("shift_factor", None) or 0.0)

    def _encode_chunk(self, images: torch.Tensor) -> torch.Tensor:
        """Raw latents z of one chunk (or, for a posterior, its moments)."""
        raise NotImplementedError

    def _latents(self, raw: torch.Tensor, generator: GeneratorSpec) -> torch.Tensor:
        return raw

    # -- the protocol
    @property
    def identifier(self) -> str:
        query = [("subfolder", self.subfolder)] + [(k, _format_factor(v)) for k, v in self._overrides.items()
                                                   if v is not None]
        query_str = "&".join(f"{k}={v}" for k, v in query if v)
        return f"{self.scheme}:{self.source}" + (f"?{query_str}" if query_str else "")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: GeneratorSpec = None) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) with H, W multiples of ``downsample`` -> float32 latents
        (B, latent_channels, H/f, W/f) on the model's device. ``generator`` (one, or one per image)
        drives posterior sampling when ``sample=True``; the result does not depend on ``max_batch``."""
        _check_images(images, self.downsample, int(self.model.config.in_channels))
        images = images.to(device=self.device, dtype=self.dtype)
        raw = torch.cat([self._encode_chunk(chunk) for chunk in self._chunks(images, "encode")])
        z = self._latents(raw, generator).float()
        return (z - self._as_tensor(self.shift, z)) * self._as_tensor(self.scale, z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, latent_channels, h, w) -> float32 images (B, 3, h*f, w*f) in [-1, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"{self.identifier}: decode expects latents (B, {self.latent_channels}, h, w), "
                             f"got shape {tuple(latents.shape)}")
        z = latents.to(self.device).float()
        z = (z / self._as_tensor(self.scale, z) + self._as_tensor(self.shift, z)).to(self.dtype)
        images = torch.cat([self.model.decode(chunk).sample for chunk in self._chunks(z, "decode")]).float()
        return images.clamp(-1, 1) if self.clamp else images

    def extra_repr(self) -> str:
        return (f"identifier={self.identifier!r}, latent_channels={self.latent_channels}, "
                f"downsample={self.downsample}, sample={self.sample}")

    # -- helpers
    def _chunks(self, x: torch.Tensor, what: str):
        from tqdm.auto import tqdm

        chunks = x.split(self.max_batch)
        return tqdm(chunks, desc=f"{self.scheme} {what}", unit="batch",
                    disable=not self.progress or len(chunks) == 1)

    def _factor(self, value: Factor, name: str) -> tuple[float, ...]:
        values = (float(value),) if isinstance(value, (int, float)) else tuple(float(v) for v in value)
        if len(values) not in (1, self.latent_channels):
            raise ValueError(f"{self.scheme}:{self.source}: {name} needs 1 or {self.latent_channels} values "
                             f"(one per latent channel), got {len(values)}")
        return values

    @staticmethod
    def _as_tensor(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)


class DiffusersAutoencoderKL(DiffusersAutoencoder):
    """diffusers ``AutoencoderKL`` (SD 1.x/2.x, SDXL, SD3, FLUX VAEs and fine-tunes).

    ``sample=False`` encodes to the posterior mean (``latent_dist.mode()``); ``sample=True`` draws
    ``mean + std * n`` as micro_diffusion does when it encodes on the fly, with ``n`` from the
    ``generator`` passed to :meth:`encode` (the global RNG when it is None). ``downsample`` is
    ``2 ** (len(block_out_channels) - 1)``.
    """

    scheme = "diffusers-kl"
    stochastic = True

    @staticmethod
    def _downsample(config) -> int:
        return 2 ** (len(config.block_out_channels) - 1)

    @staticmethod
    def _config_factors(config) -> tuple[Factor, Factor]:
        scale, shift = DiffusersAutoencoder._config_factors(config)
        mean, std = config.get("latents_mean", None), config.get("latents_std", None)
        if mean is not None and std is not None:  # per-channel statistics (Playground v2.5 style)
            return [scale / float(s) for s in std], [float(m) for m in mean]
        return scale, shift

    def _encode_chunk(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images).latent_dist.parameters  # moments: mean and logvar

    def _latents(self, raw: torch.Tensor, generator: GeneratorSpec) -> torch.Tensor:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = DiagonalGaussianDistribution(raw)
        if not self.sample:
            return posterior.mode()
        noise = randn(posterior.mean.shape, generator, device=raw.device, dtype=raw.dtype)
        return posterior.mean + posterior.std * noise


class DiffusersAutoencoderTiny(DiffusersAutoencoder):
    """diffusers ``AutoencoderTiny`` (TAESD, TAESDXL, TAESD3, TAEF1): a deterministic distilled
    encoder/decoder. Its latents already live in the scaled space of the VAE it distils (config
    ``scaling_factor=1.0``, ``shift_factor=0.0`` for TAESD/TAESDXL), so they stand in for that VAE's
    latents; the config factors (or overrides) are applied with the same formula as for KL VAEs.
    ``downsample`` is ``2 ** (len(encoder_block_out_channels) - 1)``.
    """

    scheme = "diffusers-tiny"

    @staticmethod
    def _downsample(config) -> int:
        down = 2 ** (len(config.encoder_block_out_channels) - 1)
        up = int(config.upsampling_scaling_factor) ** (len(config.decoder_block_out_channels) - 1)
        if up != down:
            raise ValueError(f"AutoencoderTiny config downsamples by {down} but upsamples by {up}; "
                             "the decoder would not give back the image size")
        return down

    def _encode_chunk(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images).latents


def _check_images(images: torch.Tensor, downsample: int, channels: int) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != channels:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"encode expects images (B, {channels}, H, W) in [-1, 1], got {shape}")
    h, w = images.shape[-2:]
    if h % downsample or w % downsample:
        raise ValueError(f"image size {h}x{w} is not a multiple of the autoencoder's downsample factor "
                         f"{downsample}; resize or crop to a multiple of {downsample}")
    if images.numel() and (images.amin() < -1.001 or images.amax() > 1.001):
        raise ValueError(f"encode expects images in [-1, 1], got values in [{images.amin().item():.3g}, "
                         f"{images.amax().item():.3g}]; map [0, 1] images with x * 2 - 1")


def _format_factor(value: Factor) -> str:
    if isinstance(value, (int, float)):
        return repr(float(value))
    return ",".join(repr(float(v)) for v in value)


# ----------------------------------------------------------------------------- loading

def _looks_like_path(source: str) -> bool:
    return (source.startswith(("/", "./", "../", "~", ".\\")) or "\\" in source
            or source.count("/") > 1 or (len(source) > 1 and source[1] == ":"))


def _load_diffusers(cls_name: str, scheme: str, source: str, subfolder: str | None,
                    dtype: torch.dtype) -> tuple[nn.Module, str]:
    """Load diffusers class ``cls_name`` from a local folder or a hub id; returns (model, source),
    where a local source is made absolute. Strict: weights that miss some of the model's tensors or
    hold them in other shapes are refused (diffusers would initialise those at random with a warning)."""
    import diffusers

    cls = getattr(diffusers, cls_name)
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "subfolder": subfolder, "output_loading_info": True}
    if importlib.util.find_spec("accelerate") is None:
        kwargs["low_cpu_mem_usage"] = False  # otherwise diffusers warns on every load
    folder = Path(source).expanduser()
    if folder.exists() or _looks_like_path(source):
        folder = folder.resolve()
        _check_folder(folder, subfolder, cls_name, scheme)
        where = folder / subfolder if subfolder else folder
        try:
            model, info = _quiet_diffusers(cls.from_pretrained, str(folder), **kwargs)
        except Exception as err:  # noqa: BLE001 - OSError, ValueError, a damaged file's SafetensorError
            if not isinstance(err, (OSError, ValueError)) and "safetensors" not in type(err).__module__:
                raise
            raise ValueError(f"{where}: cannot load a diffusers {cls_name}: {_first_line(err)}") from None
        return _strict(model, info, f"{scheme}:{where}"), folder.as_posix()
    try:
        with warnings.catch_warnings():  # diffusers passes an argument huggingface_hub deprecated
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            model, info = _quiet_diffusers(cls.from_pretrained, source, **kwargs)
            return _strict(model, info, f"{scheme}:{source}"), source
    except OSError as err:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise OSError(f"{scheme}:{source}: {source!r} is not a local folder and not in the local "
                          "Hugging Face cache, and the hub is off (HF_HUB_OFFLINE=1 / no internet); "
                          f"download it once with internet (`hf download {source}`) or pass a local "
                          "folder") from None
        raise OSError(f"{scheme}:{source}: could not load {source!r} from the Hugging Face hub "
                      f"({_first_line(err)}); check the id and your connection, or pass a local folder") from None


def _quiet_diffusers(load: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``load(...)`` with diffusers' own missing-weights warnings silenced (``_strict`` reports them)."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return load(*args, **kwargs)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _strict(model: nn.Module, info: dict[str, Any], where: str) -> nn.Module:
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [k if isinstance(k, str) else k[0] for k in (info.get("mismatched_keys") or [])]
    unexpected = sorted(info.get("unexpected_keys") or [])
    if missing or mismatched or unexpected:
        problem = ", ".join(p for p in (
            f"{len(missing)} missing (first: {missing[0]})" if missing else "",
            f"{len(mismatched)} of another shape (first: {mismatched[0]})" if mismatched else "",
            f"{len(unexpected)} unexpected (first: {unexpected[0]})" if unexpected else "") if p)
        raise ValueError(f"{where}: the weights do not fit the autoencoder its config.json describes ({problem}); "
                         "diffusers would initialise them at random: download or save the model again")
    return model


def _check_folder(folder: Path, subfolder: str | None, cls_name: str, scheme: str) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{scheme}: autoencoder folder {folder} does not exist (or is not a folder); "
                                "pass a folder saved with save_pretrained or a hub id")
    where = folder / subfolder if subfolder else folder
    config = where / "config.json"
    if not config.is_file():
        hint = (" it looks like a pipeline folder: add ?subfolder=vae"
                if subfolder is None and (folder / "model_index.json").is_file() else
                f" expected a diffusers {cls_name} saved with save_pretrained"
                + ("" if subfolder else " (for a full pipeline add ?subfolder=vae)"))
        raise FileNotFoundError(f"{config} not found;{hint}")
    try:
        found = json.loads(config.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config}: not valid JSON ({err}); re-save the model with save_pretrained") from None
    if found is not None and found != cls_name:
        other = {v: k for k, v in DIFFUSERS_CLASSES.items()}.get(found)
        hint = f"use {other}:{folder}" if other else "this scheme loads only " + cls_name
        raise ValueError(f"{config} is for {found}, not {cls_name}; {hint}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _parse_query(identifier: str, rest: str) -> tuple[str, dict[str, str]]:
    source, sep, query = rest.rpartition("?") if "?" in rest else (rest, "", "")
    params: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in QUERY_KEYS:
            raise ValueError(f"{identifier!r}: unknown option {key!r}; options are {', '.join(QUERY_KEYS)}")
        if key in params:
            raise ValueError(f"{identifier!r}: option {key!r} given twice")
        params[key] = value
    if not source:
        raise ValueError(f"{identifier!r} names no model; write e.g. {identifier.split(':')[0]}:<hub id or folder>")
    return source, params


def _parse_factor(identifier: str, key: str, value: str | None) -> Factor | None:
    if value is None:
        return None
    try:
        values = [float(v) for v in value.split(",")]
    except ValueError:
        raise ValueError(f"{identifier!r}: {key}={value!r} is not a number or a comma-separated list "
                         "of numbers") from None
    return values[0] if len(values) == 1 else values


DIFFUSERS_CLASSES = {"diffusers-kl": "AutoencoderKL", "diffusers-tiny": "AutoencoderTiny"}
WRAPPERS = {"diffusers-kl": DiffusersAutoencoderKL, "diffusers-tiny": DiffusersAutoencoderTiny}


def _load_identity(identifier: str, rest: str, device, dtype, sample: bool, **options) -> Autoencoder:
    if sample:
        raise ValueError("identity autoencoder has no posterior: sample=True has no meaning; set sample=False")
    if options:
        raise ValueError(f"identity autoencoder takes no options, got {', '.join(options)}")
    if rest and (not rest.isdigit() or int(rest) == 0):
        raise ValueError(f"{identifier!r}: write identity or identity:<channels>, e.g. identity:4")
    channels = int(rest) if rest else 3
    ae = IdentityAutoencoder(channels)
    if rest:
        ae.identifier = f"identity:{channels}"  # the class attribute says "identity" (3 channels)
    return ae


def _load_diffusers_scheme(identifier: str, rest: str, device, dtype, sample: bool, *, scheme: str,
                           **options) -> Autoencoder:
    source, params = _parse_query(identifier, rest)
    model, source = _load_diffusers(DIFFUSERS_CLASSES[scheme], scheme, source, params.get("subfolder") or None,
                                    resolve_dtype(dtype))
    return WRAPPERS[scheme](model.to(device), source=source, subfolder=params.get("subfolder") or None,
                            scale=_parse_factor(identifier, "scale", params.get("scale")),
                            shift=_parse_factor(identifier, "shift", params.get("shift")),
                            sample=sample, **options)


def _load_trained(identifier: str, rest: str, device, dtype, sample: bool, *, scheme: str,
                  **options) -> Autoencoder:
    folder = Path(rest).expanduser()
    if not rest or not folder.is_dir():
        raise FileNotFoundError(f"{identifier!r}: folder {rest!r} does not exist; pass the folder your "
                                f"{scheme.split('-')[1].upper()} training saved")
    kind = autoencoder_io.read_autoencoder_config(folder)["kind"]
    if f"microdiff-{kind}" != scheme:
        raise UserError(f"{identifier!r}: the folder holds a {kind} autoencoder, not a {scheme.split('-')[1]}; "
                        f"write microdiff-{kind}:{rest}")
    kwargs = {"sample": True} if sample else {}
    ae = autoencoder_io.load_trained_autoencoder(folder.resolve(), **kwargs, **options)
    if isinstance(ae, nn.Module):
        ae = ae.to(device=device, dtype=None if dtype is None else resolve_dtype(dtype))
    return ae


SCHEMES: dict[str, Callable[..., Autoencoder]] = {
    "identity": _load_identity,
    "diffusers-kl": partial(_load_diffusers_scheme, scheme="diffusers-kl"),
    "diffusers-tiny": partial(_load_diffusers_scheme, scheme="diffusers-tiny"),
    "microdiff-vae": partial(_load_trained, scheme="microdiff-vae"),
    "microdiff-vqgan": partial(_load_trained, scheme="microdiff-vqgan"),
}


# Latent channels and downsampling of hub autoencoders, known without a download (convert checks a
# DiT against them before it writes a pipeline); anything else is read from its config.json.
KNOWN_GEOMETRY: dict[str, tuple[int, int]] = {
    **dict.fromkeys(["stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/sdxl-vae",
                     "madebyollin/sdxl-vae-fp16-fix", "stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse",
                     "CompVis/stable-diffusion-v1-4", "runwayml/stable-diffusion-v1-5",
                     "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-2-1",
                     "playgroundai/playground-v2.5-1024px-aesthetic", "madebyollin/taesd", "madebyollin/taesdxl"],
                    (4, 8)),
    **dict.fromkeys(["stabilityai/stable-diffusion-3-medium-diffusers", "stabilityai/stable-diffusion-3.5-large",
                     "stabilityai/stable-diffusion-3.5-medium", "black-forest-labs/FLUX.1-dev",
                     "black-forest-labs/FLUX.1-schnell", "madebyollin/taesd3", "madebyollin/taef1"], (16, 8)),
}


def autoencoder_geometry(identifier: str) -> tuple[int, int] | None:
    """(latent channels, downsampling factor) of the autoencoder an identifier names, found without a
    download or reading weights: from the identifier (identity), a local folder's config.json, the
    Hugging Face cache or ``KNOWN_GEOMETRY``; None when none of them knows."""
    scheme, _, rest = str(identifier).strip().partition(":")
    if scheme == "identity":
        return (int(rest), 1) if rest.isdigit() and int(rest) > 0 else (3, 1) if not rest else None
    if scheme in ("microdiff-vae", "microdiff-vqgan"):
        folder = Path(rest).expanduser()
        if not folder.is_dir():
            return None
        _, channels, factor = autoencoder_io.saved_geometry(folder)
        return channels, factor
    if scheme not in DIFFUSERS_CLASSES:
        return None
    try:
        source, params = _parse_query(identifier, rest)
    except ValueError:
        return None
    subfolder = params.get("subfolder") or None
    config = _local_or_cached_config(source, subfolder)
    if config is None:
        return KNOWN_GEOMETRY.get(source)
    try:
        blocks = config["block_out_channels" if scheme == "diffusers-kl" else "encoder_block_out_channels"]
        return int(config["latent_channels"]), 2 ** (len(blocks) - 1)
    except (KeyError, TypeError, ValueError):
        return None


def _local_or_cached_config(source: str, subfolder: str | None) -> dict | None:
    """config.json of a local model folder or of a hub id already in the Hugging Face cache (no download)."""
    folder = Path(source).expanduser()
    path: Any = None
    if folder.is_dir():
        path = folder / subfolder / "config.json" if subfolder else folder / "config.json"
    elif not _looks_like_path(source):
        try:
            from huggingface_hub import try_to_load_from_cache

            path = try_to_load_from_cache(source, "config.json", subfolder=subfolder)
        except Exception:  # noqa: BLE001 - a malformed id or cache: nothing known
            path = None
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        return None
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def check_autoencoder_identifier(identifier: str) -> None:
    """Refuse, in one line, an identifier that can never load, without loading or downloading anything:
    an unknown scheme or option, a scale/shift that is not a non-zero number, a local folder that does
    not exist (or, for our own autoencoders, holds the other kind)."""
    scheme, _, rest = str(identifier).strip().partition(":")
    if scheme not in SCHEMES:
        raise ValueError(f"{identifier!r}: unknown autoencoder scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "identity":
        _load_identity(identifier, rest, "cpu", None, False)
        return
    if scheme in ("microdiff-vae", "microdiff-vqgan"):
        folder = Path(rest).expanduser()
        if not rest or not folder.is_dir():
            raise FileNotFoundError(f"{identifier!r}: folder {rest!r} does not exist; pass the folder your "
                                    f"{scheme.split('-')[1].upper()} training saved")
        kind = autoencoder_io.read_autoencoder_config(folder)["kind"]
        if f"microdiff-{kind}" != scheme:
            raise UserError(f"{identifier!r}: the folder holds a {kind} autoencoder, not a {scheme.split('-')[1]}; "
                            f"write microdiff-{kind}:{rest}")
        return
    source, params = _parse_query(identifier, rest)
    for key in ("scale", "shift"):
        values = _parse_factor(identifier, key, params.get(key))
        values = [] if values is None else [values] if isinstance(values, float) else values
        if any(not math.isfinite(v) for v in values) or (key == "scale" and 0 in values):
            rule = "finite and non-zero" if key == "scale" else "finite"
            raise ValueError(f"{identifier!r}: {key}={params[key]} must be {rule}")
    folder = Path(source).expanduser()
    if _looks_like_path(source) and not folder.is_dir():
        raise FileNotFoundError(f"{identifier!r}: the folder {source} does not exist; pass a folder saved with "
                                "save_pretrained or a hub id")


def load_autoencoder(identifier: str, device: str | torch.device = "cpu",
                     dtype: torch.dtype | str | None = None, sample: bool = False, **options) -> Autoencoder:
    """Build the autoencoder an identifier names (see the module docstring for the schemes).

    ``dtype`` (None = float32; ``"fp16"``, ``"bf16"``, a torch dtype) is the weights' dtype;
    latents and decoded images come back as float32. ``sample`` chooses posterior sampling over the
    mean for KL VAEs. ``options`` go to the wrapper: ``max_batch``, ``clamp``, ``enable_tiling``,
    ``enable_slicing``, ``progress``.
    """
    if not isinstance(identifier, str) or not identifier.strip():
        raise ValueError(f"autoencoder identifier must be a non-empty string like 'identity' or "
                         f"'diffusers-kl:stabilityai/sd-vae-ft-ema', got {identifier!r}")
    scheme, _, rest = identifier.strip().partition(":")
    if scheme not in SCHEMES:
        raise ValueError(f"{identifier!r}: unknown autoencoder scheme {scheme!r}; choose one of "
                         f"{', '.join(SCHEMES)} (e.g. diffusers-kl:stabilityai/sd-vae-ft-ema)")
    loader = SCHEMES[scheme]
    return loader(identifier, rest, device, dtype, sample, **options)


__all__ = ["DiffusersAutoencoder", "DiffusersAutoencoderKL", "DiffusersAutoencoderTiny", "load_autoencoder",
           "autoencoder_geometry", "check_autoencoder_identifier", "KNOWN_GEOMETRY",
           "resolve_dtype", "SCHEMES", "DTYPES"]
