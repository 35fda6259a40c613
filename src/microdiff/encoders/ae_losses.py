"""Losses for training autoencoders: reconstruction, perceptual, PatchGAN, adaptive GAN weight.

The generator objective follows taming-transformers / latent diffusion:

    nll  = l1 * |x - x^| + l2 * (x - x^)^2 + perceptual_weight * P(x, x^)      (means)
    loss = nll + kl_weight * KL / (C*H*W)   or   + vq_weight * commitment
           + d_weight * disc_factor * (-mean D(x^))
    d_weight = disc_weight * clamp(|grad_last nll| / (|grad_last g| + 1e-4), 0, max).detach()

where ``grad_last`` is the gradient w.r.t. the decoder's last layer and ``disc_factor`` is 0 before
``disc_start`` steps (then neither the GAN term nor the discriminator is trained). KL is summed over
latent elements and divided by the number of pixel values, so that ``kl_weight`` means what it
means in LDM's configs (there: sums over pixels and latents, per image; 1e-6 is their default).
The discriminator minimises the hinge loss 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x^))).

Perceptual loss: LPIPS weights cannot be downloaded here, so :class:`PerceptualLoss` takes any
feature extractor the user supplies (e.g. a VGG16 they load themselves; see
:func:`load_vgg16_features`) and compares unit-normalised features at the named layers, as LPIPS
does without its learned per-channel weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.weights import load_strict, read_safetensors, read_torch_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's VGG16 ``features``: conv widths, "M" = max-pool; LPIPS taps relu1_2 ... relu5_3
VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
VGG16_LPIPS_LAYERS = ("3", "8", "15", "22", "29")


@dataclass
class AELossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 1.0  # used only when a PerceptualLoss is given
    kl_weight: float = 1e-6  # KL autoencoder; LDM's convention (see module docstring)
    vq_weight: float = 1.0  # VQ autoencoder: multiplies the (beta-weighted) commitment loss
    disc_start: int | None = None  # step at which the GAN starts; None = no discriminator at all
    disc_weight: float = 0.5
    max_adaptive_weight: float = 1e4
    disc_layers: int = 3
    disc_channels: int = 64
    disc_norm: str = "batch"  # "batch" (taming), "group" or "none"
    disc_spectral_norm: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AELossConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown loss config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)


# ----------------------------------------------------------------------------- pixels

def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, l1_weight: float = 1.0,
                        l2_weight: float = 0.0) -> torch.Tensor:
    """``l1_weight * mean|recon - target| + l2_weight * mean (recon - target)^2``."""
    diff = recon - target
    loss = l1_weight * diff.abs().mean()
    return loss + l2_weight * diff.pow(2).mean() if l2_weight else loss


def psnr(recon: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB, (B,), for images spanning ``data_range`` (2 for [-1, 1]); recon is
    clamped to the range first. Equals 10 log10(1 / mse) of the same images mapped to [0, 1]."""
    lo = -data_range / 2
    mse = (recon.clamp(lo, lo + data_range) - target).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-12))


# ----------------------------------------------------------------------------- perceptual

class PerceptualLoss(nn.Module):
    """Distance between features of a user-supplied network, LPIPS-style without learned weights:

        d(x, y) = sum_layers w_l * mean_{h,w} sum_c (f_l(x) / |f_l(x)|_c - f_l(y) / |f_l(y)|_c)^2

    ``layers`` are names from ``feature_extractor.named_modules()`` (ints allowed for
    ``nn.Sequential`` children); their outputs are captured with forward hooks during one pass over
    both batches. Inputs in [-1, 1] are mapped to [0, 1] then normalised by ``mean``/``std``
    (ImageNet's by default, what torchvision's VGG expects). The extractor is frozen and kept in
    eval mode; gradients still flow to the images. Pass a truncated network (e.g.
    ``vgg.features[:30]``) so no work is spent past the last layer.
    """

    def __init__(self, feature_extractor: nn.Module, layers: Sequence[str | int],
                 weights: Sequence[float] | None = None, mean: Sequence[float] | None = IMAGENET_MEAN,
                 std: Sequence[float] | None = IMAGENET_STD):
        super().__init__()
        self.net = feature_extractor.eval().requires_grad_(False)
        self.layers = [str(layer) for layer in layers]
        if not self.layers:
            raise ValueError("PerceptualLoss needs at least one layer name")
        modules = dict(self.net.named_modules())
        missing = [name for name in self.layers if name not in modules or name == ""]
        if missing:
            names = [n for n in modules if n][:12]
            raise ValueError(f"feature extractor has no layer(s) {missing}; its modules are named like {names}")
        self.weights = [1.0] * len(self.layers) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.layers):
            raise ValueError(f"got {len(self.weights)} layer weights for {len(self.layers)} layers")
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, -1, 1, 1))

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.net.eval()  # a frozen extractor never switches to training behaviour (BatchNorm, dropout)
        return self

    def _normalise_input(self, x: torch.Tensor) -> torch.Tensor:
        x = (x + 1) / 2
        if self.mean is not None:
            x = x - self.mean.to(x.dtype)
        if self.std is not None:
            x = x / self.std.to(x.dtype)
        return x

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        modules = dict(self.net.named_modules())
        hooks = [modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out)) for name in self.layers]
        try:
            self.net(self._normalise_input(x))
        finally:
            for h in hooks:
                h.remove()
        return [captured[name] for name in self.layers]

    def forward(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Distance per image (``reduction="none"``, shape (B,)) or its mean."""
        if x.shape != y.shape:
            raise ValueError(f"PerceptualLoss compares images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        feats = self.features(torch.cat([x, y]))
        total = x.new_zeros(x.shape[0])
        for w, f in zip(self.weights, feats):
            f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fx, fy = f.chunk(2)
            total = total + w * (fx - fy).pow(2).sum(1).flatten(1).mean(1)
        return total.mean() if reduction == "mean" else total


def vgg16_features(layout: Sequence[int | str] = VGG16_LAYOUT, in_channels: int = 3) -> nn.Sequential:
    """The layer stack of torchvision's ``vgg16().features`` (same indices, so its state dict loads)."""
    layers: list[nn.Module] = []
    for v in layout:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_channels, int(v), 3, padding=1), nn.ReLU(inplace=False)]
            in_channels = int(v)
    return nn.Sequential(*layers)


def load_vgg16_features(path: str | Path) -> nn.Sequential:
    """VGG16 conv features from a state dict you saved yourself (safetensors, or .pt/.pth read with
    ``weights_only=True``), keys as torchvision's ``vgg16().state_dict()`` (``features.N.weight``;
    the ``features.`` prefix is optional; classifier keys are ignored). For example::

        sd = torchvision.models.vgg16(weights="IMAGENET1K_V1").state_dict()
        safetensors.torch.save_file(sd, "vgg16.safetensors")
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: perceptual weights not found; save a VGG16 state dict there "
                                "(see microdiff.encoders.ae_losses.load_vgg16_features)")
    if path.suffix == ".safetensors":
        state = read_safetensors(path, "perceptual weights file")  # truncated or damaged: one line
    else:
        state = read_torch_file(path, "perceptual weights file")
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    net = vgg16_features()
    expected = set(net.state_dict())
    if not expected <= set(state):
        missing = sorted(expected - set(state), key=lambda k: int(k.split(".")[0]))
        raise ValueError(f"{path}: not a VGG16 features state dict; missing {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''} (expected torchvision's features.N.weight/bias)")
    load_strict(net, {k: state[k] for k in expected}, path, what="VGG16 features",
                fix="expected torchvision's VGG16 features.N.weight/bias")
    return net[: int(VGG16_LPIPS_LAYERS[-1]) + 1]


def load_perceptual_loss(path: str | Path) -> PerceptualLoss:
    """An LPIPS-like loss on VGG16 weights you supply (taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)."""
    return PerceptualLoss(load_vgg16_features(path), VGG16_LPIPS_LAYERS)


# ----------------------------------------------------------------------------- GAN

def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 2) or 1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown discriminator norm {kind!r}; choose batch, group or none")


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming ``NLayerDiscriminator``): ``n_layers`` stride-2 4x4 convs, one
    stride-1 conv, then a 1-channel conv: one real/fake logit per overlapping patch.

    Weights start as N(0, 0.02) (norm scales as N(1, 0.02)), as taming does. ``spectral_norm``
    wraps every conv in spectral normalisation (then ``norm="none"`` is the usual choice).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: str = "batch",
                 spectral_norm: bool = False):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        use_bias = norm == "none"
        layers: list[nn.Module] = [sn(nn.Conv2d(in_channels, channels, 4, 2, 1)), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, n_layers + 1):
            prev, width = width, channels * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [sn(nn.Conv2d(prev, width, 4, stride, 1, bias=use_bias)), _norm(norm, width), nn.LeakyReLU(0.2)]
        layers.append(sn(nn.Conv2d(width, 1, 4, 1, 1)))
        self.main = nn.Sequential(*layers)
        self.n_layers = n_layers
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                weight = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
                nn.init.normal_(weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def min_size(self) -> int:
        """Smallest image side with at least one output patch: floor(s / 2^n) - 2 >= 1."""
        return 3 * 2 ** self.n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_size():
            raise ValueError(f"images of {tuple(x.shape[-2:])} px are too small for a {self.n_layers}-layer "
                             f"PatchGAN (needs >= {self.min_size()} px); use fewer discriminator layers")
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge GAN: -mean D(fake)."""
    return -logits_fake.mean()


def adaptive_disc_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                         max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """taming's balance between reconstruction and GAN: |grad nll| / (|grad g| + eps) at the
    decoder's last layer, clamped to [0, max_weight] and detached (graphs are retained)."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + eps)).clamp(0.0, max_weight).detach()


def disc_active(step: int, disc_start: int | None) -> bool:
    """Whether the GAN terms are on at ``step`` (0-based): from step ``disc_start`` on."""
    return disc_start is not None and step >= disc_start


# ----------------------------------------------------------------------------- totals

def generator_loss(images: torch.Tensor, out, cfg: AELossConfig, step: int, last_layer: torch.Tensor,
                   perceptual: PerceptualLoss | None = None,
                   discriminator: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The autoencoder's loss for one batch (see the module docstring) and the terms to log.

    ``out`` is an :class:`~microdiff.encoders.vae.AutoencoderOutput` (``kl`` or ``vq_loss`` set).
    """
    recon = out.recon
    rec = reconstruction_loss(recon, images, cfg.l1_weight, cfg.l2_weight)
    logs = {"l1": float((recon - images).abs().mean().detach()),
            "mse": float((recon - images).pow(2).mean().detach())}
    nll = rec
    if perceptual is not None and cfg.perceptual_weight:
        p = perceptual(recon, images)
        nll = nll + cfg.perceptual_weight * p
        logs["perceptual"] = float(p.detach())
    loss = nll
    if out.kl is not None:
        kl_term = out.kl.mean() / images[0].numel()
        loss = loss + cfg.kl_weight * kl_term
        logs["kl"] = float(out.kl.detach().mean())
    if out.vq_loss is not None:
        loss = loss + cfg.vq_weight * out.vq_loss
        logs["vq_loss"] = float(out.vq_loss.detach())
    if discriminator is not None and disc_active(step, cfg.disc_start):
        g = hinge_g_loss(discriminator(recon))
        d_weight = cfg.disc_weight * adaptive_disc_weight(nll, g, last_layer, cfg.max_adaptive_weight)
        loss = loss + d_weight * g
        logs.update(g_loss=float(g.detach()), d_weight=float(d_weight))
    logs["loss"] = float(loss.detach())
    return loss, logs


__all__ = ["AELossConfig", "reconstruction_loss", "psnr", "PerceptualLoss", "vgg16_features",
           "load_vgg16_features", "load_perceptual_loss", "PatchDiscriminator", "hinge_d_loss",
           "hinge_g_loss", "adaptive_disc_weight", "disc_active", "generator_loss",
           "IMAGENET_MEAN", "IMAGENET_STD", "VGG16_LPIPS_LAYERS"]
