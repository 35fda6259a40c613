"""Fine-tuning a pretrained model on a few corrupted images: does it copy them less?

Ambient Diffusion fine-tuned DeepFloyd IF on 3,000 images with 'dust' masks and showed that the
model learns from them without memorising them. Here: the demo's pipeline (``make demo``, a UNet
without mask channels) is fine-tuned on K shapes images it has never seen, two ways, at equal
compute:

    plain    the K clean images
    ambient  the same K images behind fixed dust masks (each pixel hidden with probability p);
             the model has no mask channels, so it sees A~ * x_t (``ambient.mask_channels: false``)
             and the loss is scored on the observed pixels

Memorisation is measured on samples for the K training captions: the RMS pixel distance of each
sample to its nearest fine-tuning image, against the same distance for fresh real images with
those captions. ``copies`` counts samples closer to a training image than the 5th percentile of
the fresh images' distances. Also reported: Fréchet distance to held-out images and prompt
alignment. Writes OUT/results.json, OUT/nearest.png (samples beside their nearest training image)
and the "ambient fine-tuning" section of benchmarks/RESULTS.md.

    python benchmarks/ambient_finetune.py --base runs/demo/pipeline
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _report import markdown_table, write_section  # noqa: E402


def overrides(arm: str, args) -> list[str]:
    common = [f"model.init_from={args.base}", f"data.source=shapes:{args.k}", f"data.seed={args.data_seed}",
              f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.threads={args.threads}",
              f"train.device={args.device}", f"optim.lr={args.lr}", "optim.schedule=constant", "optim.warmup_steps=0",
              "ema.decays=[0.99]", "log.sample_prompts=[]", "log.tensorboard=false",
              f"log.progress={str(not args.quiet).lower()}", f"checkpoint.every={args.steps}"]
    if arm == "plain":
        return common
    return [*common, f"data.corruption=[[1.0, 'dust:{args.p}']]", "ambient.enabled=true", "ambient.mask_input=true",
            "ambient.mask_channels=false", f"ambient.delta={args.delta}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="runs/demo/pipeline", help="pretrained pipeline folder (make demo)")
    parser.add_argument("--k", type=int, default=64, help="fine-tuning images")
    parser.add_argument("--p", type=float, default=0.6, help="dust: probability a pixel is hidden")
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--data-seed", type=int, default=777, help="shapes seed of the fine-tuning set (the demo used 0)")
    parser.add_argument("--samples-per-caption", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/ambient-finetune")
    parser.add_argument("--no-results-md", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (Path(args.base) / "pipeline.yaml").is_file():
        print(f"{args.base}: no pipeline folder; run `make demo` first (or pass --base)", file=sys.stderr)
        return 2

    from ambient import nearest, nearest_distance  # the other benchmark's metric helpers
    from microdiff.demo import demo_config_path, held_out
    from microdiff.eval.frechet import frechet_distance_from_features, pixel_features
    from microdiff.eval.shapes_checker import prompt_alignment
    from microdiff.pipeline import Pipeline
    from microdiff.train.config import load_config
    from microdiff.train.trainer import Trainer
    from microdiff.utils.grids import captioned_grid

    out = Path(args.out)
    vocabulary = dict(load_config(demo_config_path()).data.vocabulary)
    train_images, train_captions = held_out(args.k, 32, vocabulary, seed=args.data_seed)
    captions = train_captions * args.samples_per_caption
    fresh = torch.cat([held_out(args.k, 32, vocabulary, seed=args.data_seed + 1000 + j)[0]
                       for j in range(args.samples_per_caption)])
    fresh_d = nearest_distance(fresh, train_images)
    threshold = float(fresh_d.quantile(0.05))
    reference = held_out(300, 32, vocabulary, seed=54321)[0]
    rows, panels = [], []
    for arm in ("plain", "ambient"):
        run = out / arm
        print(f"== {arm}: fine-tuning {args.base} for {args.steps} steps on {args.k} images into {run}", flush=True)
        start = time.perf_counter()
        Trainer(load_config(demo_config_path(), overrides(arm, args)), run).fit(resume="auto")
        seconds = time.perf_counter() - start
        pipe = Pipeline.from_pretrained(run / "pipeline")
        images = pipe.generate(prompt=captions, seed=4242, batch_size=64)
        d, closest = nearest(images, train_images)
        fd = frechet_distance_from_features(pixel_features(images, 8), pixel_features(reference, 8))
        rows.append({"arm": arm, "copies": f"{int((d < threshold).sum())}/{len(d)}",
                     "median_nn_ratio": round(float(d.median() / fresh_d.median()), 3),
                     "fd8": round(fd, 3), "alignment": round(prompt_alignment(images, captions)["alignment"], 3),
                     "train_seconds": round(seconds, 1)})
        print("   ", rows[-1], flush=True)
        order = d.argsort()[:12]
        pairs = torch.stack([torch.stack([images[i], train_images[closest[i]]]) for i in order]).flatten(0, 1)
        labels = [t for i in order for t in (f"{arm} d={float(d[i]):.3f}", "nearest training image")]
        panels.append(captioned_grid(pairs, labels, columns=8, cell=64))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, "threshold": threshold,
                                                   "fresh_median_nn": float(fresh_d.median()), **vars(args)}, indent=1))
    from PIL import Image

    figure = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
    y = 0
    for p in panels:
        figure.paste(p, (0, y))
        y += p.height
    figure.save(out / "nearest.png")
    table = markdown_table(rows)
    print(table)
    if not args.no_results_md:
        write_section("ambient fine-tuning", f"`python benchmarks/ambient_finetune.py`: {args.base} fine-tuned for "
                      f"{args.steps} steps x batch {args.batch_size} on {args.k} new shapes images (ambient: dust "
                      f"p={args.p}, delta={args.delta}, no mask channels). copies = samples nearer a training image "
                      f"than 95% of fresh images are ({threshold:.3f} RMS); median_nn_ratio = median nearest-training "
                      "distance of samples / of fresh images (< 1: closer than new data).\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
