"""Building blocks shared by the backbones: embeddings, norms, attention, feed-forward layers.

Module and parameter names follow micro_diffusion's so that its state dicts load unchanged
(``mlp.0``/``mlp.2`` in the timestep embedder, ``fc1``/``norm``/``fc2`` in caption MLPs, ``qkv``,
``q_linear``, ``kv_linear``, ``proj`` in attention, ``w1``/``w2``/``w3`` in SwiGLU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def tanh_gelu() -> nn.Module:
    return nn.GELU(approximate="tanh")


def layer_norm(dim: int, eps: float = 1e-6, affine: bool = True) -> nn.LayerNorm:
    """LayerNorm without a bias (a learned scale only, or nothing when ``affine=False``)."""
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine, bias=False)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation of tokens (B, T, D) by per-sample (B, D) shift and scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def round_up(n: int, multiple: int) -> int:
    return multiple * ((n + multiple - 1) // multiple)


def noise_batch(t, batch: int, device=None) -> torch.Tensor:
    """The noise input as a (B,) tensor; a scalar or a single value is shared by the batch."""
    t = torch.as_tensor(t, device=device)
    if t.numel() == 1:
        return t.reshape(1).expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar, (1,) or ({batch},) for a batch of {batch}, got {tuple(t.shape)}")
    return t


def caption_tokens(y: torch.Tensor, y_mask: torch.Tensor | None, batch: int, channels: int) -> torch.Tensor:
    """Caption states as (B, L, C); (B, 1, L, C) (micro_diffusion's layout) is accepted too."""
    if y.ndim == 4 and y.shape[1] == 1:
        y = y.squeeze(1)
    if y.ndim != 3 or y.shape[0] != batch or y.shape[-1] != channels:
        raise ValueError(f"caption y must have shape ({batch}, L, {channels}) or ({batch}, 1, L, {channels}), "
                         f"got {tuple(y.shape)}")
    if y_mask is not None and tuple(y_mask.shape) != tuple(y.shape[:2]):
        raise ValueError(f"y_mask must have shape {tuple(y.shape[:2])} (B, L), got {tuple(y_mask.shape)}")
    return y


def mean_tokens(y: torch.Tensor, y_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over caption tokens (B, L, D) -> (B, D); over the real ones when a mask is given.

    A sample whose mask has no real token averages all of them, as attention does for it (see
    ``_attention_mask``), so an all-False mask means the same as no mask.
    """
    if y_mask is None:
        return y.mean(dim=1)
    keep = y_mask.bool()
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    w = keep.to(y.dtype).unsqueeze(-1)
    return (y * w).sum(1) / w.sum(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of a (B,) tensor: cos of all frequencies, then sin (float32).

    Frequencies are ``max_period ** (-i / (dim // 2))`` for i = 0 .. dim//2 - 1; an odd ``dim``
    gets one zero column at the end.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the noise level followed by a two-layer MLP (tanh-GELU)."""

    def __init__(self, dim: int, frequency_dim: int = 512):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), tanh_gelu(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t, self.frequency_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class Mlp(nn.Module):
    """fc1 -> tanh-GELU -> optional norm -> fc2 (timm's Mlp without dropout)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, norm: nn.Module | None = None,
                 bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim, bias=bias)
        self.act = tanh_gelu()
        self.norm = norm if norm is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) features: sin of all frequencies, then cos (float64)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    args = positions.to(torch.float64).reshape(-1, 1) * omega
    return torch.cat([args.sin(), args.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid_hw: tuple[int, int], pos_interp_scale: float = 1.0) -> torch.Tensor:
    """Fixed 2-D sin-cos table (H*W, dim), rows in raster order, as micro_diffusion builds it.

    Patch (r, c) sits at coordinates (r, c) / pos_interp_scale; the first half of the features
    encodes the column, the second half the row. With ``pos_interp_scale=2`` a grid twice as large
    puts its coordinates i/2 exactly on the base grid, so a 512-px model reuses 256-px positions.
    """
    if dim % 4:
        raise ValueError(f"the positional embedding needs a width divisible by 4, got {dim}")
    h, w = grid_hw
    rows = torch.arange(h, dtype=torch.float32) / pos_interp_scale
    cols = torch.arange(w, dtype=torch.float32) / pos_interp_scale
    row_grid, col_grid = torch.meshgrid(rows, cols, indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, col_grid), sincos_1d(dim // 2, row_grid)], dim=1)
    return emb.float()


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.reshape(b, n, heads, -1).transpose(1, 2)


def _attention_mask(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, L) keep-mask of keys -> boolean mask broadcastable over (B, heads, queries, L).

    A sample with no valid key at all (e.g. an empty caption) attends to every key rather than
    producing NaNs.
    """
    if key_mask is None:
        return None
    if key_mask.ndim != 2:
        raise ValueError(f"an attention key mask must have shape (B, L), got {tuple(key_mask.shape)}")
    key_mask = key_mask.bool()
    key_mask = key_mask | ~key_mask.any(dim=-1, keepdim=True)
    return key_mask[:, None, None, :]


def _qk_norm(norm: nn.LayerNorm, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """QK-norm in float32 whatever the autocast dtype (bf16 statistics of q and k shift the attention
    logits), returned in the dtype attention runs in."""
    return norm(x.to(torch.promote_types(x.dtype, torch.float32))).to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention (torch's fused kernels). Under CPU bf16 autocast it runs in float32:
    torch's CPU flash kernel is faster in float32 than in bf16 (forward + backward at 256 tokens, head
    dim 32: 16.7 ms against 22.5 ms on the 2-core AMD EPYC of benchmarks/RESULTS.md). On a GPU it
    runs in the autocast dtype (the bf16 flash kernel)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            up = torch.promote_types(v.dtype, torch.float32)
            out = F.scaled_dot_product_attention(q.to(up), k.to(up), v.to(up), attn_mask=mask)
        return out.to(v.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention with QK-norm: one non-affine LayerNorm over all heads of q and k.

    ``hidden_dim`` (default ``dim``) is the width of the q/k/v space; heads = hidden_dim / head_dim.
    """

    def __init__(self, dim: int, head_dim: int, hidden_dim: int | None = None, bias: bool = False,
                 norm_eps: float = 1e-6):
        super().__init__()
        hidden_dim = hidden_dim or dim
        if hidden_dim % head_dim:
            raise ValueError(f"attention width {hidden_dim} is not a multiple of head_dim {head_dim}")
        self.heads = hidden_dim // head_dim
        self.qkv = nn.Linear(dim, 3 * hidden_dim, bias=bias)
        self.proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.ln_q = layer_norm(hidden_dim, norm_eps, affine=False)
        self.ln_k = layer_norm(hidden_dim, norm_eps, affine=False)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``key_mask`` (B, T), True = a real token others may attend to (None: all tokens)."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = _qk_norm(self.ln_q, q, v.dtype), _qk_norm(self.ln_k, k, v.dtype)
        out = attention(*(_split_heads(a, self.heads) for a in (q, k, v)), _attention_mask(key_mask))
        return self.proj(_merge_heads(out))


class CrossAttention(nn.Module):
    """Queries from the tokens, keys and values from the caption tokens; QK-norm as in SelfAttention.

    ``context_mask`` (B, L), True = attend, lets padded caption tokens be ignored; micro_diffusion
    attends to all tokens (its captions are zero-padded), which is the default.
    """

    def __init__(self, dim: int, head_dim: int, hidden_dim: int | None = None, bias: bool = False,
                 norm_eps: float = 1e-6, context_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or dim
        if hidden_dim % head_dim:
            raise ValueError(f"attention width {hidden_dim} is not a multiple of head_dim {head_dim}")
        self.heads = hidden_dim // head_dim
        self.q_linear = nn.Linear(dim, hidden_dim, bias=bias)
        self.kv_linear = nn.Linear(context_dim or dim, 2 * hidden_dim, bias=bias)
        self.proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.ln_q = layer_norm(hidden_dim, norm_eps, affine=False)
        self.ln_k = layer_norm(hidden_dim, norm_eps, affine=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self.q_linear(x)
        k, v = self.kv_linear(context).chunk(2, dim=-1)
        q, k = _qk_norm(self.ln_q, q, v.dtype), _qk_norm(self.ln_k, k, v.dtype)
        out = attention(*(_split_heads(a, self.heads) for a in (q, k, v)), _attention_mask(context_mask))
        return self.proj(_merge_heads(out))


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x), hidden = ``2/3 * hidden_dim`` rounded up to ``multiple_of``."""

    def __init__(self, dim: int, hidden_dim: int, multiple_of: int, bias: bool = False):
        super().__init__()
        self.hidden_dim = round_up(int(2 * hidden_dim / 3), multiple_of)
        self.w1 = nn.Linear(dim, self.hidden_dim, bias=bias)
        self.w2 = nn.Linear(dim, self.hidden_dim, bias=bias)
        self.w3 = nn.Linear(self.hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


__all__ = [
    "tanh_gelu", "layer_norm", "modulate", "round_up", "noise_batch", "caption_tokens", "mean_tokens", "timestep_embedding", "TimestepEmbedder",
    "Mlp", "sincos_1d", "sincos_pos_embed_2d", "attention", "SelfAttention", "CrossAttention", "SwiGLU",
]
