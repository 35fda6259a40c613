"""Autoencoder training end to end on generated shape images: error goes down, the run folder is
complete, a run killed mid-way (SIGKILL) resumes from its checkpoint to the same final weights as an
uninterrupted run, every parameter is trained, and the CLI command works."""

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from microdiff.encoders.ae_losses import AELossConfig, PerceptualLoss
from microdiff.encoders.autoencoder_io import load_trained_autoencoder
from microdiff.encoders.train_autoencoder import (AutoencoderTrainer, TrainAutoencoderConfig, add_arguments,
                                                  batch_indices, collate_images, run, split_indices,
                                                  train_autoencoder)

TESTS = Path(__file__).parent


class ShapeImages(torch.utils.data.Dataset):
    """Random coloured rectangles and ellipses on a plain background, drawn with Pillow; item i
    depends on (seed, i) only."""

    def __init__(self, n: int, size: int = 16, seed: int = 0):
        self.n, self.size, self.seed = n, size, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        s = self.size
        img = Image.new("RGB", (s, s), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 3))):
            x0, y0 = rng.integers(0, s // 2, 2)
            w, h = rng.integers(s // 4, s // 2, 2)
            x1, y1 = x0 + w, y0 + h
            shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
            shape([int(x0), int(y0), int(x1), int(y1)], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        image = torch.from_numpy(np.asarray(img, np.float32) / 127.5 - 1).permute(2, 0, 1).contiguous()
        return {"image": image, "caption": "shapes", "key": f"img{i:04d}", "meta": {}}


def tiny_config(kind="vae", disc_start=None, ema=None, checkpoint_every=100, log_every=1, **loss):
    model = {"channels": 8, "channel_mult": [1, 2], "norm_groups": 4, "latent_channels": 4, "attention": True}
    if kind == "vqgan":
        model |= {"codebook_size": 32}
    return TrainAutoencoderConfig(kind=kind, model=model, ema_decay=ema, checkpoint_every=checkpoint_every,
                                  log_every=log_every, holdout=8, loss=AELossConfig(disc_start=disc_start, disc_layers=2,
                                                                           disc_channels=8, **loss))


# --- learning ---------------------------------------------------------------------------------------------------
def test_training_lowers_reconstruction_error_and_writes_the_run_folder(tmp_path):
    data = ShapeImages(64, 16, seed=0)
    out = tmp_path / "run"
    config = tiny_config("vae", disc_start=80)
    config.model["channels"] = 16
    summary = train_autoencoder(data, config, out, steps=100, batch_size=8, lr=1e-3, seed=0, progress=False)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 101))
    first, last = (np.mean([float(r["mse"]) for r in rows[k]]) for k in (slice(0, 5), slice(-5, None)))
    # Measured over training seeds 0-4 (the same on torch 2.13.0 and 2.14.1): last / first training MSE
    # 0.33-0.55, held-out MSE after / before 0.33-0.53, held-out PSNR gain 2.9-5.2 dB (no learning: ~1 and ~0).
    assert last < 0.75 * first, (first, last)  # training batches
    b, a = summary["before"], summary["after"]
    assert a["mse"] < 0.75 * b["mse"] and a["psnr"] > b["psnr"] + 1.5, (b, a)  # held-out images too
    assert rows[-1]["g_loss"] and rows[-1]["d_loss"] and not rows[78]["g_loss"]  # GAN from step 80 (0-based)
    # the run folder
    assert json.loads((out / "metrics.json").read_text())["after"] == a
    grid = np.asarray(Image.open(out / "reconstructions.png"))
    assert grid.shape == (2 * 66 + 2, 8 * 66 + 2, 3)  # 8 held-out images (x4 zoom, 2 px gaps) over their recons
    first_heldout = data[split_indices(64, 8, seed=0)[1][0]]["image"]
    tile = np.round((first_heldout.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
    assert np.array_equal(grid[2:66:4, 2:66:4], tile)  # top-left tile: the original, nearest-upscaled
    assert Image.open(out / "loss.png").size == (640, 400)
    ae = load_trained_autoencoder(out / "autoencoder")
    assert summary["identifier"] == ae.identifier
    x = collate_images([data[i] for i in range(4)])
    with torch.no_grad():
        z = ae.encode(x)
    assert z.shape == (4, 4, 8, 8)
    assert float(z.std()) == pytest.approx(1.0, abs=0.3)  # fitted scale: unit-variance latents (seeds 0-4: 0.94-0.97)
    assert ae.config.scale == summary["scale"]


def test_every_parameter_gets_a_gradient():
    for kind in ("vae", "vqgan"):
        torch.manual_seed(0)
        extractor = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
        trainer = AutoencoderTrainer(tiny_config(kind, disc_start=0), lr=1e-3, seed=0,
                                     perceptual=PerceptualLoss(extractor, [1]))
        images = collate_images([ShapeImages(8)[i] for i in range(4)])
        trainer.train_step(images)  # VQ: the first step initialises the codebook
        logs = trainer.train_step(images)
        assert {"l1", "perceptual", "g_loss", "d_loss", "d_weight"} <= set(logs)
        last_bias = f"main.{len(trainer.disc.main) - 1}.bias"
        for module in (trainer.model, trainer.disc):
            for name, p in module.named_parameters():
                assert p.grad is not None, f"{kind}: {name} got no gradient"
                # the hinge loss's gradient on the discriminator's output bias is
                # 0.5 * (share of fake logits > -1 - share of real logits < 1): exactly 0 while every
                # logit is inside the margin, as at initialisation
                if module is not trainer.disc or name != last_bias:
                    assert p.grad.abs().sum() > 0, f"{kind}: {name} got a zero gradient"
        assert all(p.grad is None for p in extractor.parameters())


# --- resume -------------------------------------------------------------------------------------------------------
KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_train_autoencoder import ShapeImages, tiny_config
from microdiff.encoders.train_autoencoder import train_autoencoder

def kill(step, logs):
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final checkpoint: like a preempted job

config = tiny_config({kind!r}, disc_start=2, ema=0.9, checkpoint_every={every}, log_every=3)
train_autoencoder(ShapeImages(24), config, {out!r}, steps={steps}, batch_size=4, lr=1e-3, seed=3, progress=False,
                  callback=kill)
"""


@pytest.mark.parametrize("kind", ["vae", "vqgan"])
def test_killed_run_resumes_to_the_same_weights(kind, tmp_path):
    steps, every, kill_at = 8, 4, 6
    # log_every=3: the checkpoint at step 4 holds a half-filled window of the averaged metrics.csv rows
    config = lambda: tiny_config(kind, disc_start=2, ema=0.9, checkpoint_every=every, log_every=3)  # noqa: E731
    train_autoencoder(ShapeImages(24), config(), tmp_path / "straight", steps=steps, batch_size=4, lr=1e-3, seed=3,
                      progress=False)
    killed = tmp_path / "killed"
    script = KILL_SCRIPT.format(tests=str(TESTS), kill_at=kill_at, kind=kind, every=every, out=str(killed),
                                steps=steps)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr  # it really was killed
    state = torch.load(killed / "checkpoint" / "trainer.pt", weights_only=True)
    assert state["trainer"]["step"] == every and not (killed / "metrics.json").exists()
    seen = []
    train_autoencoder(ShapeImages(24), config(), killed, steps=steps, batch_size=4, lr=1e-3, seed=3, progress=False,
                      callback=lambda step, logs: seen.append(step))
    assert seen == list(range(every + 1, steps + 1))  # resumed from the checkpoint, not from scratch
    a, b = (load_file(str(d / "autoencoder" / "model.safetensors")) for d in (tmp_path / "straight", killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # EMA weights, codebook
    sa, sb = (torch.load(d / "checkpoint" / "trainer.pt", weights_only=True)["trainer"]
              for d in (tmp_path / "straight", killed))
    for part in ("model", "disc"):
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part]), part
    assert (tmp_path / "straight" / "metrics.csv").read_text() == (killed / "metrics.csv").read_text()


def test_resume_refuses_other_settings_and_can_start_over(tmp_path):
    data = ShapeImages(12)
    train_autoencoder(data, tiny_config(), tmp_path, steps=2, batch_size=4, lr=1e-3, seed=0, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(lr differ\).*--no-resume"):
        train_autoencoder(data, tiny_config(), tmp_path, steps=3, batch_size=4, lr=5e-4, seed=0, progress=False)
    seen = []
    train_autoencoder(data, tiny_config(), tmp_path, steps=2, batch_size=4, lr=5e-4, seed=0, progress=False,
                      resume=False, callback=lambda step, logs: seen.append(step))
    assert seen == [1, 2]
    more = []  # more steps than before: continues
    train_autoencoder(data, tiny_config(), tmp_path, steps=3, batch_size=4, lr=5e-4, seed=0, progress=False,
                      callback=lambda step, logs: more.append(step))
    assert more == [3]


# --- data plumbing --------------------------------------------------------------------------------------------------
def test_batches_are_a_pure_function_of_seed_and_step():
    n, b = 10, 4
    stream = [i for step in range(5) for i in batch_indices(step, b, n, seed=1)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))  # epochs
    assert stream[:10] != stream[10:20]  # a new permutation per epoch
    assert batch_indices(3, b, n, seed=1) == stream[12:16] and batch_indices(3, b, n, seed=2) != stream[12:16]
    train, held = split_indices(100, 64, seed=0)
    assert len(held) == 20 and not set(train) & set(held) and sorted(train + held) == list(range(100))


def test_bad_records_are_reported_by_key(tmp_path):
    good = ShapeImages(2)[0]
    with pytest.raises(ValueError, match=r"record 'px': image values must be finite and in \[-1, 1\]"):
        collate_images([good, {**good, "key": "px", "image": (good["image"] + 1) * 127.5}])
    with pytest.raises(ValueError, match=r"record 'gray': 'image' must be a float tensor \(3, H, W\)"):
        collate_images([{**good, "key": "gray", "image": good["image"][:1]}])
    with pytest.raises(ValueError, match="record 'big': image size"):
        collate_images([good, {**good, "key": "big", "image": torch.zeros(3, 32, 32)}])
    with pytest.raises(ValueError, match="too small for a 3-layer PatchGAN"):
        cfg = tiny_config(disc_start=0)
        cfg.loss.disc_layers = 3
        train_autoencoder(ShapeImages(10), cfg, tmp_path / "run", steps=1, batch_size=2, progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


# --- CLI ---------------------------------------------------------------------------------------------------------
def test_cli_trains_on_the_builtin_shapes(tmp_path, capsys):
    pytest.importorskip("microdiff.data.shapes")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data", "shapes:40", "--out", str(tmp_path / "vq"), "--kind", "vqgan",
                              "--resolution", "16", "--steps", "3", "--batch-size", "4", "--channels", "8",
                              "--channel-mult", "1,2", "--codebook-size", "16", "--disc-start", "1",
                              "--disc-layers", "2", "--holdout", "4", "--device", "cpu", "--no-progress"])
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "held-out reconstruction (4 images)" in out and "microdiff-vqgan:" in out
    metrics = json.loads((tmp_path / "vq" / "metrics.json").read_text())
    assert metrics["kind"] == "vqgan" and metrics["latent_shape"] == [4, 8, 8] and "codebook_usage" in metrics["after"]
    for name in ("reconstructions.png", "loss.png", "metrics.csv", "autoencoder/config.json"):
        assert (tmp_path / "vq" / name).is_file(), name


def test_cli_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys):
    pytest.importorskip("microdiff.data.precompute")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for argv, message in [(["--data", "shapes:many"], "write shapes:N"),
                          (["--data", "shapes:10", "--channel-mult", "1,x"], "--channel-mult: expected comma-separated"),
                          (["--data", "shapes:10", "--perceptual-weights", str(tmp_path / "vgg.pth")],
                           "perceptual weights not found")]:
        assert run(parser.parse_args(argv + ["--out", str(tmp_path / "run"), "--no-progress"])) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
