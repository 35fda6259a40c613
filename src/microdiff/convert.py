"""``microdiff convert micro-diffusion``: a micro_diffusion / Ambient-o DiT checkpoint -> a pipeline folder.

    microdiff convert micro-diffusion --dit ambient_o.safetensors --out pipelines/ambient-o \\
        [--vae diffusers-kl:stabilityai/stable-diffusion-xl-base-1.0?subfolder=vae] \\
        [--text-encoder openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378]

The DiT's architecture is read from the checkpoint itself: its tensors' shapes give the latent
size, channels, caption width and block counts, and the preset whose layout matches them exactly
is chosen (or pass ``--preset``). Bare state dicts (as published on the hub) and composer
checkpoints (``state/model`` with ``dit.``) are accepted. The pipeline gets micro_diffusion's
sampling settings: EDM with sigma_data 0.9, Heun, 30 steps, rho 7, sigma 0.002..80, guidance 5,
zero caption states as the unconditional input and attention to all 77 caption tokens. Encoders are
written as identifiers (nothing is downloaded here); they load when the pipeline is used. The
built-in text encoder cannot be named: its weights train with the model, and a micro_diffusion
checkpoint does not hold them.

Checked before anything is written, each refusal one line: that --vae and --text-encoder can load
at all (scheme, options, local folders that exist; identity with other than 3 channels is no RGB
image); that --vae makes latents with the DiT's
input channels and --text-encoder gives states as wide as its caption channels (the defaults too),
as far as the identifier, a local folder's config, the Hugging Face cache or the built-in tables
know without a download (the pipeline checks again when it loads); that the checkpoint's keys fit a
preset exactly (a missing, extra or reshaped key is named, with the closest preset); and that no
tensor holds NaN or inf. The image size in the defaults is the DiT's latent size times the
autoencoder's downsampling.

--out must be a new or empty folder; --overwrite replaces the pipeline in a folder that holds one
(and nothing else there). The folder's pipeline.yaml records the content hash of
denoiser.safetensors, so a damaged copy is refused when the pipeline loads.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

import torch

from .encoders.image import autoencoder_geometry, check_autoencoder_identifier
from .encoders.pipeline_folder import (CONFIG_NAME, WEIGHTS_NAME, SamplingDefaults, fit_problem, is_pipeline_folder,
                                       write_pipeline_folder)
from .encoders.text import check_text_encoder_identifier, text_encoder_width
from .models import MicroDiT
from .utils.errors import UserError
from .utils.files import output_folder
from .utils.registry import did_you_mean
from .utils.weights import non_finite, state_mismatch

DEFAULT_VAE = "diffusers-kl:stabilityai/stable-diffusion-xl-base-1.0?subfolder=vae"
DEFAULT_TEXT_ENCODER = "openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"
BASE_LATENT = 32  # micro_diffusion's positions are laid out for 256 px = latent 32 (pos_interp_scale 1)


def infer_microdit_config(state: dict[str, torch.Tensor], preset: str | None = None,
                          source: str = "the checkpoint") -> tuple[str, dict[str, Any]]:
    """(preset name, MicroDiT kwargs) whose parameters have exactly the shapes of ``state``. When none
    fits (or not ``preset``), one line says which keys are missing, extra or reshaped against the
    closest preset."""
    from .models.dit import DIT_PRESETS

    try:
        dim, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
        tokens = state["pos_embed"].shape[1]
        caption_channels = state["y_embedder.y_proj.fc1.weight"].shape[1]
    except KeyError as err:
        raise UserError(f"{source}: not a micro_diffusion DiT state dict: no {err.args[0]!r}; pass the DiT's weights "
                        "(a composer checkpoint is unwrapped automatically)") from None
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise UserError(f"{source}: pos_embed has {tokens} positions, not a square grid; non-square checkpoints "
                        "are not converted: build MicroDiT(**config) yourself")
    if preset is not None and preset not in DIT_PRESETS:
        raise UserError(f"--preset {preset!r}: unknown; choose one of {', '.join(DIT_PRESETS)}"
                        f"{did_you_mean(preset, DIT_PRESETS)}")
    size = grid * patch
    overrides = {"input_size": size, "in_channels": in_channels, "caption_channels": caption_channels,
                 "pos_interp_scale": size / BASE_LATENT if size >= BASE_LATENT else 1.0}
    differences: dict[str, tuple[int, str]] = {}  # preset -> (number of differing keys, what differs)
    for name in DIT_PRESETS:
        with torch.device("meta"):
            model = DIT_PRESETS[name](**overrides)
        expected = model.state_dict()
        problem = state_mismatch(expected, state)
        if problem is None and name == (preset or name):
            config = dict(model.config)
            config["pos_interp_scale"] = _pos_interp_scale(state["pos_embed"], model, config)
            return name, config
        count = len(set(expected) ^ set(state)) + sum(tuple(state[k].shape) != tuple(v.shape)
                                                       for k, v in expected.items() if k in state)
        differences[name] = (count, problem or "")
    layout = (f"dim {dim}, {len({k.split('.')[1] for k in state if k.startswith('blocks.')})} blocks, latent {size}, "
              f"captions {caption_channels}")
    fits = [name for name, (count, _) in differences.items() if count == 0]
    if preset is not None:
        hint = (f"it is a {fits[0]} checkpoint: leave --preset out" if fits else
                "no preset fits it; the file was edited or comes from another model: build MicroDiT(**config) yourself")
        raise UserError(f"{source}: does not fit --preset {preset} ({differences[preset][1]}); {hint}")
    closest = min(differences, key=lambda name: differences[name][0])
    raise UserError(f"{source}: no preset has this checkpoint's layout ({layout}); the closest, {closest}, differs: "
                    f"{differences[closest][1]}; a missing or extra key means the file was edited or comes from "
                    "another model: build MicroDiT(**config) yourself")


def _pos_interp_scale(table: torch.Tensor, model, config: dict[str, Any]) -> float:
    """The scale whose sin-cos table equals the checkpoint's (its table is authoritative)."""
    if table.is_meta:
        return config["pos_interp_scale"]
    from .models.layers import sincos_pos_embed_2d

    for scale in sorted({config["pos_interp_scale"], 1.0, 2.0, 4.0, 0.5}):
        ours = sincos_pos_embed_2d(table.shape[-1], model.grid, scale)
        if torch.allclose(ours, table[0].float().cpu(), atol=1e-5):
            return scale
    return config["pos_interp_scale"]


def _check_identifiers(vae: str, text_encoder: str) -> None:
    """Identifiers that can never load are refused before anything is read or written (nothing is
    downloaded: a hub id that does not exist is noticed when the pipeline loads)."""
    from .encoders.text import ALIASES

    try:
        check_autoencoder_identifier(vae)
    except (ValueError, OSError) as err:
        raise UserError(f"--vae: {err}") from None
    text = ALIASES.get(text_encoder, text_encoder)
    try:
        check_text_encoder_identifier(text_encoder)
    except (ValueError, OSError) as err:
        raise UserError(f"--text-encoder: {err}") from None
    if text.partition(":")[0] == "builtin":
        raise UserError(f"--text-encoder {text_encoder!r}: the built-in encoder trains with its model and a "
                        "micro_diffusion checkpoint holds no weights for it; name the encoder the DiT was trained "
                        f"with (default: {DEFAULT_TEXT_ENCODER})")


def _check_fit(config: dict[str, Any], dit: Path, vae: str, text_encoder: str) -> int | None:
    """Refuse an autoencoder or text encoder that does not fit the DiT, as far as their identifiers, local
    folders, the Hugging Face cache or the built-in tables tell without a download (the pipeline checks
    again when it loads). Returns the autoencoder's downsampling factor when known."""
    with torch.device("meta"):
        backbone = MicroDiT(**config)
    geometry = autoencoder_geometry(vae)
    if vae.partition(":")[0] == "identity" and geometry is not None and geometry[0] != 3:
        raise UserError(f"--vae {vae}: pixel space with {geometry[0]} channels decodes to {geometry[0]}-channel "
                        "'images', not RGB ones; name the autoencoder whose latents the DiT was trained on (e.g. the "
                        f"default, {DEFAULT_VAE})")
    problem = fit_problem(backbone, geometry[0], None) if geometry is not None else None
    if problem:
        raise UserError(f"--vae {vae}{' (the default)' if vae == DEFAULT_VAE else ''}: {problem} (the DiT in {dit}); "
                        f"pass the autoencoder the DiT was trained with, one with {backbone.in_channels} latent "
                        f"channels (identity:{backbone.in_channels} for pixels)")
    width = text_encoder_width(text_encoder)
    problem = fit_problem(backbone, None, width)
    if problem:
        default = " (the default)" if text_encoder == DEFAULT_TEXT_ENCODER else ""
        raise UserError(f"--text-encoder {text_encoder}{default}: {problem} (the DiT in {dit}); pass the text "
                        f"encoder the DiT was trained with, one whose states are {backbone.caption_channels} wide")
    return None if geometry is None else geometry[1]


def _check_out(out: Path, overwrite: bool) -> Path:
    """--out: a new or empty folder, or (with --overwrite) one that holds a pipeline and nothing else of ours."""
    if out.is_dir() and any(out.iterdir()):
        if not is_pipeline_folder(out):
            raise UserError(f"--out {out}: this folder holds other files; pass a new or empty folder")
        if not overwrite:
            raise UserError(f"--out {out}: already holds a pipeline ({CONFIG_NAME}); pass another --out, or "
                            "--overwrite to replace it")
    return output_folder(out, "--out")


def convert_micro_diffusion(dit: str | Path, out: str | Path, vae: str = DEFAULT_VAE,
                            text_encoder: str = DEFAULT_TEXT_ENCODER, preset: str | None = None,
                            overwrite: bool = False) -> Path:
    """Write a pipeline folder for a micro_diffusion DiT checkpoint; returns the folder."""
    from .models.dit import extract_state_dict, load_checkpoint_file

    dit = Path(dit)
    if not dit.is_file():
        raise FileNotFoundError(f"--dit {dit}: no such file (a .safetensors / .pt DiT checkpoint)")
    _check_identifiers(vae, text_encoder)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file, not a folder; pass a new folder for the pipeline")
    state = extract_state_dict(load_checkpoint_file(str(dit)))
    name, config = infer_microdit_config(state, preset, source=f"--dit {dit}")
    bad = non_finite(state)
    if bad is not None:
        raise UserError(f"--dit {dit}: tensor {bad[0]} holds {bad[1]} NaN/inf values of {bad[2]}; the checkpoint is "
                        "damaged or from a diverged run: convert one saved before that")
    factor = _check_fit(config, dit, vae, text_encoder)
    out = _check_out(out, overwrite)
    if factor is None:  # not known without a download: the diffusers VAEs downsample by 8, the rest by 1
        factor = 8 if re.match(r"diffusers-(kl|tiny):", vae) else 1
    size = config["input_size"] * factor
    defaults = SamplingDefaults(height=size, width=size)  # its other defaults are micro_diffusion's settings
    return write_pipeline_folder(
        out, backbone_class="MicroDiT", backbone_config=config, backbone_state=state,
        parameterization={"name": "edm", "sigma_data": 0.9}, defaults=defaults, text_encoder=text_encoder,
        autoencoder=vae, backbone_preset=name,
        extra={"converted_from": {"kind": "micro-diffusion", "file": str(dit.resolve())}})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    md = sub.add_parser("micro-diffusion", help="a micro_diffusion / Ambient-o MicroDiT checkpoint",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    md.add_argument("--dit", required=True, help="DiT weights: .safetensors or .pt (bare state dict or composer)")
    md.add_argument("--out", required=True, help="pipeline folder to write")
    md.add_argument("--vae", default=DEFAULT_VAE, help=f"autoencoder identifier (default: {DEFAULT_VAE})")
    md.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER,
                    help=f"text encoder identifier (default: {DEFAULT_TEXT_ENCODER})")
    md.add_argument("--preset", default=None, help="MicroDiT preset (default: the one matching the checkpoint)")
    md.add_argument("--overwrite", action="store_true",
                    help="replace the pipeline already in --out (default: refuse a folder that is not empty)")


def run(args: argparse.Namespace) -> int:
    """Bad input ends as one line on stderr (microdiff.cli), exit status 2."""
    out = convert_micro_diffusion(args.dit, args.out, args.vae, args.text_encoder, args.preset, args.overwrite)
    print(f"wrote {out} ({CONFIG_NAME} + {WEIGHTS_NAME}); try: microdiff sample \"a photo of a cat\" --checkpoint {out}")
    return 0


__all__ = ["infer_microdit_config", "convert_micro_diffusion", "add_arguments", "run"]
