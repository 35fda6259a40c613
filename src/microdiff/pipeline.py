"""Text -> image: a text encoder, an autoencoder, a denoiser and a sampler behind ``generate``.

    pipe = Pipeline.from_pretrained("runs/shapes/pipeline")
    images = pipe.generate(prompt=["a red circle"], num_inference_steps=30, guidance_scale=5.0, seed=42)
    pipe.to_pil(images)[0].save("red.png")

A pipeline folder, readable without our code (the format: ``microdiff.encoders.pipeline_folder``)::

    pipeline.yaml            every part named: text encoder and autoencoder identifiers (see
                             microdiff.encoders), backbone class + config, parameterisation,
                             sampling defaults (sampler, steps, guidance, sigma range, rho, size),
                             and the content hash of every file beside it
    denoiser.safetensors     the backbone's weights
    text_encoder/            the text encoder's own folder (weights only for the trainable built-in)
    autoencoder/             our own trained autoencoder, copied in (pretrained ones are named by id)

Loading is strict: every part pipeline.yaml names must exist, match its hash and load without
missing, unexpected or reshaped weights, else one line names the file (nothing is ever sampled from
freshly initialised weights).

Non-finite results are never images: after each batch the latents and the decoded images are
checked (one host sync per batch) and NaN or inf raises a one-line UserError naming what made it (the
checkpoint's weights, the CLIP model's, the autoencoder, or the settings), before anything is
written; black PNGs with exit status 0 cannot happen.

Determinism: image k of a call uses the generator seeded ``seed + k`` for its starting noise and
for every stochastic step, so it does not depend on how many images are asked for or on
``batch_size`` (up to float round-off of batched kernels). The same seed gives the same images on
the same device and library versions; CPU and GPU results differ in the last bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .diffusion import schedules
from .diffusion.denoiser import Denoiser
from .diffusion.guidance import GuidedDenoiser
from .diffusion.rng import per_sample_generators, randn
from .diffusion.samplers import SAMPLERS, STOCHASTIC, get_sampler, sampler_options
from .encoders.pipeline_folder import (CONFIG_NAME, FORMAT, WEIGHTS_NAME, SamplingDefaults, load_parts,  # noqa: F401
                                       parameterization_from_config, write_pipeline_folder)
from .encoders.pipeline_folder import fingerprint as folder_fingerprint
from .prompts import check_mix
from .utils.checks import finite, whole
from .utils.errors import UserError
from .utils.weights import non_finite


@dataclass
class ClipOptions:
    """CLIP guidance (v-diffusion): the gradient of a CLIP loss between the decoded x0 estimate and
    the prompts (and ``images``, (path or PIL, weight) pairs) steers sampling; see clip_guidance.py.
    Each step backpropagates through the guided denoiser, so use a smaller batch_size."""

    model: Any  # a clip_guidance.ClipEmbedder (load_clip)
    scale: float = 500.0
    images: Sequence[tuple[Any, float]] = ()
    cutn: int = 16
    cut_pow: float = 1.0
    grad_clip: float | None = None

    def image_targets(self) -> list:
        if not self.images:
            return []
        from .clip_guidance import image_targets

        return image_targets(self.model, list(self.images))


class Pipeline:
    """``Pipeline(text_encoder, autoencoder, denoiser, defaults)``; see the module docstring."""

    def __init__(self, text_encoder, autoencoder, denoiser: Denoiser, defaults: SamplingDefaults | None = None):
        self.text_encoder = text_encoder
        self.autoencoder = autoencoder
        self.denoiser = denoiser
        self.defaults = defaults or SamplingDefaults()
        self.decode_batch_size: int | None = None  # latents per autoencoder.decode call (None: a whole batch)
        self.folder: Path | None = None  # the pipeline folder it was loaded from (from_pretrained)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | Path) -> Path:
        """Write this pipeline as a folder (see the module docstring); returns the folder."""
        backbone = getattr(self.denoiser.backbone, "_orig_mod", self.denoiser.backbone)  # torch.compile'd
        return write_pipeline_folder(path, backbone_class=type(backbone).__name__, backbone_config=backbone.config,
                                     backbone_state=backbone.state_dict(),
                                     parameterization=self.denoiser.parameterization.config(),
                                     defaults=self.defaults, text_encoder=self.text_encoder,
                                     autoencoder=self.autoencoder.identifier)

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "Pipeline":
        """Load a pipeline folder, or a Hugging Face hub repo holding one (cache / offline aware).
        Strict: a missing, damaged or mismatched part is a one-line error naming its file."""
        folder = _resolve_pipeline_folder(path_or_id)
        pipe = cls(*load_parts(folder, device=device, dtype=dtype))
        pipe.folder = folder
        return pipe

    def fingerprint(self) -> str | None:
        """A content hash of the folder this pipeline was loaded from (None if it was built in memory):
        outputs made from another fingerprint were made with other weights or defaults."""
        return None if self.folder is None else folder_fingerprint(self.folder)

    def compile(self, cuda_graphs: bool = False, **options: Any) -> "Pipeline":
        """``torch.compile`` the backbone (pays off for many images at one size). A MicroDiT compiles as
        one graph with no break (``MicroDiT.compile_graph``). ``cuda_graphs``: also capture each call as
        a CUDA graph (torch.compile's ``mode="reduce-overhead"``), which removes the per-kernel launch
        cost of small batches; on the CPU it is ignored."""
        if cuda_graphs and self.device.type == "cuda":
            options = {"mode": "reduce-overhead", **options}
        backbone = self.denoiser.backbone
        if hasattr(backbone, "compile_graph"):
            backbone.compile_graph(**options)
        else:
            self.denoiser.backbone = torch.compile(backbone, **options)
        return self

    # ------------------------------------------------------------------ generation
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.backbone.parameters()).device

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Backbone keyword arguments for a list of prompts (``y`` and, if enabled, ``y_mask``)."""
        enc = self.text_encoder.encode(list(prompts))
        states = enc.states.to(self.device, torch.float32)
        cond = {"y": states[:, None] if self.defaults.caption_layout == "B1LC" else states}
        if self.defaults.caption_mask:
            cond["y_mask"] = enc.mask.to(self.device)
        return cond

    def _null_condition(self, cond: dict[str, torch.Tensor], negative: Sequence[str] | None) -> dict[str, torch.Tensor]:
        if negative is not None:
            return self.encode_prompts(negative)
        null = {"y": torch.zeros_like(cond["y"])}  # micro_diffusion's unconditional: zero caption states
        if "y_mask" in cond:
            null["y_mask"] = torch.zeros_like(cond["y_mask"])
        return null

    def check_options(self, num_inference_steps: int | None = None, sampler: str | None = None,
                      eta: float | None = None, height: int | None = None, width: int | None = None,
                      guidance_scale: float | None = None) -> dict[str, Any]:
        """The settings a ``generate`` call with these arguments uses (None: the pipeline's default),
        checked: a bad one is a one-line UserError naming the argument. Commands call it before they
        write anything; ``generate`` calls it too."""
        d = self.defaults
        name = d.sampler if sampler is None else sampler
        get_sampler(name)
        if eta is not None:
            eta = finite(eta, "eta", minimum=0.0)
            if "eta" not in sampler_options(name):
                with_eta = [k for k in SAMPLERS if "eta" in sampler_options(k)]
                raise UserError(f"eta={eta:g}: the {name} sampler takes no eta; leave eta out, or use a sampler "
                                f"that has one: {', '.join(with_eta)}")
        checked = {"num_inference_steps": d.num_inference_steps if num_inference_steps is None
                   else whole(num_inference_steps, "num_inference_steps"),
                   "sampler": name, "eta": eta, "guidance_scale": self._guidance(guidance_scale),
                   "height": d.height if height is None else whole(height, "height"),
                   "width": d.width if width is None else whole(width, "width")}
        if d.truncate_sigma is not None and not d.truncate_sigma < d.sigma_max:
            raise UserError(f"truncate_sigma={d.truncate_sigma:g}: must be below the pipeline's sigma_max "
                            f"{d.sigma_max:g} (0 or None: no truncation)")
        _, h, w = self.latent_shape(checked["height"], checked["width"])
        fixed = getattr(getattr(self.denoiser.backbone, "_orig_mod", self.denoiser.backbone), "input_hw", None)
        if fixed is not None and tuple(fixed) != (h, w):
            f = self.autoencoder.downsample
            raise UserError(f"height x width {checked['height']}x{checked['width']}: this pipeline's backbone makes "
                            f"{fixed[0] * f}x{fixed[1] * f} px images only (its positional table); leave the size out")
        return checked

    def _guidance(self, guidance_scale: float | None) -> float:
        return self.defaults.guidance_scale if guidance_scale is None else finite(guidance_scale, "guidance_scale")

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.autoencoder.downsample
        if height % f or width % f:
            raise UserError(f"height and width must be multiples of the autoencoder's downsampling {f}; "
                             f"got {height}x{width}")
        return self.autoencoder.latent_channels, height // f, width // f

    @torch.inference_mode()
    def generate(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 sampler: str | None = None, seed: int = 42, height: int | None = None, width: int | None = None,
                 eta: float | None = None, callback: Callable[[dict], None] | None = None,
                 batch_size: int = 8, progress: bool = False, clip: ClipOptions | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], one per prompt; image k uses seed + k (see the module docstring).
        ``clip``: CLIP guidance towards each image's own prompt (plus ``clip.images``)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        negatives = _match_negatives(negative_prompt, len(prompts))
        scale = self._guidance(guidance_scale)

        def guided(start: int, stop: int, denoiser) -> GuidedDenoiser:
            cond = self.encode_prompts(prompts[start:stop])
            uncond = self._null_condition(cond, None if negatives is None else negatives[start:stop])
            return GuidedDenoiser(denoiser, [cond], uncond, scale=scale)

        targets = None
        if clip is not None:
            own = clip.model.embed_text(prompts)
            extra = clip.image_targets()
            targets = lambda start, stop: [(own[start:stop], 1.0), *extra]  # noqa: E731
        return self._sample(len(prompts), guided, seed, num_inference_steps, sampler, eta, height, width,
                            callback, batch_size, progress, clip, targets)

    @torch.inference_mode()
    def generate_weighted(self, prompts: Sequence[tuple[str, float]], num_images: int = 1,
                          negative_prompt: str | None = None, num_inference_steps: int | None = None,
                          guidance_scale: float | None = None, sampler: str | None = None, seed: int = 42,
                          height: int | None = None, width: int | None = None, eta: float | None = None,
                          callback: Callable[[dict], None] | None = None, batch_size: int = 8,
                          progress: bool = False, clip: ClipOptions | None = None) -> torch.Tensor:
        """``num_images`` images of one weighted prompt mix, D_null + scale * sum_i w_i (D_i - D_null)
        (negative weights push away), all branches in one batched forward; image k uses seed + k."""
        if not prompts:
            raise ValueError("generate_weighted needs at least one (prompt, weight) pair")
        texts = [t for t, _ in prompts]
        weights = [finite(w, f"weight of prompt {k} ({t!r})") for k, (t, w) in enumerate(prompts)]
        check_mix(weights, [w for _, w in clip.images] if clip is not None and clip.scale else [])
        num_images = whole(num_images, "num_images")
        scale = self._guidance(guidance_scale)

        # every image shares the prompts: encode each once, then repeat it over a chunk
        conds = [self.encode_prompts([t]) for t in texts]
        uncond = self._null_condition(conds[0], None if negative_prompt is None else [negative_prompt])

        def guided(start: int, stop: int, denoiser) -> GuidedDenoiser:
            n = stop - start
            return GuidedDenoiser(denoiser, [_repeat(c, n) for c in conds], _repeat(uncond, n),
                                  scale=scale, weights=weights)

        targets = None
        if clip is not None:
            from .clip_guidance import text_targets

            fixed = [*text_targets(clip.model, list(prompts)), *clip.image_targets()]
            targets = lambda start, stop: fixed  # noqa: E731
        return self._sample(num_images, guided, seed, num_inference_steps, sampler, eta, height, width,
                            callback, batch_size, progress, clip, targets)

    def _sample(self, n: int, make_guided: Callable[[int, int, Any], GuidedDenoiser], seed: int, steps: int | None,
                sampler: str | None, eta: float | None, height: int | None, width: int | None,
                callback, batch_size: int, progress: bool, clip: ClipOptions | None = None,
                targets: Callable[[int, int], list] | None = None) -> torch.Tensor:
        d = self.defaults
        checked = self.check_options(steps, sampler, eta, height, width)
        steps, name, eta = checked["num_inference_steps"], checked["sampler"], checked["eta"]
        sample = get_sampler(name)
        batch_size = whole(batch_size, "batch_size")
        shape = self.latent_shape(checked["height"], checked["width"])
        sigmas = schedules.karras(steps, d.sigma_min, d.sigma_max, d.rho, device=self.device, dtype=torch.float64)
        if d.truncate_sigma:
            sigmas = schedules.truncate(sigmas, d.truncate_sigma)
        generators = per_sample_generators(seed, n)
        images = []
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            gens = generators[start:stop]
            options: dict[str, Any] = {} if eta is None else {"eta": eta}
            if name in STOCHASTIC or options.get("eta"):
                options["generator"] = gens
            x = randn((stop - start, *shape), gens, device=self.device, dtype=torch.float64) * sigmas[0]
            guided = make_guided(start, stop, self._masked(per_sample_generators(seed + 7_919_003 + start, stop - start),
                                                           shape))
            if clip is not None and clip.scale:
                from .clip_guidance import ClipGuidedDenoiser, differentiable_decode

                guided = ClipGuidedDenoiser(guided, differentiable_decode(self.autoencoder), clip.model,
                                            targets(start, stop), scale=clip.scale, cutn=clip.cutn,
                                            cut_pow=clip.cut_pow, grad_clip=clip.grad_clip,
                                            generator=per_sample_generators(seed + start, stop - start))
            latents = sample(guided, x, sigmas, callback=callback, disable=not progress, **options)
            finite_latents = torch.isfinite(latents).all()  # read after decode: one host sync per batch
            decoded = self.decode(latents)
            if not (bool(finite_latents) and all(bool(torch.isfinite(d).all()) for d in decoded)):
                raise UserError(self._non_finite(start, stop, bool(finite_latents), clip))
            images.extend(decoded)
        return torch.cat(images)

    def _non_finite(self, start: int, stop: int, finite_latents: bool, clip: ClipOptions | None) -> str:
        """Why a batch came out NaN/inf, in one line naming the part to blame (checked only after it happened)."""
        where = f"images {start}..{stop - 1}" if stop - start > 1 else f"image {start}"
        checkpoint = f"the checkpoint {self.folder}" if self.folder is not None else "this pipeline (built in memory)"
        bad = non_finite(dict(self.denoiser.backbone.state_dict()))
        if bad is not None:
            file = self.folder / WEIGHTS_NAME if self.folder is not None else "the denoiser"
            return (f"{file}: tensor {bad[0]} holds {bad[1]} NaN/inf values of {bad[2]}, so sampling gives NaN "
                    f"images ({where}, nothing written for them); the checkpoint is damaged or from a diverged run: "
                    "export it again from a good checkpoint")
        clip_model = getattr(clip.model, "model", None) if clip is not None else None
        bad = non_finite(dict(clip_model.state_dict())) if clip_model is not None else None
        if bad is not None:
            return (f"CLIP model {clip.model.identifier}: tensor {bad[0]} holds {bad[1]} NaN/inf values of {bad[2]}, "
                    f"so CLIP guidance gives NaN images ({where}, nothing written for them); its weights are damaged: "
                    "download or save it again")
        if finite_latents:
            return (f"the autoencoder {self.autoencoder.identifier} decoded finite latents to NaN/inf pixels ({where}, "
                    f"nothing written for them; {checkpoint}); its weights are damaged or it overflows "
                    "in this dtype: try float32 weights (sample --dtype float32)")
        guide = f" with CLIP model {clip.model.identifier}" if clip is not None and clip.scale else ""
        return (f"sampling gave NaN/inf latents ({where}, nothing written for them) from {checkpoint}{guide}: "
                "the model diverges at these settings or its weights are damaged; try "
                "another sampler or step count, a lower guidance scale" + (" or CLIP guidance scale" if guide else "")
                + ", or float32")

    def decode(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """Latents -> images in [0, 1] on the CPU, ``decode_batch_size`` latents per decoder call (a VAE
        decoder at 512 px needs several GiB of activations per image)."""
        step = self.decode_batch_size or latents.shape[0]
        out = []
        for chunk in latents.split(step):
            decoded = self.autoencoder.decode(chunk.float())
            if decoded.ndim != 4 or decoded.shape[1] != 3:
                raise UserError(f"the autoencoder {self.autoencoder.identifier} decodes to shape "
                                f"{tuple(decoded.shape)}, not RGB images (B, 3, H, W); a pipeline needs an autoencoder "
                                "that decodes its backbone's latents to RGB")
            out.append(((decoded.float() + 1) / 2).clamp(0, 1).cpu())
        return out

    def _masked(self, generators: list[torch.Generator], shape: tuple[int, int, int]):
        """The denoiser, or (Ambient Diffusion models) the denoiser with each image's fixed masks."""
        d = self.defaults
        if d.mask_keep_prob is None:
            return self.denoiser
        from .ambient.sampling import FixedMaskDenoiser, sampling_masks

        masks = sampling_masks(generators, shape, d.mask_keep_prob, d.mask_draws, d.mask_block, self.device)
        return FixedMaskDenoiser(self.denoiser, masks)

    @staticmethod
    def to_pil(images: torch.Tensor) -> list:
        """(B, 3, H, W) in [0, 1] -> PIL images."""
        from PIL import Image

        arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arrays]


def _repeat(cond: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """A batch-1 condition repeated to a batch of n."""
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


def _match_negatives(negative: str | Sequence[str] | None, n: int) -> list[str] | None:
    if negative is None:
        return None
    negatives = [negative] * n if isinstance(negative, str) else list(negative)
    if len(negatives) != n:
        raise ValueError(f"negative_prompt: give one string or one per prompt ({n}), got {len(negatives)}")
    return negatives


def _resolve_pipeline_folder(path_or_id: str | Path) -> Path:
    path = Path(path_or_id)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            inner = path / "pipeline"
            hint = (f"a training run keeps its pipeline in {inner}" if (inner / CONFIG_NAME).is_file() else
                    "is this a pipeline folder (written by Pipeline.save_pretrained or `microdiff convert`)?")
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; {hint}")
        return path
    if path.is_file():
        hint = f"pass its folder, {path.parent}" if path.name == CONFIG_NAME else \
            f"pass the folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        raise FileNotFoundError(f"{path}: a file, not a pipeline folder; {hint}")
    if path.exists() or str(path_or_id).startswith((".", "/")) or str(path_or_id).count("/") != 1:
        raise FileNotFoundError(f"{path_or_id}: no such pipeline folder (a folder with {CONFIG_NAME}, "
                                "or a Hugging Face repo id like owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_id)))
    except Exception as err:  # noqa: BLE001 - offline / missing repo: one line that says what to do
        raise OSError(f"{path_or_id}: cannot fetch this pipeline from the Hugging Face hub and it is not in the "
                      f"local cache ({type(err).__name__}); with HF_HUB_OFFLINE set or no internet, pass a "
                      "local pipeline folder") from None


__all__ = ["Pipeline", "SamplingDefaults", "ClipOptions", "parameterization_from_config", "CONFIG_NAME", "WEIGHTS_NAME"]
