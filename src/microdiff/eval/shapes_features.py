"""A feature space for Fréchet distances on the built-in shapes data: a small recognition network.

FID measures distances in the features of a network trained to recognise real images (Inception-v3
on ImageNet). For data sets where Inception means little, papers use a network trained on the
domain itself (a LeNet for MNIST FID). This module is that network for ``shapes:N``: a four-layer
CNN trained on clean shapes images to read back each image's shape, colour, size, position,
background and the object's centre and radius. Its 128-d penultimate activations are the features.

Because it sees only clean, sharp images in training, blur, noise, holes and malformed shapes move
an image's features away from where real images sit, which pixel-space FD barely registers (a
1.5 px blur changes few pixel statistics at 32 px).

    net = train_shapes_feature_net(resolution=32)            # about a minute on one CPU core
    net = shapes_feature_net(cache_dir, resolution=32)       # trained once, then loaded from the cache
    shapes_features(images_01, net)                          # (B, 128) float64 numpy

The training set is drawn from its own seed (FEATURE_SEED), distinct from any seed the benchmarks
use for training or held-out images.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..utils.errors import UserError
from ..utils.weights import load_strict, read_torch_file

FEATURE_SEED = 9_999  # the recognition net's training images; no benchmark uses this data seed
FEATURE_DIM = 128
HEADS = ("shape", "colour", "size", "position", "background")


def _vocabulary() -> dict[str, tuple[str, ...]]:
    from ..data.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES

    return {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": POSITIONS,
            "background": tuple(BACKGROUNDS)}


class ShapesFeatureNet(nn.Module):
    """Conv 32-64-128-128 (strides 1, 2, 2, 2), a 128-d feature layer, one linear head per attribute
    plus a 3-d regression of the object's centre and radius (fractions of the side)."""

    def __init__(self, resolution: int = 32, width: int = 32):
        super().__init__()
        if resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 for the shapes feature net; got {resolution}")
        self.resolution = resolution
        w = width

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(*block(3, w, 1), *block(w, 2 * w, 2), *block(2 * w, 4 * w, 2),
                                  *block(4 * w, 4 * w, 2), nn.Flatten(),
                                  nn.Linear(4 * w * (resolution // 8) ** 2, FEATURE_DIM), nn.SiLU())
        vocabulary = _vocabulary()
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURE_DIM, len(vocabulary[name])) for name in HEADS})
        self.geometry = nn.Linear(FEATURE_DIM, 3)

    def features(self, images_01: torch.Tensor) -> torch.Tensor:
        return self.body(images_01 * 2 - 1)

    def forward(self, images_01: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        f = self.features(images_01)
        return {name: head(f) for name, head in self.heads.items()}, self.geometry(f)


def _labelled_images(n: int, resolution: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    from ..data.shapes import ShapesDataset

    vocabulary = _vocabulary()
    data = ShapesDataset(n, resolution=resolution, seed=seed)
    images, labels, geometry = [], {name: [] for name in HEADS}, []
    for i in range(n):
        item = data[i]
        meta = item["meta"]
        images.append((item["image"] + 1) / 2)
        for name in HEADS:
            labels[name].append(vocabulary[name].index(meta[name]))
        geometry.append([meta["centre_px"][0] / resolution, meta["centre_px"][1] / resolution,
                         meta["radius_px"] / resolution])
    return (torch.stack(images), {k: torch.tensor(v) for k, v in labels.items()},
            torch.tensor(geometry, dtype=torch.float32))


def train_shapes_feature_net(resolution: int = 32, n: int = 6000, steps: int = 800, batch_size: int = 64,
                             lr: float = 2e-3, seed: int = 0, progress: bool = False) -> tuple[ShapesFeatureNet, dict]:
    """Train the recognition net on ``n`` clean images (full vocabulary, data seed FEATURE_SEED).
    Returns the net (eval mode) and a report with the held-out accuracy of each head."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    images, labels, geometry = _labelled_images(n, resolution, FEATURE_SEED)
    test = slice(int(n * 0.9), n)
    net = ShapesFeatureNet(resolution)
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    train_n = test.start
    for _ in tqdm(range(steps), desc="train shapes feature net", unit="step", disable=not progress):
        idx = torch.randint(0, train_n, (batch_size,), generator=generator)
        logits, geo = net(images[idx])
        loss = sum(nn.functional.cross_entropy(logits[k], labels[k][idx]) for k in HEADS)
        loss = loss + 10 * nn.functional.mse_loss(geo, geometry[idx])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    net.eval()
    with torch.no_grad():
        logits, geo = net(images[test])
    report = {f"{k}_accuracy": float((logits[k].argmax(1) == labels[k][test]).float().mean()) for k in HEADS}
    report["geometry_rmse_px"] = float((geo - geometry[test]).pow(2).mean().sqrt() * resolution)
    report.update({"resolution": resolution, "n": n, "steps": steps, "seed": seed, "data_seed": FEATURE_SEED})
    return net, report


def _cache_name(resolution: int, **settings: Any) -> str:
    text = json.dumps({"resolution": resolution, "data_seed": FEATURE_SEED, **settings}, sort_keys=True)
    return f"shapes-features-{resolution}px-{hashlib.blake2b(text.encode(), digest_size=4).hexdigest()}.pt"


def shapes_feature_net(cache_dir: str | Path, resolution: int = 32, progress: bool = False,
                       **settings: Any) -> ShapesFeatureNet:
    """The recognition net for ``resolution``, loaded from ``cache_dir`` or trained once and saved
    there (with its held-out accuracies in a .json beside it)."""
    path = Path(cache_dir) / _cache_name(resolution, **settings)
    net = ShapesFeatureNet(resolution)
    if path.exists():
        try:  # our own cache: a damaged or outdated one is trained again, not trusted
            load_strict(net, read_torch_file(path, "shapes feature-net cache"), path)
            return net.eval()
        except UserError as err:
            print(f"{err}; training the recognition net again", file=sys.stderr)
            net = ShapesFeatureNet(resolution)
    net, report = train_shapes_feature_net(resolution, progress=progress, **settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # atomic: another process may read it meanwhile
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(report, indent=1))
    return net


@torch.no_grad()
def shapes_features(images_01: Any, net: ShapesFeatureNet, batch_size: int = 256) -> np.ndarray:
    """(B, 128) float64 features of images (B, 3, H, W) in [0, 1] at the net's resolution."""
    images = torch.as_tensor(images_01).float()
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != net.resolution:
        raise ValueError(f"shapes_features needs images (B, 3, {net.resolution}, {net.resolution}) in [0, 1]; "
                         f"got {tuple(images.shape)}")
    net.eval()
    return torch.cat([net.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]).double().numpy()


__all__ = ["ShapesFeatureNet", "train_shapes_feature_net", "shapes_feature_net", "shapes_features", "FEATURE_SEED",
           "FEATURE_DIM"]
