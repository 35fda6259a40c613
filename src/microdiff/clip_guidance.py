"""CLIP guidance: steer any sampler towards text or image prompts with a CLIP model's gradient.

v-diffusion's ``clip_sample.py`` and k-diffusion's ``make_cond_model_fn``, as a denoiser wrapper:

    x0_hat = D(x, sigma)                                       (the wrapped denoiser, differentiated)
    images = (decode(x0_hat) + 1) / 2                          (latents -> pixels in [0, 1])
    loss_b = sum_i w_i * mean_over_cutouts d(CLIP(cutout(images_b)), target_i)
    D_clip(x, sigma) = x0_hat - scale * sigma^2 * d(sum_b loss_b)/dx

d is the squared great-circle distance between unit vectors, ``spherical_distance``. Moving x0_hat
by -scale * sigma^2 * grad is the same as adding -scale * grad to the score (x0_hat - x)/sigma^2: the
sampler follows the model's score plus the gradient of -scale * loss. Each image's loss depends only
on that image, so the correction does not depend on the batch size; with one cutout generator per
image (``per_sample_generators``) the cutouts do not either.

    clip = load_clip("openai/clip-vit-base-patch16")
    targets = text_targets(clip, [("a watercolour fox", 1.0)]) + image_targets(clip, [("fox.png", 0.5)])
    guided = ClipGuidedDenoiser(denoiser, differentiable_decode(autoencoder), clip, targets, scale=500.0)
    x = sample_heun(guided, noise * sigmas[0], sigmas)

Gradients and ``torch.inference_mode``: the wrapper runs its forward under
``torch.inference_mode(False)`` and ``torch.enable_grad()`` on clones of x, sigma and the tensor
keyword arguments, so samplers (``@torch.no_grad``) and callers inside ``torch.inference_mode`` both
work. A tensor made under ``torch.inference_mode`` and *held inside* the wrapped denoiser cannot be
cloned from outside: a new tensor computed from it is fine (``GuidedDenoiser`` concatenates its
branches' conditions, so ``Pipeline.generate`` under inference_mode works), but if autograd has to
save the held tensor itself it refuses, and the wrapper raises a one-line RuntimeError that says to
make it under ``torch.no_grad()`` instead.

The cost per step is one forward *and backward* of the wrapped denoiser (all its CFG branches),
the decoder and ``cutn`` CLIP image forwards per image.
"""

from __future__ import annotations

import argparse
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .diffusion.denoiser import append_dims
from .diffusion.rng import GeneratorSpec
from .encoders.text import hf_load_weights
from .prompts import parse_weighted  # noqa: F401 - image prompts share the text prompts' PATH[:WEIGHT] grammar
from .utils.checks import finite, whole
from .utils.errors import UserError

# OpenAI CLIP's normalisation: used only when a model folder has no preprocessor_config.json.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INFERENCE_TENSOR_ERROR = "Inference tensors cannot be saved for backward"

Target = tuple[torch.Tensor, float]


# ----------------------------------------------------------------------------- math

def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance between the directions of ``a`` and ``b`` (last dim), halved:
    2 * arcsin(|a' - b'| / 2)^2 with a', b' the unit vectors. For an angle theta between them,
    |a' - b'| = 2 sin(theta / 2), so this is theta^2 / 2 (0 for equal directions, pi^2/2 opposite).
    Broadcasts over leading dims; differentiable (v-diffusion's ``spherical_dist_loss``)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    half_chord = ((a - b).norm(dim=-1) / 2).clamp(max=1.0)  # round-off can push it past 1 at theta = pi
    return 2 * half_chord.arcsin() ** 2


# ----------------------------------------------------------------------------- cutouts

class MakeCutouts:
    """``cutn`` random square crops of images, each resized to ``cut_size`` x ``cut_size``.

    A crop's side is ``u ** cut_pow * (max_size - min_size) + min_size`` with u ~ U[0, 1),
    max_size the image's shorter side and min_size = min(H, W, cut_size) (v-diffusion's choice:
    ``cut_pow > 1`` favours small crops); its corner is uniform over the valid positions.
    Crops shrink by adaptive average pooling (an area filter) and grow by bicubic interpolation.

    ``generator`` (a call argument): None (torch's global RNG) or one ``torch.Generator``: the same
    crops for every image of the batch; a sequence of generators, one per image: each image gets its
    own crops, so they do not depend on the batch. Output is cut-major: (cutn * B, C, s, s), row
    ``c * B + b`` is cut c of image b.
    """

    def __init__(self, cut_size: int, cutn: int, cut_pow: float = 1.0):
        if cut_size < 1 or cutn < 1:
            raise ValueError(f"cut_size and cutn must be >= 1, got cut_size={cut_size}, cutn={cutn}")
        if not cut_pow > 0:
            raise ValueError(f"cut_pow must be positive, got {cut_pow}")
        self.cut_size, self.cutn, self.cut_pow = int(cut_size), int(cutn), float(cut_pow)

    def boxes(self, height: int, width: int, generator: torch.Generator | None = None) -> list[tuple[int, int, int]]:
        """``cutn`` crops as (top, left, size), drawn from ``generator``."""
        max_size = min(height, width)
        min_size = min(height, width, self.cut_size)
        device = generator.device if generator is not None else "cpu"
        out = []
        for _ in range(self.cutn):
            u = float(torch.rand((), generator=generator, device=device))
            size = int(u**self.cut_pow * (max_size - min_size) + min_size)
            top = int(torch.randint(0, height - size + 1, (), generator=generator, device=device))
            left = int(torch.randint(0, width - size + 1, (), generator=generator, device=device))
            out.append((top, left, size))
        return out

    def resize(self, crop: torch.Tensor) -> torch.Tensor:
        if crop.shape[-1] >= self.cut_size:
            return F.adaptive_avg_pool2d(crop, self.cut_size)
        return F.interpolate(crop, size=(self.cut_size, self.cut_size), mode="bicubic", align_corners=False)

    def __call__(self, images: torch.Tensor, generator: GeneratorSpec = None) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"MakeCutouts expects images of shape (B, C, H, W), got {tuple(images.shape)}")
        batch, _, height, width = images.shape
        if generator is None or isinstance(generator, torch.Generator):
            cuts = [self.resize(images[:, :, t:t + s, l:l + s]) for t, l, s in self.boxes(height, width, generator)]
            return torch.cat(cuts)
        generators = list(generator)
        if len(generators) != batch:
            raise ValueError(f"got {len(generators)} cutout generators for a batch of {batch}; "
                             "pass one generator per image or a single generator")
        per_image = [self.boxes(height, width, g) for g in generators]
        cuts = [self.resize(images[b:b + 1, :, t:t + s, l:l + s])
                for c in range(self.cutn) for b, (t, l, s) in ((b, per_image[b][c]) for b in range(batch))]
        return torch.cat(cuts)


# ----------------------------------------------------------------------------- CLIP

class ClipEmbedder:
    """A frozen ``transformers`` CLIP model: unit-norm text and image embeddings in one space.

    ``embed_images`` is differentiable w.r.t. its input (B, 3, H, W) in [0, 1]: a non-square image is
    centre-cropped to a square, resized to ``image_size`` with antialiased bicubic interpolation,
    normalised with the model's processor mean/std. Embeddings come back in float32 (float64 for a
    float64 model).
    """

    def __init__(self, model, tokenizer, mean: Sequence[float], std: Sequence[float], identifier: str):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.identifier = identifier
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.dim = int(model.config.projection_dim)
        self.mean = torch.tensor([float(v) for v in mean], dtype=torch.float64)
        self.std = torch.tensor([float(v) for v in std], dtype=torch.float64)
        if self.mean.shape != (3,) or self.std.shape != (3,) or not bool((self.std > 0).all()):
            raise ValueError(f"{identifier}: image_mean/image_std must be 3 values (std > 0), "
                             f"got {list(mean)} / {list(std)}")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _out(self, features: torch.Tensor) -> torch.Tensor:
        features = features.to(torch.promote_types(features.dtype, torch.float32))
        return F.normalize(features, dim=-1)

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit vectors, one per text; texts longer than the model's context are truncated
        (with a warning)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("embed_text needs at least one text")
        tok = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        full = self.tokenizer(texts, truncation=False)["input_ids"]
        long = [t for t, ids in zip(texts, full) if len(ids) > self.max_length]
        if long:
            warnings.warn(f"{self.identifier}: {len(long)} prompt(s) longer than {self.max_length} tokens are "
                          f"truncated, e.g. {long[0][:60]!r}", stacklevel=2)
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        pooled = self.model.text_model(input_ids=ids, attention_mask=mask).pooler_output
        return self._out(self.model.text_projection(pooled))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the vision tower's normalised (B, 3, S, S) input, differentiably."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.identifier}: expected images of shape (B, 3, H, W) in [0, 1], "
                             f"got {tuple(images.shape)}")
        images = images.to(device=self.device, dtype=self.dtype)
        height, width = images.shape[-2:]
        if height != width:
            side = min(height, width)
            top, left = (height - side) // 2, (width - side) // 2
            images = images[:, :, top:top + side, left:left + side]
        if images.shape[-1] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False, antialias=True)
        mean, std = (v.to(images).view(1, 3, 1, 1) for v in (self.mean, self.std))
        return (images - mean) / std

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) unit vectors for images (B, 3, H, W) in [0, 1]; differentiable w.r.t. ``images``."""
        pooled = self.model.vision_model(pixel_values=self.preprocess(images)).pooler_output
        return self._out(self.model.visual_projection(pooled))

    def __repr__(self) -> str:
        return f"ClipEmbedder({self.identifier!r}, image_size={self.image_size}, dim={self.dim})"


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1 or os.sep in source.replace("/", "")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_clip(identifier_or_folder: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> ClipEmbedder:
    """A CLIP model (both towers) from a local ``save_pretrained`` folder or a Hugging Face hub id
    (looked up in the local cache when offline): model, tokenizer and the processor's mean/std."""
    try:
        import transformers
        from transformers.image_processing_base import ImageProcessingMixin
    except ImportError as err:  # pragma: no cover - transformers is a core dependency
        raise ImportError("CLIP guidance needs transformers: pip install transformers") from err

    source = os.path.expanduser(str(identifier_or_folder))
    is_dir = os.path.isdir(source)
    if not is_dir and (_looks_like_path(source) or os.path.exists(source)):
        raise FileNotFoundError(f"{identifier_or_folder}: no such CLIP model folder (pass a folder written by "
                                "CLIPModel.save_pretrained with its tokenizer, or a hub id like owner/name)")
    if is_dir and not os.path.isfile(os.path.join(source, "config.json")):
        raise FileNotFoundError(f"{identifier_or_folder}: no config.json in this folder; a CLIP model folder holds "
                                "the config, weights and tokenizer files that save_pretrained writes")
    try:
        config = transformers.AutoConfig.from_pretrained(source)
        if config.model_type != "clip":
            raise ValueError(f"{identifier_or_folder}: a {config.model_type!r} model, not a CLIP model with text and "
                             "vision towers (CLIPModel)")
        # strict: weights missing from the folder would be initialised at random by transformers
        model = hf_load_weights(transformers.CLIPModel.from_pretrained, source, str(identifier_or_folder),
                                dtype=dtype or torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except OSError as err:
        if is_dir:
            raise FileNotFoundError(f"{identifier_or_folder}: cannot load a CLIP model from this folder "
                                    f"({_first_line(err)}); it needs config.json, the weights and the tokenizer "
                                    "files that save_pretrained writes") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
        why = "HF_HUB_OFFLINE is set" if offline else "or there is no internet"
        raise OSError(f"{identifier_or_folder}: this CLIP model is not in the local Hugging Face cache ({why}); "
                      f"download it where there is internet (hf download {identifier_or_folder} --local-dir "
                      "<folder>) and pass the local folder") from None
    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(source)
        mean, std = processor["image_mean"], processor["image_std"]
    except (OSError, KeyError):
        warnings.warn(f"{identifier_or_folder}: no preprocessor_config.json with image_mean/image_std; "
                      "using OpenAI CLIP's normalisation", stacklevel=2)
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    model = model.to(device=device)
    return ClipEmbedder(model, tokenizer, mean, std, identifier=str(identifier_or_folder))


# ----------------------------------------------------------------------------- targets

def text_targets(clip: ClipEmbedder, prompts: Sequence[tuple[str, float]]) -> list[Target]:
    """[(text, weight), ...] -> [(unit embedding (D,), weight), ...]."""
    prompts = list(prompts)
    if not prompts:
        return []
    embeds = clip.embed_text([text for text, _ in prompts])
    return [(e, float(w)) for e, (_, w) in zip(embeds, prompts)]


def _load_image(image: Any) -> "Any":
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file for an image prompt")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: cannot read this image prompt ({_first_line(err)})") from None


def image_targets(clip: ClipEmbedder, images: Sequence[tuple[Any, float]]) -> list[Target]:
    """[(PIL image or path, weight), ...] -> [(unit embedding (D,), weight), ...]: image prompts
    (v-diffusion's ``--images path:weight``), embedded whole (centre square, resized)."""
    import numpy as np

    out = []
    for image, weight in images:
        array = np.asarray(_load_image(image), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)[None]
        with torch.no_grad():
            out.append((clip.embed_images(tensor)[0], float(weight)))
    return out


# ----------------------------------------------------------------------------- decoding

def differentiable_decode(autoencoder) -> Callable[[torch.Tensor], torch.Tensor]:
    """latents -> images in [-1, 1] with gradients, for a microdiff autoencoder.

    The protocol's ``decode`` of the diffusers wrappers runs under ``torch.no_grad`` and clamps,
    which would give CLIP guidance no gradient. Identity: the latents themselves. Our own KL/VQ
    autoencoders: ``decode_raw(unscale_latents(z))`` (VQ without snapping to the codebook).
    diffusers wrappers: the wrapped model's decoder on ``z / scale + shift``. Anything else:
    its ``decode``, which must be differentiable (checked at the first guided step). Not clamped:
    clamping would zero the gradient of out-of-range pixels.
    """
    if getattr(autoencoder, "identifier", "").startswith("identity"):
        return lambda z: z
    if hasattr(autoencoder, "decode_raw") and hasattr(autoencoder, "unscale_latents"):
        def decode_own(z: torch.Tensor) -> torch.Tensor:
            param = next(autoencoder.parameters())
            return autoencoder.decode_raw(autoencoder.unscale_latents(z.to(device=param.device, dtype=param.dtype)))
        return decode_own
    inner = getattr(autoencoder, "model", None)
    if inner is not None and hasattr(autoencoder, "scale") and hasattr(autoencoder, "shift"):
        def decode(z: torch.Tensor) -> torch.Tensor:
            param = next(inner.parameters())
            z = z.to(device=param.device, dtype=torch.float32)
            scale = torch.tensor(autoencoder.scale, device=z.device).view(1, -1, 1, 1)
            shift = torch.tensor(autoencoder.shift, device=z.device).view(1, -1, 1, 1)
            return inner.decode((z / scale + shift).to(param.dtype)).sample.float()
        return decode
    return autoencoder.decode


# ----------------------------------------------------------------------------- the wrapper

class ClipGuidedDenoiser:
    """``D_clip(x, sigma, **extra) = D(x) - scale * sigma^2 * grad_x sum_b loss_b`` (module docstring).

    denoiser: ``denoiser(x, sigma_batch, **extra) -> x0_hat``; decode: latents -> images in [-1, 1]
    (``differentiable_decode(autoencoder)``; None for pixel models); targets: [(embedding, weight)]
    with embeddings of shape (D,) (every image) or (B, D) (one per image of the batch); negative
    weights push away. cutn / cut_pow: see ``MakeCutouts``; generator: one torch.Generator or one
    per image (the crops are then independent of the batch). grad_clip: if set, each image's
    gradient is rescaled to an L2 norm of at most ``grad_clip`` before ``scale`` applies.
    ``last_loss`` keeps the per-image loss (B,) of the latest call.
    """

    def __init__(self, denoiser, decode: Callable[[torch.Tensor], torch.Tensor] | None, clip: ClipEmbedder,
                 targets: Sequence[Target], scale: float, cutn: int = 16, cut_pow: float = 1.0,
                 generator: GeneratorSpec = None, grad_clip: float | None = None):
        targets = list(targets)
        if not targets:
            raise ValueError("CLIP guidance needs at least one (embedding, weight) target")
        if not math.isfinite(float(scale)):
            raise ValueError(f"CLIP guidance scale must be finite, got {scale}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {grad_clip}")
        self.denoiser, self.clip = denoiser, clip
        self.decode = decode if decode is not None else (lambda z: z)
        self.scale, self.grad_clip = float(scale), grad_clip
        self.cutouts = MakeCutouts(clip.image_size, cutn, cut_pow)
        self.generator = generator
        self.targets: list[Target] = []
        with torch.inference_mode(False):  # targets embedded under inference_mode become normal tensors
            for k, (embed, weight) in enumerate(targets):
                embed = torch.as_tensor(embed).detach().clone()
                if embed.ndim not in (1, 2) or embed.shape[-1] != clip.dim:
                    raise ValueError(f"target {k}: expected an embedding of shape ({clip.dim},) or (B, {clip.dim}), "
                                     f"got {tuple(embed.shape)}")
                self.targets.append((embed, float(weight)))
        self.last_loss: torch.Tensor | None = None

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Per-image loss (B,) of images in [0, 1]: sum_i w_i * mean over cutouts of the distance."""
        batch = images.shape[0]
        embeds = self.clip.embed_images(self.cutouts(images, self.generator))
        embeds = embeds.view(self.cutouts.cutn, batch, -1)
        total = embeds.new_zeros(batch)
        for k, (target, weight) in enumerate(self.targets):
            if target.ndim == 2 and target.shape[0] != batch:
                raise ValueError(f"target {k} has {target.shape[0]} embeddings for a batch of {batch}; "
                                 "give one embedding for all images or one per image")
            target = target.to(embeds).expand(batch, -1)[None]
            total = total + weight * spherical_distance(embeds, target).mean(0)
        return total

    def __call__(self, x: torch.Tensor, sigma, **extra) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        if self.scale == 0:
            return self.denoiser(x, sigma, **extra)
        with torch.inference_mode(False), torch.enable_grad():
            x_in = x.detach().clone().requires_grad_(True)
            extra_in = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
            try:
                denoised = self.denoiser(x_in, sigma.detach().clone(), **extra_in)
                images = self.decode(denoised)
                if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
                    shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
                    raise ValueError(f"CLIP guidance: decode must return images (B, 3, H, W) in [-1, 1], got {shape}")
                if not images.requires_grad:
                    raise ValueError("CLIP guidance: decode returned images without a gradient (it runs under "
                                     "torch.no_grad or detaches); pass differentiable_decode(autoencoder)")
                loss = self.loss((images + 1) / 2)
                (grad,) = torch.autograd.grad(loss.sum(), x_in)
            except RuntimeError as err:
                if INFERENCE_TENSOR_ERROR not in str(err):
                    raise
                raise RuntimeError(
                    "CLIP guidance differentiates through the denoiser, but a tensor it holds (e.g. prompt "
                    "embeddings inside a GuidedDenoiser) was made under torch.inference_mode; build the "
                    "conditions and sample under torch.no_grad() instead") from None
        if self.grad_clip is not None:
            norms = grad.flatten(1).norm(dim=1)
            grad = grad * append_dims((self.grad_clip / norms.clamp(min=1e-30)).clamp(max=1.0), grad.ndim)
        self.last_loss = loss.detach()
        correction = self.scale * append_dims(sigma, x.ndim) ** 2 * grad.to(x.dtype)
        return denoised.detach().to(x.dtype) - correction


# ----------------------------------------------------------------------------- CLI options

CLI_DEFAULTS = {"clip_guidance_scale": 500.0, "cutn": 16, "cut_pow": 1.0}


def check_arguments(args: argparse.Namespace) -> None:
    """Fill in the CLIP options' defaults, refusing in one line the combinations in which they would do
    nothing: CLIP options without --clip-model, and --clip-guidance-scale 0 (CLIP guidance off, so the
    model and --images would be loaded for nothing)."""
    if args.clip_guidance_scale is not None:
        finite(args.clip_guidance_scale, "--clip-guidance-scale")
    if args.cutn is not None:
        whole(args.cutn, "--cutn")
    if args.cut_pow is not None:
        finite(args.cut_pow, "--cut-pow", positive=True)
    given = [f"--{name.replace('_', '-')}" for name in CLI_DEFAULTS if getattr(args, name) is not None]
    if not args.clip_model:
        if given or args.images:
            raise UserError(f"{(given or ['--images'])[0]} needs --clip-model (it sets up CLIP guidance, which is off "
                            "without a CLIP model); add --clip-model, or leave it out")
    for name, value in CLI_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.clip_model and args.clip_guidance_scale == 0:
        raise UserError("--clip-guidance-scale 0 turns CLIP guidance off, so --clip-model"
                        + (" and --images" if args.images else "") + " would have no effect; give a non-zero scale, "
                        "or leave --clip-model out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The CLIP guidance options of ``microdiff sample`` (check them with ``check_arguments``)."""
    group = parser.add_argument_group("CLIP guidance")
    group.add_argument("--clip-model", default=None,
                       help="CLIP model (hub id in the local cache, or a folder) to guide with, e.g. "
                            "openai/clip-vit-base-patch16 (default: off)")
    group.add_argument("--clip-guidance-scale", type=float, default=None,
                       help=f"strength of the CLIP gradient, not 0 (default: {CLI_DEFAULTS['clip_guidance_scale']:g}, "
                            "as v-diffusion); needs --clip-model")
    group.add_argument("--cutn", type=int, default=None,
                       help=f"random crops per image per step (default: {CLI_DEFAULTS['cutn']}); needs --clip-model")
    group.add_argument("--cut-pow", type=float, default=None,
                       help="crop size exponent; >1 favours small crops (default: 1); needs --clip-model")
    group.add_argument("--images", nargs="*", default=[], metavar="PATH[:WEIGHT]",
                       help="image prompts for CLIP guidance, e.g. fox.png:0.5")


__all__ = [
    "ClipEmbedder", "ClipGuidedDenoiser", "MakeCutouts", "add_arguments", "check_arguments", "CLI_DEFAULTS",
    "differentiable_decode",
    "image_targets", "load_clip", "parse_weighted", "spherical_distance", "text_targets",
]
