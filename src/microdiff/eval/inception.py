"""Inception-v3 pool3 features for FID, in plain PyTorch (no torchvision).

The network is the TensorFlow FID Inception (``inception-2015-12-05``) in the layout pytorch-fid
uses, so pytorch-fid's weights file ``pt_inception-2015-12-05-6726825d.pth`` loads with its own key
names: torchvision's ``Inception3`` module names, no ``AuxLogits``, a 1008-way ``fc`` (kept only so
the keys match; features stop before it), BatchNorm ``eps=0.001``, and the three FID patches:

- average pools inside Mixed_5b..5d, 6b..6e and 7b ignore the zero padding
  (``count_include_pad=False``, as TensorFlow does);
- Mixed_7c pools its ``branch_pool`` input with a *max* pool (a quirk of the TF graph).

    model = load_fid_inception()                      # or load_fid_inception("pt_inception-...pth")
    feats = inception_features(images, model)         # images: (N, 3, H, W) float in [0, 1]
    mu, sigma = feature_statistics(feats)             # microdiff.eval.frechet -> FID

``FIDInceptionV3.forward`` resizes to 299x299 (bilinear, ``align_corners=False``), maps [0, 1] to
[-1, 1] and returns the (B, 2048) pool3 features, as ``pytorch_fid.InceptionV3([3])`` does.
The module stays in eval mode: ``.train()`` is ignored, so BatchNorm always uses stored statistics.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .images import as_image_batch
from ..utils.weights import read_torch_file

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_ENV = "MICRODIFF_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
DOWNLOAD_SOCKET_TIMEOUT_S = 30.0  # per connect/read, so an unreachable host fails instead of hanging


# ----------------------------------------------------------------------------- layers

class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm(eps=0.001) -> ReLU; keys ``conv.weight`` and ``bn.*``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool3x3(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same-size 3x3 pool feeding a ``branch_pool``: TF-style average (padding not counted) or max."""
    if kind == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_pool3x3(x, "avg")),
        ], 1)


class BlockB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convs (Mixed_6b..6e)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = conv(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_pool3x3(x, "avg"))], 1)


class BlockD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class BlockE(nn.Module):
    """8x8 block with split 1x3/3x1 outputs (Mixed_7b: ``pool="avg"``, Mixed_7c: ``pool="max"``)."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max'; got {pool!r}")
        self.pool = pool
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, **row)
        self.branch3x3_2b = ConvBN(384, 384, **col)
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, **row)
        self.branch3x3dbl_3b = ConvBN(384, 384, **col)
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
            self.branch_pool(_pool3x3(x, self.pool)),
        ], 1)


# ----------------------------------------------------------------------------- network

class FIDInceptionV3(nn.Module):
    """FID Inception-v3 up to pool3: ``forward(images)`` with (B, 3, H, W) floats in [0, 1] -> (B, 2048).

    Randomly initialised; use ``load_fid_inception`` for the published weights.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, pool_features=32)
        self.Mixed_5c = BlockA(256, pool_features=64)
        self.Mixed_5d = BlockA(288, pool_features=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, channels_7x7=128)
        self.Mixed_6c = BlockC(768, channels_7x7=160)
        self.Mixed_6d = BlockC(768, channels_7x7=160)
        self.Mixed_6e = BlockC(768, channels_7x7=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, pool="avg")
        self.Mixed_7c = BlockE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)  # unused by forward; present so the keys match the file
        self.eval()

    def train(self, mode: bool = True) -> "FIDInceptionV3":
        """Always eval: BatchNorm must use the stored statistics, even inside a module put in training."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = as_image_batch(images, "FIDInceptionV3")
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


# ----------------------------------------------------------------------------- weights

def load_fid_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID Inception with pytorch-fid's weights, in eval mode with gradients off.

    Weights come from ``path``, else the file named by $MICRODIFF_INCEPTION_WEIGHTS, else a download
    of ``FID_WEIGHTS_URL`` through torch.hub's cache (tried only when no local file is given).
    """
    path = path or os.environ.get(WEIGHTS_ENV) or None
    if path is not None:
        source = str(path)
        state = _read_state_dict(Path(path))
    else:
        source = FID_WEIGHTS_URL
        state = _download_state_dict()
    model = FIDInceptionV3()
    _load_strict(model, state, source)
    model.requires_grad_(False)
    return model.to(device)


def _read_state_dict(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Inception weights file not found; download {FID_WEIGHTS_URL} and pass "
                                f"its path (--features inception:PATH, load_fid_inception(PATH) or ${WEIGHTS_ENV})")
    return read_torch_file(path, "Inception weights file", fix=f"expected pytorch-fid's "
                                                              f"{FID_WEIGHTS_URL.rsplit('/', 1)[-1]}")


def _download_state_dict() -> Mapping[str, Any]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        return torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", progress=False,
                                                  weights_only=True)
    except Exception as err:  # noqa: BLE001 - offline, proxy, HTTP error, corrupt cache: one message
        raise RuntimeError(f"could not download the FID Inception weights ({_one_line(err)}); download "
                           f"{FID_WEIGHTS_URL} and pass its path: --features inception:PATH, load_fid_inception(PATH) "
                           f"or ${WEIGHTS_ENV}=PATH") from None
    finally:
        socket.setdefaulttimeout(previous)


def _load_strict(model: nn.Module, state: Any, source: str) -> None:
    """Load every key of ``model`` from ``state``, or raise one line naming the first mismatches.

    ``*.num_batches_tracked`` may be absent (files converted without it): it does not affect eval.
    """
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source}: expected a state dict (name -> tensor) as in pytorch-fid's weights file; "
                         f"got {type(state).__name__}")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {tuple(state[k].shape)}!={tuple(v.shape)}" for k, v in expected.items()
                if k in state and state[k].shape != v.shape]
    problems = [f"{label} {_first(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped)) if keys]
    if problems:
        raise ValueError(f"{source}: not the FID Inception-v3 weights; {'; '.join(problems)} "
                         f"(expected pytorch-fid's {FID_WEIGHTS_URL.rsplit('/', 1)[-1]})")
    model.load_state_dict(state, strict=False)


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


# ----------------------------------------------------------------------------- features

@torch.no_grad()
def inception_features(images: Any, model: nn.Module, batch_size: int = 64) -> np.ndarray:
    """(N, 2048) float64 pool3 features of ``images`` ((N, 3, H, W) floats in [0, 1], tensor or array),
    computed ``batch_size`` at a time on the model's device."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    images = as_image_batch(images, "inception_features")
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    model.eval()
    chunks = [model(images[i:i + batch_size].to(device, dtype)).double().cpu()
              for i in range(0, len(images), batch_size)]
    if not chunks:
        return np.zeros((0, FEATURE_DIM), dtype=np.float64)
    return torch.cat(chunks).numpy()
