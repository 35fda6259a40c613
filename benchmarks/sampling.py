"""Sampling speed: 30-step Heun with classifier-free guidance, our way beside the reference's way.

- ours: one batched forward for the conditional and unconditional branches (GuidedDenoiser), the
  backbone in its own dtype (bf16 autocast with --bf16), sampler state in float64;
- reference (micro_diffusion's loop as the issue describes it): two separate float32 forwards per
  denoiser evaluation, sampler state in float64.
Both run on the same inputs in the same process; the table gives images/s, the speed ratio and
(on CUDA) peak memory. Latents only: the VAE decode is not included.

Usage:  python benchmarks/sampling.py [--device cuda] [--bf16] [--presets A,B] [--steps 30]
Prints a table, writes benchmarks/results/sampling[-<device>].csv and replaces the
'sampling (<device>)' section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _report import markdown_table, write_csv, write_section  # noqa: E402

from microdiff.diffusion import EDM, Denoiser, schedules  # noqa: E402
from microdiff.diffusion.guidance import GuidedDenoiser  # noqa: E402
from microdiff.diffusion.samplers import denoiser_calls, sample_heun  # noqa: E402
from microdiff.models.dit import DIT_PRESETS  # noqa: E402

CAPTION_TOKENS = 77


class SeparateCFG:
    """The reference's guidance: conditional and unconditional forwards as two float32 calls."""

    def __init__(self, denoiser: Denoiser, cond: dict, uncond: dict, scale: float):
        self.denoiser, self.cond, self.uncond, self.scale = denoiser, cond, uncond, scale

    def __call__(self, x, sigma):
        d_u = self.denoiser(x.float(), sigma.float(), **self.uncond).double()
        d_c = self.denoiser(x.float(), sigma.float(), **self.cond).double()
        return d_u + self.scale * (d_c - d_u)


def forward_gflops(name: str, latent: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = DIT_PRESETS[name](input_size=latent)
        x = torch.randn(1, model.in_channels, latent, latent)
        y = torch.randn(1, 1, CAPTION_TOKENS, model.caption_channels)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x, torch.zeros(1), y)
    return counter.get_total_flops() / 1e9


def run_case(name: str, latent: int, args) -> dict:
    torch.manual_seed(0)
    model = DIT_PRESETS[name](input_size=latent).to(args.device).eval()
    with torch.no_grad():  # a fresh model outputs zeros; give it random weights so work is realistic
        for p in model.parameters():
            p.normal_(0, 0.02)
    denoiser = Denoiser(model, EDM(sigma_data=0.9))
    gen = torch.Generator(args.device).manual_seed(0)
    y = torch.randn(args.batch, 1, CAPTION_TOKENS, model.caption_channels, device=args.device, generator=gen)
    cond, uncond = {"y": y}, {"y": torch.zeros_like(y)}
    sigmas = schedules.karras(args.steps, 0.002, 80.0, 7.0, device=args.device, dtype=torch.float64)
    x = torch.randn(args.batch, model.in_channels, latent, latent, device=args.device, generator=gen,
                    dtype=torch.float64) * sigmas[0]
    amp = (torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16) if args.bf16
           else contextlib.nullcontext())
    ours = GuidedDenoiser(denoiser, [cond], uncond, scale=5.0)
    reference = SeparateCFG(denoiser, cond, uncond, 5.0)

    def sample(guided, use_amp: bool):
        with torch.inference_mode(), (amp if use_amp else contextlib.nullcontext()):
            return sample_heun(guided, x, sigmas, disable=True)

    variants = {"ours": (ours, True), "reference": (reference, False)}
    times = {k: [] for k in variants}
    peaks = {k: 0.0 for k in variants}
    outputs = {}
    cuda = torch.device(args.device).type == "cuda"
    for k, (guided, use_amp) in variants.items():
        outputs[k] = sample(guided, use_amp)  # warm-up
    for _ in range(args.repeats):
        for k, (guided, use_amp) in variants.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
            start = time.perf_counter()
            sample(guided, use_amp)
            if cuda:
                torch.cuda.synchronize()
                peaks[k] = max(peaks[k], torch.cuda.max_memory_allocated() / 2**30)
            times[k].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = (outputs["ours"] - outputs["reference"]).abs().max().item()
    row = {"preset": name, "image_px": latent * 8, "latent": f"4x{latent}x{latent}", "batch": args.batch,
           "steps": args.steps, "calls": denoiser_calls("heun", args.steps),
           "ours_img/s": round(args.batch / med["ours"], 3), "reference_img/s": round(args.batch / med["reference"], 3),
           "speed-up": round(med["reference"] / med["ours"], 2), "max_abs_diff": f"{diff:.1e}"}
    if cuda:
        row["ours_peak_GiB"], row["reference_peak_GiB"] = round(peaks["ours"], 2), round(peaks["reference"], 2)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="our variant under bf16 autocast (GPU)")
    parser.add_argument("--presets", default=None, help="default: Nano and Small on CPU, all on GPU")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=None, help="images per call (default 4 on CPU, 16 on GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-gflops", type=float, default=None,
                        help="skip cases whose forward costs more GFLOPs per image (default 4 on CPU)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    args.batch = args.batch or (16 if gpu else 4)
    args.max_gflops = args.max_gflops or (1e6 if gpu else 4.0)
    presets = args.presets.split(",") if args.presets else (
        list(DIT_PRESETS) if gpu else ["MicroDiT_Nano_2", "MicroDiT_Small_2"])
    rows = []
    for name in presets:
        for latent in (32, 64):
            gflops = forward_gflops(name, latent)
            if gflops > args.max_gflops:
                print(f"skip {name} at latent {latent}: {gflops:.1f} forward GFLOPs/img > --max-gflops")
                continue
            rows.append(run_case(name, latent, args))
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "" if not gpu else "-cuda"
    write_csv(rows, out / f"sampling{tag}.csv")
    table = markdown_table(rows)
    print(table)
    write_section(f"sampling ({torch.device(args.device).type})", (
        f"{args.steps}-step Heun with CFG 5 (EDM sigma_data 0.9, Karras grid 80 -> 0.002), latents only, "
        f"random-weight MicroDiT presets, median of {args.repeats}. ours = one batched forward for both branches"
        f"{' under bf16 autocast' if args.bf16 else ''}; reference = two separate float32 forwards per call; "
        f"both with float64 sampler state. `max_abs_diff` is the largest difference between the two final latents.\n\n{table}"))
    print(f"wrote {out / f'sampling{tag}.csv'}")


if __name__ == "__main__":
    main()
