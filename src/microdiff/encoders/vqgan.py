"""A VQ autoencoder (the autoencoder of VQGAN), on the conv family of ``vae.py``.

    images -> Encoder -> z_e (B, D, h, w) -> nearest codebook vector per position -> z_q
           -> straight-through z_e + (z_q - z_e).detach() -> Decoder -> images

Codebook: updated by exponential moving averages (VQ-VAE paper, appendix A.1; Razavi et al. 2019),
not by a codebook loss. Per batch, with one-hot assignments of the N flattened encoder vectors:
``cluster_size <- decay * cluster_size + (1 - decay) * counts``, ``embed_sum <- decay * embed_sum +
(1 - decay) * sum of the vectors assigned to each code``, and each code = embed_sum / (Laplace-
smoothed cluster_size). Only the commitment term ``beta * |z_e - sg(z_q)|^2`` is a loss; the
codebook lives in buffers (no gradient, no optimiser), which is why we chose EMA: it is stable at
small batch sizes and has no codebook-learning-rate to tune.

Options: ``l2_normalize`` (codes and encoder outputs on the unit sphere, cosine-similarity lookup,
ViT-VQGAN); the codebook is initialised from random encoder outputs of the first training batch;
``dead_code_threshold`` restarts codes whose EMA cluster size falls below it with random encoder
outputs of the current batch (set 0 to disable). Random choices take an explicit generator.
Single process only: the EMA statistics are not all-reduced across data-parallel ranks.

``encode`` returns the quantised latents (continuous code vectors, scaled and shifted);
``encode_indices`` the code indices; ``decode`` snaps its input to the nearest codes first by
default (diffusion samples are not exactly on the codebook; the decoder was trained on codes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .vae import AutoencoderConfig, AutoencoderOutput, ConvAutoencoder, Decoder, Encoder


@dataclass
class VQConfig(AutoencoderConfig):
    """The conv family's fields plus the codebook's; ``latent_channels`` is the code dimension."""

    latent_channels: int = 4
    codebook_size: int = 512
    beta: float = 0.25  # commitment weight
    ema_decay: float = 0.99
    l2_normalize: bool = False
    dead_code_threshold: float = 1.0  # in units of the EMA cluster size (expected uses per batch); 0 = off
    eps: float = 1e-5  # Laplace smoothing of the cluster sizes

    def __post_init__(self):
        super().__post_init__()
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class Quantized:
    latents: torch.Tensor  # (B, D, h, w) straight-through quantised vectors
    indices: torch.Tensor  # (B, h, w) long
    loss: torch.Tensor  # scalar commitment loss, beta * mse(z_e, sg(z_q))
    perplexity: torch.Tensor  # exp(entropy of the batch's code histogram); K when uniform
    usage: torch.Tensor  # fraction of the codebook used in this batch


def perplexity(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """exp(-sum p log p) of the code histogram of ``indices``: 1 = one code, K = all codes evenly."""
    p = torch.bincount(indices.flatten(), minlength=codebook_size).double() / indices.numel()
    return torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).float()


class VectorQuantizer(nn.Module):
    def __init__(self, dim: int, codebook_size: int, beta: float = 0.25, decay: float = 0.99,
                 l2_normalize: bool = False, dead_code_threshold: float = 1.0, eps: float = 1e-5):
        super().__init__()
        self.dim, self.codebook_size, self.beta, self.decay = dim, codebook_size, beta, decay
        self.l2_normalize, self.dead_code_threshold, self.eps = l2_normalize, dead_code_threshold, eps
        embed = torch.randn(codebook_size, dim)
        self.register_buffer("embedding", F.normalize(embed, dim=1) if l2_normalize else embed)
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_sum", self.embedding.clone())
        self.register_buffer("initialized", torch.tensor(False))

    def _prepare(self, z_flat: torch.Tensor) -> torch.Tensor:
        return F.normalize(z_flat, dim=1) if self.l2_normalize else z_flat

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean; cosine when l2-normalised) per row."""
        e = self.embedding
        dist = z_flat.pow(2).sum(1, keepdim=True) - 2 * z_flat @ e.t() + e.pow(2).sum(1)[None]
        return dist.argmin(1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, h, w) -> code vectors (B, D, h, w)."""
        return self.embedding[indices].permute(0, 3, 1, 2).contiguous()

    def _random_rows(self, z_flat: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
        device = generator.device if generator is not None else z_flat.device
        if z_flat.shape[0] >= n:
            idx = torch.randperm(z_flat.shape[0], generator=generator, device=device)[:n]
        else:
            idx = torch.randint(z_flat.shape[0], (n,), generator=generator, device=device)
        return z_flat[idx.to(z_flat.device)]

    @torch.no_grad()
    def _update(self, z_flat: torch.Tensor, indices: torch.Tensor, generator: torch.Generator | None):
        if not bool(self.initialized):
            init = self._random_rows(z_flat, self.codebook_size, generator)
            self.embedding.copy_(init)
            self.embed_sum.copy_(init)
            self.cluster_size.fill_(1.0)
            self.initialized.fill_(True)
            return
        counts = torch.bincount(indices, minlength=self.codebook_size).to(z_flat.dtype)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, z_flat)  # no (N, K) one-hot
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        embed = self.embed_sum / smoothed[:, None]
        self.embedding.copy_(F.normalize(embed, dim=1) if self.l2_normalize else embed)
        dead = self.cluster_size < self.dead_code_threshold
        if self.dead_code_threshold > 0 and bool(dead.any()):
            fresh = self._random_rows(z_flat, int(dead.sum()), generator)
            self.embedding[dead] = fresh
            self.embed_sum[dead] = fresh * self.dead_code_threshold
            self.cluster_size[dead] = self.dead_code_threshold

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None,
                update: bool | None = None) -> Quantized:
        """Quantise z (B, D, h, w). With ``update`` (default: in training mode) the codebook is
        updated after the lookup (or, on the first such call, initialised from z)."""
        update = self.training if update is None else update
        b, d, h, w = z.shape
        z_flat = self._prepare(z.permute(0, 2, 3, 1).reshape(-1, d))
        first = update and not bool(self.initialized)
        if first:
            self._update(z_flat.detach(), None, generator)  # first batch: codes = encoder outputs
        indices = self.nearest(z_flat.detach())
        z_q = self.embedding[indices]
        loss = self.beta * F.mse_loss(z_flat, z_q)
        if update and not first:
            self._update(z_flat.detach(), indices, generator)
        z_st = z_flat + (z_q - z_flat).detach()  # straight-through: gradients skip the lookup
        counts = torch.bincount(indices, minlength=self.codebook_size)
        return Quantized(latents=z_st.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous(),
                         indices=indices.reshape(b, h, w), loss=loss,
                         perplexity=perplexity(indices, self.codebook_size),
                         usage=(counts > 0).float().mean())


class VQAutoencoder(ConvAutoencoder):
    """Conv encoder -> EMA vector quantiser -> conv decoder; latents are code vectors (scaled)."""

    kind = "vqgan"
    config: VQConfig

    def __init__(self, config: VQConfig | None = None, **kwargs):
        config = config or VQConfig(**kwargs)
        super().__init__(config)
        self.encoder = Encoder(config, config.latent_channels)
        self.quantizer = VectorQuantizer(config.latent_channels, config.codebook_size, config.beta,
                                         config.ema_decay, config.l2_normalize, config.dead_code_threshold,
                                         config.eps)
        self.decoder = Decoder(config)

    def quantize(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 update: bool = False) -> Quantized:
        """Encode and quantise; the codebook changes only with ``update`` (the training forward)."""
        self.check_images(images)
        return self.quantizer(self.encoder(images), generator, update)

    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantize(images).latents

    def encode_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> code indices (B, h, w), each in [0, codebook_size)."""
        return self.quantize(images).indices

    def encode_with_indices(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.quantize(images)
        return self.scale_latents(q.latents), q.indices

    def snap(self, z: torch.Tensor) -> torch.Tensor:
        """Replace each vector of z (B, D, h, w) by its nearest code."""
        b, d, h, w = z.shape
        flat = self.quantizer._prepare(z.permute(0, 2, 3, 1).reshape(-1, d))
        return self.quantizer.lookup(self.quantizer.nearest(flat).reshape(b, h, w))

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def decode(self, latents: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Scaled latents -> images; with ``quantize`` the latents are snapped to the codebook first."""
        z = self.unscale_latents(latents)
        return self._clamp(self.decoder(self.snap(z) if quantize else z))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantizer.lookup(indices))

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> AutoencoderOutput:
        q = self.quantize(images, generator, update=self.training)
        recon = self.decoder(q.latents)
        return AutoencoderOutput(recon=recon, vq_loss=q.loss, indices=q.indices,
                                 stats={"perplexity": float(q.perplexity), "codebook_usage": float(q.usage),
                                        "max_perplexity": float(min(self.config.codebook_size, q.indices.numel()))})


__all__ = ["VQConfig", "VQAutoencoder", "VectorQuantizer", "Quantized", "perplexity"]
