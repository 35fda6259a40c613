"""The embedded default (`microdiff demo`): text-to-image on the built-in shapes data, on a CPU, in minutes.

1. train the demo config (``configs/demo.yaml``: a pixel-space MicroDiT with a built-in text
   encoder trained jointly, 32 px, one large object per image) with ``microdiff train``'s engine;
2. sample every colour x shape prompt (6 x 3 = 18) with 4 seeds from the EMA pipeline;
3. score prompt alignment with a checker that reads the pixels (``eval.shapes_checker``; its own
   accuracy on held-out real images is reported beside it) and a pixel-space Fréchet distance
   to held-out real images (with the real-vs-real distance at the same sample size as its floor).

Everything lands in one run folder (the layout is printed at the end)::

    grid.png  samples/*.png  samples.jsonl  alignment.csv  metrics.json  loss.png
    pipeline/  (microdiff sample --checkpoint RUN/pipeline "a green triangle")
    checkpoints/ metrics.jsonl tensorboard/ config.yaml   (the training run itself)
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .utils.argtypes import int_at_least, positive_int
from .utils.devices import parse_device
from .utils.errors import UserError

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
SEEDS = (0, 1000, 2000, 3000)  # image k of a prompt list uses seed + k


def demo_prompts() -> list[str]:
    return [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c in COLOURS for s in SHAPES]


def demo_config_path() -> Path:
    return Path(str(resources.files("microdiff") / "configs" / "demo.yaml"))


def held_out(n: int, resolution: int, vocabulary: dict[str, Any], seed: int = 12345) -> tuple[torch.Tensor, list[str]]:
    from .data.shapes import ShapesDataset

    data = ShapesDataset(n, resolution=resolution, seed=seed, **vocabulary)
    items = [data[i] for i in range(n)]
    return (torch.stack([it["image"] for it in items]) + 1) / 2, [it["caption"] for it in items]


def sample_prompts(pipe, prompts: list[str], seeds: tuple[int, ...], batch_size: int = 64,
                   progress: bool = False) -> tuple[torch.Tensor, list[dict]]:
    images, rows = [], []
    for seed in seeds:
        images.append(pipe.generate(prompt=prompts, seed=seed, batch_size=batch_size, progress=progress))
        rows += [{"prompt": p, "seed": seed + k} for k, p in enumerate(prompts)]
    return torch.cat(images), rows


def evaluate(pipe, out: Path, resolution: int, vocabulary: dict[str, Any], fd_samples: int = 200,
             progress: bool = True) -> dict[str, Any]:
    from .eval.frechet import frechet_distance_from_features, pixel_features
    from .eval.shapes_checker import prompt_alignment
    from .utils.grids import captioned_grid

    prompts = demo_prompts()
    images, rows = sample_prompts(pipe, prompts, SEEDS, progress=progress)
    folder = out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    settings = dict(vars(pipe.defaults))
    with open(out / "samples.jsonl", "w") as f:
        for img, row in zip(pipe.to_pil(images), rows):
            name = f"{row['prompt'].split(' ', 1)[1].replace(' ', '-')}-seed{row['seed']}.png"
            img.save(folder / name)
            f.write(json.dumps({"file": f"samples/{name}", **row, **settings}) + "\n")
    # grid: one row per colour, columns = 3 shapes x 4 seeds
    order = [s * len(prompts) + p for p in range(len(prompts)) for s in range(len(SEEDS))]
    captioned_grid(images[order], [rows[i]["prompt"] for i in order], columns=len(SHAPES) * len(SEEDS),
                   cell=64).save(out / "grid.png")

    judged = prompt_alignment(images, [r["prompt"] for r in rows])
    with open(out / "alignment.csv", "w", newline="") as f:
        fields = ["prompt", "seed", "colour", "shape", "match"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row, item in zip(rows, judged["items"]):
            writer.writerow({"prompt": row["prompt"], "seed": row["seed"], "colour": item["judged"]["colour"],
                             "shape": item["judged"]["shape"], "match": item["aligned"]})

    real, captions = held_out(fd_samples, resolution, vocabulary)
    checker_on_real = prompt_alignment(real, captions)["alignment"]
    # FD: generated images for held-out captions vs other held-out real images; the floor is two real sets
    gen_fd, _ = sample_prompts(pipe, captions, (777,), progress=progress)
    real_a = held_out(fd_samples, resolution, vocabulary, seed=54321)[0]
    fd = frechet_distance_from_features(pixel_features(gen_fd), pixel_features(real_a))
    fd_floor = frechet_distance_from_features(pixel_features(real), pixel_features(real_a))
    return {"alignment": judged["alignment"], "colour_accuracy": judged["colour_accuracy"],
            "shape_accuracy": judged["shape_accuracy"], "n_samples": judged["n"], "prompts": len(prompts),
            "seeds": list(SEEDS), "checker_accuracy_on_real": checker_on_real,
            "fd_pixel": fd, "fd_pixel_real_vs_real": fd_floor, "fd_samples": fd_samples}


def run_demo(out: str | Path, overrides: list[str] = (), progress: bool = True, fd_samples: int = 200) -> dict[str, Any]:
    from .train.config import load_config
    from .train.trainer import Trainer

    out = Path(out)
    start = time.perf_counter()
    config = load_config(demo_config_path(), [*overrides, *([] if progress else ["log.progress=false"])])
    print(f"[1/3] training {config.model.backbone} ({config.train.steps} steps, batch {config.train.batch_size}, "
          f"{config.data.resolution} px) on {config.data.source} into {out}", flush=True)
    trainer = Trainer(config, out)
    summary = trainer.fit(resume="auto")
    train_seconds = time.perf_counter() - start
    print(f"[2/3] sampling {len(demo_prompts())} prompts x {len(SEEDS)} seeds from the EMA pipeline", flush=True)
    from .pipeline import Pipeline

    pipe = Pipeline.from_pretrained(out / "pipeline")
    print("[3/3] scoring prompt alignment (pixel checker) and Fréchet distance to held-out images", flush=True)
    metrics = evaluate(pipe, out, config.data.resolution, dict(config.data.vocabulary), fd_samples, progress)
    metrics.update(train_seconds=round(train_seconds, 1), total_seconds=round(time.perf_counter() - start, 1),
                   steps=summary["steps"], final_loss=summary["final_loss"], threads=torch.get_num_threads(),
                   config=str(out / "config.yaml"))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"\nprompt alignment {metrics['alignment']:.1%} (colour {metrics['colour_accuracy']:.1%}, shape "
          f"{metrics['shape_accuracy']:.1%}) over {metrics['n_samples']} samples; the checker scores "
          f"{metrics['checker_accuracy_on_real']:.1%} on real images")
    print(f"pixel FD to held-out images {metrics['fd_pixel']:.2f} (real vs real: {metrics['fd_pixel_real_vs_real']:.2f}); "
          f"{metrics['total_seconds']:.0f} s in all ({metrics['train_seconds']:.0f} s training)")
    print(f"wrote {out}/grid.png, samples/, samples.jsonl, alignment.csv, metrics.json, loss.png, pipeline/")
    print(f'next: microdiff sample --checkpoint {out}/pipeline "a green triangle" --grid -n 8')
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides of configs/demo.yaml, e.g. train.steps=4000 data.resolution=64")
    parser.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    parser.add_argument("--steps", type=positive_int, help="training steps (default: the config's)")
    parser.add_argument("--resolution", type=int_at_least(8), help="image side in px (default: the config's 32)")
    parser.add_argument("--device", help="cpu, cuda, auto (default: the config's auto)")
    parser.add_argument("--fd-samples", type=int_at_least(2), default=200,
                        help="images per set for the pixel Fréchet distance (default: 200)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--samples", type=int_at_least(2), default=None,
                        help="--toy only: points per sampler (default: 4000)")
    parser.add_argument("--toy", action="store_true",
                        help="instead: the 2-D sampler comparison (every sampler vs exact samples, < 1 min)")


def run(args: argparse.Namespace) -> int:
    if args.samples is not None and not args.toy:
        raise UserError("--samples: applies to the toy demo only (--toy); the image demo's sample count is fixed "
                        "(18 prompts x 4 seeds), its FD set size is --fd-samples")
    if args.device is not None:
        parse_device(args.device, "--device")
    if args.toy:
        from .toy_demo import run_smoke_demo

        run_smoke_demo(args.out, steps=args.steps or 3000, n_samples=args.samples or 4000,
                       progress=not args.no_progress)
        return 0
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.resolution is not None:
        overrides.append(f"data.resolution={args.resolution}")
    if args.device is not None:
        overrides.append(f"train.device={args.device}")
    run_demo(args.out, overrides, progress=not args.no_progress, fd_samples=args.fd_samples)
    return 0


__all__ = ["run_demo", "demo_prompts", "evaluate", "held_out", "add_arguments", "run"]
