"""Error versus number of denoiser calls for every sampler, on a Gaussian mixture whose exact
denoiser is known (so the error is the sampler's alone, not a network's).

- Deterministic samplers: RMS distance to a float64 DOP853 solution of the probability-flow ODE
  from the same noise (sigma 80 -> 0.002 on a Karras grid, then the shared final denoising step).
- Stochastic samplers: sliced W1 between 20,000 samples and 20,000 exact draws (the 'floor' row is
  the same distance between two exact sets: sampling noise alone).

Usage:  python benchmarks/samplers.py [--quick]
Prints a table, writes benchmarks/results/samplers.csv and samplers.png, and replaces the
'samplers' section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _report import markdown_table, write_csv, write_section  # noqa: E402

from microdiff.data.mixture import GaussianMixture, probability_flow_reference  # noqa: E402
from microdiff.diffusion import samplers, schedules  # noqa: E402
from microdiff.eval.distances import sliced_wasserstein  # noqa: E402
from microdiff.utils.plots import line_plot  # noqa: E402

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
DETERMINISTIC = [("euler", {}), ("heun", {}), ("dpmpp_2m", {}), ("dpmpp_3m", {})]
STOCHASTIC = [("euler_ancestral", {}), ("ddim", {"eta": 1.0}), ("heun", {"s_churn": 10.0}),
              ("dpmpp_3m_sde", {"eta": 1.0})]


def mixture() -> GaussianMixture:
    return GaussianMixture([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0], [0.6, -0.4]],
                           [0.3, 0.2, 0.25, 0.1], [0.4, 0.3, 0.2, 0.1])


def steps_for_calls(name: str, calls: int) -> int:
    return (calls + 1) // 2 if name == "heun" else calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer points and samples (for a smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gm = mixture()
    budgets = [4, 8, 16, 32, 64] if args.quick else [4, 8, 16, 32, 64, 128, 256]
    n_points, n_dist = (64, 4000) if args.quick else (256, 20_000)

    x = torch.randn(n_points, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SIGMA_MAX
    start = time.perf_counter()
    x_end = probability_flow_reference(gm, x, SIGMA_MAX, SIGMA_MIN)
    want = gm.denoise(x_end, SIGMA_MIN)
    print(f"reference ODE solution (DOP853, rtol 1e-12) in {time.perf_counter() - start:.1f} s")

    rows, series = [], {}
    for name, options in DETERMINISTIC:
        xs, ys = [], []
        for calls in budgets:
            n = steps_for_calls(name, calls)
            sigmas = schedules.karras(n, SIGMA_MIN, SIGMA_MAX, dtype=torch.float64)
            got = samplers.get_sampler(name)(gm.denoise, x.clone(), sigmas, disable=True, **options)
            err = float((got - want).pow(2).mean().sqrt())
            real_calls = samplers.denoiser_calls(name, n)
            rows.append({"sampler": name, "kind": "ODE", "steps": n, "calls": real_calls, "error": f"{err:.3e}"})
            xs.append(real_calls)
            ys.append(err)
        series[name] = (xs, ys)

    reference = gm.sample(n_dist, torch.Generator().manual_seed(1))
    floor = sliced_wasserstein(gm.sample(n_dist, torch.Generator().manual_seed(2)), reference, 128,
                               torch.Generator().manual_seed(0), p=1)
    rows.append({"sampler": "exact samples (floor)", "kind": "SW1", "steps": "-", "calls": "-", "error": f"{floor:.3e}"})
    for name, options in STOCHASTIC:
        label = name + (" (churn)" if "s_churn" in options else "") + (" eta=1" if name == "ddim" else "")
        xs, ys = [], []
        for calls in budgets:
            n = steps_for_calls(name, calls)
            sigmas = schedules.karras(n, SIGMA_MIN, SIGMA_MAX, dtype=torch.float64)
            g = torch.Generator().manual_seed(3)
            noise = torch.randn(n_dist, 2, generator=g, dtype=torch.float64) * SIGMA_MAX
            got = samplers.get_sampler(name)(gm.denoise, noise, sigmas, disable=True, generator=g, **options)
            sw = sliced_wasserstein(got, reference, 128, torch.Generator().manual_seed(0), p=1)
            real_calls = samplers.denoiser_calls(name, n)
            rows.append({"sampler": label, "kind": "SW1", "steps": n, "calls": real_calls, "error": f"{sw:.3e}"})
            xs.append(real_calls)
            ys.append(sw)
        series[label + " [SW1]"] = (xs, ys)

    print(markdown_table(rows))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    write_csv(rows, out / "samplers.csv")
    line_plot(series, out / "samplers.png", title="sampler error vs denoiser calls (Gaussian mixture, exact D)",
              xlabel="denoiser calls", ylabel="error", logy=True, logx=True, size=(760, 480))
    if not args.quick:
        write_section("samplers", (
            "Error vs denoiser calls on a 4-component 2-D Gaussian mixture with its exact denoiser "
            f"(Karras grid, sigma {SIGMA_MAX} -> {SIGMA_MIN}). ODE rows: RMS distance to a float64 "
            f"DOP853 solution from the same {n_points} noise draws. SW1 rows: sliced W1 between "
            f"{n_dist} samples and {n_dist} exact draws (floor = two exact sets).\n\n"
            + markdown_table(rows) + "\n\nPlot: `benchmarks/results/samplers.png`."))
        print(f"updated {Path(__file__).with_name('RESULTS.md')}")
    print(f"wrote {out / 'samplers.csv'} and {out / 'samplers.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
