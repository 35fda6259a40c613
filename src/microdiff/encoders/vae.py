"""A compact convolutional KL autoencoder (the "VAE" of latent diffusion), trainable on your images.

    images (B,3,H,W) in [-1,1]
      Encoder: conv_in -> per level: num_res_blocks x ResBlock, then a stride-2 conv (not after
               the last level) -> mid: ResBlock, attention (optional), ResBlock
               -> GroupNorm -> SiLU -> conv_out to 2 x latent_channels  (mean, logvar)
      posterior N(mean, exp(logvar)) -> z (the mean, or a sample drawn with an explicit generator)
      Decoder: conv_in -> mid -> per level (coarse to fine): num_res_blocks + 1 x ResBlock, then
               nearest x2 + conv -> GroupNorm -> SiLU -> conv_out to 3 channels (the "last layer"
               the adaptive GAN weight looks at)

``downsample`` = 2 ** (len(channel_mult) - 1). ResBlock = GroupNorm -> SiLU -> conv3x3 -> GroupNorm
-> SiLU -> conv3x3, plus a 1x1-conv skip when the width changes (no time embedding: this is not a
denoiser). Attention is single-head over all positions, as in taming-transformers / LDM.

Latent convention (the Autoencoder protocol of ``base.py``): ``encode`` returns
``(z - shift) * scale`` and ``decode`` inverts it before decoding. ``scale`` and ``shift`` live in
the config (so they are saved with the weights); :meth:`ConvAutoencoder.fit_scale` sets them from a
batch of raw latents as Stable Diffusion did (scale = 1 / std, shift = 0 or the mean).
This module also holds the shared conv family (``Encoder``, ``Decoder``) that ``vqgan.py`` reuses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion.rng import GeneratorSpec, randn_like
from ..models.unet import Upsample, group_norm

LOGVAR_CLAMP = (-30.0, 20.0)  # LDM's clamp: keeps exp(logvar) finite early in training


# ----------------------------------------------------------------------------- config

@dataclass
class AutoencoderConfig:
    """Architecture of the conv encoder/decoder, plus the latent scale/shift (data, not weights)."""

    in_channels: int = 3
    channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    latent_channels: int = 4
    attention: bool = True  # self-attention in the mid blocks
    norm_groups: int = 32
    scale: float = 1.0
    shift: float = 0.0

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {self.channel_mult}")
        for name in ("in_channels", "channels", "latent_channels", "norm_groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_res_blocks < 0:
            raise ValueError(f"num_res_blocks must be >= 0, got {self.num_res_blocks}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)


# ----------------------------------------------------------------------------- blocks

class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """GroupNorm -> single-head self-attention over the H*W positions (1x1-conv q, k, v) -> residual."""

    def __init__(self, channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class MidBlock(nn.Module):
    def __init__(self, channels: int, attention: bool, norm_groups: int):
        super().__init__()
        self.block1 = ResBlock(channels, channels, norm_groups)
        self.attn = AttnBlock(channels, norm_groups) if attention else nn.Identity()
        self.block2 = ResBlock(channels, channels, norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.attn(self.block1(x)))


class Encoder(nn.Module):
    """images (B, in_channels, H, W) -> (B, out_channels, H / f, W / f), f = 2 ** (levels - 1)."""

    def __init__(self, cfg: AutoencoderConfig, out_channels: int):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.levels = nn.ModuleList()
        prev = widths[0]
        for i, width in enumerate(widths):
            level = nn.Module()
            level.blocks = nn.Sequential(*[ResBlock(prev if j == 0 else width, width, cfg.norm_groups)
                                           for j in range(cfg.num_res_blocks)])
            prev = width if cfg.num_res_blocks else prev
            last = i == len(widths) - 1
            level.down = nn.Identity() if last else nn.Conv2d(prev, prev, 3, stride=2, padding=1)
            self.levels.append(level)
        self.mid = MidBlock(prev, cfg.attention, cfg.norm_groups)
        self.norm_out = group_norm(prev, cfg.norm_groups)
        self.conv_out = nn.Conv2d(prev, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level.down(level.blocks(h))
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """latents (B, latent_channels, h, w) -> images (B, in_channels, h * f, w * f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        prev = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, prev, 3, padding=1)
        self.mid = MidBlock(prev, cfg.attention, cfg.norm_groups)
        self.levels = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            level = nn.Module()
            level.blocks = nn.Sequential(*[ResBlock(prev if j == 0 else width, width, cfg.norm_groups)
                                           for j in range(cfg.num_res_blocks + 1)])
            prev = width
            level.up = Upsample(prev) if i > 0 else nn.Identity()
            self.levels.append(level)
        self.norm_out = group_norm(prev, cfg.norm_groups)
        self.conv_out = nn.Conv2d(prev, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level.up(level.blocks(h))
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- posterior

class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) over the latent; ``logvar`` is clamped to LOGVAR_CLAMP."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(*LOGVAR_CLAMP)
        self.std = torch.exp(0.5 * self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        """Split a (B, 2C, h, w) encoder output into (mean, logvar) along channels."""
        return cls(*moments.chunk(2, dim=1))

    def sample(self, generator: GeneratorSpec = None) -> torch.Tensor:
        """mean + std * n with n from ``generator`` (one, one per sample, or None = global RNG)."""
        return self.mean + self.std * randn_like(self.mean, generator)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over all latent elements: shape (B,)."""
        return gaussian_kl(self.mean, self.logvar)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, e^logvar) || N(0, 1)) summed over every dim but the first:
    0.5 * sum(mean^2 + e^logvar - 1 - logvar)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


# ----------------------------------------------------------------------------- models

@dataclass
class AutoencoderOutput:
    """What a training forward returns: the reconstruction, the regulariser, statistics to log."""

    recon: torch.Tensor
    kl: torch.Tensor | None = None  # (B,) summed KL per sample (KL autoencoder)
    vq_loss: torch.Tensor | None = None  # scalar commitment loss (VQ autoencoder)
    indices: torch.Tensor | None = None  # (B, h, w) code indices (VQ autoencoder)
    stats: dict[str, float] = dataclasses.field(default_factory=dict)


class ConvAutoencoder(nn.Module):
    """What the KL and VQ autoencoders share: scale/shift, the protocol wrappers, size checks.

    Subclasses implement ``encode_raw(images) -> z``, ``decode_raw(z) -> images`` and the training
    ``forward(images, generator) -> AutoencoderOutput``.
    """

    kind = "base"
    config: AutoencoderConfig

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.identifier = f"microdiff-{self.kind}:unsaved"
        self.clamp = False  # run-time option: decode clamps images to [-1, 1]

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.channel_mult) - 1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight: the adaptive GAN weight compares gradients here."""
        return self.decoder.conv_out.weight

    def check_images(self, images: torch.Tensor) -> None:
        c, f = self.config.in_channels, self.downsample
        if images.ndim != 4 or images.shape[1] != c:
            raise ValueError(f"expected images of shape (B, {c}, H, W), got {tuple(images.shape)}")
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the "
                             f"autoencoder's downsampling factor {f}; resize or crop to a multiple of {f}")

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.config.shift) * self.config.scale

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.config.scale + self.config.shift

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents (B, latent_channels, H/f, W/f), scaled and shifted."""
        return self.scale_latents(self.encode_raw(images))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (roughly in [-1, 1]; clamped only when ``self.clamp``)."""
        return self._clamp(self.decode_raw(self.unscale_latents(latents)))

    def _clamp(self, images: torch.Tensor) -> torch.Tensor:
        return images.clamp(-1.0, 1.0) if self.clamp else images

    @torch.no_grad()
    def fit_scale(self, raw_latents: torch.Tensor, center: bool = False) -> dict[str, float]:
        """Set ``scale = 1 / std(raw_latents)`` (Stable Diffusion's recipe; std over every element)
        and ``shift = mean`` when ``center`` (else 0), so encoded data has unit variance.

        ``raw_latents`` are *unscaled* latents, e.g. ``model.encode_raw(images)`` on a batch of data.
        """
        z = raw_latents.detach().double()
        if z.numel() < 2:
            raise ValueError("fit_scale needs a batch of at least 2 latent values")
        std = float(z.std())
        if not std > 0 or not torch.isfinite(z).all():
            raise ValueError(f"cannot fit a latent scale: std of the latents is {std}; "
                             "the encoder outputs constant or non-finite latents")
        self.config.scale = 1.0 / std
        self.config.shift = float(z.mean()) if center else 0.0
        return {"scale": self.config.scale, "shift": self.config.shift}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class KLAutoencoder(ConvAutoencoder):
    """KL-regularised autoencoder: ``encode`` returns the posterior mean (or a sample), scaled."""

    kind = "vae"

    def __init__(self, config: AutoencoderConfig | None = None, **kwargs):
        config = config or AutoencoderConfig(**kwargs)
        super().__init__(config)
        self.encoder = Encoder(config, 2 * config.latent_channels)
        self.decoder = Decoder(config)
        self.sample_posterior = False  # run-time default of ``encode(sample=None)``

    def posterior(self, images: torch.Tensor) -> DiagonalGaussian:
        self.check_images(images)
        return DiagonalGaussian.from_moments(self.encoder(images))

    def encode_raw(self, images: torch.Tensor, sample: bool | None = None,
                   generator: GeneratorSpec = None) -> torch.Tensor:
        post = self.posterior(images)
        sample = self.sample_posterior if sample is None else sample
        return post.sample(generator) if sample else post.mode()

    def encode(self, images: torch.Tensor, sample: bool | None = None,
               generator: GeneratorSpec = None) -> torch.Tensor:
        """Images -> scaled latents: the posterior mean, or a sample when ``sample`` (default:
        ``self.sample_posterior``), drawn from ``generator``: one torch.Generator, one per sample,
        or None for the global RNG."""
        return self.scale_latents(self.encode_raw(images, sample, generator))

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, images: torch.Tensor, generator: GeneratorSpec = None) -> AutoencoderOutput:
        """Training pass: sample the posterior (reparameterised) and decode it."""
        post = self.posterior(images)
        recon = self.decoder(post.sample(generator))
        kl = post.kl()
        return AutoencoderOutput(recon=recon, kl=kl, stats={"kl": float(kl.detach().mean()),
                                                            "latent_std": float(post.mean.detach().std())})


__all__ = ["AutoencoderConfig", "ConvAutoencoder", "KLAutoencoder", "AutoencoderOutput", "DiagonalGaussian",
           "gaussian_kl", "Encoder", "Decoder", "ResBlock", "AttnBlock"]
