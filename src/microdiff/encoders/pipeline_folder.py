"""The pipeline folder format: the one writer and the one reader of ``pipeline.yaml`` and its parts.

    pipeline.yaml            format, version; every part named: text_encoder {identifier, folder},
                             autoencoder {identifier, relative}, backbone {class, config},
                             parameterization {name, ...}, defaults (SamplingDefaults), and
                             files: {relative path: sha256:<hex>} of every file written beside it
    denoiser.safetensors     the backbone's weights
    text_encoder/            the text encoder's own folder (weights only for the trainable built-in)
    autoencoder/             our own trained autoencoder, copied in (pretrained ones are named by id)

``write_pipeline_folder`` (used by ``Pipeline.save_pretrained``, ``microdiff convert`` and the
trainer's export) writes the parts first and ``pipeline.yaml`` last, atomically, so a folder with
a ``pipeline.yaml`` is complete. ``read_config`` / ``load_parts`` / ``read_weights`` (used by
``Pipeline.from_pretrained`` and ``model.init_from``) check everything the file names: the YAML and
its keys, that every part exists, the content hash of every listed file (safetensors does not notice
flipped bytes inside tensor data), and that each part's weights load strictly. Anything wrong is one
line naming the file. From format version 2 on, ``files`` is required and must list every file the
loader reads (the denoiser, the text encoder's and the autoencoder's files): a version-2 folder whose
``files`` was deleted or thinned is refused. Folders of version 1 written before hashes were recorded
(no ``files`` key) still load. Loading also checks that the parts fit each other (the autoencoder's
latent channels against the backbone's input and output channels, the text encoder's width against
its caption channels) and names pipeline.yaml and the parts when they do not.

It lives with the encoders (it imports only diffusion, models, encoders and utils), so the trainer
below ``pipeline`` can read and write the format without an upward import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from ..diffusion.denoiser import PARAMETERIZATIONS, Denoiser, Parameterization
from ..diffusion.samplers import SAMPLERS
from ..models import MicroDiT, MLPBackbone, UNet
from ..utils.checks import finite, whole
from ..utils.errors import UserError
from ..utils.jsondata import json_data
from ..utils.registry import did_you_mean
from ..utils.weights import check_digest, file_digest, load_strict, non_finite, path_digest, read_safetensors
from .autoencoder_io import CONFIG_NAME as AE_CONFIG_FILE
from .base import IdentityAutoencoder
from .autoencoder_io import WEIGHTS_NAME as AE_WEIGHTS_FILE
from .image import autoencoder_geometry, load_autoencoder
from .text import BuiltinTextEncoder, load_text_encoder, text_encoder_width
from .text_common import CONFIG_FILE as TEXT_CONFIG_FILE
from .text_common import WEIGHTS_FILE as TEXT_WEIGHTS_FILE

CONFIG_NAME = "pipeline.yaml"
WEIGHTS_NAME = "denoiser.safetensors"
TEXT_ENCODER_DIR = "text_encoder"
AUTOENCODER_DIR = "autoencoder"
FORMAT = "microdiff-pipeline"
VERSION = 2  # 2: `files` (content hashes of every part's files) is required; 1: optional
HASHES_REQUIRED_SINCE = 2
BACKBONES: dict[str, type] = {cls.__name__: cls for cls in (MicroDiT, UNet, MLPBackbone)}
OWN_AUTOENCODERS = ("microdiff-vae", "microdiff-vqgan")  # trained by us: copied into the folder
REEXPORT = "re-export the pipeline (Pipeline.save_pretrained, `microdiff convert`, or the training run)"


# ----------------------------------------------------------------------------- sampling defaults

@dataclass
class SamplingDefaults:
    """What ``generate`` uses when a call does not say (micro_diffusion's values by default).
    Every field is range-checked when the object is made (also when read from ``pipeline.yaml``)."""

    sampler: str = "heun"
    num_inference_steps: int = 30
    guidance_scale: float = 5.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    height: int = 256
    width: int = 256
    caption_mask: bool = False  # pass the text encoder's mask to the backbone (False: attend to all tokens)
    caption_layout: str = "B1LC"  # "B1LC" (MicroDiT / micro_diffusion) or "BLC"
    # Ambient Diffusion models (2C input channels): each image is sampled with fixed masks A~ kept with
    # this probability (block x block squares), D averaged over mask_draws of them; None: no masks
    truncate_sigma: float | None = None  # stop at this sigma and return x0_hat (models of data noisy there)
    mask_keep_prob: float | None = None
    mask_draws: int = 1
    mask_block: int = 1

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise UserError(f"sampler={self.sampler!r}: unknown; choose one of {', '.join(SAMPLERS)}"
                            f"{did_you_mean(self.sampler, SAMPLERS)}")
        for name in ("num_inference_steps", "height", "width", "mask_draws", "mask_block"):
            setattr(self, name, whole(getattr(self, name), name))
        self.guidance_scale = finite(self.guidance_scale, "guidance_scale")
        self.sigma_min = finite(self.sigma_min, "sigma_min", positive=True)
        self.sigma_max = finite(self.sigma_max, "sigma_max", positive=True)
        if self.sigma_max <= self.sigma_min:
            raise UserError(f"sigma_max={self.sigma_max:g}: must be above sigma_min={self.sigma_min:g}")
        self.rho = finite(self.rho, "rho", positive=True)
        if self.caption_layout not in ("B1LC", "BLC"):
            raise UserError(f"caption_layout={self.caption_layout!r}: use B1LC or BLC")
        if not isinstance(self.caption_mask, bool):
            raise UserError(f"caption_mask={self.caption_mask!r}: use true or false")
        if self.truncate_sigma is not None:
            self.truncate_sigma = finite(self.truncate_sigma, "truncate_sigma", positive=True)
        if self.mask_keep_prob is not None:
            self.mask_keep_prob = finite(self.mask_keep_prob, "mask_keep_prob", positive=True)
            if self.mask_keep_prob > 1:
                raise UserError(f"mask_keep_prob={self.mask_keep_prob:g}: must be in (0, 1]")

    @classmethod
    def from_dict(cls, values: Any, source: str | os.PathLike) -> "SamplingDefaults":
        """The defaults of a ``pipeline.yaml``; unknown keys and bad values name the file."""
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise UserError(f"{source}: 'defaults' must be a mapping of sampling settings, got "
                            f"{type(values).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in known]
        if unknown:
            raise UserError(f"{source}: defaults.{unknown[0]} is not a sampling setting"
                            f"{did_you_mean(unknown[0], known)}; known: {', '.join(known)}")
        try:
            return cls(**values)
        except UserError as err:
            raise UserError(f"{source}: defaults.{err}") from None


# ----------------------------------------------------------------------------- writing

def write_pipeline_folder(path: str | os.PathLike, *, backbone_class: str, backbone_config: Mapping[str, Any],
                          backbone_state: Mapping[str, torch.Tensor], parameterization: Mapping[str, Any],
                          defaults: SamplingDefaults, text_encoder: Any, autoencoder: str,
                          backbone_preset: str | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write a pipeline folder at ``path`` (created; parts already there are replaced, and an earlier
    pipeline's ``text_encoder/`` or ``autoencoder/`` that this one does not have is removed).

    ``text_encoder``: an encoder object (its ``save`` writes ``text_encoder/``) or an identifier string
    (recorded only; a built-in encoder needs its weights, so it must be an object). ``autoencoder``: an
    identifier; our own trained ones (microdiff-vae:/microdiff-vqgan:) are copied into ``autoencoder/``.
    ``backbone_preset``: the preset name, recorded for people. ``extra``: more top-level keys (e.g.
    ``converted_from``). Returns the folder."""
    from safetensors.torch import save_file

    if backbone_class not in BACKBONES:
        raise UserError(f"cannot save a {backbone_class} backbone in a pipeline folder; "
                        f"known: {', '.join(BACKBONES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).unlink(missing_ok=True)  # the folder is incomplete until the new one is written
    state = {k: v.detach().contiguous().cpu() for k, v in backbone_state.items()}
    save_file(state, str(path / WEIGHTS_NAME))
    written = [path / WEIGHTS_NAME]
    if isinstance(text_encoder, str):
        if text_encoder.strip().startswith("builtin"):
            raise UserError(f"text encoder {text_encoder!r}: a built-in encoder trains with its diffusion model, so "
                            "a pipeline needs its weights; pass the trained encoder (or name a pretrained one)")
        text_cfg: dict[str, Any] = {"identifier": text_encoder}
        shutil.rmtree(path / TEXT_ENCODER_DIR, ignore_errors=True)  # an earlier pipeline's part, now stale
    else:
        shutil.rmtree(path / TEXT_ENCODER_DIR, ignore_errors=True)
        text_encoder.save(path / TEXT_ENCODER_DIR)
        text_cfg = {"identifier": text_encoder.identifier, "folder": TEXT_ENCODER_DIR}
        written.append(path / TEXT_ENCODER_DIR)
    ae_cfg = _write_autoencoder(path, autoencoder)
    if ae_cfg["relative"]:
        written.append(path / AUTOENCODER_DIR)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "text_encoder": text_cfg,
        "autoencoder": ae_cfg,
        "backbone": {"class": backbone_class, "config": json_data(dict(backbone_config), "backbone.config"),
                     **({"preset": backbone_preset} if backbone_preset else {})},
        "parameterization": json_data(dict(parameterization), "parameterization"),
        "defaults": asdict(defaults),
        **dict(extra or {}),
        "files": _digests(path, written),
    }
    tmp = path / f".{CONFIG_NAME}.{os.getpid()}.tmp"
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, path / CONFIG_NAME)
    return path


def _write_autoencoder(path: Path, identifier: str) -> dict[str, Any]:
    scheme, _, rest = identifier.partition(":")
    if scheme in OWN_AUTOENCODERS:  # our own: copy it in, so the folder travels
        target = path / AUTOENCODER_DIR
        if Path(rest).resolve() != target.resolve():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(rest, target)
        return {"identifier": f"{scheme}:{AUTOENCODER_DIR}", "relative": True}
    shutil.rmtree(path / AUTOENCODER_DIR, ignore_errors=True)  # an earlier pipeline's part, now stale
    return {"identifier": identifier, "relative": False}


def _digests(root: Path, written: list[Path]) -> dict[str, str]:
    files = []
    for item in written:
        files += sorted(p for p in item.rglob("*") if p.is_file()) if item.is_dir() else [item]
    return {p.relative_to(root).as_posix(): file_digest(p) for p in files}


# ----------------------------------------------------------------------------- reading

def is_pipeline_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """``pipeline.yaml`` of a folder, checked: valid YAML, our format, a version we read, every
    required part named with the right types. Errors are one line naming the file and the key."""
    config_path = Path(path) / CONFIG_NAME
    if not config_path.is_file():
        raise UserError(f"{Path(path)}: no {CONFIG_NAME}; is this a pipeline folder (written by "
                        "Pipeline.save_pretrained or `microdiff convert`)?")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"{config_path}: not valid YAML{at} ({getattr(err, 'problem', None) or type(err).__name__}); "
                        f"fix the file or {REEXPORT}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{config_path}: not a microdiff pipeline config (no 'format: {FORMAT}')")
    version = config.get("version", 1)
    if not isinstance(version, int) or version > VERSION:
        raise UserError(f"{config_path}: format version {version!r} is newer than this microdiff reads "
                        f"({VERSION}); upgrade microdiff")
    _require(config, config_path, "text_encoder", {"identifier": str})
    _require(config, config_path, "autoencoder", {"identifier": str})
    _require(config, config_path, "backbone", {"class": str, "config": dict})
    _require(config, config_path, "parameterization", {"name": str})
    files = config.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise UserError(f"{config_path}: 'files' must map file names to content hashes; {REEXPORT}")
    if version >= HASHES_REQUIRED_SINCE:
        unlisted = [name for name in _part_files(Path(path), config) if name not in files]
        if unlisted:
            what = "has no 'files' section" if not files else f"does not list {unlisted[0]} under 'files'"
            raise UserError(f"{config_path}: format version {version} records the content hash of every part, but "
                            f"it {what} (the file was edited); restore {CONFIG_NAME} or {REEXPORT}")
    return config


def _part_files(path: Path, config: Mapping[str, Any]) -> list[str]:
    """The files (relative names) the loader reads besides pipeline.yaml: what ``files`` must list."""
    names = [WEIGHTS_NAME]
    folder = config["text_encoder"].get("folder")
    if folder is not None:
        names.append(f"{folder}/{TEXT_CONFIG_FILE}")
        if (path / str(folder) / TEXT_WEIGHTS_FILE).exists():
            names.append(f"{folder}/{TEXT_WEIGHTS_FILE}")
    if config["autoencoder"].get("relative"):
        rest = config["autoencoder"]["identifier"].partition(":")[2]
        names += [f"{rest}/{AE_CONFIG_FILE}", f"{rest}/{AE_WEIGHTS_FILE}"]
    return names


def _require(config: dict, config_path: Path, key: str, fields: dict[str, type]) -> None:
    section = config.get(key)
    if not isinstance(section, dict):
        raise UserError(f"{config_path}: no '{key}' section (the pipeline needs its {key.replace('_', ' ')}); "
                        f"{REEXPORT}")
    for name, kind in fields.items():
        if not isinstance(section.get(name), kind):
            raise UserError(f"{config_path}: '{key}.{name}' is missing or not a {kind.__name__}; {REEXPORT}")


def verify_files(path: str | os.PathLike, config: Mapping[str, Any]) -> None:
    """Every file ``pipeline.yaml`` lists under ``files`` exists and has its recorded content hash."""
    path = Path(path)
    for name, digest in config.get("files", {}).items():
        check_digest(path / name, digest, path / CONFIG_NAME, f"restore it or {REEXPORT}")


def _text_encoder_folder(path: Path, config: Mapping[str, Any]) -> Path | None:
    """The text encoder's folder that ``pipeline.yaml`` names (it must exist), or None if it names none."""
    folder = config["text_encoder"].get("folder")
    if folder is None:
        return None
    target = path / str(folder)
    if not (target / TEXT_CONFIG_FILE).is_file():
        what = "missing" if not target.exists() else f"has no {TEXT_CONFIG_FILE}"
        raise UserError(f"{target}: {what}, but {path / CONFIG_NAME} names it as the text encoder's folder; "
                        f"copy it back or {REEXPORT}")
    return target


def read_weights(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor] | None]:
    """The trained weights of a pipeline folder, checked (hashes, readable files): ``{"backbone":
    state, "text_encoder": state or None}`` (None: the text encoder is a frozen pretrained one)."""
    path = Path(path)
    config = read_config(path)
    verify_files(path, config)
    folder = _text_encoder_folder(path, config)
    text_state = None
    if folder is not None and (folder / TEXT_WEIGHTS_FILE).is_file():
        text_state = read_safetensors(folder / TEXT_WEIGHTS_FILE, "text encoder weights file")
    return {"backbone": _denoiser_state(path), "text_encoder": text_state}


def _denoiser_state(path: Path) -> dict[str, torch.Tensor]:
    """The denoiser's weights, refusing NaN or inf ones (a diverged run's export samples black images)."""
    state = read_safetensors(path / WEIGHTS_NAME, "denoiser weights file")
    bad = non_finite(state)
    if bad is not None:
        raise UserError(f"{path / WEIGHTS_NAME}: tensor {bad[0]} holds {bad[1]} NaN/inf values of {bad[2]} (they "
                        f"sample black images; the run that wrote it diverged); {REEXPORT} from a good checkpoint")
    return state


def fingerprint(path: str | os.PathLike) -> str:
    """A content hash of everything a pipeline folder samples with: ``pipeline.yaml`` (its parts,
    defaults and the hashes of its files) and, for folders written before hashes were recorded, the
    files themselves. Moving the folder keeps it; retraining, re-exporting or editing defaults changes it."""
    path = Path(path)
    config = read_config(path)
    h = hashlib.sha256((path / CONFIG_NAME).read_bytes())
    if not config.get("files"):
        for part in (path / WEIGHTS_NAME, path / TEXT_ENCODER_DIR, path / AUTOENCODER_DIR):
            if part.exists():
                h.update(path_digest(part).encode())
    return f"sha256:{h.hexdigest()}"


def parameterization_from_config(cfg: Mapping[str, Any], source: str | os.PathLike = CONFIG_NAME) -> Parameterization:
    cfg = dict(cfg)
    name = cfg.pop("name")
    if name == "eps" and cfg.pop("discrete", False):
        raise UserError(f"{source}: a discrete-schedule eps model needs its DDPM schedule saved; "
                        "this version supports continuous eps, v, x0 and EDM parameterisations")
    cfg.pop("discrete", None)
    if name not in PARAMETERIZATIONS:
        raise UserError(f"{source}: unknown parameterization {name!r}; known: {', '.join(PARAMETERIZATIONS)}")
    try:
        return PARAMETERIZATIONS[name](**cfg)
    except TypeError as err:
        raise UserError(f"{source}: parameterization {name!r} does not take these settings ({err})") from None


def build_backbone(config: Mapping[str, Any], source: str | os.PathLike = CONFIG_NAME) -> torch.nn.Module:
    """A fresh backbone of the class and config ``pipeline.yaml`` names (weights come next)."""
    name = config["backbone"]["class"]
    if name not in BACKBONES:
        raise UserError(f"{source}: unknown backbone class {name!r}; known: {', '.join(BACKBONES)}")
    try:
        return BACKBONES[name](**config["backbone"]["config"])
    except (TypeError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{source}: backbone.config does not describe a {name} ({reason}); {REEXPORT}") from None


def load_parts(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(text_encoder, autoencoder, denoiser, defaults) of a pipeline folder, every part checked and
    loaded strictly (see the module docstring); the backbone gets ``dtype`` on ``device``."""
    path = Path(path)
    config_path = path / CONFIG_NAME
    config = read_config(path)
    defaults = SamplingDefaults.from_dict(config.get("defaults"), config_path)
    parameterization = parameterization_from_config(config["parameterization"], config_path)
    backbone = build_backbone(config, config_path)
    verify_files(path, config)  # before any weights are read
    state = _denoiser_state(path)
    load_strict(backbone, state, path / WEIGHTS_NAME,
                what=f"the {config['backbone']['class']} that {CONFIG_NAME} describes",
                fix=f"this file belongs to another model; put back the one written with this {CONFIG_NAME} or "
                    f"{REEXPORT}")
    # before the encoders load (a large one takes a while): what the identifiers tell without loading
    _check_fit(config_path, backbone, defaults, _known_geometry(path, config), _known_width(path, config),
               config["autoencoder"]["identifier"], config["text_encoder"]["identifier"])
    backbone = backbone.to(device=device, dtype=dtype).eval()
    text_encoder = _load_text_encoder(path, config, device)
    autoencoder = _load_autoencoder(path, config, device)
    if isinstance(autoencoder, IdentityAutoencoder) and autoencoder.latent_channels != 3:
        raise UserError(f"{config_path}: autoencoder {autoencoder.identifier} is pixel space with "
                        f"{autoencoder.latent_channels} channels, which are not RGB images; {REEXPORT} naming the "
                        "autoencoder whose latents the backbone makes")
    _check_fit(config_path, backbone, defaults, (autoencoder.latent_channels, autoencoder.downsample),
               getattr(text_encoder, "dim", None), autoencoder.identifier, text_encoder.identifier)
    return text_encoder, autoencoder, Denoiser(backbone, parameterization), defaults


def fit_problem(backbone: torch.nn.Module, latent_channels: int | None, text_width: int | None,
                mask_channels: bool = False) -> str | None:
    """Why a backbone does not fit an autoencoder with ``latent_channels`` and a text encoder whose states
    are ``text_width`` wide (None: not known, not checked), or None when they fit. ``mask_channels``: the
    backbone may take [x, mask] (2 x latent channels; Ambient Diffusion models sampled with masks)."""
    name = type(getattr(backbone, "_orig_mod", backbone)).__name__
    c_in, c_out = getattr(backbone, "in_channels", None), getattr(backbone, "out_channels", None)
    if latent_channels is not None and c_in is not None:
        allowed = (latent_channels, 2 * latent_channels) if mask_channels else (latent_channels,)
        if c_in not in allowed or (c_out is not None and c_out != latent_channels):
            if c_in == 2 * latent_channels and c_out == latent_channels:
                return (f"the {name} takes {c_in} input channels ([x, mask] of an Ambient Diffusion model) but "
                        "defaults.mask_keep_prob is not set, so it would get no mask")
            return (f"the autoencoder makes {latent_channels}-channel latents but the {name} takes "
                    f"in_channels={c_in}" + (f", out_channels={c_out}" if c_out != c_in else ""))
    caption = getattr(backbone, "caption_channels", None)
    if text_width is not None and caption and caption != text_width:
        return f"the text encoder's states are {text_width} wide but the {name} takes caption_channels={caption}"
    return None


def _check_fit(config_path: Path, backbone, defaults: SamplingDefaults, geometry, width, ae_id: str,
               text_id: str) -> None:
    problem = fit_problem(backbone, None if geometry is None else geometry[0], width,
                          defaults.mask_keep_prob is not None)
    if problem:
        raise UserError(f"{config_path}: the parts do not fit: {problem} (autoencoder {ae_id}, text encoder "
                        f"{text_id}); re-export the pipeline with matching parts (`microdiff convert` names them "
                        "with --vae and --text-encoder)")


def _known_geometry(path: Path, config: Mapping[str, Any]):
    ae = config["autoencoder"]
    identifier = ae["identifier"]
    if ae.get("relative"):
        scheme, _, rest = identifier.partition(":")
        if not (path / rest).is_dir():
            return None  # _load_autoencoder names the missing folder
        identifier = f"{scheme}:{path / rest}"
    try:
        return autoencoder_geometry(identifier)
    except (ValueError, OSError):
        return None  # the load that follows says what is wrong with it


def _known_width(path: Path, config: Mapping[str, Any]) -> int | None:
    folder = config["text_encoder"].get("folder")
    return text_encoder_width(path / str(folder) if folder is not None else config["text_encoder"]["identifier"])


def _load_text_encoder(path: Path, config: Mapping[str, Any], device):
    folder = _text_encoder_folder(path, config)
    if folder is not None:
        return load_text_encoder(folder, device=device)
    identifier = config["text_encoder"]["identifier"]
    encoder = load_text_encoder(identifier, device=device)
    if isinstance(encoder, BuiltinTextEncoder):
        raise UserError(f"{path / CONFIG_NAME}: text_encoder {identifier!r} is a built-in encoder, whose weights "
                        f"train with the model, but the folder holds no {TEXT_ENCODER_DIR}/ with them; copy it "
                        f"back or {REEXPORT}")
    return encoder


def _load_autoencoder(path: Path, config: Mapping[str, Any], device):
    ae_cfg = config["autoencoder"]
    identifier = ae_cfg["identifier"]
    if ae_cfg.get("relative"):
        scheme, _, rest = identifier.partition(":")
        target = path / rest
        if not target.is_dir():
            raise UserError(f"{target}: missing, but {path / CONFIG_NAME} names it as the autoencoder's folder; "
                            f"copy it back or {REEXPORT}")
        identifier = f"{scheme}:{target.resolve()}"
    return load_autoencoder(identifier, device=device)


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "TEXT_ENCODER_DIR", "AUTOENCODER_DIR", "FORMAT", "VERSION", "BACKBONES",
           "SamplingDefaults", "write_pipeline_folder", "is_pipeline_folder", "read_config", "verify_files",
           "read_weights", "fingerprint", "parameterization_from_config", "build_backbone", "load_parts", "fit_problem"]
