"""The toy demo (`microdiff demo --toy`): the diffusion core end to end on a 2-D distribution, in under a minute.

Train a small MLP denoiser (EDM preconditioning) on a Gaussian mixture whose exact denoiser is
known, sample it with every sampler, and compare each result with exact samples (sliced W1), next
to the same samplers driven by the exact denoiser. Writes pictures and tables to the run folder.
Every sampler is compared with exact samples and with the exact denoiser driving it.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from microdiff.data.mixture import GaussianMixture
from microdiff.diffusion import samplers, schedules
from microdiff.diffusion.denoiser import EDM, Denoiser
from microdiff.diffusion.noise import LogNormal
from microdiff.diffusion.toy_training import train_denoiser
from microdiff.eval.distances import sliced_wasserstein
from microdiff.models import MLPBackbone
from microdiff.utils.files import write_json_atomic
from microdiff.utils.folders import claim_folder
from microdiff.utils.plots import line_plot, scatter_panels

# sampler, steps, options: roughly equal denoiser-call budgets (heun uses 2 calls a step)
DEMO_SAMPLERS = [
    ("euler", 32, {}),
    ("heun", 16, {}),
    ("dpmpp_2m", 32, {}),
    ("dpmpp_3m", 32, {}),
    ("ddim", 32, {"eta": 0.0}),
    ("euler_ancestral", 32, {}),
    ("dpmpp_3m_sde", 32, {"eta": 1.0}),
]


COMMAND = "demo --toy"
MARKER = "toy_demo.json"  # the settings the folder was made with (utils/folders.claim_folder)


def demo_mixture() -> GaussianMixture:
    """Eight blobs on a circle of radius 2 and one in the middle."""
    ring = GaussianMixture.ring(8, radius=2.0, std=0.12)
    means = torch.cat([ring.means, torch.zeros(1, 2, dtype=torch.float64)])
    return GaussianMixture(means, [0.12] * 8 + [0.25], [1.0] * 8 + [2.0])


def run_smoke_demo(out: str | Path, steps: int = 3000, n_samples: int = 4000, seed: int = 0,
                   progress: bool = True) -> dict:
    """Train, sample and score into ``out``: a new or empty folder, or an earlier toy demo with the same
    settings (written again, identically); anything else is refused in one line (utils/folders.py)."""
    with claim_folder(out, COMMAND, MARKER, {"train_steps": steps, "n_samples": n_samples, "seed": seed}):
        return _run(Path(out), steps, n_samples, seed, progress)


def _run(out: Path, steps: int, n_samples: int, seed: int, progress: bool) -> dict:
    torch.manual_seed(seed)
    mixture = demo_mixture()
    data_std = float(mixture.sample(100_000, torch.Generator().manual_seed(seed)).std())
    param = EDM(sigma_data=round(data_std, 3))
    backbone = MLPBackbone(dim=2, hidden=128, depth=3)
    denoiser = Denoiser(backbone, param)
    noise = LogNormal(p_mean=-0.4, p_std=1.4)

    print(f"[1/3] training an MLP denoiser ({sum(p.numel() for p in backbone.parameters()):,} "
          f"parameters, EDM sigma_data={param.sigma_data}) for {steps} steps")
    trained = train_denoiser(denoiser, lambda n, g: mixture.sample(n, g), noise, steps=steps,
                             batch_size=512, lr=2e-3, seed=seed, progress=progress)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, out / "model.safetensors")
    config = {"backbone": {"name": "mlp", **backbone.config}, "parameterization": param.config(),
              "noise": noise.config(), "train_steps": steps, "seed": seed}
    write_json_atomic(out / "config.json", config)

    print(f"[2/3] sampling {n_samples} points with {len(DEMO_SAMPLERS)} samplers")
    reference = mixture.sample(n_samples, torch.Generator().manual_seed(seed + 1))
    rows, panels = [], [("data (exact samples)", reference.numpy())]
    denoiser.eval()
    for name, n_steps, options in DEMO_SAMPLERS:
        sigmas = schedules.karras(n_steps, 0.002, 80.0)
        for model_name, model in (("trained", denoiser), ("exact", mixture.denoise)):
            g = torch.Generator().manual_seed(seed + 2)
            x = torch.randn(n_samples, 2, generator=g) * sigmas[0]
            start = time.perf_counter()
            extra = {"generator": g} if name in samplers.STOCHASTIC else {}
            with torch.inference_mode():
                sample = samplers.get_sampler(name)(model, x, sigmas, disable=True, **options, **extra)
            seconds = time.perf_counter() - start
            sw = sliced_wasserstein(sample, reference, 128, torch.Generator().manual_seed(0), p=1)
            rows.append({"sampler": name, "steps": n_steps, "denoiser_calls": samplers.denoiser_calls(name, n_steps),
                         "model": model_name, "sliced_w1": round(sw, 5), "seconds": round(seconds, 3)})
            if model_name == "trained":
                panels.append((f"{name}, {n_steps} steps", sample.numpy()))

    print("[3/3] writing pictures and tables")
    scatter_panels(panels, out / "samples.png")
    line_plot({"loss": (np.arange(len(trained.losses)), _smooth(trained.losses))}, out / "loss.png",
              title="training loss (EDM-weighted, smoothed)", xlabel="step", ylabel="loss", logy=True)
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {"train_seconds": round(trained.seconds, 2), "final_loss": float(np.mean(trained.losses[-100:])),
               "null_sliced_w1": round(sliced_wasserstein(mixture.sample(n_samples, torch.Generator().manual_seed(seed + 3)),
                                                          reference, 128, torch.Generator().manual_seed(0), p=1), 5),
               "samplers": rows}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    _print_table(rows, summary)
    print(f"\nwrote {out}/samples.png, loss.png, metrics.csv, metrics.json, model.safetensors, config.json")
    return summary


def _smooth(values, window: int = 50) -> np.ndarray:
    v = np.asarray(values, float)
    if len(v) < window:
        return v
    return np.convolve(v, np.ones(window) / window, mode="valid")


def _print_table(rows, summary) -> None:
    print(f"\ntrained in {summary['train_seconds']} s; sliced W1 to exact samples "
          f"(two exact sets differ by {summary['null_sliced_w1']}):")
    print(f"{'sampler':<16}{'steps':>6}{'calls':>7}{'trained':>10}{'exact D':>10}")
    by_key = {(r["sampler"], r["model"]): r for r in rows}
    for name, n_steps, _ in DEMO_SAMPLERS:
        t, e = by_key[(name, "trained")], by_key[(name, "exact")]
        print(f"{name:<16}{n_steps:>6}{t['denoiser_calls']:>7}{t['sliced_w1']:>10.4f}{e['sliced_w1']:>10.4f}")
