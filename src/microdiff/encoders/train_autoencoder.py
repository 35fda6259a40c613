"""Train a KL-VAE or VQGAN on your images, resumably, and leave a run folder you can look at.

    train_autoencoder(dataset, config, out_dir, steps, batch_size, lr, seed, device)
    microdiff train-autoencoder --data shapes:2000 --out runs/vae --kind vae --resolution 32 --steps 500

Per step: the autoencoder's loss (``ae_losses.generator_loss``: L1 [+ L2] [+ perceptual] + KL or
commitment [+ adaptively weighted hinge GAN from ``disc_start`` on]) -> AdamW step; then, once the
GAN is on, the PatchGAN's hinge loss -> its own AdamW step; then the optional weight EMA.

Reproducible and resumable: models are initialised from ``seed`` (in a forked RNG, so the caller's
global RNG is untouched); batch ``s`` is a pure function of ``(seed, s)`` (a fresh seeded
permutation of the training indices per epoch); posterior noise and codebook restarts draw from
one CPU ``torch.Generator`` whose state is checkpointed. Every ``checkpoint_every`` steps the whole
trainer state (model, discriminator, both optimisers, EMA, generator, step, loss history, the
"before" metrics) is written atomically to ``out_dir/checkpoint/trainer.pt``; rerunning the same
command resumes from it, and on one device with the same thread count the final weights are
bitwise equal to an uninterrupted run.

Run folder: ``autoencoder/`` (``config.json`` + ``model.safetensors``, load with
``autoencoder_io.load_trained_autoencoder``; the EMA weights when EMA is on), ``reconstructions.png``
(held-out originals over their reconstructions), ``loss.png``, ``metrics.csv`` (logged steps) and
``metrics.json`` (held-out L1 / MSE / PSNR before vs after training, latent scale, timings).
The folder must be new, empty or an earlier run of this command (``train_autoencoder.json``, written
first, says so): a folder holding other files is refused in one line and nothing in it is touched;
it is locked (``.lock``) while a run writes to it, so a second run into it is refused too.
After training the latent ``scale`` (and ``shift`` with ``center_latents``) is fitted on encoded
training images, for VQ models as well as KL ones, so that latents have unit variance.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..utils.argtypes import finite_float, int_at_least, non_negative_int, positive_float, positive_int
from ..utils.devices import resolve_device
from ..utils.errors import UserError, first_line
from ..utils.files import save_torch_atomic
from ..utils.folders import claim_folder
from ..utils.weights import read_torch_file
from .ae_losses import (AELossConfig, PatchDiscriminator, PerceptualLoss, disc_active, generator_loss,
                        hinge_d_loss, psnr)
from .autoencoder_io import KINDS, build_autoencoder, load_trained_autoencoder, save_autoencoder
from .vae import AutoencoderConfig, ConvAutoencoder

CHECKPOINT = Path("checkpoint") / "trainer.pt"
COMMAND = "train-autoencoder"
MARKER = "train_autoencoder.json"  # written first: says the folder is this command's (utils/folders.claim_folder)
# positive terms, so one log-scale chart shows them (the total and g_loss can be negative: CSV only)
PLOTTED = ("l1", "mse", "perceptual", "vq_loss", "d_loss")


@dataclass
class TrainAutoencoderConfig:
    """Everything about a run except its length, batch size, learning rate, seed and device."""

    kind: str = "vae"  # "vae" (KL) or "vqgan"
    model: dict[str, Any] = field(default_factory=dict)  # fields of AutoencoderConfig / VQConfig
    loss: AELossConfig = field(default_factory=AELossConfig)
    betas: tuple[float, float] = (0.5, 0.9)  # taming-transformers' Adam betas for GAN training
    weight_decay: float = 0.0
    disc_lr: float | None = None  # None = the autoencoder's lr
    ema_decay: float | None = None  # e.g. 0.999; None = no EMA
    checkpoint_every: int = 100
    log_every: int = 10  # metrics.csv rows: the mean of each term over the last log_every steps
    holdout: int = 64  # images kept out of training for the before/after metrics (at most 1/5 of the data)
    fit_scale_samples: int = 256  # training images encoded to fit the latent scale
    center_latents: bool = False  # also fit shift = mean of the latents
    num_workers: int = 0
    init_from: str | None = None  # fine-tune this saved autoencoder (its architecture; ``model`` is ignored)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown autoencoder kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if isinstance(self.model, AutoencoderConfig):
            self.model = self.model.to_dict()
        if isinstance(self.loss, dict):
            self.loss = AELossConfig.from_dict(self.loss)
        self.betas = tuple(float(b) for b in self.betas)
        for name in ("checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["loss"], d["betas"] = self.loss.to_dict(), list(self.betas)
        return d


# ----------------------------------------------------------------------------- data

def batch_indices(step: int, batch_size: int, num_items: int, seed: int) -> list[int]:
    """Positions (into the training indices) of batch ``step``: the concatenation of one seeded
    permutation per epoch, cut into consecutive batches. Depends only on its arguments."""
    start, stop = step * batch_size, (step + 1) * batch_size
    out: list[int] = []
    for epoch in range(start // num_items, (stop - 1) // num_items + 1):
        perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        lo, hi = max(start - epoch * num_items, 0), min(stop - epoch * num_items, num_items)
        out += perm[lo:hi].tolist()
    return out


class _StepBatches(torch.utils.data.Sampler):
    """Batch sampler for steps [first, last): lists of dataset indices."""

    def __init__(self, train_idx: list[int], batch_size: int, seed: int, first: int, last: int):
        self.train_idx, self.batch_size, self.seed, self.first, self.last = train_idx, batch_size, seed, first, last

    def __len__(self) -> int:
        return max(self.last - self.first, 0)

    def __iter__(self):
        for step in range(self.first, self.last):
            yield [self.train_idx[i] for i in batch_indices(step, self.batch_size, len(self.train_idx), self.seed)]


def collate_training(records: list[dict[str, Any]]) -> tuple[torch.Tensor, list]:
    """``collate_images`` plus the skipped items the records stand in for (a record that replaces a
    skipped one carries them under "skips": ``data/skips.py``), so they reach the main process."""
    skipped = [skip for r in records if isinstance(r, dict) for skip in r.get("skips", ())]
    replaced = sum(1 for r in records if isinstance(r, dict) and "skips" in r)
    return collate_images(records), [skipped, replaced]


def collate_images(records: list[dict[str, Any]]) -> torch.Tensor:
    """Stack the ``image`` of each record, checking shape and range with a message naming the record.

    ``None`` records are items the dataset skipped (a corrupt file: its ``report`` has the path and
    reason); they are left out of the batch."""
    records = [r for r in records if r is not None]
    if not records:
        raise ValueError("every record of this batch was skipped by the dataset (see its report); "
                         "run `microdiff data check` on the source to list the unreadable files")
    images = []
    for r in records:
        image, key = r.get("image") if isinstance(r, dict) else None, r.get("key", "?") if isinstance(r, dict) else "?"
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"record {key!r}: 'image' must be a float tensor (3, H, W) in [-1, 1], got {got}")
        if not torch.isfinite(image).all() or image.abs().max() > 1.0 + 1e-3:
            raise ValueError(f"record {key!r}: image values must be finite and in [-1, 1] (got range "
                             f"[{float(image.min()):.3g}, {float(image.max()):.3g}]); map 0..255 pixels "
                             "with x / 127.5 - 1")
        if images and image.shape != images[0].shape:
            raise ValueError(f"record {key!r}: image size {tuple(image.shape)} differs from {tuple(images[0].shape)}; "
                             "resize/crop every image to one resolution")
        images.append(image.float())
    return torch.stack(images)


def split_indices(n: int, holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) dataset indices: a seeded permutation; at most n // 5 are held out."""
    if n < 2:
        raise ValueError(f"the dataset has {n} image(s); autoencoder training needs at least 2")
    k = max(1, min(int(holdout), n // 5))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


# ----------------------------------------------------------------------------- metrics

@torch.no_grad()
def reconstruction_metrics(model: ConvAutoencoder, images: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """Held-out L1, MSE (images in [-1, 1]) and mean per-image PSNR (dB) of deterministic
    reconstructions (posterior mean / nearest codes); VQ models add codebook usage and perplexity."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    l1, mse, db, indices = [], [], [], []
    for chunk in images.split(batch_size):
        x = chunk.to(device)
        if hasattr(model, "quantize"):
            q = model.quantize(x)
            recon = model.decode_raw(q.latents)
            indices.append(q.indices.flatten().cpu())
        else:
            recon = model.decode_raw(model.encode_raw(x, sample=False))
        l1.append((recon - x).abs().flatten(1).mean(1).cpu())
        mse.append((recon - x).pow(2).flatten(1).mean(1).cpu())
        db.append(psnr(recon, x).cpu())
    model.train(was_training)
    out = {"l1": float(torch.cat(l1).mean()), "mse": float(torch.cat(mse).mean()), "psnr": float(torch.cat(db).mean())}
    if indices:
        from .vqgan import perplexity

        idx, k = torch.cat(indices), model.config.codebook_size
        out.update(codebook_usage=float((torch.bincount(idx, minlength=k) > 0).float().mean()),
                   perplexity=float(perplexity(idx, k)))
    return out


# ----------------------------------------------------------------------------- trainer

class AutoencoderTrainer:
    """The state of a run (models, optimisers, EMA, generator, step) and one training step."""

    def __init__(self, config: TrainAutoencoderConfig, lr: float, seed: int, device: str | torch.device = "cpu",
                 perceptual: PerceptualLoss | None = None):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.config, self.device = config, torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if config.init_from:
                model = load_trained_autoencoder(config.init_from)
                if model.kind != config.kind:
                    raise ValueError(f"{config.init_from}: is a {model.kind!r} autoencoder, not {config.kind!r}")
                model = model.train().requires_grad_(True)
            else:
                model = build_autoencoder(config.kind, config.model)
            loss = config.loss
            disc = None if loss.disc_start is None else PatchDiscriminator(
                model.config.in_channels, loss.disc_channels, loss.disc_layers, loss.disc_norm, loss.disc_spectral_norm)
        self.model: ConvAutoencoder = model.to(self.device)
        self.disc = disc.to(self.device) if disc is not None else None
        self.perceptual = perceptual.to(self.device) if perceptual is not None else None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=config.betas,
                                     weight_decay=config.weight_decay)
        self.opt_d = None if disc is None else torch.optim.AdamW(
            self.disc.parameters(), lr=config.disc_lr or lr, betas=config.betas, weight_decay=config.weight_decay)
        self.ema = None
        if config.ema_decay is not None:
            self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.step = 0

    def train_step(self, images: torch.Tensor) -> dict[str, float]:
        """One optimisation step on a batch in [-1, 1]; returns the logged terms. Gradients are
        left on the parameters (set to None at the start of the next step)."""
        cfg, model, disc = self.config.loss, self.model, self.disc
        images = images.to(self.device)
        model.train()
        gan = disc is not None and disc_active(self.step, cfg.disc_start)
        if disc is not None:
            disc.requires_grad_(False)  # the generator pass needs no discriminator gradients
        out = model(images, generator=self.generator)
        loss, logs = generator_loss(images, out, cfg, self.step, model.last_layer, self.perceptual,
                                    disc if gan else None)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if gan:
            disc.requires_grad_(True)
            logits_real, logits_fake = disc(images), disc(out.recon.detach())
            d_loss = hinge_d_loss(logits_real, logits_fake)
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
            logs.update(d_loss=float(d_loss.detach()), logits_real=float(logits_real.detach().mean()),
                        logits_fake=float(logits_fake.detach().mean()))
        if self.ema is not None:
            ema_update(self.ema, model, self.config.ema_decay)
        self.step += 1
        logs.update(out.stats)
        return logs

    def final_model(self) -> ConvAutoencoder:
        return self.ema if self.ema is not None else self.model

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "disc": None if self.disc is None else self.disc.state_dict(),
                "opt_d": None if self.opt_d is None else self.opt_d.state_dict(),
                "ema": None if self.ema is None else self.ema.state_dict(),
                "generator": self.generator.get_state(),
                "latent_scale": [self.model.config.scale, self.model.config.shift]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        self.model.config.scale, self.model.config.shift = state["latent_scale"]
        self.opt.load_state_dict(state["opt"])
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
            self.ema.config.scale, self.ema.config.shift = state["latent_scale"]
        self.generator.set_state(state["generator"])


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers (codebook, norms) are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def _run_settings(config: TrainAutoencoderConfig, batch_size: int, lr: float, seed: int, n: int,
                  perceptual: PerceptualLoss | None) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed (everything but the number of steps)."""
    return {"config": config.to_dict(), "batch_size": batch_size, "lr": lr, "seed": seed, "dataset_size": n,
            "perceptual_layers": None if perceptual is None else perceptual.layers}


def _json_normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


# ----------------------------------------------------------------------------- the run

def train_autoencoder(dataset, config: TrainAutoencoderConfig | None, out_dir: str | Path, steps: int = 500,
                      batch_size: int = 16, lr: float = 2e-4, seed: int = 0, device: str | torch.device = "cpu",
                      resume: bool = True, progress: bool = True, perceptual: PerceptualLoss | None = None,
                      callback: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train on ``dataset`` (map-style; items are records with ``"image"`` (3, H, W) in [-1, 1])
    for ``steps`` steps and write the run folder ``out_dir`` (see the module docstring).

    ``resume``: continue from ``out_dir/checkpoint/trainer.pt`` when it exists (its settings must
    match; ``steps`` may grow); False starts over. ``perceptual``: a :class:`PerceptualLoss` on
    your own feature extractor. ``callback(step, logs)`` runs after every step. Returns the
    summary that is also written to ``metrics.json``.
    """
    config = config or TrainAutoencoderConfig()
    if int(steps) < 1 or int(batch_size) < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ValueError(f"train_autoencoder needs a map-style dataset (len() and [i]); got "
                         f"{type(dataset).__name__}. Use an image folder / manifest source, or shapes:N")
    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT
    train_idx, held_idx = split_indices(len(dataset), config.holdout, seed)
    # a view that replaces skipped items (data.skips.ReplaceSkipped) draws them from the training split;
    # the held-out images are read as they are (an unreadable one is left out, never replaced)
    raw = getattr(dataset, "raw", dataset)
    held = collate_images([raw[i] for i in held_idx])
    dataset = dataset.with_pool(train_idx) if hasattr(dataset, "with_pool") else dataset
    skipped: list = []  # the skipped items that replacements stood in for, and how many slots were replaced
    replaced = 0
    settings = _json_normalise(_run_settings(config, batch_size, lr, seed, len(dataset), perceptual))
    trainer = AutoencoderTrainer(config, lr, seed, device, perceptual)
    if trainer.disc is not None and min(held.shape[-2:]) < trainer.disc.min_size():
        raise ValueError(f"images of {tuple(held.shape[-2:])} px are too small for a {config.loss.disc_layers}-"
                         f"layer PatchGAN (needs >= {trainer.disc.min_size()} px); lower loss.disc_layers "
                         "(--disc-layers) or "
                         "raise the resolution")
    # the run folder: new, empty or an earlier run of this command (a foreign folder is refused, nothing in it
    # is overwritten), locked while this run writes to it; the checkpoint's settings decide whether it resumes
    with claim_folder(out, COMMAND, MARKER, {}, legacy=lambda folder: (folder / CHECKPOINT).is_file()):
        history: list[dict[str, float]] = []
        window: dict[str, list[float]] = {}  # terms of the steps since the last logged row
        if resume and ckpt_path.is_file():
            state = read_torch_file(ckpt_path, "autoencoder training checkpoint",  # on the CPU: generator states
                                    fix="delete it to start over (--no-resume), or restore it")
            if state["settings"] != settings:
                diff = sorted(k for k in settings if state["settings"].get(k) != settings[k])
                raise ValueError(f"{ckpt_path}: was written by a run with other settings ({', '.join(diff)} "
                                 "differ); use a new output folder, or resume=False (--no-resume) to start over")
            trainer.load_state_dict(state["trainer"])
            history, window, before, seconds = state["history"], state["window"], state["before"], state["seconds"]
            skipped, replaced = [tuple(s) for s in state.get("skipped", [])], int(state.get("replaced", 0))
            print(f"resuming from {ckpt_path} at step {trainer.step}")
        else:
            before, seconds = reconstruction_metrics(trainer.model, held), 0.0

        def save_checkpoint():
            save_torch_atomic({"trainer": trainer.state_dict(), "settings": settings, "history": history,
                               "window": window, "before": before, "seconds": seconds + time.perf_counter() - start,
                               "skipped": [list(s) for s in skipped], "replaced": replaced}, ckpt_path)

        start = time.perf_counter()
        batches = _StepBatches(train_idx, batch_size, seed, trainer.step, steps)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=config.num_workers,
                                             collate_fn=collate_training)
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=min(trainer.step, steps), desc=f"train {config.kind}", unit="step",
                   disable=not progress, dynamic_ncols=True)
        for images, (new_skips, new_replaced) in loader:
            skipped += [(s.path, s.reason, s.detail) for s in new_skips]
            replaced += new_replaced
            logs = trainer.train_step(images)
            step = trainer.step
            for k, v in logs.items():
                window.setdefault(k, []).append(v)
            if step % config.log_every == 0 or step == steps:
                history.append({"step": step, **{k: sum(v) / len(v) for k, v in window.items()}})
                window = {}
                bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", l1=f"{history[-1]['l1']:.4f}", refresh=False)
            bar.update(1)
            if callback is not None:
                callback(step, logs)
            if step % config.checkpoint_every == 0 and step < steps:
                save_checkpoint()
        bar.close()
        if trainer.step >= steps:
            save_checkpoint()
        seconds += time.perf_counter() - start
        summary = _finish(trainer, dataset, train_idx, held, out, history, before, seconds, batch_size, lr, seed)
        return summary | {"skipped": sorted(set(skipped)), "replaced": replaced}


def _finish(trainer: AutoencoderTrainer, dataset, train_idx, held, out: Path, history, before, seconds,
            batch_size, lr, seed) -> dict[str, Any]:
    """Fit the latent scale, save the autoencoder, measure it and write the pictures and tables."""
    config = trainer.config
    model = copy.deepcopy(trainer.final_model()).eval()
    fit_idx = train_idx[: config.fit_scale_samples]
    with torch.no_grad():
        raw = torch.cat([model.encode_raw(collate_images([dataset[i] for i in fit_idx[k:k + 64]]).to(trainer.device))
                         .cpu() for k in range(0, len(fit_idx), 64)])
    latent_scale = model.fit_scale(raw, center=config.center_latents)
    folder = save_autoencoder(model, out / "autoencoder")
    after = reconstruction_metrics(model, held)
    write_reconstructions(model, held[:16], out / "reconstructions.png")
    write_history(history, out)
    summary = {
        "kind": config.kind, "steps": trainer.step, "batch_size": batch_size, "lr": lr, "seed": seed,
        "train_images": len(train_idx), "heldout_images": len(held), "resolution": list(held.shape[-2:]),
        "parameters": model.num_parameters(), "latent_shape": list(raw.shape[1:]),
        "downsample": model.downsample, **latent_scale, "latent_std_before_scaling": float(raw.std()),
        "before": before, "after": after,
        "l1_reduction": before["l1"] / max(after["l1"], 1e-12),
        "psnr_gain_db": after["psnr"] - before["psnr"],
        "train_seconds": round(seconds, 2), "autoencoder": str(folder),
        "identifier": f"microdiff-{model.kind}:{folder.resolve()}",
        "ema_weights": trainer.ema is not None, "config": config.to_dict(),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def write_history(history: list[dict[str, float]], out: Path) -> None:
    """metrics.csv (one row per logged step, every term seen) and loss.png."""
    from ..utils.plots import line_plot

    fields = ["step"] + sorted({k for row in history for k in row} - {"step"})
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
    series = {}
    for name in PLOTTED:
        rows = [r for r in history if name in r and math.isfinite(r[name]) and r[name] > 0]
        if rows:
            series[name] = ([r["step"] for r in rows], [r[name] for r in rows])
    if series:
        line_plot(series, out / "loss.png", title="autoencoder training", xlabel="step", ylabel="loss", logy=True)


@torch.no_grad()
def write_reconstructions(model: ConvAutoencoder, images: torch.Tensor, path: Path, min_tile: int = 64) -> Path:
    """A PNG grid: rows of originals, each above the row of their reconstructions (8 per row)."""
    from PIL import Image

    device = next(model.parameters()).device
    recon = model.decode(model.encode(images.to(device))).cpu().clamp(-1, 1)
    per_row = min(8, len(images))
    rows = []
    for k in range(0, len(images), per_row):
        rows += [images[k:k + per_row], recon[k:k + per_row]]
    h, w = images.shape[-2:]
    zoom = max(1, math.ceil(min_tile / min(h, w)))
    canvas = Image.new("RGB", (per_row * w * zoom + (per_row + 1) * 2, len(rows) * (h * zoom + 2) + 2), "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            arr = ((img.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
            tile = Image.fromarray(arr).resize((w * zoom, h * zoom), Image.NEAREST)
            canvas.paste(tile, (2 + c * (w * zoom + 2), 2 + r * (h * zoom + 2)))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ----------------------------------------------------------------------------- CLI

def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--channel-mult: expected comma-separated integers like 1,2,2; got {text!r}") from None


def _non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value:g}")
    return value


def _decay(text: str) -> float:
    value = finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), e.g. 0.999; got {value:g}")
    return value


# options that act only with others: flag -> (dest, default, what it needs, test of args that it acts)
DEPENDENT = {
    "--codebook-size": ("codebook_size", 512, "--kind vqgan (a new one, not with --init)",
                        lambda a: a.kind == "vqgan" and not a.init_from),
    "--kl-weight": ("kl_weight", 1e-6, "--kind vae", lambda a: a.kind == "vae"),
    "--perceptual-weight": ("perceptual_weight", 1.0, "--perceptual-weights FILE", lambda a: a.perceptual_weights),
    "--disc-start": ("disc_start", 250, "the PatchGAN (leave out --no-disc)", lambda a: not a.no_disc),
    "--disc-layers": ("disc_layers", 3, "the PatchGAN (leave out --no-disc)", lambda a: not a.no_disc),
    "--disc-weight": ("disc_weight", 0.5, "the PatchGAN (leave out --no-disc)", lambda a: not a.no_disc),
    # a fine-tuned autoencoder keeps the architecture it was saved with
    "--channels": ("channels", 32, "a new autoencoder (not with --init)", lambda a: not a.init_from),
    "--latent-channels": ("latent_channels", 4, "a new autoencoder (not with --init)", lambda a: not a.init_from),
    "--channel-mult": ("channel_mult", "1,2,2", "a new autoencoder (not with --init)", lambda a: not a.init_from),
}


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="any image source training reads: image folder, manifest, "
                                                      "hf:NAME, image shards (microdiff data download), or shapes:N; "
                                                      "unreadable images are replaced and counted")
    parser.add_argument("--out", required=True, help="run folder: new, empty, or an earlier train-autoencoder run "
                                                     "(it resumes when it holds a checkpoint); a folder holding other "
                                                     "files is refused")
    parser.add_argument("--kind", choices=sorted(KINDS), default="vae", help="KL autoencoder or VQGAN (default: vae)")
    parser.add_argument("--resolution", type=int_at_least(8), default=32,
                        help="training image side in px, >= 8 (default: 32)")
    parser.add_argument("--steps", type=positive_int, default=500, help="training steps (default: 500)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per step (default: 16)")
    parser.add_argument("--lr", type=positive_float, default=2e-4, help="AdamW learning rate (default: 2e-4)")
    parser.add_argument("--latent-channels", type=positive_int, default=None,
                        help="latent channels / code dimension (default: 4)")
    parser.add_argument("--channels", type=positive_int, default=None,
                        help="base width of the conv encoder/decoder (default: 32; e.g. 128 for 256 px on a GPU)")
    parser.add_argument("--channel-mult", default=None,
                        help="width multipliers per level; downsampling = 2^(levels-1) (default: 1,2,2)")
    parser.add_argument("--codebook-size", type=int_at_least(2), default=None,
                        help="with --kind vqgan: codebook size (default: 512)")
    parser.add_argument("--kl-weight", type=_non_negative_float, default=None,
                        help="with --kind vae: KL weight, LDM's convention (default: 1e-6)")
    parser.add_argument("--perceptual-weights", help="VGG16 state dict (safetensors or .pth, torchvision key "
                                                     "names) for an LPIPS-like perceptual loss")
    parser.add_argument("--perceptual-weight", type=_non_negative_float, default=None,
                        help="with --perceptual-weights: weight of the perceptual loss (default: 1)")
    parser.add_argument("--disc-start", type=non_negative_int, default=None,
                        help="step at which the PatchGAN starts (default: 250)")
    parser.add_argument("--no-disc", action="store_true", help="train without a discriminator")
    parser.add_argument("--disc-layers", type=positive_int, default=None,
                        help="PatchGAN stride-2 layers; images need >= 3 * 2^layers px (default: 3)")
    parser.add_argument("--disc-weight", type=_non_negative_float, default=None,
                        help="GAN weight times the adaptive weight (default: 0.5)")
    parser.add_argument("--ema-decay", type=_decay, default=None,
                        help="keep an EMA of the weights (e.g. 0.999) and save it")
    parser.add_argument("--checkpoint-every", type=positive_int, default=100,
                        help="steps between checkpoints (default: 100)")
    parser.add_argument("--holdout", type=positive_int, default=None,
                        help="held-out images for before/after metrics, at most 1/5 of the data (default: 64, or "
                             "1/5 of the data when that is fewer)")
    parser.add_argument("--init", dest="init_from", help="a saved autoencoder folder to fine-tune on this data (its "
                                                         "architecture: --channels, --channel-mult, "
                                                         "--latent-channels are refused with it)")
    parser.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader worker processes (default: 0)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start over even if --out holds a checkpoint of this command")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def check_options(args) -> None:
    """One line for an option that would do nothing with the others given (instead of ignoring it)."""
    for flag, (dest, _, needs, acts) in DEPENDENT.items():
        if getattr(args, dest) is not None and not acts(args):
            raise UserError(f"{flag} {getattr(args, dest)}: acts only with {needs}; leave it out")


def check_holdout(holdout: int | None, n: int) -> None:
    """An explicit ``--holdout`` larger than the 1/5 of the data that may be held out is refused."""
    most = max(1, n // 5)
    if holdout is not None and holdout > most:
        raise UserError(f"--holdout {holdout}: at most 1/5 of the {n} images may be held out; pass --holdout {most} "
                        "or fewer (or leave it out)")


def config_from_args(args) -> TrainAutoencoderConfig:
    value = {flag: getattr(args, dest) if getattr(args, dest) is not None else default
             for flag, (dest, default, _, _) in DEPENDENT.items()}
    model = {"channels": value["--channels"], "channel_mult": _int_list(value["--channel-mult"]),
             "latent_channels": value["--latent-channels"]}
    if args.kind == "vqgan":
        model["codebook_size"] = value["--codebook-size"]
    loss = AELossConfig(kl_weight=value["--kl-weight"], perceptual_weight=value["--perceptual-weight"],
                        disc_start=None if args.no_disc else value["--disc-start"],
                        disc_weight=value["--disc-weight"], disc_layers=value["--disc-layers"])
    return TrainAutoencoderConfig(kind=args.kind, model=model, loss=loss, ema_decay=args.ema_decay,
                                  checkpoint_every=args.checkpoint_every,
                                  holdout=64 if args.holdout is None else args.holdout,
                                  num_workers=args.workers, init_from=args.init_from)


def run(args) -> int:
    """``microdiff train-autoencoder``: bad input ends with a one-line error and exit status 2."""
    import sys

    from ..data.sources import DataSpec, build_replacing, skip_totals  # data/ sits above encoders/

    from .ae_losses import load_perceptual_loss

    try:
        check_options(args)
        config = config_from_args(args)
        spec = DataSpec(source=args.data, resolution=args.resolution, seed=args.seed)
        dataset = build_replacing(spec, command="train-autoencoder", progress=not args.no_progress)
        check_holdout(args.holdout, len(dataset))
        perceptual = load_perceptual_loss(args.perceptual_weights) if args.perceptual_weights else None
        summary = train_autoencoder(dataset, config, args.out, steps=args.steps, batch_size=args.batch_size,
                                    lr=args.lr, seed=args.seed, device=resolve_device(args.device),
                                    resume=not args.no_resume, progress=not args.no_progress, perceptual=perceptual)
    except (ValueError, OSError) as err:
        print(f"microdiff train-autoencoder: error: {first_line(err)}", file=sys.stderr)
        return 2
    skips = skip_totals(dataset, summary["skipped"], summary["replaced"])
    b, a = summary["before"], summary["after"]
    print(f"held-out reconstruction ({summary['heldout_images']} images): L1 {b['l1']:.4f} -> {a['l1']:.4f}, "
          f"PSNR {b['psnr']:.2f} -> {a['psnr']:.2f} dB; latents {summary['latent_shape']}, "
          f"scale {summary['scale']:.4g}")
    print(f"wrote {args.out}/autoencoder/ (use --autoencoder {summary['identifier']}), reconstructions.png, "
          "loss.png, metrics.csv, metrics.json")
    print(skips.summary())
    return 0


__all__ = ["TrainAutoencoderConfig", "AutoencoderTrainer", "train_autoencoder", "reconstruction_metrics",
           "batch_indices", "split_indices", "collate_images", "ema_update", "write_reconstructions",
           "write_history", "add_arguments", "run", "config_from_args", "check_options", "check_holdout"]
