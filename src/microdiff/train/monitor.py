"""What a run shows while and after it trains: a progress bar (loss, images/s, ETA), ``metrics.jsonl``,
TensorBoard scalars and images, sample grids and a loss-curve PNG. Only rank 0 writes.

metrics.jsonl, one line per ``log.every`` steps: ``step``, ``loss`` (mean over the window),
``grad_norm``, ``lr``, ``images_per_s``, ``seconds`` and ``loss_sigma/<lo>-<hi>`` (the mean
per-sample loss of samples whose sigma fell in that bucket). On resume, lines after the resumed
step are dropped, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from .config import LogConfig


def bucket_names(edges: list[float]) -> list[str]:
    bounds = [0.0, *edges, math.inf]
    return [f"{lo:g}-{hi:g}" for lo, hi in zip(bounds[:-1], bounds[1:])]


def loss_by_sigma(per_sample: torch.Tensor, sigma: torch.Tensor, edges: list[float]) -> dict[str, tuple[float, int]]:
    """(sum, count) of per-sample losses in each sigma bucket ``[edge_k, edge_k+1)``."""
    index = torch.bucketize(sigma.float(), torch.tensor(edges, dtype=torch.float32), right=True)
    out = {}
    for k, name in enumerate(bucket_names(edges)):
        chosen = per_sample[index == k]
        out[name] = (float(chosen.sum()), int(chosen.numel()))
    return out


def _on_host(window: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The window's device tensors as host values: every scalar (loss, grad norm, ...) as a float, read
    together in one transfer, and the per-sample tensors copied to the CPU. A train step leaves them on
    the device so that it never waits for the GPU; this runs once per ``log.every`` steps."""
    if not window:
        return window
    scalars = [(i, k) for i, m in enumerate(window) for k, v in m.items()
               if isinstance(v, torch.Tensor) and v.ndim == 0]
    values = torch.stack([window[i][k].float() for i, k in scalars]).cpu().tolist() if scalars else []
    out = [dict(m) for m in window]
    for (i, k), v in zip(scalars, values):
        out[i][k] = v
    for m in out:
        for k, v in m.items():
            if isinstance(v, torch.Tensor):
                m[k] = v.cpu()
    return out


def _parse_rows(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], list[int]]:
    """(line, row) for each readable line of a metrics file, and the numbers of the lines that are not JSON
    objects (a torn last line is what a kill or a full disk leaves)."""
    rows, torn = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            torn.append(number)
            continue
        if isinstance(row, dict):
            rows.append((line, row))
        else:
            torn.append(number)
    return rows, torn


def truncate_metrics(path: Path, last_step: int) -> list[int]:
    """Keep the rows up to ``last_step`` (a resumed run rewrites the rest); drops unreadable lines and
    returns their numbers, so the caller can say so."""
    if not path.is_file():
        return []
    rows, torn = _parse_rows(path)
    kept = [line for line, row in rows if row.get("step", 0) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return torn


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file; unreadable (torn) lines are left out."""
    path = Path(path)
    return [row for _, row in _parse_rows(path)[0]] if path.is_file() else []


class Monitor:
    def __init__(self, out: Path, config: LogConfig, is_main: bool, total_steps: int, start_step: int = 0,
                 state: dict[str, Any] | None = None):
        """``state``: what :meth:`state_dict` returned when the checkpoint being resumed was written."""
        self.out, self.config, self.is_main = Path(out), config, is_main
        self.metrics_path = self.out / "metrics.jsonl"
        self.window: list[dict[str, Any]] = []
        self.window_start = time.perf_counter()
        self.started = time.perf_counter()
        self.last: dict[str, Any] = {}
        self.writer = None
        self.bar = None
        self.elapsed_before = 0.0  # training seconds of the run before this process resumed it
        if state:
            self.window = [dict(m) for m in state.get("window", [])]
            self.elapsed_before = float(state.get("elapsed", 0.0))
        if not is_main:
            return
        # rows up to the resumed step stay, except a partial row over the restored window (a run that ended
        # there wrote one): the resumed run writes that row again over the whole window
        kept_until = self.window[0]["step"] - 1 if self.window else start_step
        torn = truncate_metrics(self.metrics_path, kept_until)
        if torn:
            print(f"{self.metrics_path}: dropped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn[:5]))}; "
                  "a run killed mid-write leaves a torn last line)", flush=True)
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=kept_until + 1)
            except ImportError:
                self.note("TensorBoard logging is off: install tensorboard (pip install 'microdiff[train]')")
        if config.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")

    def note(self, text: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def record(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.window.append({**metrics, "step": step})
        if self.bar is not None:
            self.bar.update(1)
        if step % max(self.config.every, 1) == 0:
            self._flush(step)

    def _flush(self, step: int) -> None:
        window, self.window = _on_host(self.window), []
        if not window:
            return
        now = time.perf_counter()
        seconds = now - self.window_start
        self.window_start = now
        images = sum(m["images"] for m in window)
        row: dict[str, Any] = {"step": step, "loss": sum(m["loss"] for m in window) / len(window),
                               "grad_norm": sum(m["grad_norm"] for m in window) / len(window),
                               "lr": window[-1]["lr"], "images_per_s": images / max(seconds, 1e-9),
                               "seconds": self.elapsed_before + now - self.started}
        extra = [m["consistency"] for m in window if "consistency" in m]  # ambient.consistency_weight > 0
        if extra:
            row["consistency"] = sum(extra) / len(extra)
        per_sample = torch.cat([m["per_sample"] for m in window])
        sigma = torch.cat([m["sigma"] for m in window])
        for name, (total, count) in loss_by_sigma(per_sample, sigma, list(self.config.sigma_buckets)).items():
            if count:
                row[f"loss_sigma/{name}"] = total / count
        self.last = row
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key in ("loss", "grad_norm", "lr", "consistency"):
                if key in row:
                    self.writer.add_scalar(f"train/{key}", row[key], step)
            self.writer.add_scalar("perf/images_per_s", row["images_per_s"], step)
            for key, value in row.items():
                if key.startswith("loss_sigma/"):
                    self.writer.add_scalar(f"train/{key}", value, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}")

    def images(self, step: int, images: torch.Tensor, prompts: list[str]) -> Path | None:
        """Save a captioned grid of sample images (B,3,H,W in [0,1]) as samples/step-XXXXXXXX.png."""
        if not self.is_main:
            return None
        from ..utils.grids import captioned_grid

        path = self.out / "samples" / f"step-{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        captioned_grid(images, prompts).save(path)
        if self.writer is not None:
            self.writer.add_images("samples", images.clamp(0, 1), step)
        return path

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the monitor: the steps recorded since the last metrics row (a
        checkpoint between two rows would otherwise lose them, and the resumed run's next row would
        average fewer steps than the uninterrupted run's) and the seconds trained so far."""
        return {"window": [{k: v for k, v in m.items()} for m in _on_host(self.window)],
                "elapsed": self.elapsed_before + time.perf_counter() - self.started}

    def summary(self) -> dict[str, Any]:
        return {"final_loss": self.last.get("loss"), "metrics": str(self.metrics_path)}

    def close(self) -> None:
        if not self.is_main:
            return
        if self.window:
            self._flush(self.window[-1]["step"])
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        rows = read_metrics(self.metrics_path)
        if len(rows) > 1:
            from ..utils.plots import line_plot

            line_plot({"loss": ([r["step"] for r in rows], [r["loss"] for r in rows])}, self.out / "loss.png",
                      title="training loss", xlabel="step", ylabel="loss", logy=True)


__all__ = ["Monitor", "loss_by_sigma", "bucket_names", "read_metrics", "truncate_metrics"]
