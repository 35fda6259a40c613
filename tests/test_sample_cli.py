"""`microdiff sample` end to end in a real process, on a tiny pipeline saved here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from microdiff.diffusion import EDM, Denoiser
from microdiff.encoders.base import IdentityAutoencoder
from microdiff.encoders.text import BuiltinTextEncoder
from microdiff.models import MicroDiT_Nano_2
from microdiff.pipeline import Pipeline, SamplingDefaults
from microdiff.sample import parse_prompt


def _sample(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "microdiff", "sample", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    backbone = MicroDiT_Nano_2(in_channels=3, caption_channels=32, input_size=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fresh MicroDiT outputs zero; perturbed weights make prompts matter
        for p in backbone.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    pipe = Pipeline(BuiltinTextEncoder(dim=32, layers=1, heads=2, max_length=32), IdentityAutoencoder(3),
                    Denoiser(backbone.eval(), EDM(0.5)), SamplingDefaults(num_inference_steps=5, height=8, width=8))
    return pipe.save_pretrained(tmp_path_factory.mktemp("ckpt") / "pipe")


def test_parse_prompt():
    assert parse_prompt("a red circle:1.5") == ("a red circle", 1.5)
    assert parse_prompt("blurry:-0.3") == ("blurry", -0.3)
    assert parse_prompt("ratio 16:9 poster") == ("ratio 16:9 poster", 1.0)
    assert parse_prompt("plain") == ("plain", 1.0)


def test_sample_writes_pngs_with_settings_grid_and_log(checkpoint, tmp_path):
    out = tmp_path / "a"
    r = _sample("a red circle:1", "a blue square:-0.3", "--checkpoint", str(checkpoint), "-n", "5",
                "--batch-size", "2", "--seed", "10", "--out", str(out), "--grid", "--no-progress", "--device", "auto")
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in out.glob("0*.png"))
    assert files == [f"{k:05d}.png" for k in range(5)]
    info = Image.open(out / "00003.png").text
    assert info["microdiff:seed"] == "13" and info["microdiff:prompt"] == "a red circle:1 | a blue square:-0.3"
    assert info["microdiff:sampler"] == "heun" and info["microdiff:steps"] == "5"
    log = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [row["seed"] for row in log] == [10, 11, 12, 13, 14]
    assert Image.open(out / "grid.png").size == (3 * 8, 2 * 8)

    # same seed, other batch size and count: the same images (up to one 8-bit level of round-off)
    again = tmp_path / "b"
    r = _sample("a red circle:1", "a blue square:-0.3", "--checkpoint", str(checkpoint), "-n", "4",
                "--batch-size", "4", "--seed", "11", "--out", str(again), "--no-progress", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    for k in range(4):
        a = np.asarray(Image.open(out / f"{k + 1:05d}.png"), dtype=int)
        b = np.asarray(Image.open(again / f"{k:05d}.png"), dtype=int)
        assert np.abs(a - b).max() <= 1


def test_sample_errors_are_one_line(tmp_path):
    r = _sample("a red circle", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such pipeline folder" in r.stderr
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "pipeline.yaml").write_text("format: not-ours\n")
    r = _sample("a red circle", "--checkpoint", str(tmp_path / "other"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "not a microdiff pipeline config" in r.stderr


@pytest.mark.parametrize("flags, message", [(["--cuda-graphs"], "--cuda-graphs works through torch.compile"),
                                            (["--decode-batch", "0"], "--decode-batch=0: must be at least 1")])
def test_sample_speed_flags_are_checked(checkpoint, tmp_path, flags, message):
    r = _sample("a red circle", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"), *flags)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and message in r.stderr


def test_sample_with_clip_guidance_and_an_image_prompt(checkpoint, tmp_path):
    """CLIP guidance end to end: a tiny random CLIP built offline (as in test_clip_guidance.py), a text
    and an image prompt; the guided images differ from the unguided ones and the settings are logged."""
    from test_clip_guidance import build_tiny_clip

    folder = build_tiny_clip(tmp_path / "clip")
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "red.png")

    common = ["a red circle", "--checkpoint", str(checkpoint), "-n", "2", "--seed", "0", "--no-progress",
              "--device", "cpu"]
    plain = _sample(*common, "--out", str(tmp_path / "plain"))
    guided = _sample(*common, "--out", str(tmp_path / "guided"), "--clip-model", str(folder),
                     "--clip-guidance-scale", "2000", "--cutn", "4", "--images", f"{tmp_path / 'red.png'}:0.5")
    assert plain.returncode == 0 and guided.returncode == 0, guided.stderr
    a = np.asarray(Image.open(tmp_path / "plain" / "00000.png"), dtype=int)
    b = np.asarray(Image.open(tmp_path / "guided" / "00000.png"), dtype=int)
    assert np.abs(a - b).max() > 0
    info = Image.open(tmp_path / "guided" / "00000.png").text
    assert info["microdiff:clip_model"] == str(folder) and info["microdiff:clip_guidance_scale"] == "2000.0"
    bad = _sample(*common, "--out", str(tmp_path / "bad"), "--images", "red.png")
    assert bad.returncode == 2 and "--images needs --clip-model" in bad.stderr
