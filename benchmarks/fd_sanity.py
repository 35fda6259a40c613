"""Does Fréchet distance grow with damage? A sanity check of our FD on the built-in shapes data.

Held-out clean shapes images (32 px, the demo's vocabulary) are blurred (Gaussian, sigma in pixels)
or noised (Gaussian, sigma on the [-1, 1] scale) at increasing strength and compared with another
held-out clean set, in three feature spaces:

    shapes-32   the shapes recognition net (eval.shapes_features; trained once into --cache)
    pixels-8    8 x 8 block means
    pixels-32   full-resolution pixels

A sound FD is smallest for the undamaged set and grows monotonically with the strength. Writes
OUT/fd_sanity.csv, OUT/fd_sanity_blur.png, OUT/fd_sanity_noise.png, and the "fd sanity" section of
benchmarks/RESULTS.md.

    python benchmarks/fd_sanity.py                  # about a minute on one CPU core
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _report import markdown_table, write_csv, write_section  # noqa: E402

BLUR = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
NOISE = (0.0, 0.05, 0.1, 0.2, 0.4)
SPACES = ("shapes:32", "pixels:8", "pixels:32")


def damaged(images_pm1: torch.Tensor, kind: str, strength: float) -> torch.Tensor:
    """Images in [0, 1] after ``kind`` at ``strength`` (none at 0), clipped back to [0, 1]."""
    from microdiff.ambient.corruptions import apply_corruption, parse_corruption

    if strength == 0:
        return (images_pm1 + 1) / 2
    out = apply_corruption(images_pm1, parse_corruption(f"{kind}:{strength}"), torch.Generator().manual_seed(0)).images
    return ((out + 1) / 2).clamp(0, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="images per set (default 500)")
    parser.add_argument("--out", default="runs/fd-sanity")
    parser.add_argument("--cache", default="runs/cache", help="where the shapes feature net is kept")
    parser.add_argument("--no-results-md", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from microdiff.data.shapes import ShapesDataset
    from microdiff.eval.features import extract, load_features
    from microdiff.eval.frechet import frechet_distance_from_features
    from microdiff.utils.plots import line_plot

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vocabulary = {"sizes": ["large"], "backgrounds": ["black"]}

    def held_out(seed):
        data = ShapesDataset(args.n, resolution=32, seed=seed, **vocabulary)
        return torch.stack([data[i]["image"] for i in range(args.n)])

    reference, other = held_out(54321), held_out(12345)
    spaces = {spec: load_features(spec, cache_dir=args.cache) if spec.startswith("shapes") else load_features(spec)
              for spec in SPACES}
    ref_feats = {spec: extract(f, (reference + 1) / 2) for spec, f in spaces.items()}
    rows = []
    for kind, strengths in (("blur", BLUR), ("noise", NOISE)):
        for strength in strengths:
            images = damaged(other, kind, strength)
            row = {"damage": kind, "strength": strength}
            for spec, f in spaces.items():
                row[f.name] = round(frechet_distance_from_features(extract(f, images), ref_feats[spec]), 4)
            rows.append(row)
            print(row, flush=True)
    write_csv(rows, out / "fd_sanity.csv")
    names = [f.name for f in spaces.values()]
    for kind in ("blur", "noise"):
        part = [r for r in rows if r["damage"] == kind]
        base = {name: part[0][name] for name in names}
        line_plot({name: ([r["strength"] for r in part], [r[name] / max(base[name], 1e-12) for r in part])
                   for name in names}, out / f"fd_sanity_{kind}.png", logy=True,
                  title=f"FD to clean held-out images vs {kind} strength (relative to undamaged)",
                  xlabel=f"{kind} sigma ({'pixels' if kind == 'blur' else '[-1, 1] scale'})",
                  ylabel="FD / FD(undamaged)")
    monotone = {name: all(a[name] < b[name] for kind in ("blur", "noise")
                          for a, b in zip([r for r in rows if r["damage"] == kind],
                                          [r for r in rows if r["damage"] == kind][1:])) for name in names}
    table = markdown_table(rows)
    print(table)
    print("monotone in strength:", monotone)
    if not args.no_results_md:
        write_section("fd sanity", f"`python benchmarks/fd_sanity.py`: {args.n} held-out shapes images (32 px) damaged "
                      f"at increasing strength vs {args.n} other clean ones. Monotone in strength: "
                      + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in monotone.items()) + ".\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
