"""UNet: the convolutional backbone of ADM (Dhariwal & Nichol 2021) and DDPM++ (Song et al. 2021).

    x (B,Cin,H,W) -> pad H, W up to a multiple of 2**(levels-1) (replicate) -> conv_in
      encoder: per level, num_res_blocks x [ResBlock (+ attention)], then a strided-conv Downsample
      middle:  ResBlock + attention, ResBlock                     (at the coarsest level)
      decoder: per level, num_res_blocks+1 x [concat skip -> ResBlock (+ attention)], then
               nearest-neighbour x2 + conv Upsample
      -> GroupNorm -> SiLU -> conv_out (zero-initialised) -> crop back to H, W -> F (B,Cout,H,W)
    t (B,)             -> sinusoidal features -> MLP --------------+--> emb, drives every ResBlock
    y (B,L,Cy) -> (masked) mean over tokens -> MLP ----------------'    by GroupNorm scale-shift
               `-> caption tokens for cross-attention in every attention block

ResBlock: GroupNorm -> SiLU -> conv3x3 -> GroupNorm * (1 + scale) + shift (AdaGN, from emb) ->
SiLU -> dropout -> conv3x3 (zero-initialised), plus a 1x1-conv skip when the width changes.
Attention block: GroupNorm -> multi-head self-attention (QK-normed, ``layers.SelfAttention``) ->
residual, then, for caption models, GroupNorm -> cross-attention to the caption tokens -> residual;
both output projections start at zero, so a fresh model outputs exactly zero.

Conventions: attention levels are given as *downsampling factors* (``attention_downsample``,
1 = input resolution, 2 = half, ...), because the network accepts any input size; attention "at
16 px of a 32 px input" is factor 2. GroupNorm uses the largest divisor of the width that is at
most ``norm_groups`` (32) and leaves at least two channels per group. Inputs whose sides are not
multiples of 2**(levels-1) are padded at the bottom/right by replicating the border, then cropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..utils.registry import lookup
from .layers import CrossAttention, Mlp, SelfAttention, TimestepEmbedder, caption_tokens, mean_tokens, noise_batch

GROUP_NORM_EPS = 1e-5


def group_count(channels: int, max_groups: int = 32) -> int:
    """Largest divisor of ``channels`` that is <= ``max_groups`` and leaves >= 2 channels per group.

    (A group of one channel is an instance norm, which cancels the bias of the conv before it.)
    """
    limit = max(1, min(max_groups, channels // 2))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels, max_groups), channels, eps=GROUP_NORM_EPS)


def downsample_factors(pixel_sizes: Sequence[int], input_size: int) -> list[int]:
    """Feature-map sides in pixels of an ``input_size`` input -> downsampling factors (16 of 32 -> 2)."""
    factors = []
    for px in pixel_sizes:
        if px <= 0 or input_size % px:
            raise ValueError(f"attention resolution {px} px does not divide the input size {input_size}")
        factors.append(input_size // px)
    return factors


# ----------------------------------------------------------------------------- blocks

class ResBlock(nn.Module):
    """Residual conv block with AdaGN: the embedding gives a per-channel scale and shift that
    modulate the second GroupNorm, h = norm(h) * (1 + scale) + shift."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0,
                 norm_groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.adaGN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.adaGN_modulation(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)


def _to_map(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(like.shape)


class AttentionBlock(nn.Module):
    """GroupNorm -> self-attention -> residual, then (caption models) GroupNorm -> cross-attention
    to the caption tokens -> residual."""

    def __init__(self, channels: int, head_dim: int, caption_channels: int | None = None,
                 norm_groups: int = 32):
        super().__init__()
        head_dim = min(head_dim, channels)
        if channels % head_dim:
            raise ValueError(f"attention at width {channels} needs a head size dividing it; got "
                             f"attention_head_dim={head_dim}")
        self.norm = group_norm(channels, norm_groups)
        self.attn = SelfAttention(channels, head_dim)
        self.norm_cross = group_norm(channels, norm_groups) if caption_channels else None
        self.cross_attn = (CrossAttention(channels, head_dim, context_dim=caption_channels)
                           if caption_channels else None)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,
                y_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + _to_map(self.attn(_to_tokens(self.norm(x))), x)
        if self.cross_attn is not None:
            x = x + _to_map(self.cross_attn(_to_tokens(self.norm_cross(x)), y, y_mask), x)
        return x


class UNetBlock(nn.Module):
    """One ResBlock, optionally followed by an attention block: the unit the UNet stacks."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float,
                 attention: bool, head_dim: int, caption_channels: int | None, norm_groups: int):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, emb_dim, dropout, norm_groups)
        self.attn = (AttentionBlock(out_channels, head_dim, caption_channels, norm_groups)
                     if attention else None)

    def forward(self, x, emb, y=None, y_mask=None):
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x, y, y_mask)


class Downsample(nn.Module):
    """Halve H and W with a strided 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour repeat, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


# ----------------------------------------------------------------------------- the model

class UNet(nn.Module):
    """ADM / DDPM++-style UNet backbone ``F(x, t, y=None, y_mask=None) -> (B, out_channels, H, W)``.

    in_channels / out_channels: image channels in and out (out defaults to in; an ambient model
        that sees ``[masked image, mask]`` takes 2C or C+1 in and predicts C).
    model_channels, channel_mult: width of level i is model_channels * channel_mult[i]; there are
        len(channel_mult) levels, each downsampling by 2.
    num_res_blocks: ResBlocks per level in the encoder (the decoder has one more per level).
    attention_downsample: downsampling factors of the levels with attention (1 = input size);
        ``downsample_factors((16, 8), 32)`` turns pixel sizes of a 32 px input into them.
    mid_attention: attention between the two middle ResBlocks.
    attention_head_dim: channels per head (capped at the level's width).
    caption_channels: width of caption token states; enables cross-attention in every attention
        block and adds a pooled-caption MLP to the timestep embedding. None: no caption.
    emb_mult: the embedding width is emb_mult * model_channels.
    norm_groups: at most this many GroupNorm groups (see ``group_count``).
    gradient_checkpointing: recompute the blocks' activations in backward while training.
    """

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, model_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_downsample: Sequence[int] = (2,), mid_attention: bool = True,
                 attention_head_dim: int = 64, dropout: float = 0.0, caption_channels: int | None = None,
                 emb_mult: int = 4, norm_groups: int = 32, gradient_checkpointing: bool = False):
        super().__init__()
        caption_channels = caption_channels or None
        channel_mult = [int(m) for m in channel_mult]
        attention_downsample = sorted({int(f) for f in attention_downsample})
        levels = [2**i for i in range(len(channel_mult))]
        if not channel_mult or min(channel_mult) < 1 or num_res_blocks < 1:
            raise ValueError(f"UNet needs a non-empty positive channel_mult and num_res_blocks >= 1; got "
                             f"channel_mult={channel_mult}, num_res_blocks={num_res_blocks}")
        if unknown := [f for f in attention_downsample if f not in levels]:
            raise ValueError(f"attention_downsample {unknown} matches no level; this UNet's levels have "
                             f"downsampling factors {levels}")
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
            channel_mult=channel_mult, num_res_blocks=num_res_blocks,
            attention_downsample=attention_downsample, mid_attention=mid_attention,
            attention_head_dim=attention_head_dim, dropout=float(dropout), caption_channels=caption_channels,
            emb_mult=emb_mult, norm_groups=norm_groups, gradient_checkpointing=gradient_checkpointing)
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.caption_channels = caption_channels
        self.size_multiple = levels[-1]
        self.gradient_checkpointing = gradient_checkpointing

        emb_dim = emb_mult * model_channels
        self.t_embedder = TimestepEmbedder(emb_dim, frequency_dim=model_channels)
        self.pooled_y_embedder = Mlp(caption_channels, emb_dim, emb_dim) if caption_channels else None

        def block(cin: int, cout: int, attention: bool) -> UNetBlock:
            return UNetBlock(cin, cout, emb_dim, dropout, attention, attention_head_dim, caption_channels,
                             norm_groups)

        ch = model_channels * channel_mult[0]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        skips = [ch]
        self.encoder = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.encoder.append(block(ch, model_channels * mult, levels[level] in attention_downsample))
                ch = model_channels * mult
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.encoder.append(Downsample(ch))
                skips.append(ch)

        self.middle = nn.ModuleList([block(ch, ch, mid_attention), block(ch, ch, False)])

        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.decoder.append(block(ch + skips.pop(), model_channels * mult,
                                          levels[level] in attention_downsample))
                ch = model_channels * mult
            if level > 0:
                self.decoder.append(Upsample(ch))

        self.norm_out = group_norm(ch, norm_groups)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """PyTorch's default init, then zeros (as ADM) for the last conv of every ResBlock, every
        attention output projection and the output conv: each block starts as the identity and the
        untrained model outputs F = 0."""
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)
                nn.init.zeros_(m.conv2.bias)
            elif isinstance(m, (SelfAttention, CrossAttention)):
                nn.init.zeros_(m.proj.weight)
                if m.proj.bias is not None:
                    nn.init.zeros_(m.proj.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                y_mask: torch.Tensor | None = None, mask_ratio: float = 0.0) -> torch.Tensor:
        """F(x, t, y). x: (B, in_channels, H, W), any H, W; t: c_noise, shape (B,), (1,) or a scalar;
        y: caption tokens (B, 1, L, caption_channels) or (B, L, caption_channels), required exactly
        when the model has caption_channels; y_mask: optional (B, L), True = real token.
        ``mask_ratio`` exists only so MicroDiT's training calls work; a UNet cannot drop tokens."""
        if mask_ratio:
            raise ValueError(f"a UNet cannot drop patches (mask_ratio={mask_ratio}); patch masking is a "
                             "MicroDiT feature, train the UNet with mask_ratio=0")
        y = self._check_inputs(x, y, y_mask)
        b, _, height, width = x.shape
        emb = self.t_embedder(noise_batch(t, b, x.device))
        if y is not None:
            emb = emb + self.pooled_y_embedder(mean_tokens(y, y_mask))

        h = self.conv_in(self._pad(x))
        skips = [h]
        for module in self.encoder:
            h = self._run(module, h, emb, y, y_mask)
            skips.append(h)
        for module in self.middle:
            h = self._run(module, h, emb, y, y_mask)
        for module in self.decoder:
            if isinstance(module, UNetBlock):
                h = torch.cat([h, skips.pop().to(h.dtype)], dim=1)
            h = self._run(module, h, emb, y, y_mask)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out[:, :, :height, :width]

    def _run(self, module: nn.Module, h, emb, y, y_mask) -> torch.Tensor:
        if not isinstance(module, UNetBlock):
            return module(h)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, h, emb, y, y_mask, use_reentrant=False)
        return module(h, emb, y, y_mask)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Replicate-pad the bottom and right up to multiples of 2**(levels-1)."""
        m = self.size_multiple
        pad_h, pad_w = -x.shape[-2] % m, -x.shape[-1] % m
        return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x

    def _check_inputs(self, x: torch.Tensor, y: torch.Tensor | None,
                      y_mask: torch.Tensor | None) -> torch.Tensor | None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if self.caption_channels is None:
            if y is not None or y_mask is not None:
                got = "y_mask" if y is None else f"y of shape {tuple(y.shape)}"
                raise ValueError(f"this UNet was built without caption_channels and takes no caption, got "
                                 f"{got}; build it with caption_channels=... to condition on captions")
            return None
        if y is None:
            raise ValueError(f"this UNet was built with caption_channels={self.caption_channels} and needs "
                             f"caption tokens y of shape ({x.shape[0]}, L, {self.caption_channels}); "
                             "pass zeros for an empty caption")
        y = caption_tokens(y, y_mask, x.shape[0], self.caption_channels)
        return y.to(self.conv_in.weight.dtype)


# ----------------------------------------------------------------------------- presets

def UNet_Small(**overrides: Any) -> UNet:
    """CPU-small: 32-64 channels, one ResBlock per level, attention at the lowest level (8 px of a
    16 px input); trains on a CPU in minutes on 16-32 px images."""
    return _preset(dict(in_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_downsample=(2,), attention_head_dim=32), overrides)


def UNet_Noise2Art(**overrides: Any) -> UNet:
    """Noise2Art-like text-to-image UNet on 4-channel 32x32 latents: 64-128-256-256 channels,
    attention with caption cross-attention at 16, 8 and 4 px (CLIP-L width captions by default)."""
    return _preset(dict(in_channels=4, model_channels=64, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                        attention_downsample=downsample_factors((16, 8, 4), 32), attention_head_dim=64,
                        caption_channels=768), overrides)


def UNet_DDPMpp_CIFAR(**overrides: Any) -> UNet:
    """DDPM++ (Song et al. 2021) CIFAR-10 size: 128-256-256-256 channels, 4 ResBlocks per level,
    single-head attention at 16 px of a 32 px input, dropout 0.1."""
    return _preset(dict(in_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=4,
                        attention_downsample=downsample_factors((16,), 32), attention_head_dim=256,
                        dropout=0.1), overrides)


def _preset(arch: dict[str, Any], overrides: dict[str, Any]) -> UNet:
    return UNet(**{**arch, **overrides})


UNET_PRESETS: dict[str, Callable[..., UNet]] = {
    "UNet_Small": UNet_Small,
    "UNet_Noise2Art": UNet_Noise2Art,
    "UNet_DDPMpp_CIFAR": UNet_DDPMpp_CIFAR,
}


def unet(name: str, **overrides: Any) -> UNet:
    """A preset UNet by name, with keyword overrides."""
    return lookup(UNET_PRESETS, name, "UNet preset")(**overrides)


__all__ = [
    "UNet", "ResBlock", "AttentionBlock", "UNetBlock", "Downsample", "Upsample", "group_count",
    "downsample_factors", "UNET_PRESETS", "unet", *UNET_PRESETS,
]
