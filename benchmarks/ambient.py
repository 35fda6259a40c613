"""Does ambient training beat throwing bad data away, and beat using it as if it were clean?

On the built-in shapes data (the demo's recipe: pixel-space UNet, frozen MiniLM captions, 32 px),
a training set of N images of which a fraction is clean and the rest corrupted, for each corruption
family three arms at equal compute (same steps, batch and model):

    clean    only the clean images (data.min_quality=0.5)
    naive    every image, the corrupted ones as if they were clean
    ambient  every image, with microdiff's ambient options for the family:
               noise  each image's trusted level sigma_tn = the noise std (Ambient Tweedie loss)
               blur   blurred images only above a per-sample sigma_tn that `microdiff annotate`
                      finds (Ambient-o's classifier; run first, into OUT/annotate-blur)
               mask   Ambient Diffusion: the network sees [A~ x_t, A~], the loss is on A

The clean arm is the same run in every family (whether a sample is corrupted is drawn before, and
independently of, what the corruption is), so it is trained once and reused.

Each arm samples the captions of held-out clean images; reported per arm:

    fd          Fréchet distance of full-resolution pixels (3 x 32 x 32) to other held-out clean
                images: the primary metric, chosen before the runs because it sees noise, blur
                and holes (the real-vs-real value at the same sample size is its floor)
    fd8         the same on 8 x 8 block means (layout and colour only)
    alignment   colour + shape read back from the pixels by eval.shapes_checker
    sharpness   mean finite-difference gradient magnitude of the samples / that of real images
    memorisation  median distance of each sample to its nearest clean training image, divided by
                the same for held-out real images (< 1: samples sit closer to the training set
                than fresh images do)

Writes OUT/results.json, OUT/results.csv, OUT/<family>.png (sample grids, one row block per arm),
OUT/fd.png, per-arm run folders, and the "ambient" section of benchmarks/RESULTS.md.

    python benchmarks/ambient.py                                  # CPU default, all families
    python benchmarks/ambient.py --families noise --steps 400     # quicker look
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
    "blur": {"corruption": "blur:1.5", "ambient": [], "annotate": True},
    "noise": {"corruption": "noise:0.2", "ambient": []},  # sigma_tn comes with each noisy image's meta
    "mask": {"corruption": "mask:0.4", "ambient": ["ambient.mask_input=true", "ambient.delta=0.1"]},
}
ARMS = ("clean", "naive", "ambient")


def arm_overrides(family: str, arm: str, args) -> list[str]:
    spec = FAMILIES[family]
    common = [f"data.source=shapes:{args.n}", f"data.corruption=[[{1 - args.clean_fraction}, '{spec['corruption']}']]",
              f"data.resolution={args.resolution}", f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
              f"train.seed={args.seed}", f"data.seed={args.seed}", f"train.device={args.device}",
              f"train.threads={args.threads}", "log.sample_prompts=[]", "log.tensorboard=false",
              f"log.progress={str(not args.quiet).lower()}", f"checkpoint.every={args.steps}",
              f"optim.warmup_steps={min(100, args.steps // 10)}"]
    if arm == "clean":
        return [*common, "data.min_quality=0.5"]
    if arm == "naive":
        return common
    levels = [f"ambient.annotations={annotations_path(family, args)}"] if spec.get("annotate") else []
    return [*common, "ambient.enabled=true", *spec["ambient"], *levels, *args.ambient_overrides]


def annotations_path(family: str, args) -> Path:
    return Path(args.out) / f"annotate-{family}" / "annotations.csv"


def ensure_annotations(family: str, args, vocabulary: dict) -> None:
    """Run `microdiff annotate` on the family's training set (same source, seed and corruption)."""
    path = annotations_path(family, args)
    if path.exists():
        return
    from microdiff.ambient.annotate import AnnotateConfig, annotate

    print(f"== {family}: microdiff annotate -> {path.parent}", flush=True)
    summary = annotate(f"shapes:{args.n}", path.parent, AnnotateConfig(
        resolution=args.resolution, corruption=[[1 - args.clean_fraction, FAMILIES[family]["corruption"]]],
        vocabulary=vocabulary, data_seed=args.seed, device=args.device, progress=not args.quiet))
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


def evaluate_arm(pipe, real_captions, real_ref, clean_train, args) -> tuple[dict, torch.Tensor]:
    from microdiff.eval.frechet import frechet_distance_from_features, pixel_features
    from microdiff.eval.shapes_checker import prompt_alignment

    images = pipe.generate(prompt=real_captions, seed=777, batch_size=args.sample_batch)
    fd = frechet_distance_from_features(pixel_features(images, args.resolution), pixel_features(real_ref, args.resolution))
    fd8 = frechet_distance_from_features(pixel_features(images, 8), pixel_features(real_ref, 8))
    judged = prompt_alignment(images, real_captions)
    ratio = float(nearest_distance(images, clean_train).median() / nearest_distance(real_ref, clean_train).median())
    return {"fd": fd, "fd8": fd8, "alignment": judged["alignment"], "colour": judged["colour_accuracy"],
            "shape": judged["shape_accuracy"], "sharpness": sharpness(images) / sharpness(real_ref),
            "memorisation": ratio}, images


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


def reuse_clean_arm(out: Path, family: str, args) -> bool:
    """The clean arm trains on the same images in every family (a sample's clean-or-corrupted draw
    does not depend on the corruption), so one finished clean arm serves all: copy its row and samples."""
    import shutil

    path = out / "results.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    for row in rows:
        same = all(row.get(k) == v for k, v in (("arm", "clean"), ("n", args.n), ("steps", args.steps),
                                                  ("seed", args.seed), ("clean_fraction", args.clean_fraction)))
        samples = out / row["family"] / "clean" / "bench_samples.pt"
        if same and row["family"] != family and samples.exists():
            (out / family / "clean").mkdir(parents=True, exist_ok=True)
            shutil.copy(samples, out / family / "clean" / "bench_samples.pt")
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


def report(out: Path, args, floor: float, floor8: float, captions: list[str]) -> None:
    """Figures, CSV and the RESULTS.md section from results.json and each arm's saved samples."""
    from microdiff.utils.plots import grouped_bars

    rows = json.loads((out / "results.json").read_text())
    write_csv(rows, out / "results.csv")
    by_family: dict[str, dict[str, float]] = {}
    for r in rows:
        by_family.setdefault(r["family"], {})[r["arm"]] = r["fd"]
    for family in by_family:
        grids = {arm: torch.load(out / family / arm / "bench_samples.pt").float() / 255 for arm in ARMS
                 if (out / family / arm / "bench_samples.pt").exists()}
        if grids:
            family_figure(family, grids, captions, out / f"{family}.png")
    grouped_bars(by_family, out / "fd.png", title=f"pixel FD to held-out clean images (real vs real {floor:.1f})",
                 ylabel="FD (lower is better)")
    columns = ("family", "arm", "fd", "fd8", "alignment", "sharpness", "memorisation", "train_seconds")
    table = markdown_table([{k: r[k] for k in columns} for r in rows])
    print(table)
    if not args.no_results_md:
        write_section("ambient", f"`python benchmarks/ambient.py` with N={args.n}, {args.clean_fraction:.0%} clean, "
                      f"{args.steps} steps x batch {args.batch_size}, seed {args.seed}, {args.fd_samples} images per FD "
                      f"set (real-vs-real floor: fd {floor:.2f}, fd8 {floor8:.3f}). Lower fd/fd8 is better; sharpness "
                      "and memorisation are ratios to real images (1 = like real data).\n\n" + table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="blur,noise,mask", help="comma list of: " + ", ".join(FAMILIES))
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--n", type=int, default=1000, help="training images (default 1000)")
    parser.add_argument("--clean-fraction", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--fd-samples", type=int, default=300, help="generated and real images per FD set")
    parser.add_argument("--sample-batch", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/ambient-bench")
    parser.add_argument("--ambient-overrides", nargs="*", default=[], help="extra key=value for the ambient arms")
    parser.add_argument("--report-only", action="store_true", help="only rebuild figures/tables from OUT")
    parser.add_argument("--no-results-md", action="store_true", help="do not write benchmarks/RESULTS.md")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from microdiff.demo import demo_config_path, held_out
    from microdiff.eval.frechet import frechet_distance_from_features, pixel_features
    from microdiff.pipeline import Pipeline
    from microdiff.train.config import load_config
    from microdiff.train.trainer import Trainer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vocabulary = dict(load_config(demo_config_path()).data.vocabulary)
    _, captions = held_out(args.fd_samples, args.resolution, vocabulary)
    real_ref = held_out(args.fd_samples, args.resolution, vocabulary, seed=54321)[0]
    real_other = held_out(args.fd_samples, args.resolution, vocabulary, seed=12345)[0]
    floor = frechet_distance_from_features(pixel_features(real_other, args.resolution),
                                           pixel_features(real_ref, args.resolution))
    floor8 = frechet_distance_from_features(pixel_features(real_other, 8), pixel_features(real_ref, 8))
    if not args.report_only:
        for family in args.families.split(","):
            for arm in args.arms.split(","):
                if arm == "clean" and reuse_clean_arm(out, family, args):
                    print(f"== {family} / clean: the same run as another family's clean arm (reused)", flush=True)
                    continue
                if arm == "ambient" and FAMILIES[family].get("annotate"):
                    ensure_annotations(family, args, vocabulary)
                config = load_config(demo_config_path(), arm_overrides(family, arm, args))
                run = out / family / arm
                start = time.perf_counter()
                print(f"== {family} / {arm}: {args.steps} steps into {run}", flush=True)
                Trainer(config, run).fit(resume="auto")
                seconds = time.perf_counter() - start
                pipe = Pipeline.from_pretrained(run / "pipeline")
                clean_train = clean_training_images(load_config(demo_config_path(), arm_overrides(family, "clean", args)))
                metrics, images = evaluate_arm(pipe, captions, real_ref, clean_train, args)
                torch.save((images * 255).round().to(torch.uint8), run / "bench_samples.pt")
                row = {"family": family, "arm": arm, "corruption": FAMILIES[family]["corruption"], "n": args.n,
                       "clean_fraction": args.clean_fraction, "steps": args.steps, "seed": args.seed,
                       **{k: round(v, 4) for k, v in metrics.items()}, "fd_floor": round(floor, 4),
                       "fd8_floor": round(floor8, 4), "train_seconds": round(seconds, 1)}
                print("   " + ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("family", "arm")), flush=True)
                save_row(out / "results.json", row)
    report(out, args, floor, floor8, captions)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
