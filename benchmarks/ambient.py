"""Does ambient training beat throwing bad data away, and beat using it as if it were clean?

On the built-in shapes data (the demo's recipe: pixel-space UNet, frozen MiniLM captions, 32 px),
a training set of N images of which a fraction is clean and the rest corrupted, for each corruption
family three arms at equal compute (same steps, batch and model):

    clean    only the clean images (data.min_quality=0.5)
    naive    every image, the corrupted ones as if they were clean
    ambient  every image, with microdiff's ambient options for the family:
               noise  each image's trusted level sigma_tn = the noise std (Ambient Tweedie loss),
                      noisy images only above sigma_tn + 0.5 (ambient.buffer)
               blur   blurred images only above a per-sample sigma_tn that `microdiff annotate`
                      finds (Ambient-o's classifier; run first, into OUT/seedS/annotate-blur), with the
                      plain loss on the stored image there (ambient.target=plain: a blurred image is
                      not x0 + Gaussian noise, so the Tweedie correction does not apply to it)
               mask   Ambient Diffusion: the network sees [A~ x_t, A~], the loss is on A

The clean arm is the same run in every family (whether a sample is corrupted is drawn before, and
independently of, what the corruption is), so it is trained once per seed and reused.

Each arm samples the captions of held-out clean images; reported per arm:

    fd_net      the primary metric: Fréchet distance to other held-out clean images in the features of
                a small recognition network trained on clean shapes images (eval.shapes_features; the
                FID recipe with a domain network, as MNIST FIDs use a LeNet). fd_net_se is its
                bootstrap standard error over the generated images. The real-vs-real value at the
                same sample size is its floor.
    fd_px       Fréchet distance of full-resolution pixels (3 x 32 x 32); blind to blur at this size
    fd8         the same on 8 x 8 block means (layout and colour only)
    alignment   colour + shape read back from the pixels by eval.shapes_checker
    sharpness   mean finite-difference gradient magnitude of the samples / that of real images
    memorisation  median distance of each sample to its nearest clean training image, divided by
                the same for held-out real images (< 1: samples sit closer to the training set
                than fresh images do)

Writes OUT/results.json and OUT/results.csv (one row per seed, family and arm), OUT/summary.csv
(mean and spread over seeds), OUT/<family>.png (sample grids of the first seed, one row block per
arm), OUT/fd.png, per-arm run folders OUT/seedS/<family>/<arm>, and the "ambient" section of
benchmarks/RESULTS.md.

    python benchmarks/ambient.py                                   # CPU default: 3 families, seeds 0,1
    python benchmarks/ambient.py --families noise --seeds 0 --steps 400     # quicker look
    python benchmarks/ambient.py --device cuda --n 20000 --steps 20000 --resolution 64   # scale up
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _report import markdown_table, write_csv, write_section  # noqa: E402

FAMILIES = {
    # blurred images get per-sample levels from `microdiff annotate` (Ambient-o's classifier), run first
    "blur": {"corruption": "blur:1.5", "ambient": ["ambient.target=plain"], "annotate": True},
    # sigma_tn comes with each noisy image's meta; between 0.2 and 0.7 only the clean images teach
    "noise": {"corruption": "noise:0.2", "ambient": ["ambient.buffer=0.5"]},
    "mask": {"corruption": "mask:0.4", "ambient": ["ambient.mask_input=true", "ambient.delta=0.1"]},
}
ARMS = ("clean", "naive", "ambient")


def arm_overrides(family: str, arm: str, seed: int, args) -> list[str]:
    spec = FAMILIES[family]
    common = [f"data.source=shapes:{args.n}", f"data.corruption=[[{1 - args.clean_fraction}, '{spec['corruption']}']]",
              f"data.resolution={args.resolution}", f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
              f"train.seed={seed}", f"data.seed={seed}", f"train.device={args.device}",
              f"train.threads={args.threads}", "log.sample_prompts=[]", "log.tensorboard=false",
              f"log.progress={str(not args.quiet).lower()}", f"checkpoint.every={args.steps}",
              f"optim.warmup_steps={min(100, args.steps // 10)}"]
    if arm == "clean":
        return [*common, "data.min_quality=0.5"]
    if arm == "naive":
        return common
    levels = [f"ambient.annotations={annotations_path(family, seed, args)}"] if spec.get("annotate") else []
    return [*common, "ambient.enabled=true", *spec["ambient"], *levels, *args.ambient_overrides]


def annotations_path(family: str, seed: int, args) -> Path:
    return Path(args.out) / f"seed{seed}" / f"annotate-{family}" / "annotations.csv"


def ensure_annotations(family: str, seed: int, args, vocabulary: dict) -> None:
    """Run `microdiff annotate` on the family's training set (same source, seed and corruption)."""
    path = annotations_path(family, seed, args)
    if path.exists():
        return
    from microdiff.ambient.annotate import AnnotateConfig, annotate

    print(f"== {family}: microdiff annotate -> {path.parent}", flush=True)
    summary = annotate(f"shapes:{args.n}", path.parent, AnnotateConfig(
        resolution=args.resolution, corruption=[[1 - args.clean_fraction, FAMILIES[family]["corruption"]]],
        vocabulary=vocabulary, data_seed=seed, device=args.device, progress=not args.quiet))
    print(f"   low-quality sigma_tn median {summary['sigma_tn']['median']:.3g}", flush=True)


# ----------------------------------------------------------------------------- metrics
def sharpness(images: torch.Tensor) -> float:
    """Mean absolute finite difference along rows and columns (images in [0, 1])."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return float((dx + dy) / 2)


def nearest(queries: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, the RMS pixel distance to its nearest image in ``bank``, and that image's index."""
    q, b = queries.flatten(1).double(), bank.flatten(1).double()
    d2 = (q.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2 * q @ b.T).clamp(min=0)
    best = d2.min(1)
    return (best.values / q.shape[1]).sqrt(), best.indices


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    return nearest(queries, bank)[0]


def clean_training_images(config) -> torch.Tensor:
    from microdiff.train.data import build_map_dataset

    data = build_map_dataset(config.data)
    items = [data[i] for i in range(len(data))]
    return torch.stack([it["image"] for it in items if it["meta"].get("quality", 1.0) >= 0.5]).add(1).div(2)


def bootstrap_fd_se(generated, reference, reps: int = 100, seed: int = 0) -> float:
    """Standard error of FD from resampling the generated features with replacement."""
    import numpy as np

    from microdiff.eval.frechet import frechet_distance_from_features

    rng = np.random.default_rng(seed)
    values = [frechet_distance_from_features(generated[rng.integers(0, len(generated), len(generated))], reference)
              for _ in range(reps)]
    return float(np.std(values, ddof=1))


def evaluate_arm(pipe, real_captions, reference, clean_train, args) -> tuple[dict, torch.Tensor]:
    images = pipe.generate(prompt=real_captions, seed=777, batch_size=args.sample_batch)
    return arm_metrics(images, real_captions, reference, clean_train, args), images


def arm_metrics(images, real_captions, reference, clean_train, args) -> dict:
    from microdiff.eval.frechet import frechet_distance_from_features, pixel_features
    from microdiff.eval.shapes_checker import prompt_alignment
    from microdiff.eval.shapes_features import shapes_features

    net_features = shapes_features(images, reference["net"])
    judged = prompt_alignment(images, real_captions)
    real = reference["images"]
    ratio = float(nearest_distance(images, clean_train).median() / nearest_distance(real, clean_train).median())
    return {"fd_net": frechet_distance_from_features(net_features, reference["net_features"]),
            "fd_net_se": bootstrap_fd_se(net_features, reference["net_features"]),
            "fd_px": frechet_distance_from_features(pixel_features(images, args.resolution), reference["px"]),
            "fd8": frechet_distance_from_features(pixel_features(images, 8), reference["px8"]),
            "alignment": judged["alignment"], "colour": judged["colour_accuracy"], "shape": judged["shape_accuracy"],
            "sharpness": sharpness(images) / sharpness(real), "memorisation": ratio}


def reference_set(args, vocabulary: dict) -> tuple[dict, dict, list[str]]:
    """Held-out clean images the samples are compared with (seed 54321), their features, and the
    real-vs-real floors against a second held-out set (seed 12345) of the same size."""
    from microdiff.demo import held_out
    from microdiff.eval.frechet import frechet_distance_from_features, pixel_features
    from microdiff.eval.shapes_features import shapes_feature_net, shapes_features

    net = shapes_feature_net(args.feature_cache, args.resolution, progress=not args.quiet)
    _, captions = held_out(args.fd_samples, args.resolution, vocabulary)
    real = held_out(args.fd_samples, args.resolution, vocabulary, seed=54321)[0]
    other = held_out(args.fd_samples, args.resolution, vocabulary, seed=12345)[0]
    reference = {"images": real, "net": net, "net_features": shapes_features(real, net),
                 "px": pixel_features(real, args.resolution), "px8": pixel_features(real, 8)}
    floors = {"fd_net": frechet_distance_from_features(shapes_features(other, net), reference["net_features"]),
              "fd_px": frechet_distance_from_features(pixel_features(other, args.resolution), reference["px"]),
              "fd8": frechet_distance_from_features(pixel_features(other, 8), reference["px8"])}
    return reference, floors, captions


# ----------------------------------------------------------------------------- figures
def family_figure(family: str, grids: dict[str, torch.Tensor], captions: list[str], path: Path, columns: int = 12):
    from PIL import Image, ImageDraw

    from microdiff.utils.grids import captioned_grid

    blocks = []
    for arm, images in grids.items():
        grid = captioned_grid(images[:columns * 2], captions[:columns * 2], columns=columns, cell=64)
        canvas = Image.new("RGB", (grid.width, grid.height + 22), "white")
        ImageDraw.Draw(canvas).text((6, 4), f"{family}: {arm}", fill=(0, 0, 0))
        canvas.paste(grid, (0, 22))
        blocks.append(canvas)
    out = Image.new("RGB", (max(b.width for b in blocks), sum(b.height for b in blocks)), "white")
    y = 0
    for b in blocks:
        out.paste(b, (0, y))
        y += b.height
    out.save(path)


def reuse_clean_arm(out: Path, family: str, seed: int, args) -> bool:
    """The clean arm trains on the same images in every family (a sample's clean-or-corrupted draw
    does not depend on the corruption), so one finished clean arm per seed serves all: copy its row
    and samples."""
    import shutil

    path = out / "results.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    for row in rows:
        same = all(row.get(k) == v for k, v in (("arm", "clean"), ("n", args.n), ("steps", args.steps),
                                                  ("seed", seed), ("clean_fraction", args.clean_fraction)))
        samples = out / f"seed{seed}" / row["family"] / "clean" / "bench_samples.pt"
        if same and row["family"] != family and samples.exists():
            (out / f"seed{seed}" / family / "clean").mkdir(parents=True, exist_ok=True)
            shutil.copy(samples, out / f"seed{seed}" / family / "clean" / "bench_samples.pt")
            save_row(path, {**row, "family": family, "corruption": FAMILIES[family]["corruption"],
                            "reused_from": row["family"]})
            return True
    return False


def save_row(path: Path, row: dict) -> list[dict]:
    """Add (or replace) one arm's row in results.json, re-reading it first: several invocations
    may share one output folder."""
    rows = json.loads(path.read_text()) if path.exists() else []
    same = ("family", "arm", "seed", "steps", "n")
    rows = [r for r in rows if any(r.get(k) != row[k] for k in same)] + [row]
    path.write_text(json.dumps(rows, indent=1))
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over seeds per (family, arm), with the per-seed primary metric and its spread."""
    import statistics

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["arm"]), []).append(r)
    summary = []
    for family in dict.fromkeys(r["family"] for r in rows):
        for arm in ARMS:
            group = sorted(groups.get((family, arm), []), key=lambda r: r["seed"])
            if not group:
                continue
            fd = [r["fd_net"] for r in group]
            row = {"family": family, "arm": arm, "seeds": " ".join(str(r["seed"]) for r in group),
                   "clean_images": " ".join(str(r.get("clean_images", "")) for r in group),
                   "fd_net": round(statistics.mean(fd), 2),
                   "fd_net_per_seed": " / ".join(f"{v:.1f}" for v in fd),
                   "fd_net_sd": round(statistics.stdev(fd), 2) if len(fd) > 1 else ""}
            for k in ("fd_px", "fd8", "alignment", "sharpness", "memorisation"):
                row[k] = round(statistics.mean(r[k] for r in group), 3)
            summary.append(row)
    return summary


def report(out: Path, args, floors: dict, captions: list[str]) -> None:
    """Figures, CSVs and the RESULTS.md section from results.json and each arm's saved samples."""
    from microdiff.utils.plots import grouped_bars

    rows = sorted(json.loads((out / "results.json").read_text()), key=lambda r: (r["seed"], r["family"], r["arm"]))
    write_csv(rows, out / "results.csv")
    summary = summarise(rows)
    write_csv(summary, out / "summary.csv")
    first_seed = min(r["seed"] for r in rows)
    for family in dict.fromkeys(r["family"] for r in rows):
        folder = out / f"seed{first_seed}" / family
        grids = {arm: torch.load(folder / arm / "bench_samples.pt").float() / 255 for arm in ARMS
                 if (folder / arm / "bench_samples.pt").exists()}
        if grids:
            family_figure(family, grids, captions, out / f"{family}.png")
    by_family: dict[str, dict[str, float]] = {}
    for r in summary:
        by_family.setdefault(r["family"], {})[r["arm"]] = r["fd_net"]
    grouped_bars(by_family, out / "fd.png", ylabel="FD (lower is better)",
                 title=f"FD to held-out clean images, recognition-net features, mean of seeds (real vs real "
                       f"{floors['fd_net']:.1f})")
    table = markdown_table(summary)
    print(table)
    if not args.no_results_md:
        per_seed = markdown_table([{k: r.get(k, "") for k in ("seed", "family", "arm", "clean_images", "fd_net",
                                                               "fd_net_se", "fd_px", "fd8", "alignment", "memorisation",
                                                               "train_seconds")} for r in rows])
        write_section("ambient", f"`python benchmarks/ambient.py` with N={args.n}, {args.clean_fraction:.0%} "
                      f"clean (per-sample draw; the clean counts are per seed), {args.steps} steps x batch "
                      f"{args.batch_size}, {args.fd_samples} images per FD set. Real-vs-real floors: fd_net "
                      f"{floors['fd_net']:.2f}, fd_px {floors['fd_px']:.2f}, fd8 {floors['fd8']:.3f}. Lower fd is "
                      "better; sharpness and memorisation are ratios to real images (1 = like real data).\n\n"
                      "Mean over seeds:\n\n" + table + "\n\nPer seed (fd_net_se: bootstrap standard error over "
                      "the generated images):\n\n" + per_seed)


def training_seconds(run: Path, fallback: float) -> float:
    """The run's own clock at its last logged step (so a finished run that is only re-evaluated keeps
    its training time)."""
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    rows = [json.loads(line) for line in lines if line.strip()]
    return float(rows[-1]["seconds"]) if rows and "seconds" in rows[-1] else fallback


def train_and_evaluate(out: Path, family: str, arm: str, seed: int, args, vocabulary, reference, floors,
                       captions) -> None:
    from microdiff.demo import demo_config_path
    from microdiff.pipeline import Pipeline
    from microdiff.train.config import load_config
    from microdiff.train.trainer import Trainer

    if arm == "ambient" and FAMILIES[family].get("annotate"):
        ensure_annotations(family, seed, args, vocabulary)
    config = load_config(demo_config_path(), arm_overrides(family, arm, seed, args))
    run = out / f"seed{seed}" / family / arm
    start = time.perf_counter()
    print(f"== seed {seed} / {family} / {arm}: {args.steps} steps into {run}", flush=True)
    Trainer(config, run).fit(resume="auto")
    seconds = training_seconds(run, fallback=time.perf_counter() - start)
    pipe = Pipeline.from_pretrained(run / "pipeline")
    clean_train = clean_training_images(load_config(demo_config_path(), arm_overrides(family, "clean", seed, args)))
    metrics, images = evaluate_arm(pipe, captions, reference, clean_train, args)
    torch.save((images * 255).round().to(torch.uint8), run / "bench_samples.pt")
    row = {"family": family, "arm": arm, "corruption": FAMILIES[family]["corruption"], "n": args.n,
           "clean_fraction": args.clean_fraction, "clean_images": len(clean_train), "steps": args.steps,
           "seed": seed, **{k: round(v, 4) for k, v in metrics.items()},
           **{f"{k}_floor": round(v, 4) for k, v in floors.items()}, "train_seconds": round(seconds, 1)}
    print("   " + ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("family", "arm")), flush=True)
    save_row(out / "results.json", row)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="blur,noise,mask", help="comma list of: " + ", ".join(FAMILIES))
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="0,1", help="comma list of seeds (data and training), default 0,1")
    parser.add_argument("--n", type=int, default=300, help="training images (default 300)")
    parser.add_argument("--clean-fraction", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--fd-samples", type=int, default=300, help="generated and real images per FD set")
    parser.add_argument("--sample-batch", type=int, default=150)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one process per core is fastest)")
    parser.add_argument("--out", default="runs/ambient-bench")
    parser.add_argument("--feature-cache", default="runs/cache", help="where the FD recognition net is kept")
    parser.add_argument("--ambient-overrides", nargs="*", default=[], help="extra key=value for the ambient arms")
    parser.add_argument("--report-only", action="store_true", help="only rebuild figures/tables from OUT")
    parser.add_argument("--no-results-md", action="store_true", help="do not write benchmarks/RESULTS.md")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from microdiff.demo import demo_config_path
    from microdiff.train.config import load_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vocabulary = dict(load_config(demo_config_path()).data.vocabulary)
    reference, floors, captions = reference_set(args, vocabulary)
    if not args.report_only:
        for seed in (int(s) for s in args.seeds.split(",")):
            for family in args.families.split(","):
                for arm in args.arms.split(","):
                    if arm == "clean" and reuse_clean_arm(out, family, seed, args):
                        print(f"== seed {seed} / {family} / clean: the same run as another family's (reused)", flush=True)
                        continue
                    train_and_evaluate(out, family, arm, seed, args, vocabulary, reference, floors, captions)
    report(out, args, floors, captions)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
