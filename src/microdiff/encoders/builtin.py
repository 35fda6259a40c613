"""The built-in text encoder: a byte-level tokenizer and a small pre-norm transformer, trained jointly
with the diffusion model (the offline default). Its identifier (``builtin:byte-d128-l2-h4-len128-
mlp4-seed0``) holds the whole architecture and the init seed, so an untrained one is rebuilt from it
exactly; trained weights are saved in a folder (``save``/``load``) or with the diffusion checkpoint.

A saved folder's ``text_encoder.json`` records the content hash of ``text_encoder.safetensors``
(``files``; format 2, where it is required) and ``load`` compares it before reading the weights, as
for pipelines and autoencoders; folders saved before (no ``format``, no hash) still load."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.errors import UserError
from ..utils.files import write_text_atomic
from ..utils.weights import check_digest, file_digest, load_strict, read_safetensors
from .base import TextEncoding
from .text_common import (CHECKPOINT_KEY, CONFIG_FILE, WEIGHTS_FILE, _count_truncation,
                          check_captions, masked_mean)
from .tokenizer import VOCAB_SIZE, ByteTokenizer

BUILTIN_DEFAULTS: dict[str, Any] = dict(dim=128, layers=2, heads=4, max_length=128, mlp_ratio=4.0, seed=0)
SAVED_FORMAT = 2  # 2: text_encoder.json records the weights' content hash (required); none: saved before


def builtin_identifier(config: dict[str, Any]) -> str:
    c = {**BUILTIN_DEFAULTS, **config}
    return (f"builtin:byte-d{c['dim']}-l{c['layers']}-h{c['heads']}-len{c['max_length']}"
            f"-mlp{float(c['mlp_ratio']):g}-seed{c['seed']}")


_BUILTIN_FIELDS = {"d": "dim", "l": "layers", "h": "heads", "len": "max_length", "mlp": "mlp_ratio",
                   "seed": "seed"}


def parse_builtin(name: str) -> dict[str, Any]:
    """``byte-d128-l2-h4-len128-mlp4-seed0`` (any subset, any order; ``''``/``default``: defaults)."""
    config = dict(BUILTIN_DEFAULTS)
    for part in name.split("-") if name not in ("", "default") else []:
        m = re.fullmatch(r"(len|mlp|seed|d|l|h)(\d+(?:\.\d+)?)", part)
        if part == "byte":
            continue
        if m is None:
            raise ValueError(f"builtin text encoder {name!r}: cannot read {part!r}; write it like "
                             "builtin:byte-d128-l2-h4-len128-mlp4-seed0 (d=width, l=layers, h=heads, "
                             "len=max bytes, mlp=ratio, seed=init seed)")
        key = _BUILTIN_FIELDS[m.group(1)]
        config[key] = float(m.group(2)) if key == "mlp_ratio" else int(float(m.group(2)))
    return config


class TextBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)) over the real tokens, then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class BuiltinTextEncoder(nn.Module):
    """Byte tokens -> embedding + learned positions -> pre-norm transformer blocks -> LayerNorm.

    Bidirectional attention over the real tokens only, so a caption's states do not depend on the
    padding; padded positions are returned as zeros; pooled = mean over the real tokens. Its
    parameters train with the diffusion model (``encode`` keeps the graph unless the caller is
    under ``torch.no_grad``). The initial weights come from ``seed``, so ``load_text_encoder``
    rebuilds an untrained encoder exactly from its identifier; trained ones travel as
    ``save``/``load`` folders or inside a checkpoint (``text_encoder_state``).
    """

    def __init__(self, dim: int = 128, layers: int = 2, heads: int = 4, max_length: int = 128,
                 mlp_ratio: float = 4.0, seed: int = 0, padding: str = "max_length"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"builtin text encoder: dim={dim} must be a multiple of heads={heads}")
        self.config = dict(dim=dim, layers=layers, heads=heads, max_length=max_length,
                           mlp_ratio=float(mlp_ratio), seed=seed)
        self.identifier = builtin_identifier(self.config)
        self.dim, self.max_length, self.padding = dim, max_length, padding
        self.tokenizer = ByteTokenizer(max_length)
        self.truncated = self.encoded = 0
        self.token_embedding = nn.Embedding(VOCAB_SIZE, dim)
        self.pos_embedding = nn.Parameter(torch.zeros(max_length, dim))
        self.blocks = nn.ModuleList([TextBlock(dim, heads, mlp_ratio) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, 0.02) embeddings and input projections, output projections scaled by
        1/sqrt(2 * layers) (GPT-2), zero biases, unit LayerNorms; drawn from ``seed`` on the CPU."""
        g = torch.Generator().manual_seed(self.config["seed"])
        out_std = 0.02 / (2 * len(self.blocks)) ** 0.5

        def normal(t: torch.Tensor, std: float = 0.02) -> None:
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32) * std)

        normal(self.token_embedding.weight)
        normal(self.pos_embedding)
        for blk in self.blocks:
            for lin, std in ((blk.qkv, 0.02), (blk.proj, out_std), (blk.fc1, 0.02), (blk.fc2, out_std)):
                normal(lin.weight, std)
                lin.bias.zero_()
            blk.norm1.reset_parameters()
            blk.norm2.reset_parameters()
        self.norm.reset_parameters()

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.bool()
        x = self.token_embedding(input_ids) + self.pos_embedding[: input_ids.shape[1]]
        for blk in self.blocks:
            x = blk(x, mask)
        return self.norm(x) * mask.unsqueeze(-1).to(x.dtype)

    def encode(self, captions: list[str]) -> TextEncoding:
        captions = check_captions(captions)
        tokens = self.tokenizer(captions, self.padding)
        _count_truncation(self, sum(tokens["truncated"]), len(captions))
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        states = self(ids, mask)
        return TextEncoding(states, mask, masked_mean(states, mask))

    def save(self, directory: str | os.PathLike) -> Path:
        """``directory/text_encoder.safetensors``, then ``text_encoder.json`` (identifier, config and the
        weights' content hash, written atomically: a folder with the JSON is complete)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).unlink(missing_ok=True)  # incomplete until the new one is written
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={CHECKPOINT_KEY: self.identifier})
        payload = {"identifier": self.identifier, "kind": "builtin", "format": SAVED_FORMAT, "config": self.config,
                   "files": {WEIGHTS_FILE: file_digest(directory / WEIGHTS_FILE)}}
        write_text_atomic(directory / CONFIG_FILE, json.dumps(payload, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> "BuiltinTextEncoder":
        """The encoder ``save`` wrote; a missing, damaged or mismatched file is one line naming it."""
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found: a built-in text encoder folder holds "
                                        f"{CONFIG_FILE} and {WEIGHTS_FILE}, as BuiltinTextEncoder.save writes them")
        try:
            payload = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
            config = payload.get("config")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise UserError(f"{directory / CONFIG_FILE}: not a JSON object ({err}); re-save the encoder with "
                            ".save()") from None
        _verify_saved_files(directory, payload)
        if not isinstance(config, dict):
            raise ValueError(f"{directory / CONFIG_FILE}: no 'config' object; re-save the encoder with .save()")
        try:
            encoder = cls(**config)
        except (TypeError, ValueError) as err:
            raise UserError(f"{directory / CONFIG_FILE}: 'config' does not describe a built-in text encoder "
                            f"({err}); re-save the encoder with .save()") from None
        weights = directory / WEIGHTS_FILE
        load_strict(encoder, read_safetensors(weights, "text encoder weights file"), weights,
                    what=CONFIG_FILE,
                    fix="the file belongs to another encoder; re-save it with .save()")
        return encoder.to(device=device, dtype=dtype)


def _verify_saved_files(directory: Path, payload: dict[str, Any]) -> None:
    """The weights' content hash that ``text_encoder.json`` records matches (required from format 2 on)."""
    config_path = directory / CONFIG_FILE
    version, files = payload.get("format", 1), payload.get("files")
    if not isinstance(version, int) or version > SAVED_FORMAT:
        raise UserError(f"{config_path}: format {version!r} is newer than this microdiff reads ({SAVED_FORMAT}); "
                        "upgrade microdiff")
    if files is None and version >= 2:
        raise UserError(f"{config_path}: format {version} records the content hash of {WEIGHTS_FILE} under 'files', "
                        "but the key is missing (the file was edited); restore it, or save the encoder again")
    if files is None:
        return
    if not (isinstance(files, dict) and isinstance(files.get(WEIGHTS_FILE), str)):
        raise UserError(f"{config_path}: 'files' must map {WEIGHTS_FILE} to its content hash; restore the file, or "
                        "save the encoder again")
    check_digest(directory / WEIGHTS_FILE, files[WEIGHTS_FILE], config_path,
                 "restore the folder from a good copy, or save the encoder again")


__all__ = ["BUILTIN_DEFAULTS", "BuiltinTextEncoder", "TextBlock", "builtin_identifier", "parse_builtin"]
