"""Save and load our own trained autoencoders (KL-VAE, VQGAN) as a folder:

    <folder>/config.json          {"kind": "vae" | "vqgan", "format": 2, "scale": ..., "shift": ...,
                                   "config": {architecture fields, scale, shift},
                                   "files": {"model.safetensors": "sha256:<hex>"}}
    <folder>/model.safetensors    weights and buffers (the VQ codebook and its EMA statistics)

safetensors does not notice bytes flipped inside tensor data, so ``config.json`` records the content
hash of the weights file and every load compares it first (a damaged copy is one line naming the
file, never a model with garbage weights). Format 2 says the hash is required: a format-2
``config.json`` without ``files`` is refused (someone deleted it). Folders written before (format 1,
no hash) still load.

``load_trained_autoencoder(folder)`` rebuilds the model in eval mode with
``identifier = "microdiff-vae:<absolute folder>"`` (or ``microdiff-vqgan:``), the string a
precompute run stores in its shard metadata and from which
:func:`microdiff.encoders.image.load_autoencoder` rebuilds the model (local folders are stored as
absolute paths, as for the other autoencoder schemes).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..utils.errors import UserError
from ..utils.files import write_text_atomic
from ..utils.weights import check_digest, file_digest, load_strict, non_finite, read_safetensors
from .vae import AutoencoderConfig, ConvAutoencoder, KLAutoencoder
from .vqgan import VQAutoencoder, VQConfig

FORMAT_VERSION = 2  # 2: config.json records the weights' content hash (required); 1: no hash
HASHED_SINCE = 2
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
KINDS: dict[str, tuple[type[ConvAutoencoder], type[AutoencoderConfig]]] = {
    "vae": (KLAutoencoder, AutoencoderConfig),
    "vqgan": (VQAutoencoder, VQConfig),
}


def build_autoencoder(kind: str, config: AutoencoderConfig | dict | None = None) -> ConvAutoencoder:
    """A fresh model of ``kind`` ("vae" or "vqgan") from a config object or dict of its fields.
    The model gets its own copy of the config (``fit_scale`` changes it)."""
    if kind not in KINDS:
        raise ValueError(f"unknown autoencoder kind {kind!r}; choose one of {', '.join(KINDS)}")
    model_cls, config_cls = KINDS[kind]
    if isinstance(config, AutoencoderConfig):
        config = config.to_dict()
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"a {kind!r} autoencoder needs a {config_cls.__name__} or a dict, got {type(config).__name__}")
    return model_cls(config_cls.from_dict(config or {}))


def save_autoencoder(model: ConvAutoencoder, folder: str | Path) -> Path:
    """Write ``model.safetensors`` and then ``config.json`` (with the weights' content hash, atomically)
    into ``folder`` (created); returns the folder."""
    from safetensors.torch import save_file

    if model.kind not in KINDS:
        raise ValueError(f"cannot save a {type(model).__name__}: only {', '.join(KINDS)} autoencoders")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"kind": model.kind})
    config = {"kind": model.kind, "format": FORMAT_VERSION, "scale": model.config.scale,
              "shift": model.config.shift, "config": model.config.to_dict(),
              "files": {WEIGHTS_NAME: file_digest(folder / WEIGHTS_NAME)}}
    write_text_atomic(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return folder


def read_autoencoder_config(folder: str | Path) -> dict:
    """``config.json`` of a saved autoencoder folder, checked (valid JSON, a kind we build, a format we
    read, a well-formed ``files`` section, required from format 2 on); one line naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such autoencoder folder (expected the output of "
                                "`microdiff train-autoencoder`, with config.json and model.safetensors)")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing; the folder is not a saved microdiff autoencoder")
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(saved, dict) or saved.get("kind") not in KINDS or not isinstance(saved.get("config"), dict):
        raise ValueError(f"{config_path}: field 'kind' must be one of {list(KINDS)} and 'config' an object; "
                         f"got kind={saved.get('kind') if isinstance(saved, dict) else None!r}")
    version = saved.get("format", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{config_path}: format {version!r} is newer than this microdiff reads "
                         f"({FORMAT_VERSION}); upgrade microdiff")
    files = saved.get("files")
    if files is None and version >= HASHED_SINCE:
        raise UserError(f"{config_path}: format {version} records the content hash of {WEIGHTS_NAME} under "
                        "'files', but the key is missing (the file was edited); restore it, or save the "
                        "autoencoder again")
    if files is not None and not (isinstance(files, dict) and isinstance(files.get(WEIGHTS_NAME), str)):
        raise UserError(f"{config_path}: 'files' must map {WEIGHTS_NAME} to its content hash; restore the file, "
                        "or save the autoencoder again")
    return saved


def saved_geometry(folder: str | Path) -> tuple[str, int, int]:
    """(kind, latent channels, downsampling factor) of a saved autoencoder folder, from its
    ``config.json`` alone (no weights are read)."""
    saved = read_autoencoder_config(folder)
    try:
        config = KINDS[saved["kind"]][1].from_dict(dict(saved["config"]))
    except (TypeError, ValueError) as err:
        raise UserError(f"{Path(folder) / CONFIG_NAME}: 'config' does not describe a {saved['kind']} autoencoder "
                        f"({err}); save it again with save_autoencoder") from None
    return saved["kind"], int(config.latent_channels), 2 ** (len(config.channel_mult) - 1)


def verify_autoencoder_files(folder: str | Path, saved: dict) -> None:
    """The files ``config.json`` lists have their recorded content hashes (a folder without hashes: nothing
    to compare)."""
    folder = Path(folder)
    for name, digest in (saved.get("files") or {}).items():
        check_digest(folder / name, digest, folder / CONFIG_NAME,
                     "restore the folder from a good copy, or train / save the autoencoder again")


def load_trained_autoencoder(folder: str | Path, device: str | torch.device = "cpu", sample: bool = False,
                             clamp: bool = False) -> ConvAutoencoder:
    """The autoencoder saved in ``folder`` by :func:`save_autoencoder`, in eval mode on ``device``,
    with gradients off. ``sample``: a KL autoencoder's ``encode`` draws from the posterior instead
    of returning its mean. ``clamp``: ``decode`` clamps images to [-1, 1]."""
    folder = Path(folder)
    saved = read_autoencoder_config(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: missing; the training run did not finish saving, "
                                "rerun it (it resumes from its checkpoint)")
    verify_autoencoder_files(folder, saved)  # before any weights are read
    arch = dict(saved["config"])
    arch.update({k: float(saved[k]) for k in ("scale", "shift") if k in saved})  # top level wins
    try:
        model = build_autoencoder(saved["kind"], arch)
    except (TypeError, ValueError) as err:
        raise UserError(f"{config_path}: 'config' does not describe a {saved['kind']} autoencoder ({err}); "
                        "save it again with save_autoencoder") from None
    state = read_safetensors(weights_path, "autoencoder weights file")
    load_strict(model, state, weights_path, what=f"{CONFIG_NAME} (a {saved['kind']} autoencoder)",
                fix="the file belongs to another autoencoder; save it again with save_autoencoder")
    bad = non_finite(state)
    if bad is not None:
        raise UserError(f"{weights_path}: tensor {bad[0]} holds {bad[1]} NaN/inf values of {bad[2]} (the training "
                        "diverged); train the autoencoder again or use an earlier copy")
    if sample and saved["kind"] != "vae":
        raise ValueError(f"{folder}: sample=True needs a KL autoencoder (kind 'vae'); this one is {saved['kind']!r}")
    model.sample_posterior, model.clamp = bool(sample), bool(clamp)
    model.identifier = f"microdiff-{saved['kind']}:{folder.resolve()}"
    return model.to(device).eval().requires_grad_(False)


__all__ = ["build_autoencoder", "save_autoencoder", "load_trained_autoencoder", "read_autoencoder_config",
           "saved_geometry", "verify_autoencoder_files", "KINDS", "FORMAT_VERSION"]
