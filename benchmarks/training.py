"""Training throughput of the real training step (microdiff.train.Trainer.train_step: loss, backward,
clip, AdamW, EMA) per preset: images/s, peak memory and model FLOPs utilisation.

Each case builds a Trainer from a config (synthetic precomputed latents are not needed: the step is
timed on batches drawn from the built-in shapes data at the case's resolution, or random latents
for latent models), runs --warmup steps, then times --steps steps.

MFU = (forward + backward FLOPs per image, counted with torch's FlopCounterMode on one micro-batch)
x images/s / peak FLOP/s of the device (--peak-tflops; default 989 for an H100 in bf16 dense, or
the best rate of a 2048^3 fp32 matmul on CPUs).

Usage:
  python benchmarks/training.py                         # CPU: small presets
  python benchmarks/training.py --device cuda --xl      # GPU: + MicroDiT_XL_2 at 256/512 px,
                                                        #      masked/unmasked, fp32/bf16, compile
Prints a table, writes benchmarks/results/training[-<device>].csv and replaces the
'training (<device>)' section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _report import markdown_table, write_csv, write_section  # noqa: E402

from microdiff.train.config import load_config  # noqa: E402
from microdiff.train.trainer import Trainer  # noqa: E402


def cpu_cases() -> list[dict]:
    return [
        {"case": "demo config (UNet, 32 px, MiniLM captions; first epoch: rendering + caption encoding included)", "overrides": []},
        {"case": "MicroDiT_Nano_2 32 px, mask 0.5", "overrides": ["model.backbone=MicroDiT_Nano_2", "model.options={}",
                                                                 "loss.mask_ratio=0.5"]},
        {"case": "UNet_Small 32 px", "overrides": ["model.backbone=UNet_Small", "model.options={}"]},
        {"case": "MicroDiT_Small_2 32 px, patch 2", "overrides": ["model.backbone=MicroDiT_Small_2", "model.options={}"]},
    ]


def gpu_cases(xl: bool) -> list[dict]:
    cases = [{"case": f"MicroDiT_Small_2 64 px {p}", "overrides": ["model.backbone=MicroDiT_Small_2", "model.options={}",
                                                                   "data.resolution=64", "train.batch_size=256",
                                                                   f"train.precision={p}"]}
             for p in ("fp32", "bf16")]
    if not xl:
        return cases
    for side in (32, 64):  # latent side of 256 / 512 px images
        for mask in (0.0, 0.75):
            for precision, compile_ in (("fp32", False), ("bf16", False), ("bf16", True)):
                batch = 64 if side == 32 else 16
                cases.append({"case": f"MicroDiT_XL_2 {side * 8} px mask {mask} {precision}{' compile' if compile_ else ''}",
                              "latent": (4, side), "overrides": [
                                  "model.backbone=MicroDiT_XL_2", "model.options={}", "encoders.text=builtin:byte-d64-l1-h4-len77",
                                  "encoders.caption_mask=false", f"loss.mask_ratio={mask}", f"train.batch_size={batch}",
                                  f"train.precision={precision}", f"train.compile={str(compile_).lower()}",
                                  f"data.resolution={side}", "encoders.autoencoder=identity:4"]})
    return cases


def random_latent_batches(batch: int, channels: int, side: int):
    """Endless batches of random 'latents' with captions (XL timing needs no real VAE)."""
    while True:
        yield [(0, {"image": torch.randn(batch, channels, side, side), "caption": ["a photograph"] * batch})]


def step_flops(trainer: Trainer, micro) -> float:
    """Forward + backward FLOPs per image of one micro-batch, counted (not estimated)."""
    offset, batch = micro[0]
    with FlopCounterMode(display=False) as counter:
        trainer._micro_step(offset, batch, trainer.noise_dist.sample(trainer._global_batch),
                            torch.zeros(trainer._global_batch, dtype=torch.bool),
                            torch.randn((trainer._global_batch, *trainer.latent_shape), device=trainer.device), True, 1)
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["image" if "image" in batch else "latent"].shape[0]


def peak_flops(device: torch.device, given: float | None) -> float:
    if given:
        return given * 1e12
    if device.type == "cuda":
        return 989e12
    a = torch.randn(2048, 2048)
    a @ a
    best = 0.0
    for _ in range(5):  # the best of 5 rounds: the machine's attainable fp32 matmul rate
        t = time.perf_counter()
        for _ in range(3):
            a @ a
        best = max(best, 3 * 2 * 2048**3 / (time.perf_counter() - t))
    return best


def time_case(case: dict, device: str, warmup: int, steps: int, tmp: Path) -> dict:
    overrides = ["log.progress=false", "log.tensorboard=false", "log.sample_prompts=[]", "checkpoint.every=0",
                 f"train.device={device}", f"train.steps={warmup + steps + 1}", *case["overrides"]]
    from microdiff.demo import demo_config_path

    config = load_config(demo_config_path(), overrides)
    trainer = Trainer(config, tmp / "run")
    trainer._global_batch = config.train.batch_size
    if "latent" in case:
        channels, side = case["latent"]
        batches = random_latent_batches(config.train.batch_size, channels, side)
    else:
        batches = trainer.data.steps(0, warmup + steps + 1)
    dev = trainer.device
    first = next(batches)
    flops = step_flops(trainer, first)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(warmup):
        trainer.train_step(next(batches))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    images = 0
    for _ in range(steps):
        images += trainer.train_step(next(batches))["images"]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    rate = images / seconds
    row = {"case": case["case"], "params_M": round(sum(p.numel() for p in trainer.module.parameters()) / 1e6, 2),
           "batch": config.train.batch_size, "images_per_s": round(rate, 1),
           "train_GFLOPs_per_img": round(flops / 1e9, 3), "train_TFLOP_s": round(flops * rate / 1e12, 4)}
    if dev.type == "cuda":
        row["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    else:
        import resource

        row["peak_rss_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--xl", action="store_true", help="GPU: add MicroDiT_XL_2 cases")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: H100 bf16 989, CPU measured)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu")
    cases = cpu_cases() if device.type == "cpu" else gpu_cases(args.xl)
    peak = peak_flops(device, args.peak_tflops)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            try:
                row = time_case(case, str(device), args.warmup, args.steps, Path(tmp))
            except torch.cuda.OutOfMemoryError:
                row = {"case": case["case"], "images_per_s": "OOM"}
            if isinstance(row.get("images_per_s"), float):
                row["MFU_%"] = round(100 * row["train_TFLOP_s"] * 1e12 / peak, 2)
            rows.append(row)
            print(row, flush=True)
    table = markdown_table(rows)
    print(table)
    results = Path(__file__).with_name("results")
    results.mkdir(exist_ok=True)
    suffix = "" if device.type == "cpu" else f"-{device.type}"
    write_csv(rows, results / f"training{suffix}.csv")
    note = (f"Real training steps (loss, backward, clip, AdamW, EMA) after {args.warmup} warm-up steps, {args.steps} "
            f"timed; MFU against {peak / 1e12:.2f} TFLOP/s "
            f"({'given' if args.peak_tflops else 'H100 bf16 dense' if device.type == 'cuda' else 'a measured fp32 matmul'}).")
    write_section(f"training ({device.type})", note + "\n\n" + table)


if __name__ == "__main__":
    main()
