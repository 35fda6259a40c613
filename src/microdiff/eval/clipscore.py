"""``microdiff eval clip-score``: CLIP score of generated images against their own prompts.

    microdiff eval clip-score --prompts gen/coco/index.csv                    # after `microdiff eval generate`
    microdiff eval clip-score --prompts gen/coco/index.csv --features clip:openai/clip-vit-base-patch16 --out b16.json
    microdiff eval clip-score --prompts drawbench.txt --images gen/db/images  # ids -> {id}_s{seed}.png

Which image goes with which prompt: an ``index.csv`` (columns ``file`` and ``prompt``; what eval generate
writes) lists them, files relative to ``--images`` (default: the ``images`` folder beside the index);
any other prompts file (.csv/.tsv/.txt/.json/.jsonl, read as eval generate reads it) is matched by
name: the images ``{id}_s{seed}.png`` in ``--images``, every seed found.

Convention: per image ``scale * max(cos(image embedding, prompt embedding), 0)`` with scale 100, the
formula torchmetrics documents for CLIPScore (Hessel et al. 2021 use scale 2.5); the score is the mean
over images (eval.metrics.clip_score). Embeddings are CLIPModel's ``get_image_features`` and
``get_text_features`` (eval.features.load_clip; prompts past the model's context, 77 tokens for OpenAI
CLIP, are truncated); the default model is openai/clip-vit-large-patch14, torchmetrics' default too.
Our resize runs in torch, not PIL (eval.features), so scores can differ from torchmetrics' in the
second decimal. Output: the mean on stdout, ``--out`` JSON and a per-image CSV beside it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .generate import IMAGES_DIR, read_prompts

CONVENTION = "per image: scale * max(cos(image, prompt), 0) of CLIP embeddings (torchmetrics at scale 100); " \
             "clip_score = mean over images"
_NAMED = re.compile(r"^(?P<name>.+)_s(?P<seed>\d+)\.png$")


@dataclass(frozen=True)
class Pair:
    file: Path
    id: str
    seed: str
    prompt: str


def _is_index(path: Path) -> bool:
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    columns = {c.strip().lower() for c in header}
    return {"file", "prompt"} <= columns


def read_pairs(prompts: str | Path, images: str | Path | None) -> tuple[list[Pair], Path, list[str]]:
    """(image, prompt) pairs, the images folder and notes, from an index.csv or a prompts file + naming."""
    prompts = Path(prompts)
    if _is_index(prompts):
        folder = Path(images) if images else prompts.parent / IMAGES_DIR
        with open(prompts, newline="", encoding="utf-8-sig") as f:
            rows = [{k.strip().lower(): (v or "") for k, v in row.items() if k} for row in csv.DictReader(f)]
        if not rows:
            raise ValueError(f"{prompts}: no rows; run `microdiff eval generate` first")
        pairs = [Pair(folder / r["file"], r.get("id", ""), r.get("seed", ""), r["prompt"]) for r in rows]
        missing = [p.file for p in pairs if not p.file.is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: listed in {prompts} but missing ({len(missing)} of {len(pairs)} "
                                    "missing); finish `microdiff eval generate` (it resumes) or pass the right "
                                    "--images")
        return pairs, folder, []
    if images is None:
        raise ValueError(f"{prompts}: not an index.csv (columns file, prompt), so pass --images, the folder of "
                         "{id}_s{seed}.png images made from it")
    folder = Path(images)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder; pass the folder of {{id}}_s{{seed}}.png images")
    items = read_prompts(prompts)
    found: dict[str, list[tuple[int, Path]]] = {}
    for path in folder.iterdir():
        match = _NAMED.match(path.name)
        if match:
            found.setdefault(match["name"], []).append((int(match["seed"]), path))
    pairs = [Pair(path, item.id, str(seed), item.prompt) for item in items
             for seed, path in sorted(found.get(item.name, []))]
    if not pairs:
        raise ValueError(f"{folder}: no image named {{id}}_s{{seed}}.png for the ids of {prompts} "
                         f"(first id {items[0].id!r} -> {items[0].file(0)}); check --images")
    without = sum(1 for item in items if item.name not in found)
    notes = [f"{without} of {len(items)} prompts have no image in {folder}"] if without else []
    return pairs, folder, notes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", required=True,
                        help="index.csv of eval generate (file, prompt columns), or a prompts file (.csv/.tsv/.txt/"
                             ".json/.jsonl) whose ids name the images {id}_s{seed}.png in --images")
    parser.add_argument("--images", default=None,
                        help="folder of the images (default with an index.csv: the images/ folder beside it)")
    parser.add_argument("--features", default="clip", help="clip[:HUB_ID_OR_FOLDER] (default clip = "
                        "openai/clip-vit-large-patch14, from the local Hugging Face cache)")
    parser.add_argument("--scale", type=float, default=100.0, help="score = scale * max(cos, 0) (default 100, as "
                        "torchmetrics; CLIPScore's paper uses 2.5)")
    parser.add_argument("--resolution", type=int, default=None, help="resize every image to this square size first "
                        "(clean-fid style); needed only when sizes differ (default: CLIP's own resize)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto (cuda when there is a GPU), cpu, cuda:1 ...")
    parser.add_argument("--out", default=None, help="JSON summary here, the per-image CSV beside it with .csv "
                        "(default: clip_score.json beside the images folder)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """``microdiff eval clip-score``: bad input ends with a one-line error and exit status 2."""
    from .errors import run_reporting

    return run_reporting("eval clip-score", _run, args)


def score_pairs(pairs: list[Pair], clip, scale: float, batch_size: int, resolution: int | None,
                progress: bool) -> tuple[float, Any, Any]:
    """(mean, per-image scores, per-image cosines) of the pairs, in their order."""
    import numpy as np
    from tqdm.auto import tqdm

    from .images import iterate_images
    from .metrics import clip_score, paired_cosine

    image_rows, text_rows = [], []
    with tqdm(total=len(pairs), unit="img", desc="clip score", disable=not progress, dynamic_ncols=True) as bar:
        for start, batch in zip(range(0, len(pairs), batch_size),
                                iterate_images([p.file for p in pairs], resolution, batch_size)):
            texts = [p.prompt for p in pairs[start:start + len(batch)]]
            image_rows.append(np.asarray(clip(batch).detach().cpu().double()))
            text_rows.append(np.asarray(clip.encode_text(texts).detach().cpu().double()))
            bar.update(len(batch))
    image_feats, text_feats = np.concatenate(image_rows), np.concatenate(text_rows)
    mean, per_image = clip_score(image_feats, text_feats, scale=scale)
    return mean, per_image, paired_cosine(image_feats, text_feats)


def _run(args: argparse.Namespace) -> int:
    from ..utils.devices import resolve_device
    from .features import load_clip

    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    pairs, folder, notes = read_pairs(args.prompts, args.images)
    clip = load_clip(args.features, device=resolve_device(args.device))
    mean, per_image, cosine = score_pairs(pairs, clip, args.scale, args.batch_size, args.resolution, not args.quiet)
    out = Path(args.out) if args.out else folder.resolve().parent / "clip_score.json"
    table = out.with_suffix(".csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "id", "seed", "prompt", "clip_score", "cosine"])
    for pair, s, c in zip(pairs, per_image, cosine):
        writer.writerow([pair.file.name if pair.file.parent == folder else str(pair.file), pair.id, pair.seed,
                         pair.prompt, f"{s:.6f}", f"{c:.8f}"])
    table.write_text(buffer.getvalue(), encoding="utf-8")
    result = {"clip_score": mean, "std": float(per_image.std()), "count": len(pairs), "features": clip.name,
              "scale": float(args.scale), "convention": CONVENTION, "prompts": str(args.prompts), "images": str(folder),
              "per_image_csv": str(table), "notes": notes}
    out.write_text(json.dumps(result, indent=1))
    print(f"CLIP score ({clip.name}, {args.scale:g} * max(cos, 0)): {mean:.4f}  [{len(pairs)} images, "
          f"std {result['std']:.4f}]; wrote {out} and {table}")
    for note in notes:
        print(f"note: {note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="microdiff eval clip-score", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = ["Pair", "read_pairs", "score_pairs", "add_arguments", "run", "main", "CONVENTION"]


if __name__ == "__main__":
    sys.exit(main())
