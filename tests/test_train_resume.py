"""A run killed with SIGKILL and resumed with --resume auto computes the same losses as one that was
never interrupted (same process count and threads: equal to float round-off, in practice bitwise)."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import torch

from microdiff.pipeline import Pipeline
from microdiff.train.checkpoint import list_checkpoints, load_state

from train_helpers import env, losses, run_train, train_command, write_config

STEPS = 60


@pytest.mark.parametrize("mask_ratio", [0.5])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, mask_ratio):
    config = write_config(tmp_path / "c.yaml", train={"steps": STEPS}, checkpoint={"every": 10, "keep_last": 2},
                          loss={"mask_ratio": mask_ratio, "caption_dropout": 0.2})
    straight = tmp_path / "straight"
    run_train(config, straight)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_command(config, killed), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        found = list_checkpoints(killed)
        if found and found[-1][0] >= 20:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    interrupted_at = list_checkpoints(killed)[-1][0]
    assert 20 <= interrupted_at < STEPS

    run_train(config, killed, "--resume", "auto")
    a, b = losses(straight), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))  # no step lost or logged twice
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step

    # the final weights, EMA included, match too
    sa = load_state(list_checkpoints(straight)[-1][1])
    sb = load_state(list_checkpoints(killed)[-1][1])
    for key, value in sa["model"].items():
        torch.testing.assert_close(sb["model"][key], value, rtol=1e-5, atol=1e-6)
    for key, value in sa["ema"]["shadows"]["0.99"].items():
        torch.testing.assert_close(sb["ema"]["shadows"]["0.99"][key], value, rtol=1e-5, atol=1e-6)
    # and the exported pipeline samples
    pipe = Pipeline.from_pretrained(killed / "pipeline")
    images = pipe.generate(["a red circle"], num_inference_steps=3, seed=0)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    config = write_config(tmp_path / "c.yaml")
    out = tmp_path / "run"
    run_train(config, out)
    before = losses(out)
    proc = run_train(config, out, "--resume", "auto")
    assert losses(out) == before
    assert "trained 8 steps" in proc.stdout
