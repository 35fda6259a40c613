"""Size, compute and speed of every backbone preset, and what gather/scatter MoE dispatch gains.

For each preset at 256- and 512-px equivalents (latent side 32/64 for 4-channel latent models, the
pixel side for pixel models), unmasked and with 75% of tokens dropped (MicroDiT):
- parameters;
- forward GFLOPs per image, counted with torch's FlopCounterMode on the meta device (nothing is
  allocated, so XL is counted on any machine);
- forward+backward milliseconds per image (median over --repeats after a warm-up), for every
  model whose forward costs less than --max-gflops per batch (the rest would take minutes on a CPU);
- for MicroDiT, the same with micro_diffusion's dense one-hot MoE dispatch in the same run, so the
  speed-up of our gather/scatter dispatch is a ratio measured side by side.
A second table times one MoE layer at XL width against the number of tokens, both dispatches.

Usage:  python benchmarks/models.py [--device cuda] [--bf16] [--compile] [--presets A,B] [--quick]
Prints the tables, writes benchmarks/results/models[-<device>].csv, moe_dispatch[-<device>].png and
replaces the 'models (<device>)' section of benchmarks/RESULTS.md.
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
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _report import markdown_table, write_csv, write_section  # noqa: E402

from microdiff.models.dit import DIT_PRESETS  # noqa: E402
from microdiff.models.moe import ExpertChoiceMoE  # noqa: E402
from microdiff.models.unet import UNET_PRESETS  # noqa: E402
from microdiff.utils.plots import line_plot  # noqa: E402

CAPTION_TOKENS = 77
MASK_RATIO = 0.75


def build(name: str, side: int, device, **overrides) -> torch.nn.Module:
    if name in DIT_PRESETS:
        return DIT_PRESETS[name](input_size=side, **overrides).to(device)
    with torch.device(device):
        return UNET_PRESETS[name](**overrides)


def native(name: str) -> dict:
    """The preset's own channels (read from a meta-device build)."""
    with torch.device("meta"):
        model = DIT_PRESETS[name]() if name in DIT_PRESETS else UNET_PRESETS[name]()
    cfg = model.config
    return {"in_channels": cfg["in_channels"], "caption_channels": cfg.get("caption_channels"),
            "params": sum(p.numel() for p in model.parameters())}


def inputs(info: dict, batch: int, side: int, device, generator=None) -> tuple:
    x = torch.randn(batch, info["in_channels"], side, side, device=device, generator=generator)
    t = torch.randn(batch, device=device, generator=generator)
    cond = {}
    if info["caption_channels"]:
        cond["y"] = torch.randn(batch, 1, CAPTION_TOKENS, info["caption_channels"], device=device,
                                generator=generator)
    return x, t, cond


def sides(info: dict) -> list[tuple[str, int]]:
    """(image side in px, model input side): latent models (4 channels, an f=8 autoencoder) at 256
    and 512 px; pixel models at 32 and 64 px, the sizes they are built for."""
    if info["in_channels"] == 4:
        return [("256", 32), ("512", 64)]
    return [("32", 32), ("64", 64)]


def forward_gflops(name: str, side: int, info: dict, mask_ratio: float, **overrides) -> float:
    with torch.device("meta"):
        model = build(name, side, "meta", **overrides)
        x, t, cond = inputs(info, 1, side, "meta")
        if mask_ratio:
            cond["mask_ratio"] = mask_ratio
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x, t, **cond)
    return counter.get_total_flops() / 1e9


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def train_step(model, x, t, cond, device, autocast: bool):
    """A closure running one forward+backward of ``model`` on fixed inputs."""
    amp = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if autocast
           else contextlib.nullcontext())

    def step():
        with amp:
            out = model(x, t, **cond)
            out = out["sample"] if isinstance(out, dict) else out
            loss = out.float().square().mean()
        loss.backward()
    return step


def measure(steps: dict, device, repeats: int) -> dict[str, tuple[float, float | None]]:
    """Median seconds (and peak CUDA GiB, None on CPU) of each step, run interleaved a, b, a, b, ...
    after one warm-up each, so that drift in machine load hits every variant alike."""
    cuda = torch.device(device).type == "cuda"
    for step in steps.values():
        step()  # warm-up (and compilation)
    times = {name: [] for name in steps}
    peaks = {name: 0.0 for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
            if cuda:
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**30)
    return {name: (statistics.median(times[name]), peaks[name] if cuda else None) for name in steps}


def bench_preset(name: str, args) -> list[dict]:
    info = native(name)
    rows = []
    is_dit = name in DIT_PRESETS
    for label, side in sides(info):
        for ratio in ((0.0, MASK_RATIO) if is_dit else (0.0,)):
            gflops = forward_gflops(name, side, info, ratio)
            row = {"preset": name, "image_px": label, "input": f"{info['in_channels']}x{side}x{side}",
                   "mask": ratio, "params_M": round(info["params"] / 1e6, 2),
                   "fwd_GFLOPs/img": round(gflops, 2)}
            if is_dit:
                row["fwd_GFLOPs/img_dense"] = round(forward_gflops(name, side, info, ratio, moe_dispatch="dense"), 2)
            if gflops * args.batch > args.max_gflops:
                row["fwd+bwd_ms/img"] = "skipped"
            else:
                variants = {"": {"moe_dispatch": "gather"}, "_dense": {"moe_dispatch": "dense"}} if is_dit else {"": {}}
                results = time_variants(name, side, info, ratio, variants, args)
                for suffix, (seconds, peak) in results.items():
                    row[f"fwd+bwd_ms/img{suffix}"] = round(seconds / args.batch * 1e3, 2)
                    if peak is not None:
                        row[f"peak_GiB{suffix}"] = round(peak, 2)
                if is_dit:
                    row["dense/gather"] = round(row["fwd+bwd_ms/img_dense"] / row["fwd+bwd_ms/img"], 2)
            rows.append(row)
            print(row, flush=True)
    return rows


def time_variants(name, side, info, ratio, variants: dict, args) -> dict:
    x, t, cond = inputs(info, args.batch, side, args.device)
    if ratio:
        cond["mask_ratio"] = ratio
    steps = {}
    for suffix, overrides in variants.items():
        torch.manual_seed(0)
        model = build(name, side, args.device, **overrides).train()
        model = torch.compile(model) if args.compile else model
        steps[suffix] = train_step(model, x, t, cond, args.device, args.bf16)
    results = measure(steps, args.device, args.repeats)
    del steps
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()
    return results


def bench_moe_layer(args) -> list[dict]:
    """One XL-width MoE layer (dim 1024, hidden 4096, 8 experts, capacity 2), both dispatches."""
    rows = []
    tokens = [64, 256, 1024] if args.quick else [64, 256, 1024, 4096]
    for t in tokens:
        steps = {}
        x = torch.randn(args.batch, t, 1024, device=args.device, requires_grad=True)
        for dispatch in ("gather", "dense"):
            torch.manual_seed(0)
            layer = ExpertChoiceMoE(1024, 4096, 8, 2.0, 256, dispatch).to(args.device)
            steps[dispatch] = train_step(lambda x, t, layer=layer: layer(x), x, None, {}, args.device, args.bf16)
        row = {"tokens": t}
        for dispatch, (seconds, peak) in measure(steps, args.device, args.repeats).items():
            row[f"{dispatch}_ms"] = round(seconds * 1e3, 2)
            if peak is not None:
                row[f"{dispatch}_peak_GiB"] = round(peak, 2)
        row["dense/gather"] = round(row["dense_ms"] / row["gather_ms"], 2)
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="time under bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="time torch.compile'd models")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 2 on CPU, 16 on GPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-gflops", type=float, default=None,
                        help="skip timing when forward GFLOPs per batch exceed this (default: 40 on CPU, 1e6 on GPU)")
    parser.add_argument("--presets", default=",".join([*DIT_PRESETS, *UNET_PRESETS]))
    parser.add_argument("--quick", action="store_true", help="smallest presets only, fewer token counts")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    args.batch = args.batch or (16 if gpu else 2)
    args.max_gflops = args.max_gflops or (1e6 if gpu else 40.0)
    presets = args.presets.split(",")
    if args.quick:
        presets = [p for p in presets if "Nano" in p or "Small" in p]
    unknown = [p for p in presets if p not in DIT_PRESETS and p not in UNET_PRESETS]
    if unknown:
        parser.error(f"unknown presets {unknown}; choose from {', '.join([*DIT_PRESETS, *UNET_PRESETS])}")

    rows = [r for name in presets for r in bench_preset(name, args)]
    moe_rows = bench_moe_layer(args)
    tag = "" if args.device == "cpu" else f"-{torch.device(args.device).type}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / f"models{tag}.csv")
    write_csv(moe_rows, out / f"moe_dispatch{tag}.csv")
    line_plot({d: ([r["tokens"] for r in moe_rows], [r[f"{d}_ms"] for r in moe_rows]) for d in ("gather", "dense")},
              out / f"moe_dispatch{tag}.png", title="one XL-width MoE layer, forward+backward",
              xlabel="tokens per sample", ylabel="ms per step", logx=True, logy=True)
    dit_rows = [r for r in rows if r["preset"] in DIT_PRESETS]
    unet_rows = [r for r in rows if r["preset"] in UNET_PRESETS]
    tables = "\n\n".join(markdown_table(t) for t in (dit_rows, unet_rows) if t)
    print(tables)
    print(markdown_table(moe_rows))
    settings = (f"batch {args.batch}, {'bf16 autocast' if args.bf16 else 'float32'}"
                f"{', torch.compile' if args.compile else ''}, median of {args.repeats}")
    if not args.quick:
        write_section(f"models ({torch.device(args.device).type})", (
            f"Backbone presets ({settings}). GFLOPs are counted per image on the meta device "
            f"(multiply-add = 2 FLOPs); `mask` = fraction of tokens dropped after the patch-mixer; "
            f"`_dense` columns use micro_diffusion's one-hot MoE dispatch in the same run; timing is "
            f"skipped above {args.max_gflops:g} forward GFLOPs per batch.\n\n{tables}\n\n"
            f"One MoE layer at XL width (dim 1024, hidden 4096, 8 experts, capacity 2), forward+backward "
            f"per step of {args.batch} samples:\n\n{markdown_table(moe_rows)}"))
    print(f"wrote {out / f'models{tag}.csv'}, {out / f'moe_dispatch{tag}.csv'}, {out / f'moe_dispatch{tag}.png'}")


if __name__ == "__main__":
    main()
