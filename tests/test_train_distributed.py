"""Two CPU processes (torchrun, gloo; DDP and FSDP2) with the same global batch train like one process: the global
batch is split by rank, per-sample noise/sigma/dropout/patch masks are drawn for the global batch
and sliced, gradients are averaged. Tolerance: the all-reduce sums gradients in another order than
one process's accumulation, so losses agree to ~1e-6 relative, not bitwise; we allow 1e-4 over 6
steps (a bug such as a rank seeing the wrong samples moves the loss by 1e-2 or more)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

from microdiff.train.checkpoint import list_checkpoints, load_state

from train_helpers import env, losses, run_train, write_config

STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(config, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "microdiff", "train", str(config), "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, strategy):
    config = write_config(tmp_path / "c.yaml", train={"steps": STEPS, "batch_size": 8, "micro_batch_size": 4},
                          loss={"mask_ratio": 0.5, "caption_dropout": 0.25}, checkpoint={"every": 3},
                          distributed={"strategy": strategy})
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(config, one)  # 1 process: 2 accumulation steps of 4
    _torchrun(config, two)  # 2 processes: 1 step of 4 each
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a[step], b[step])
    sa, sb = load_state(list_checkpoints(one)[-1][1]), load_state(list_checkpoints(two)[-1][1])
    assert sb["world_size"] == 2 and len(sb["data"]) == 2  # every rank's data position and RNG state
    for key, value in sa["model"].items():
        torch.testing.assert_close(sb["model"][key], value, rtol=1e-3, atol=1e-5)
    # only rank 0 wrote: one metrics file, one pipeline, no stray rank folders
    assert (two / "pipeline" / "pipeline.yaml").is_file()
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_resume_needs_the_same_process_count(tmp_path):
    config = write_config(tmp_path / "c.yaml", train={"steps": 4})
    out = tmp_path / "run"
    run_train(config, out)
    cmd_config = write_config(tmp_path / "c2.yaml", train={"steps": 6})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "microdiff", "train", str(cmd_config), "--out", str(out)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "resume with the same number of processes" in proc.stderr


def test_fsdp_checkpoint_and_pipeline_hold_full_weights(tmp_path):
    """FSDP2 shards parameters as DTensors; the checkpoint and the exported pipeline gather them into
    plain full tensors that one process (and Pipeline.from_pretrained) can load."""
    config = write_config(tmp_path / "c.yaml", train={"steps": 3, "batch_size": 8, "micro_batch_size": 4},
                          checkpoint={"every": 0}, distributed={"strategy": "fsdp"})
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(config, one)
    _torchrun(config, two)
    a, b = losses(one), losses(two)
    assert sorted(b) == [1, 2, 3] and b[1] == pytest.approx(a[1], rel=1e-6)
    state = load_state(list_checkpoints(two)[-1][1])
    reference = load_state(list_checkpoints(one)[-1][1])
    assert {k: tuple(v.shape) for k, v in state["model"].items()} == {k: tuple(v.shape) for k, v in reference["model"].items()}
    from microdiff.pipeline import Pipeline

    images = Pipeline.from_pretrained(two / "pipeline").generate(["a red circle"], num_inference_steps=2, seed=0)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
