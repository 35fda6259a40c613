"""MicroDiT: the sparse latent diffusion transformer of "Stretching Each Dollar" (micro_diffusion).

    x (B,C,H,W) -> patch embed + fixed sin-cos positions -> patch-mixer blocks over all tokens
      -> drop a random mask_ratio of tokens -> DiT blocks on the kept tokens -> final AdaLN layer
      -> put a zero mask token where tokens were dropped -> unpatchify -> F (B,C,H,W)
    t (B,)   -> sinusoidal features -> MLP -----------------------------+--> c drives every AdaLN
    y (B,1,L,Cy) -> per-token MLP -> prompt self-attention block -> mean -> MLP
                                   `-> caption tokens for cross-attention in every block

Every block: AdaLN-modulated gated self-attention, cross-attention to the caption tokens (neither
modulated nor gated), AdaLN-modulated gated feed-forward (SwiGLU, or expert-choice MoE every
``experts_every_n`` blocks). Attention and FFN widths grow linearly over depth from ``qkv_ratio``
and ``mlp_ratio``. Names of modules and parameters are micro_diffusion's, so its checkpoints (and
Ambient-o's) load with ``strict=True``.

``forward`` returns ``{"sample": F, "mask": token mask or None, "loss_mask": pixel mask or None}``:
``mask`` is micro_diffusion's (B, T) with 1 = dropped token; ``loss_mask`` is (B, 1, H, W) with
1 = visible, which :func:`microdiff.diffusion.loss.denoising_loss` applies on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..utils.registry import lookup
from ..utils.weights import load_strict, read_safetensors, read_torch_file
from .layers import (CrossAttention, Mlp, SelfAttention, SwiGLU, TimestepEmbedder, caption_tokens, layer_norm,
                     mean_tokens, modulate, noise_batch, round_up, sincos_pos_embed_2d, tanh_gelu)
from .moe import ExpertChoiceMoE

Ratio = float | Sequence[float]


# ----------------------------------------------------------------------------- widths and masks

def spread(ratio: Ratio, depth: int) -> list[float]:
    """Per-block ratios: a scalar is constant, a [start, end] pair is spread linearly over depth
    (numpy.linspace, as micro_diffusion does), a list of ``depth`` values is taken as is."""
    if isinstance(ratio, (int, float)):
        return [float(ratio)] * depth
    ratio = [float(r) for r in ratio]
    if len(ratio) == depth:
        return ratio
    if len(ratio) == 2:
        return [float(r) for r in np.linspace(ratio[0], ratio[1], num=depth, dtype=float)]
    raise ValueError(f"a ratio must be a number, a [start, end] pair or {depth} values; got {ratio}")


def attention_width(dim: int, head_dim: int, qkv_ratio: float) -> int:
    """Width of the q/k/v space: dim * ratio rounded up to a multiple of two heads (dim at ratio 1)."""
    return dim if qkv_ratio == 1 else round_up(int(dim * qkv_ratio), 2 * head_dim)


def moe_blocks(depth: int, every_n: int, first: int, last: int) -> list[bool]:
    """Which of ``depth`` blocks hold an MoE FFN: every ``every_n``-th (1-based) block with index in
    [first, last). micro_diffusion's backbone uses [0, depth - 1) (its last block stays dense), its
    patch-mixer [1, depth)."""
    return [first <= i < last and every_n > 0 and (i + 1) % every_n == 0 for i in range(depth)]


def draw_token_mask(batch: int, tokens: int, mask_ratio: float, device=None,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random per-sample token dropping, drawn as micro_diffusion does: ``torch.rand(B, T)`` then
    argsort; the first ``int(T * (1 - mask_ratio))`` tokens of the order are kept.

    Returns ``keep`` (B, K) indices of kept tokens, ``restore`` (B, T) the inverse permutation and
    ``mask`` (B, T) with 1 = dropped.
    """
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    num_keep = int(tokens * (1 - mask_ratio))
    if num_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no token of {tokens}; lower it")
    order = torch.argsort(torch.rand(batch, tokens, device=device, generator=generator), dim=1)
    restore = torch.argsort(order, dim=1)
    mask = torch.ones(batch, tokens, device=device)
    mask[:, :num_keep] = 0
    return {"keep": order[:, :num_keep], "restore": restore, "mask": torch.gather(mask, 1, restore)}


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, T, D), index (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def restore_tokens(x: torch.Tensor, restore: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Append ``fill`` tokens for the dropped positions and undo the shuffle: (B, K, D) -> (B, T, D)."""
    b, k, d = x.shape
    fill = fill.to(x.dtype).expand(b, restore.shape[1] - k, d)
    return gather_tokens(torch.cat([x, fill], dim=1), restore)


# ----------------------------------------------------------------------------- modules

class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens (B, T, D) in raster order (a conv, kernel = stride = patch)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class CaptionProjection(nn.Module):
    """Per-token MLP from caption_channels to the model width, LayerNorm between its layers."""

    def __init__(self, caption_channels: int, dim: int, norm_eps: float):
        super().__init__()
        self.y_proj = Mlp(caption_channels, dim, dim, norm=layer_norm(dim, norm_eps))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class PromptBlock(nn.Module):
    """One pre-norm transformer block over the caption tokens (self-attention + SwiGLU)."""

    def __init__(self, dim: int, head_dim: int, multiple_of: int, norm_eps: float, use_bias: bool):
        super().__init__()
        self.norm1 = layer_norm(dim, norm_eps)
        self.attn = SelfAttention(dim, head_dim, bias=use_bias, norm_eps=norm_eps)
        self.norm2 = layer_norm(dim, norm_eps)
        self.mlp = SwiGLU(dim, 4 * dim, multiple_of, bias=use_bias)

    def forward(self, y: torch.Tensor, y_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = y + self.attn(self.norm1(y), y_mask)
        return y + self.mlp(self.norm2(y))


class DiTBlock(nn.Module):
    """AdaLN-gated self-attention, plain cross-attention to captions, AdaLN-gated FFN (dense or MoE)."""

    def __init__(self, dim: int, cond_dim: int, head_dim: int, qkv_ratio: float, mlp_ratio: float,
                 multiple_of: int, norm_eps: float, use_bias: bool, moe: bool, num_experts: int,
                 expert_capacity: float, moe_dispatch: str, init_std: float):
        super().__init__()
        self.init_std = init_std
        self.norm1 = layer_norm(dim, norm_eps)
        self.attn = SelfAttention(dim, head_dim, attention_width(dim, head_dim, qkv_ratio),
                                  bias=use_bias, norm_eps=norm_eps)
        self.cross_attn = CrossAttention(dim, head_dim, bias=use_bias, norm_eps=norm_eps)
        self.norm2 = layer_norm(dim, norm_eps)
        self.norm3 = layer_norm(dim, norm_eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = (ExpertChoiceMoE(dim, hidden, num_experts, expert_capacity, multiple_of, moe_dispatch)
                    if moe else SwiGLU(dim, hidden, multiple_of, bias=use_bias))
        self.adaLN_modulation = nn.Sequential(tanh_gelu(), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor,
                y_mask: torch.Tensor | None = None) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        x = x + self.cross_attn(self.norm2(x), y, y_mask)
        return x + gate_f.unsqueeze(1) * self.mlp(modulate(self.norm3(x), shift_f, scale_f))

    @torch.no_grad()
    def init_weights(self) -> None:
        """Inputs of attention/FFN at std 0.02, their output projections at the depth-scaled std,
        AdaLN at zero (each block starts as the identity)."""
        for norm in (self.norm1, self.norm2, self.norm3):
            norm.reset_parameters()
        _trunc_normal(self.attn.qkv.weight, self.cross_attn.q_linear.weight, self.cross_attn.kv_linear.weight)
        _trunc_normal(self.attn.proj.weight, self.cross_attn.proj.weight, std=self.init_std)
        if isinstance(self.mlp, ExpertChoiceMoE):
            _trunc_normal(self.mlp.gate.weight, self.mlp.w1)
            _trunc_normal(self.mlp.w2, std=self.init_std)
        else:
            _trunc_normal(self.mlp.w1.weight)
            _trunc_normal(self.mlp.w2.weight, self.mlp.w3.weight, std=self.init_std)
        nn.init.zeros_(self.adaLN_modulation[-1].weight)


class FinalLayer(nn.Module):
    """AdaLN (shift, scale) then a linear map from tokens to patches of output channels."""

    def __init__(self, dim: int, cond_dim: int, patch_size: int, out_channels: int, norm_eps: float):
        super().__init__()
        self.norm_final = layer_norm(dim, norm_eps)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(tanh_gelu(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def _trunc_normal(*tensors: torch.Tensor, std: float = 0.02) -> None:
    for t in tensors:
        nn.init.trunc_normal_(t, mean=0.0, std=std)


# ----------------------------------------------------------------------------- the model

class MicroDiT(nn.Module):
    """Text-conditioned sparse DiT; keyword arguments are micro_diffusion's ``DiT`` ones.

    ``qkv_ratio`` and ``mlp_ratio`` take a [start, end] pair spread over ``depth`` (or one value per
    block). ``input_size`` is the latent side (or an (H, W) pair); the positional table is built for
    it. Ours on top: ``out_channels`` (default: in_channels), ``moe_dispatch`` ("gather" or
    micro_diffusion's "dense") and ``gradient_checkpointing``.
    """

    def __init__(self, input_size: int | Sequence[int] = 32, patch_size: int = 2, in_channels: int = 4,
                 dim: int = 1152, depth: int = 28, head_dim: int = 64, multiple_of: int = 256,
                 caption_channels: int = 1024, pos_interp_scale: float = 1.0, norm_eps: float = 1e-6,
                 depth_init: bool = True, qkv_ratio: Ratio = 1.0, mlp_ratio: Ratio = 4.0,
                 use_patch_mixer: bool = True, patch_mixer_depth: int = 4, patch_mixer_dim: int = 512,
                 patch_mixer_qkv_ratio: float = 1.0, patch_mixer_mlp_ratio: float = 1.0,
                 use_bias: bool = True, num_experts: int = 8, expert_capacity: float = 1.0,
                 experts_every_n: int = 2, out_channels: int | None = None,
                 moe_dispatch: str = "gather", gradient_checkpointing: bool = False):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.config["qkv_ratio"] = _as_data(qkv_ratio)
        self.config["mlp_ratio"] = _as_data(mlp_ratio)
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(size) != 2 or any(s % patch_size for s in size):
            raise ValueError(f"input_size {input_size} must be one or two multiples of patch_size={patch_size}")
        self.input_hw = size
        self.grid = (size[0] // patch_size, size[1] // patch_size)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.caption_channels = caption_channels
        self.pos_interp_scale = pos_interp_scale
        self.use_patch_mixer = use_patch_mixer
        self.gradient_checkpointing = gradient_checkpointing

        self.x_embedder = PatchEmbed(patch_size, in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.register_buffer("pos_embed", torch.zeros(1, self.grid[0] * self.grid[1], dim))
        self.y_embedder = CaptionProjection(caption_channels, dim, norm_eps)
        self.y_emb_preprocess = PromptBlock(dim, head_dim, multiple_of, norm_eps, use_bias)
        self.pooled_y_emb_process = Mlp(dim, dim, dim, norm=layer_norm(dim, norm_eps))

        block = dict(cond_dim=dim, head_dim=head_dim, multiple_of=multiple_of, norm_eps=norm_eps,
                     use_bias=use_bias, num_experts=num_experts, expert_capacity=expert_capacity,
                     moe_dispatch=moe_dispatch)
        if use_patch_mixer:
            mixer_moe = moe_blocks(patch_mixer_depth, experts_every_n, 1, patch_mixer_depth)
            self.patch_mixer = nn.ModuleList([
                DiTBlock(patch_mixer_dim, qkv_ratio=patch_mixer_qkv_ratio, mlp_ratio=patch_mixer_mlp_ratio,
                         moe=mixer_moe[i], init_std=0.02 / (2 * depth) ** 0.5, **block)
                for i in range(patch_mixer_depth)])
            mixer_map = (lambda a, b: nn.Sequential(layer_norm(a, norm_eps), nn.Linear(a, b, bias=use_bias))
                         if patch_mixer_dim != dim else nn.Identity())
            self.patch_mixer_map_xin = mixer_map(dim, patch_mixer_dim)
            self.patch_mixer_map_xout = mixer_map(patch_mixer_dim, dim)
            self.patch_mixer_map_y = mixer_map(dim, patch_mixer_dim)

        qkv_ratios, mlp_ratios = spread(qkv_ratio, depth), spread(mlp_ratio, depth)
        backbone_moe = moe_blocks(depth, experts_every_n, 0, depth - 1)
        self.blocks = nn.ModuleList([
            DiTBlock(dim, qkv_ratio=qkv_ratios[i], mlp_ratio=mlp_ratios[i], moe=backbone_moe[i],
                     init_std=0.02 / (2 * ((i + 1) if depth_init else depth)) ** 0.5, **block)
            for i in range(depth)])
        self.register_buffer("mask_token", torch.zeros(1, 1, patch_size ** 2 * self.out_channels))
        self.final_layer = FinalLayer(dim, dim, patch_size, self.out_channels, norm_eps)
        self.init_weights()

    # ------------------------------------------------------------------ weights

    def positional_table(self, device=None) -> torch.Tensor:
        table = sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid, self.pos_interp_scale)
        return table.unsqueeze(0).to(device if device is not None else self.pos_embed.device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """micro_diffusion's initialisation: xavier-uniform linears with zero biases, N(0, 0.02)
        embedding MLPs, per-block truncated normals with depth-scaled output projections, and zero
        AdaLN, prompt-block outputs and final layer, so training starts from F = 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.pos_embed.copy_(self.positional_table())
        nn.init.xavier_uniform_(self.x_embedder.proj.weight.view(self.x_embedder.proj.weight.shape[0], -1))
        for mlp in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.pooled_y_emb_process.fc1,
                    self.pooled_y_emb_process.fc2, self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):
            nn.init.normal_(mlp.weight, std=0.02)
        for blk in [*self.blocks, *getattr(self, "patch_mixer", [])]:
            blk.init_weights()
        prompt = self.y_emb_preprocess
        _trunc_normal(prompt.attn.qkv.weight, prompt.attn.proj.weight, prompt.mlp.w1.weight,
                      prompt.mlp.w2.weight, prompt.mlp.w3.weight)
        for w in (prompt.attn.proj.weight, prompt.mlp.w3.weight, self.final_layer.linear.weight,
                  self.final_layer.adaLN_modulation[-1].weight):
            nn.init.zeros_(w)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint trained at another resolution carries a positional table for its own grid;
        # the table is fixed (not learned), so use the one for this model's grid instead.
        key = prefix + "pos_embed"
        if key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            state_dict[key] = self.positional_table(device=state_dict[key].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask_ratio: float = 0.0,
                y_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                **unused: Any) -> dict[str, torch.Tensor | None]:
        """F(x, t, y). x: (B, C, H, W); t: c_noise, shape (B,) or a scalar; y: caption tokens
        (B, 1, L, caption_channels) or (B, L, caption_channels); y_mask: optional (B, L), True = real
        token (default: attend to all, as micro_diffusion); mask_ratio: fraction of tokens dropped
        after the patch-mixer, drawn from ``generator`` (default: torch's global generator)."""
        y = self._check_inputs(x, y, y_mask)
        drop = None
        if mask_ratio > 0:  # drawn outside the graph: a torch.Generator cannot enter a compiled graph
            drop = draw_token_mask(x.shape[0], self.grid[0] * self.grid[1], mask_ratio, x.device, generator)
        keep, restore = (None, None) if drop is None else (drop["keep"], drop["restore"])
        graph = self.__dict__.get("_graph")
        out = (self.transform if graph is None else graph)(x, t, y, y_mask, keep, restore)
        mask = None if drop is None else drop["mask"]
        return {"sample": out, "mask": mask, "loss_mask": None if mask is None else self.visible_pixels(mask)}

    def transform(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None,
                  keep: torch.Tensor | None, restore: torch.Tensor | None) -> torch.Tensor:
        """The network proper, given the kept tokens' indices (B, K) and the inverse shuffle (B, T) of
        :func:`draw_token_mask` (None: no masking). Pure tensor code: one graph under torch.compile."""
        b = x.shape[0]
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(noise_batch(t, b, x.device))
        y = self.y_emb_preprocess(self.y_embedder(y), y_mask)
        c = c + self.pooled_y_emb_process(mean_tokens(y, y_mask))

        if self.use_patch_mixer:
            tokens = self.patch_mixer_map_xin(tokens)
            y_mixer = self.patch_mixer_map_y(y)
            for block in self.patch_mixer:
                tokens = self._run(block, tokens, y_mixer, c, y_mask)
        if keep is not None:
            tokens = gather_tokens(tokens, keep)
        if self.use_patch_mixer:
            tokens = self.patch_mixer_map_xout(tokens)
        for block in self.blocks:
            tokens = self._run(block, tokens, y, c, y_mask)
        patches = self.final_layer(tokens, c)
        if restore is not None:
            patches = restore_tokens(patches, restore, self.mask_token)
        return self.unpatchify(patches)

    def compile_graph(self, **options: Any) -> "MicroDiT":
        """``torch.compile`` the network (everything but the token-mask draw) as one graph;
        ``fullgraph=True`` makes any graph break an error. Options go to torch.compile."""
        self.__dict__["_graph"] = torch.compile(self.transform, **{"fullgraph": True, **options})
        return self

    def _run(self, block: DiTBlock, x, y, c, y_mask):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, y, c, y_mask, use_reentrant=False)
        return block(x, y, c, y_mask)

    def _check_inputs(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"MicroDiT expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != self.input_hw:
            raise ValueError(
                f"MicroDiT was built for {self.input_hw[0]}x{self.input_hw[1]} inputs (a positional table of "
                f"{self.grid[0]}x{self.grid[1]} patches), got {x.shape[-2]}x{x.shape[-1]}; build it with "
                f"input_size={x.shape[-2] if x.shape[-2] == x.shape[-1] else tuple(x.shape[-2:])} "
                "(and pos_interp_scale to reuse positions of another resolution)")
        return caption_tokens(y, y_mask, x.shape[0], self.caption_channels).to(self.pos_embed.dtype)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) tokens in raster order -> (B, C, H, W)."""
        (h, w), p, c = self.grid, self.patch_size, self.out_channels
        x = patches.reshape(patches.shape[0], h, w, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(patches.shape[0], c, h * p, w * p)

    def visible_pixels(self, mask: torch.Tensor) -> torch.Tensor:
        """Token mask (B, T), 1 = dropped -> pixel weights (B, 1, H, W), 1 = visible."""
        h, w = self.grid
        keep = (1 - mask).reshape(-1, 1, h, w)
        return keep.repeat_interleave(self.patch_size, 2).repeat_interleave(self.patch_size, 3)


def _as_data(ratio: Ratio) -> float | list[float]:
    return float(ratio) if isinstance(ratio, (int, float)) else [float(r) for r in ratio]


# ----------------------------------------------------------------------------- checkpoints

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def extract_state_dict(checkpoint: dict[str, Any], prefix: str = "dit.") -> dict[str, torch.Tensor]:
    """A MicroDiT state dict from a plain state dict, a ``{"state_dict": ...}`` file, or a composer
    checkpoint (``state/model`` with the DiT under ``dit.``); torch.compile/DDP prefixes are removed."""
    sd = checkpoint
    if "state" in sd and isinstance(sd["state"], dict) and "model" in sd["state"]:
        sd = sd["state"]["model"]
    elif "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    out = {}
    for key, value in sd.items():
        for wrapper in _WRAPPER_PREFIXES:
            key = key.replace(wrapper, "")
        out[key] = value
    return out


def load_checkpoint_file(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch checkpoint (loaded with ``weights_only=True``)."""
    if str(path).endswith(".safetensors"):
        return read_safetensors(path, "checkpoint")  # a truncated or damaged file: one line naming it
    return read_torch_file(path, "checkpoint", fix="re-save its state dict with torch.save(model.state_dict()) or "
                                                   "as safetensors")


def load_microdit(model: MicroDiT, path_or_state: str | dict[str, Any], strict: bool = True) -> MicroDiT:
    """Load micro_diffusion / Ambient-o / composer / our own weights into ``model`` (strict by default:
    missing, unexpected or reshaped weights are one line naming the file)."""
    state = load_checkpoint_file(path_or_state) if isinstance(path_or_state, str) else path_or_state
    if strict:
        source = path_or_state if isinstance(path_or_state, str) else "the state dict"
        load_strict(model, extract_state_dict(state), source, fix="these are the weights of another model",
                    ignore_shape=("pos_embed",))
    else:
        model.load_state_dict(extract_state_dict(state), strict=False)
    return model


# ----------------------------------------------------------------------------- presets

def MicroDiT_XL_2(**overrides: Any) -> MicroDiT:
    """1.16B parameters at latent 64 (micro_diffusion's and Ambient-o's released size)."""
    return _preset(dict(dim=1024, depth=28, head_dim=64, multiple_of=256, patch_mixer_depth=6,
                        patch_mixer_dim=768), overrides)


def MicroDiT_Tiny_2(**overrides: Any) -> MicroDiT:
    return _preset(dict(dim=512, depth=16, head_dim=32, multiple_of=256, patch_mixer_depth=4,
                        patch_mixer_dim=512), overrides)


def MicroDiT_Small_2(**overrides: Any) -> MicroDiT:
    """CPU-trainable in minutes at latent 16; captions from MiniLM-L6 (384 channels) by default."""
    return _preset(dict(dim=192, depth=6, head_dim=32, multiple_of=64, caption_channels=384,
                        input_size=16, patch_mixer_depth=2, patch_mixer_dim=192), overrides)


def MicroDiT_Nano_2(**overrides: Any) -> MicroDiT:
    """The smallest model with every part (mixer, MoE in mixer and backbone), for tests."""
    return _preset(dict(dim=64, depth=4, head_dim=16, multiple_of=32, caption_channels=32,
                        input_size=8, patch_mixer_depth=2, patch_mixer_dim=48), overrides)


def _preset(arch: dict[str, Any], overrides: dict[str, Any]) -> MicroDiT:
    kwargs = dict(input_size=32, patch_size=2, in_channels=4, caption_channels=1024, qkv_ratio=[0.5, 1.0],
                  mlp_ratio=[0.5, 4.0], pos_interp_scale=1.0, norm_eps=1e-6, depth_init=True,
                  use_patch_mixer=True, patch_mixer_qkv_ratio=1.0, patch_mixer_mlp_ratio=4.0,
                  use_bias=False, num_experts=8, expert_capacity=2.0, experts_every_n=2)
    kwargs.update(arch)
    kwargs.update(overrides)
    return MicroDiT(**kwargs)


DIT_PRESETS: dict[str, Callable[..., MicroDiT]] = {
    "MicroDiT_XL_2": MicroDiT_XL_2,
    "MicroDiT_Tiny_2": MicroDiT_Tiny_2,
    "MicroDiT_Small_2": MicroDiT_Small_2,
    "MicroDiT_Nano_2": MicroDiT_Nano_2,
}


def microdit(name: str, **overrides: Any) -> MicroDiT:
    return lookup(DIT_PRESETS, name, "MicroDiT preset")(**overrides)


__all__ = [
    "MicroDiT", "DiTBlock", "FinalLayer", "PatchEmbed", "CaptionProjection", "PromptBlock",
    "spread", "attention_width", "moe_blocks", "draw_token_mask", "gather_tokens", "restore_tokens",
    "extract_state_dict", "load_checkpoint_file", "load_microdit", "DIT_PRESETS", "microdit",
    *DIT_PRESETS,
]
