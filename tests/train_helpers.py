"""Shared bits of the training tests: a tiny config and a way to run ``microdiff train`` in a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

TINY = {
    "name": "tiny",
    "model": {"backbone": "MicroDiT_Nano_2"},
    "data": {"source": "shapes:64", "resolution": 16, "cache": True},
    "encoders": {"text": "builtin:byte-d32-l1-h2-len96"},
    "optim": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 2, "weight_decay": 0.01},
    "ema": {"decays": [0.9, 0.99]},
    "train": {"steps": 8, "batch_size": 8, "micro_batch_size": 4, "threads": 1},
    "log": {"every": 1, "progress": False, "tensorboard": False},
    "checkpoint": {"every": 4, "keep_last": 2},
    "sampling": {"steps": 3},
}


def write_config(path: Path, **sections) -> Path:
    data = json.loads(json.dumps(TINY))
    for name, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(name, {}).update(values)
        else:
            data[name] = values
    path.write_text(yaml.safe_dump(data))
    return path


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def train_command(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "microdiff", "train", str(config), "--out", str(out), *extra]


def run_train(config: Path, out: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_command(config, out, *extra), env=env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}
