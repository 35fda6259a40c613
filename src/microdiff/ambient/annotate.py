"""Quality annotation (Ambient-o, Daras et al. 2025): at which noise level may a bad sample be used?

A small noise-conditional classifier learns to tell high-quality (label 0) from low-quality (label 1)
images after both are noised as ``x + sigma * n``. At small sigma the two sets are easy to tell apart;
at large sigma the noise hides the difference. A low-quality sample's ``sigma_tn`` ("use only above
this noise level") is the first sigma of a fixed ascending grid at which its probability of being low
quality, averaged over ``draws`` noise draws and smoothed along the grid, falls below ``0.5 + eps``:
the classifier is confused there. This is the rule of Ambient-o's code (``analyze_classifier_trajectory``:
first grid index with ``0.5 - p + eps > 0``, eps = 0.05). A classifier at chance outputs p close to 0.5
on both sides, so the stricter ``0.5 - eps`` would leave most samples never crossing; give a negative
``eps`` to ask for that (the classifier must lean to "high quality" by |eps|).
High-quality samples get ``sigma_tn = 0``. Training then uses each sample only at sigma > sigma_tn.

    sigma_grid(lo, hi, n)                               ascending geometric grid
    QualityClassifier(in_channels, width, depth)        conv net, FiLM-conditioned on log(sigma)
    train_quality_classifier(high, low, ...)            -> (model, loss history)
    low_quality_probability(model, images, grid, draws) -> (N, S) mean probability
    annotate_sigma_tn(prob, grid, eps, smooth)          -> (sigma_tn (N,), flagged (N,)), pure
    annotate(source, out, AnnotateConfig(...))          end to end, writes the outputs below

Outputs of :func:`annotate` (and ``microdiff annotate``): ``annotations.csv`` (key,sigma_tn,sigma_max,
read by training's ``ambient.annotations``), ``sigma_tn_hist.png``, ``probability_curves.png``,
``curves.csv`` (per grid sigma: held-out accuracy, mean probabilities, sigma_tn counts),
``summary.json`` and ``classifier.pt``. The output folder must be new, empty or an earlier annotate run
with the same settings (``summary.json``, stamped and written first of the outputs, records them):
a rerun with other settings is refused in one line unless ``replace`` (``--overwrite``) says to redo
it, and a folder holding other files is refused. It is locked (``.lock``) while a run writes to it.

Sigmas are in the units the diffusion model trains in: pixels in [-1, 1] for ``--autoencoder
identity``, the autoencoder's scaled latents otherwise (images are encoded once, then annotated).
Which samples are "low quality" is a rule on each record's meta (``AnnotateConfig.split``):
``quality`` (default): ``meta["quality"] < quality_threshold`` (missing quality = 1.0, clean);
``corruption``: ``meta["corruption"]`` present and not ``"none"``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ..utils.argtypes import finite_float, int_at_least, non_negative_int, positive_float, positive_int
from ..utils.errors import UserError, first_line
from ..utils.files import stamp, write_text_atomic
from ..utils.folders import claim_folder, normalised
from ..utils.weights import load_strict, read_torch_file
from .dataset import parse_mixture

# ----------------------------------------------------------------------------- defaults
GRID_MIN, GRID_MAX, GRID_SIZE = 0.01, 10.0, 25  # pixel units: images in [-1, 1]
EPS = 0.05  # Ambient-o's cls_epsilon: "confused" means p(low quality) < 0.5 + eps
SMOOTH = 3  # moving-average width along the grid (grid points; 1 = no smoothing)
DRAWS = 4  # noise draws per (sample, sigma) when scoring
STEPS, BATCH_SIZE, LR, WIDTH = 1500, 64, 1e-3, 16  # width 16: ~4 min for 2000 images at 32 px on one CPU thread
HELDOUT = 0.2  # fraction of each quality class kept out of training, for the accuracy curve
CHUNK = 256  # scoring batch; the noise of each chunk has its own seed, so scores do not depend on the device
SPLITS = ("quality", "corruption")
COMMAND = "annotate"
SUMMARY = "summary.json"  # stamped, with the settings: the marker of an annotate folder (utils/folders)
THRESHOLDS = ("half", "heldout")


# ----------------------------------------------------------------------------- grid and pure functions
def sigma_grid(sigma_min: float = GRID_MIN, sigma_max: float = GRID_MAX, n: int = GRID_SIZE) -> np.ndarray:
    """``n`` sigmas from ``sigma_min`` to ``sigma_max``, geometrically spaced, ascending."""
    if not (0 < sigma_min < sigma_max and math.isfinite(sigma_max)):
        raise ValueError(f"the sigma grid needs 0 < grid-min < grid-max; got grid-min={sigma_min}, grid-max={sigma_max}")
    if isinstance(n, bool) or int(n) != n or n < 2:
        raise ValueError(f"grid-size must be an integer >= 2; got {n!r}")
    return np.geomspace(sigma_min, sigma_max, int(n))


def moving_average(rows: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average of each row over ``width`` neighbouring entries (indices
    ``i - (width-1)//2 .. i + width//2``), the window shrunk to the entries inside the row at its ends."""
    rows = np.asarray(rows, dtype=np.float64)
    if isinstance(width, bool) or int(width) != width or width < 1:
        raise ValueError(f"smooth must be an integer >= 1 grid points (1 = no smoothing); got {width!r}")
    width, n = int(width), rows.shape[-1]
    if width == 1:
        return rows.copy()
    padded = np.concatenate([np.zeros(rows.shape[:-1] + (1,)), np.cumsum(rows, axis=-1)], axis=-1)
    lo = np.clip(np.arange(n) - (width - 1) // 2, 0, n)
    hi = np.clip(np.arange(n) + width // 2 + 1, 0, n)
    return (padded[..., hi] - padded[..., lo]) / (hi - lo)


def annotate_sigma_tn(prob: np.ndarray, grid: np.ndarray, eps: float = EPS, smooth: int = SMOOTH,
                      null: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``prob`` (N, S) (probability of low quality at each grid sigma), the first grid sigma
    where the row, smoothed by :func:`moving_average` of width ``smooth``, is below the threshold:
    ``0.5 + eps`` (Ambient-o's rule), or ``null + eps`` when ``null`` (S,) is given: what the classifier
    says, at each sigma, about clean images it never saw (see ``AnnotateConfig.threshold``).

    Returns ``(sigma_tn (N,), flagged (N,) bool)``; a row that never drops below the threshold gets the
    largest grid sigma and is flagged (the classifier still tells it apart at the top of the grid)."""
    prob, grid = np.asarray(prob, dtype=np.float64), np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or len(grid) < 1 or np.any(np.diff(grid) <= 0):
        raise ValueError(f"sigma grid must be a 1-D ascending array; got {grid!r}")
    if prob.ndim != 2 or prob.shape[1] != len(grid):
        raise ValueError(f"prob must be (N, {len(grid)}), one column per grid sigma; got {prob.shape}")
    if not -0.5 < eps < 0.5:
        raise ValueError(f"eps must be in (-0.5, 0.5); the threshold is 0.5 + eps; got {eps}")
    if null is None:
        threshold = np.full(len(grid), 0.5 + eps)
    else:
        null = np.asarray(null, dtype=np.float64)
        if null.shape != grid.shape:
            raise ValueError(f"null must have one value per grid sigma ({len(grid)}); got shape {null.shape}")
        threshold = moving_average(null[None], smooth)[0] + eps
    below = moving_average(prob, smooth) < threshold
    flagged = ~below.any(axis=1)
    first = np.where(flagged, len(grid) - 1, below.argmax(axis=1))
    return grid[first], flagged


def balanced_accuracy(p_high: np.ndarray, p_low: np.ndarray) -> np.ndarray:
    """Per column: mean of the fraction of high-quality entries with p < 0.5 and of low-quality entries
    with p >= 0.5 (entries are single noise draws; axis 0 and any trailing draw axis are averaged)."""
    def per_column(hits: np.ndarray) -> np.ndarray:
        return hits.mean(axis=tuple(i for i in range(hits.ndim) if i != 1))

    return 0.5 * (per_column(np.asarray(p_high) < 0.5) + per_column(np.asarray(p_low) >= 0.5))


def is_low_quality(meta: dict[str, Any], split: str = "quality", quality_threshold: float = 0.5) -> bool:
    """The split rule: ``quality`` -> meta quality (default 1.0) < threshold; ``corruption`` -> meta
    corruption present and not "none" (a dict counts unless its name is "none")."""
    if split == "quality":
        return float(meta.get("quality", 1.0)) < quality_threshold
    if split == "corruption":
        c = meta.get("corruption")
        name = c.get("name", c.get("corruption")) if isinstance(c, dict) else c
        return name not in (None, "", "none")
    raise ValueError(f"unknown split rule {split!r}; choose one of {', '.join(SPLITS)}")


def _seed_of(*numbers: int) -> int:
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1, np.uint64)[0] % (2**63))


# ----------------------------------------------------------------------------- the classifier
class FiLMBlock(nn.Module):
    """conv3x3 -> GroupNorm -> FiLM(sigma embedding) -> SiLU -> conv3x3 -> SiLU, then 2x average pooling
    if asked. Without the norm, training sat at loss ln 2 for hundreds of steps (weak signal among
    noise-level-dominated gradients); with it the loss falls within the first hundred."""

    def __init__(self, channels_in: int, channels_out: int, embed: int, downsample: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.norm = nn.GroupNorm(math.gcd(8, channels_out), channels_out)
        self.film = nn.Linear(embed, 2 * channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.downsample = downsample

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(e)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm(self.conv1(h)) * (1 + scale) + shift)
        h = F.silu(self.conv2(h))
        return F.avg_pool2d(h, 2) if self.downsample and min(h.shape[-2:]) >= 2 else h


class QualityClassifier(nn.Module):
    """``(x (B,C,H,W), sigma (B,) or scalar) -> logit (B,)`` of "low quality".

    Inputs are scaled by ``1 / sqrt(sigma_data^2 + sigma^2)`` (EDM's c_in) so every noise level
    reaches the convolutions at unit scale, and the stem sees them next to their 3x3 high-pass residual
    ``x - box_blur(x)``: noise adds fine detail, blur and JPEG remove it, and a random first layer would
    take hundreds of steps to find that filter. ``log(sigma)`` enters every block through FiLM. The head
    reads the spatial mean and standard deviation of the last features, so any resolution works."""

    def __init__(self, in_channels: int = 3, width: int = WIDTH, depth: int = 3, embed: int = 64,
                 sigma_data: float = 0.5):
        super().__init__()
        self.config = {"in_channels": in_channels, "width": width, "depth": depth, "embed": embed,
                       "sigma_data": sigma_data}
        self.sigma_data = sigma_data
        self.embed = nn.Sequential(nn.Linear(1, embed), nn.SiLU(), nn.Linear(embed, embed), nn.SiLU())
        self.stem = nn.Conv2d(2 * in_channels, width, 3, padding=1)
        chans = [width * min(2**k, 4) for k in range(depth)]
        self.blocks = nn.ModuleList(FiLMBlock(c_in, c_out, embed, downsample=k < depth - 1)
                                    for k, (c_in, c_out) in enumerate(zip([width] + chans[:-1], chans)))
        self.head = nn.Linear(2 * chans[-1], 1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        c_in = (self.sigma_data**2 + sigma**2).rsqrt()
        e = self.embed((sigma.log() / 4)[:, None])
        x = x * c_in[:, None, None, None]
        h = self.stem(torch.cat([x, x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)], dim=1))
        for block in self.blocks:
            h = block(h, e)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3), correction=0)], dim=1)  # level and spread
        return self.head(pooled)[:, 0]


def save_quality_classifier(model: QualityClassifier, path: str | Path, **extra: Any) -> Path:
    """``{"config", "state_dict", **extra}`` with torch.save; reload with :func:`load_quality_classifier`."""
    path = Path(path)
    torch.save({"config": model.config, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                **extra}, path)
    return path


def load_quality_classifier(path: str | Path, device: str | torch.device = "cpu") -> QualityClassifier:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such classifier file; write one with `microdiff annotate`")
    state = read_torch_file(path, "quality classifier", fix="write it again with `microdiff annotate`")
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or "state_dict" not in state:
        raise UserError(f"{path}: not a quality classifier file (no config / state_dict); write one with "
                        "`microdiff annotate`")
    try:
        model = QualityClassifier(**state["config"])
    except TypeError as err:
        raise UserError(f"{path}: its classifier config does not fit this version ({err})") from None
    load_strict(model, state["state_dict"], path, fix="write it again with `microdiff annotate`")
    return model.to(device).eval()


# ----------------------------------------------------------------------------- training and scoring
def train_quality_classifier(high: torch.Tensor, low: torch.Tensor, *, sigma_min: float = GRID_MIN,
                             sigma_max: float = GRID_MAX, steps: int = STEPS, batch_size: int = BATCH_SIZE,
                             lr: float = LR, width: int = WIDTH, seed: int = 0, device: str | torch.device = "cpu",
                             progress: bool = True) -> tuple[QualityClassifier, list[float]]:
    """Train a :class:`QualityClassifier` on balanced batches (half high quality, label 0; half low,
    label 1, drawn with replacement), each image noised as ``x + sigma * n`` with sigma log-uniform in
    [sigma_min, sigma_max]; BCE loss, Adam. All randomness (init, batches, sigmas, noise) comes from
    ``seed`` on the CPU, so the run is deterministic given the seed (and device). Returns the model in
    eval mode and the per-step loss."""
    from tqdm.auto import tqdm

    if high.ndim != 4 or low.ndim != 4 or high.shape[1:] != low.shape[1:]:
        raise ValueError(f"high and low quality images must be (N, C, H, W) of one shape; got "
                         f"{tuple(high.shape)} and {tuple(low.shape)}")
    if len(high) == 0 or len(low) == 0:
        raise ValueError(f"the classifier needs both classes; got {len(high)} high and {len(low)} low quality images")
    if batch_size < 2 or batch_size % 2:
        raise ValueError(f"batch-size must be an even number >= 2 (half high, half low quality); got {batch_size}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = QualityClassifier(in_channels=high.shape[1], width=width).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    half = batch_size // 2
    labels = torch.cat([torch.zeros(half), torch.ones(half)]).to(device)
    log_lo, log_hi = math.log(sigma_min), math.log(sigma_max)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="train quality classifier", unit="step", disable=not progress, dynamic_ncols=True)
    model.train()
    for step in bar:
        x = torch.cat([high[torch.randint(len(high), (half,), generator=generator)],
                       low[torch.randint(len(low), (half,), generator=generator)]])
        sigma = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(batch_size, generator=generator))
        noise = torch.randn(x.shape, generator=generator)
        x, sigma = (x + sigma[:, None, None, None] * noise).to(device), sigma.to(device)
        loss = F.binary_cross_entropy_with_logits(model(x, sigma), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return model.eval(), losses


@torch.no_grad()
def draw_probabilities(model: nn.Module, images: torch.Tensor, grid: np.ndarray, draws: int = DRAWS, *,
                       seed: int = 0, device: str | torch.device | None = None,
                       progress: bool = False, desc: str = "score") -> np.ndarray:
    """(N, S, draws) probability of low quality of each image noised at each grid sigma, one column per
    noise draw. The noise of images [k*CHUNK, (k+1)*CHUNK) at grid index s, draw d comes from a CPU
    generator seeded by (seed, s, d, k): the same whatever the device."""
    from tqdm.auto import tqdm

    if draws < 1:
        raise ValueError(f"draws must be >= 1; got {draws}")
    device = next(model.parameters()).device if device is None else torch.device(device)
    out = np.zeros((len(images), len(grid), draws), dtype=np.float64)
    chunks = range(0, len(images), CHUNK)
    bar = tqdm(total=len(images) * len(grid) * draws, desc=desc, unit="img", unit_scale=True,
               disable=not progress, dynamic_ncols=True)
    for k, start in enumerate(chunks):
        x = images[start:start + CHUNK]
        x_dev = x.to(device)
        for s, sigma in enumerate(grid):
            for d in range(draws):
                noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(_seed_of(seed, s, d, k)))
                logits = model(x_dev + float(sigma) * noise.to(device), float(sigma))
                out[start:start + len(x), s, d] = torch.sigmoid(logits.float()).cpu().numpy()
                bar.update(len(x))
    bar.close()
    return out


def low_quality_probability(model: nn.Module, images: torch.Tensor, grid: np.ndarray, draws: int = DRAWS, *,
                            seed: int = 0, device: str | torch.device | None = None,
                            progress: bool = False) -> np.ndarray:
    """(N, S): the classifier's probability that each image is low quality at each grid sigma, the
    mean over ``draws`` noise draws (see :func:`draw_probabilities`)."""
    return draw_probabilities(model, images, grid, draws, seed=seed, device=device, progress=progress).mean(axis=2)


# ----------------------------------------------------------------------------- end to end
@dataclass
class AnnotateConfig:
    resolution: int = 32
    corruption: Any = None  # a corruption mixture applied to the source (see data/shapes.py), as data.corruption
    vocabulary: dict = field(default_factory=dict)  # shapes:N only, as data.vocabulary (e.g. {sizes: [large]})
    split: str = "quality"  # quality | corruption (see the module docstring)
    quality_threshold: float = 0.5
    autoencoder: str = "identity"
    grid_min: float = GRID_MIN
    grid_max: float = GRID_MAX
    grid_size: int = GRID_SIZE
    eps: float = EPS
    threshold: str = "half"  # half: p(low) < 0.5 + eps (Ambient-o) | heldout: < p(low) of held-out clean + eps
    smooth: int = SMOOTH
    draws: int = DRAWS
    steps: int = STEPS
    batch_size: int = BATCH_SIZE
    lr: float = LR
    width: int = WIDTH
    heldout: float = HELDOUT
    seed: int = 0  # classifier init, batches, noise, held-out split
    data_seed: int = 0  # the dataset's seed (shapes:N content and keys): the one training uses
    device: str = "auto"
    progress: bool = True


def load_records(source: str, config: AnnotateConfig) -> tuple[torch.Tensor, list[str], list[dict], Any]:
    """Images (N, C, H, W) float32 in [-1, 1], keys and metas of every readable record of ``source``,
    built as training builds it (``data.sources``), and the SkipReport of the items left out."""
    from ..data.sources import DataSpec, build_dataset, read_records  # ambient/__init__ loads before data/

    spec = DataSpec(source=source, resolution=config.resolution, corruption=config.corruption,
                    vocabulary=dict(config.vocabulary), seed=config.data_seed)
    dataset = build_dataset(spec, needs="images", command="annotate", progress=config.progress)
    records, skips = read_records(dataset, f"read {source}", config.progress)
    images = [r["image"] for r in records]
    keys = [str(r["key"]) for r in records]
    metas = [r.get("meta") or {} for r in records]
    if not images:
        raise ValueError(f"{source}: no readable images ({skips.summary()})")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{source}: sample keys are not unique; annotations need one key per sample")
    return torch.stack(images).float(), keys, metas, skips


@torch.no_grad()
def encode(images: torch.Tensor, identifier: str, device: torch.device, progress: bool) -> torch.Tensor:
    """Images -> the model's training space (latents on the CPU); identity returns them unchanged."""
    from tqdm.auto import tqdm

    from ..encoders.image import load_autoencoder

    autoencoder = load_autoencoder(identifier, device=device)
    if identifier.strip().split(":")[0] == "identity":
        return images
    out = [autoencoder.encode(images[i:i + CHUNK].to(device)).float().cpu()
           for i in tqdm(range(0, len(images), CHUNK), desc=f"encode ({identifier})", unit="batch",
                         disable=not progress, dynamic_ncols=True)]
    return torch.cat(out)


def heldout_split(n: int, fraction: float, seed: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) index arrays of ``range(n)``: a seeded permutation, ``round(n * fraction)``
    held out (at least 1 when fraction > 0), at least 1 left for training."""
    if not 0 <= fraction < 1:
        raise ValueError(f"heldout must be in [0, 1); got {fraction}")
    order = np.random.default_rng([seed, salt, 0xA11]).permutation(n)
    k = min(max(round(n * fraction), 1 if fraction > 0 else 0), n - 1)
    return np.sort(order[k:]), np.sort(order[:k])


def _check_source_options(source: str, c: AnnotateConfig) -> None:
    """One line for a data seed that would seed nothing (a source that is not shapes:N, no corruption)."""
    from ..data.sources import source_kind  # ambient/__init__ loads before data/

    if c.data_seed and c.corruption is None and source_kind(source) != "shapes":
        raise UserError(f"--data-seed {c.data_seed}: seeds shapes:N content and --corruption draws, and {source} is "
                        "not shapes:N and no --corruption is given; leave it out")


def _check_config(c: AnnotateConfig) -> None:
    if c.split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}; got {c.split!r}")
    if c.threshold not in THRESHOLDS:
        raise ValueError(f"--threshold must be one of {', '.join(THRESHOLDS)}; got {c.threshold!r}")
    if not -0.5 < c.eps < 0.5:
        raise ValueError(f"--eps must be in (-0.5, 0.5) (the threshold is 0.5 + eps); got {c.eps}")
    for name in ("smooth", "draws", "steps"):
        if getattr(c, name) < 1:
            raise ValueError(f"--{name} must be >= 1; got {getattr(c, name)}")
    sigma_grid(c.grid_min, c.grid_max, c.grid_size)


def annotate_settings(source: str, config: AnnotateConfig) -> dict[str, Any]:
    """What an annotation is a function of (the device and progress bars aside): a rerun into the same
    folder must give the same, or say ``replace``."""
    return {"source": source, **{k: v for k, v in asdict(config).items() if k not in ("device", "progress")}}


def annotate(source: str, out: str | Path, config: AnnotateConfig | None = None, *,
             replace: bool = False) -> dict[str, Any]:
    """Read ``source``, split it by ``config.split``, train the classifier on the training part of both
    classes, measure its balanced accuracy per grid sigma on the held-out part, annotate every
    low-quality sample (training and held-out) and write the outputs into ``out`` (see the module
    docstring for what ``out`` may hold; ``replace``: redo an earlier run made with other settings).
    Returns the summary."""
    config = config or AnnotateConfig()
    _check_config(config)
    _check_source_options(source, config)
    settings = annotate_settings(source, config)
    with claim_folder(out, COMMAND, SUMMARY, settings, replace=replace, replace_flag="--overwrite", write=False):
        return _annotate(source, Path(out), config, settings)


def _annotate(source: str, out: Path, config: AnnotateConfig, settings: dict[str, Any]) -> dict[str, Any]:
    from ..utils.devices import resolve_device
    from .annotations import write_annotations

    started = time.perf_counter()
    device = resolve_device(config.device)
    grid = sigma_grid(config.grid_min, config.grid_max, config.grid_size)
    images, keys, metas, skips = load_records(source, config)
    low_mask = np.array([is_low_quality(m, config.split, config.quality_threshold) for m in metas])
    n_low, n_high = int(low_mask.sum()), int((~low_mask).sum())
    rule = (f"quality < {config.quality_threshold}" if config.split == "quality" else "corruption not 'none'")
    if n_low < 2 or n_high < 2:
        raise ValueError(f"{source}: {n_high} high and {n_low} low quality samples by the rule '{rule}' "
                         "(--split); each class needs at least 2 (for shapes:N give --corruption, e.g. noise:0.3@0.5)")
    x = encode(images, config.autoencoder, device, config.progress)
    high_idx, low_idx = np.flatnonzero(~low_mask), np.flatnonzero(low_mask)
    high_train, high_test = (high_idx[i] for i in heldout_split(n_high, config.heldout, config.seed, 0))
    low_train, low_test = heldout_split(n_low, config.heldout, config.seed, 1)  # positions in low_idx
    loaded = time.perf_counter()

    model, losses = train_quality_classifier(
        x[high_train], x[low_idx[low_train]], sigma_min=config.grid_min, sigma_max=config.grid_max, steps=config.steps,
        batch_size=config.batch_size, lr=config.lr, width=config.width, seed=config.seed, device=device,
        progress=config.progress)
    trained = time.perf_counter()

    # every low-quality sample is scored (with its own noise seeds); held-out high for the accuracy curve
    p_low = draw_probabilities(model, x[low_idx], grid, config.draws, seed=config.seed + 1, device=device,
                               progress=config.progress, desc="score low quality")
    p_high_test = draw_probabilities(model, x[high_test], grid, config.draws, seed=config.seed + 2, device=device,
                                     progress=config.progress, desc="score held-out high quality")
    p_low_test = p_low[low_test]
    accuracy = balanced_accuracy(p_high_test, p_low_test) if len(high_test) and len(low_test) else None
    null = None
    if config.threshold == "heldout":
        if not len(high_test):
            raise ValueError("--threshold heldout compares with held-out clean images, but none were held out; "
                             "raise --heldout or use --threshold half")
        null = p_high_test.mean(axis=(0, 2))
    sigma_tn, flagged = annotate_sigma_tn(p_low.mean(axis=2), grid, config.eps, config.smooth, null)
    scored = time.perf_counter()

    summary = _summary(source, config, grid, keys, metas, low_idx, sigma_tn, flagged, accuracy, p_high_test, p_low,
                       p_low_test, losses, n_high, n_low, high_test, low_test, rule,
                       {"load": loaded - started, "train": trained - loaded, "score": scored - trained})
    summary["skipped"] = skips.to_dict() | {"summary": skips.summary()}
    summary["seconds"]["total"] = time.perf_counter() - started
    # summary.json first: it says the folder is this run's (a kill during the other writes leaves a folder a
    # rerun of the same settings may redo)
    write_text_atomic(out / SUMMARY, json.dumps({**stamp(COMMAND), "settings": normalised(settings), **summary},
                                                indent=1))
    tn = dict(zip((keys[i] for i in low_idx), sigma_tn.tolist()))
    write_annotations(out / "annotations.csv", {k: {"sigma_tn": tn.get(k, 0.0), "sigma_max": None} for k in keys})
    save_quality_classifier(model, out / "classifier.pt", grid=[float(g) for g in grid],
                            autoencoder=config.autoencoder, eps=config.eps, smooth=config.smooth)
    _write_curves(out, summary)
    _plots(out, summary, sigma_tn)
    return summary


def _summary(source, config, grid, keys, metas, low_idx, sigma_tn, flagged, accuracy, p_high_test, p_low,
             p_low_test, losses, n_high, n_low, high_test, low_test, rule, seconds) -> dict[str, Any]:
    counts = [int(np.sum(np.isclose(sigma_tn, g))) for g in grid]
    known = [float(metas[i]["sigma_tn"]) for i in low_idx if "sigma_tn" in metas[i]]
    every = max(1, len(losses) // 100)
    mean_curve = lambda p: p.mean(axis=(0, 2)).tolist() if len(p) else None  # noqa: E731
    return {
        "source": source,
        "config": asdict(config),
        "space": "pixels" if config.autoencoder.split(":")[0] == "identity" else f"latents of {config.autoencoder}",
        "rule": f"low quality if {rule}",
        "counts": {"total": len(keys), "high": n_high, "low": n_low, "heldout_high": len(high_test),
                   "heldout_low": len(low_test), "flagged": int(flagged.sum())},
        "grid": [float(g) for g in grid],
        "eps": config.eps, "threshold": config.threshold, "smooth": config.smooth, "draws": config.draws,
        "heldout_accuracy": None if accuracy is None else [float(a) for a in accuracy],
        "mean_probability": {"high_heldout": mean_curve(p_high_test), "low_heldout": mean_curve(p_low_test),
                             "low_all": mean_curve(p_low)},
        "sigma_tn": {"histogram": {"sigma": [float(g) for g in grid], "count": counts},
                     "median": float(np.median(sigma_tn)), "mean": float(np.mean(sigma_tn)),
                     "min": float(np.min(sigma_tn)), "max": float(np.max(sigma_tn)), "flagged": int(flagged.sum())},
        "known_sigma_tn": {"count": len(known), "median": float(np.median(known))} if known else None,
        "loss": {"first50": float(np.mean(losses[:50])), "last50": float(np.mean(losses[-50:])),
                 "every": every, "history": [float(np.mean(losses[i:i + every])) for i in range(0, len(losses), every)]},
        "seconds": seconds,
    }


def _write_curves(out: Path, summary: dict[str, Any]) -> None:
    probs, accuracy = summary["mean_probability"], summary["heldout_accuracy"]
    with (out / "curves.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sigma", "heldout_accuracy", "p_low_high_heldout", "p_low_low_heldout", "p_low_low_all",
                         "sigma_tn_count"])
        for s, sigma in enumerate(summary["grid"]):
            cell = lambda values: "" if values is None else f"{values[s]:.6g}"  # noqa: E731
            writer.writerow([repr(sigma), cell(accuracy), cell(probs["high_heldout"]), cell(probs["low_heldout"]),
                             cell(probs["low_all"]), summary["sigma_tn"]["histogram"]["count"][s]])


def _plots(out: Path, summary: dict[str, Any], sigma_tn: np.ndarray) -> None:
    from ..utils.plots import histogram, line_plot

    grid = np.asarray(summary["grid"])
    logs = np.log10(grid)
    step = logs[1] - logs[0]
    edges = np.concatenate([[logs[0] - step / 2], (logs[1:] + logs[:-1]) / 2, [logs[-1] + step / 2]])
    c = summary["counts"]
    histogram(np.log10(sigma_tn), out / "sigma_tn_hist.png", bins=edges,
              title=f"sigma_tn of {c['low']} low-quality samples ({c['flagged']} flagged at the top)",
              xlabel="log10 sigma_tn (one bar per grid sigma)")
    probs = summary["mean_probability"]
    series = {name: (grid, values) for name, values in
              [("p(low) high quality, held out", probs["high_heldout"]),
               ("p(low) low quality, held out", probs["low_heldout"]),
               ("p(low) low quality, all", probs["low_all"]),
               ("held-out balanced accuracy", summary["heldout_accuracy"])] if values is not None}
    if summary.get("threshold") == "heldout" and probs["high_heldout"] is not None:
        series[f"threshold: held-out clean + eps {summary['eps']:g}"] = (
            grid, moving_average(np.asarray(probs["high_heldout"])[None], summary["smooth"])[0] + summary["eps"])
    else:
        series[f"threshold 0.5 + eps = {0.5 + summary['eps']:g}"] = (grid, np.full(len(grid), 0.5 + summary["eps"]))
    line_plot(series, out / "probability_curves.png", title="quality classifier vs noise level",
              xlabel="sigma", ylabel="probability", logx=True)


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = AnnotateConfig()
    parser.add_argument("source", help="shapes:N, an image folder, a manifest (.jsonl/.csv/.parquet) or hf:NAME")
    parser.add_argument("--out", required=True, help="output folder: new, empty, or an earlier annotate run of the "
                                                     "same settings (redone); other settings need --overwrite, a "
                                                     "folder holding other files is refused")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo an earlier annotate run in --out that was made with other settings")
    parser.add_argument("--resolution", type=int_at_least(8), default=d.resolution,
                        help=f"image side in pixels, >= 8 (default: {d.resolution})")
    parser.add_argument("--corruption", default=None, metavar="MIXTURE",
                        help="corrupt the source as training's data.corruption does: SPEC@P[,SPEC@P...] e.g. "
                             "noise:0.3@0.5,blur:1.5@0.25 (a bare SPEC corrupts half the images) or YAML "
                             "'[[0.5, noise:0.3], [0.2, blur:1.5]]' (default: the images' own metadata)")
    parser.add_argument("--vocabulary", default=None, metavar="YAML",
                        help="shapes:N only, as training's data.vocabulary, e.g. '{sizes: [large], backgrounds: [black]}'")
    parser.add_argument("--split", choices=SPLITS, default=d.split,
                        help="which samples are low quality: 'quality' = meta quality < --quality-threshold "
                             "(missing = 1.0, clean); 'corruption' = meta corruption present and not 'none' "
                             f"(default: {d.split})")
    parser.add_argument("--quality-threshold", type=finite_float, default=None,
                        help=f"with --split quality: samples below it are low quality (default: {d.quality_threshold})")
    parser.add_argument("--autoencoder", default=d.autoencoder,
                        help="annotate in this autoencoder's latent units, e.g. microdiff-vae:runs/vae/autoencoder "
                             "(default: identity = pixels in [-1, 1])")
    parser.add_argument("--grid-min", type=positive_float, default=d.grid_min, help=f"smallest grid sigma (default: {d.grid_min})")
    parser.add_argument("--grid-max", type=positive_float, default=d.grid_max, help=f"largest grid sigma (default: {d.grid_max})")
    parser.add_argument("--grid-size", type=int_at_least(2), default=d.grid_size,
                        help=f"number of geometrically spaced grid sigmas (default: {d.grid_size})")
    parser.add_argument("--eps", type=finite_float, default=d.eps,
                        help="sigma_tn = first grid sigma where the smoothed p(low quality) < 0.5 + eps, as in "
                             f"Ambient-o's code; negative = stricter (default: {d.eps})")
    parser.add_argument("--threshold", choices=THRESHOLDS, default=d.threshold,
                        help="half: compare p(low quality) with 0.5 + eps (Ambient-o); heldout: with the classifier's "
                             "p(low quality) for held-out clean images at the same sigma, + eps. Use heldout when "
                             "there are few clean images: the classifier then memorises them and calls any other "
                             "image low quality even at high noise, so p stays above 0.5 (default: half)")
    parser.add_argument("--smooth", type=positive_int, default=d.smooth,
                        help=f"centred moving average of p along the grid, in grid points; 1 = none (default: {d.smooth})")
    parser.add_argument("--draws", type=positive_int, default=d.draws, help=f"noise draws per sample and sigma (default: {d.draws})")
    parser.add_argument("--steps", type=positive_int, default=d.steps, help=f"classifier training steps (default: {d.steps})")
    parser.add_argument("--batch-size", type=int_at_least(2), default=d.batch_size,
                        help=f"even; half high, half low quality (default: {d.batch_size})")
    parser.add_argument("--lr", type=positive_float, default=d.lr, help=f"Adam learning rate (default: {d.lr})")
    parser.add_argument("--width", type=positive_int, default=d.width, help=f"classifier channels (default: {d.width})")
    parser.add_argument("--heldout", type=finite_float, default=d.heldout,
                        help=f"fraction of each class held out to measure accuracy per sigma (default: {d.heldout})")
    parser.add_argument("--seed", type=non_negative_int, default=d.seed,
                        help="seed of the classifier's init, batches, noise and held-out split (default: 0)")
    parser.add_argument("--data-seed", type=non_negative_int, default=d.data_seed,
                        help="the dataset's seed (shapes:N content and keys); use training's data.seed (default: 0)")
    parser.add_argument("--device", default=d.device, help="auto (default), cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    """``microdiff annotate``: bad input ends with a one-line error and exit status 2."""
    try:
        corruption = None if args.corruption is None else parse_mixture(args.corruption)
        try:
            vocabulary = {} if args.vocabulary is None else yaml.safe_load(args.vocabulary)
        except yaml.YAMLError as err:
            raise ValueError(f"--vocabulary {args.vocabulary!r}: not valid YAML ({str(err).splitlines()[0]}); write "
                             "a mapping such as '{sizes: [large]}'") from None
        if not isinstance(vocabulary, dict):
            raise ValueError(f"--vocabulary: write a YAML mapping such as '{{sizes: [large]}}'; got {args.vocabulary!r}")
        if args.quality_threshold is not None and args.split != "quality":
            raise ValueError(f"--quality-threshold {args.quality_threshold:g}: acts only with --split quality, and "
                             f"--split is {args.split}; leave it out")
        config = AnnotateConfig(
            resolution=args.resolution, corruption=corruption, vocabulary=vocabulary, split=args.split,
            quality_threshold=AnnotateConfig.quality_threshold if args.quality_threshold is None
            else args.quality_threshold, autoencoder=args.autoencoder, grid_min=args.grid_min,
            grid_max=args.grid_max, grid_size=args.grid_size, eps=args.eps, threshold=args.threshold, smooth=args.smooth, draws=args.draws,
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, width=args.width, heldout=args.heldout,
            seed=args.seed, data_seed=args.data_seed, device=args.device, progress=not args.no_progress)
        summary = annotate(args.source, args.out, config, replace=args.overwrite)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"microdiff annotate: error: {first_line(err)}", file=sys.stderr)
        return 2
    c, tn, acc = summary["counts"], summary["sigma_tn"], summary["heldout_accuracy"]
    print(f"{c['total']} samples: {c['high']} high quality (sigma_tn 0), {c['low']} low quality ({summary['rule']})")
    if acc:
        print(f"held-out balanced accuracy: {acc[0]:.3f} at sigma {summary['grid'][0]:.3g}, "
              f"{acc[-1]:.3f} at sigma {summary['grid'][-1]:.3g}")
    print(f"low-quality sigma_tn: median {tn['median']:.4g}, range {tn['min']:.4g}..{tn['max']:.4g}; "
          f"{c['flagged']} flagged (never below the threshold, set to the top of the grid)")
    print(summary["skipped"]["summary"])
    print(f"wrote {args.out}/annotations.csv (train with ambient.annotations: {args.out}/annotations.csv), "
          f"sigma_tn_hist.png, probability_curves.png, curves.csv, summary.json, classifier.pt "
          f"in {summary['seconds']['total']:.1f}s")
    return 0


__all__ = ["sigma_grid", "moving_average", "annotate_sigma_tn", "balanced_accuracy", "is_low_quality",
           "QualityClassifier", "save_quality_classifier", "load_quality_classifier", "train_quality_classifier",
           "draw_probabilities", "low_quality_probability", "AnnotateConfig", "annotate", "annotate_settings", "parse_mixture",
           "add_arguments", "run"]
