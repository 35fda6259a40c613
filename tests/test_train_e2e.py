"""End to end as a user runs it: `microdiff train` -> `microdiff sample --checkpoint RUN/pipeline`, the
multi-stage command, a diverging run, and `microdiff demo` (tiny settings: files, not quality)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from microdiff.train.checkpoint import list_checkpoints

from train_helpers import env, losses, run_train, write_config


def test_train_then_sample_from_the_pipeline(tmp_path):
    config = write_config(tmp_path / "c.yaml", train={"steps": 12},
                          log={"sample_prompts": ["a red circle", "a blue square"], "sample_every": 6,
                               "tensorboard": True})
    out = tmp_path / "run"
    proc = run_train(config, out)
    assert "pipeline:" in proc.stdout
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "pipeline/pipeline.yaml", "pipeline/denoiser.safetensors",
                 "samples/step-00000006.png", "samples/step-00000012.png"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "grad_norm", "lr", "images_per_s"} <= set(rows[0])
    assert any(k.startswith("loss_sigma/") for k in rows[0])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["steps"] == 12 and saved["log"]["sample_every"] == 6

    samples = tmp_path / "samples"
    cmd = [sys.executable, "-m", "microdiff", "sample", "a green triangle", "--checkpoint", str(out / "pipeline"),
           "-n", "2", "--steps", "3", "--out", str(samples), "--grid"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted(samples.glob("*.png"))
    assert len(pngs) == 3 and Image.open(pngs[0]).size == (16, 16)


def test_stages_run_in_order_and_start_from_the_previous_stage(tmp_path):
    write_config(tmp_path / "s1.yaml", train={"steps": 4}, loss={"mask_ratio": 0.5})
    write_config(tmp_path / "s2.yaml", train={"steps": 3}, data={"resolution": 32},
                 model={"init_from": "previous", "options": {"pos_interp_scale": 2.0}})
    (tmp_path / "stages.yaml").write_text("stages: [s1.yaml, s2.yaml]\n")
    out = tmp_path / "md"
    proc = run_train(tmp_path / "stages.yaml", out)
    assert "stage 1/2" in proc.stdout and "stage 2/2" in proc.stdout
    assert sorted(losses(out / "s1")) == [1, 2, 3, 4] and sorted(losses(out / "s2")) == [1, 2, 3]
    assert yaml.safe_load((out / "s2" / "config.yaml").read_text())["model"]["init_from"] == str(out / "s1")
    # running it again skips what finished
    again = run_train(tmp_path / "stages.yaml", out)
    assert again.stdout.count("already finished") == 2


def test_a_diverging_run_stops_with_one_clear_line_and_keeps_the_last_good_checkpoint(tmp_path):
    config = write_config(tmp_path / "c.yaml", train={"steps": 40}, optim={"lr": 1e8, "grad_clip": None,
                                                                         "warmup_steps": 0},
                          checkpoint={"every": 1, "keep_last": 3})
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "microdiff", "train", str(config), "--out", str(out)], env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("microdiff train: error: step ") and ("the loss is" in last or "the gradient norm is" in last) and "last good checkpoint" in last
    found = list_checkpoints(out)
    assert found and str(found[-1][1]) in last


def test_demo_writes_everything_it_promises(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "microdiff", "demo", "--out", str(out), "--steps", "20", "--fd-samples", "40",
           "--no-progress", "sampling.steps=2", "train.threads=1", "data.source=shapes:200", "checkpoint.every=10", "log.every=5"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("grid.png", "samples.jsonl", "alignment.csv", "metrics.json", "loss.png", "pipeline/pipeline.yaml"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 72 and len({r["prompt"] for r in rows}) == 18
    assert all((out / r["file"]).is_file() for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checker_accuracy_on_real"] >= 0.99  # the judge itself is right on real images
    # 20 steps train nothing yet: over train/data seeds 0-4 fd_pixel is 30-32 against a real-vs-real floor of 0.95
    assert 0.0 <= metrics["alignment"] <= 1.0 and metrics["fd_pixel"] > metrics["fd_pixel_real_vs_real"] >= 0
    assert "prompt alignment" in proc.stdout and "microdiff sample --checkpoint" in proc.stdout


@pytest.mark.parametrize("bad, message", [
    ("model.backbone=Huge", "model.backbone: unknown preset 'Huge'; choose one of MicroDiT_XL_2"),
    ("train.micro_batch_size=3", "micro_batch_size=3 must divide"),
])
def test_build_errors_name_the_field(tmp_path, bad, message):
    config = write_config(tmp_path / "c.yaml")
    proc = subprocess.run([sys.executable, "-m", "microdiff", "train", str(config), "--out", str(tmp_path / "r"), bad],
                          env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
