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
second decimal. Output: the mean on stdout, ``--out`` JSON and a per-image CSV beside it (an existing
pair is replaced only when this command wrote it). An unreadable image is a one-line error naming it;
``--skip-bad`` leaves such images out, counts them in the summary and lists them in the JSON.
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

from ..utils.argtypes import Parser, positive_float, positive_int
from ..utils.files import output_file, stamp, write_text_atomic
from .features import check_finite, quiet_hub_progress
from .generate import IMAGES_DIR, read_prompts
from .images import image_batches, none_readable, skipped_line

CONVENTION = "per image: scale * max(cos(image, prompt), 0) of CLIP embeddings (torchmetrics at scale 100); " \
             "clip_score = mean over images"
_NAMED = re.compile(r"^(?P<name>.+)_s(?P<seed>\d+)\.png$")
COMMAND = "eval clip-score"


@dataclass(frozen=True)
class Pair:
    file: Path
    id: str
    seed: str
    prompt: str


def _is_index(path: Path) -> bool:
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except UnicodeDecodeError:
        raise ValueError(f"--prompts {path}: not UTF-8 text; save the CSV as UTF-8") from None
    columns = {c.strip().lower() for c in header}
    return {"file", "prompt"} <= columns


def read_pairs(prompts: str | Path, images: str | Path | None) -> tuple[list[Pair], Path, list[str]]:
    """(image, prompt) pairs, the images folder and notes, from an index.csv or a prompts file + naming."""
    prompts = Path(prompts)
    if not prompts.is_file():
        what = "a folder, not a file" if prompts.is_dir() else "no such file"
        raise FileNotFoundError(f"--prompts {prompts}: {what}; pass the index.csv that eval generate wrote, or a "
                                "prompts file with --images")
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
    parser.add_argument("--scale", type=positive_float, default=100.0, help="score = scale * max(cos, 0) (default 100, as "
                        "torchmetrics; CLIPScore's paper uses 2.5)")
    parser.add_argument("--resolution", type=positive_int, default=None, help="resize every image to this square size first "
                        "(clean-fid style); needed only when sizes differ (default: CLIP's own resize)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--device", default="auto", help="auto (cuda when there is a GPU), cpu, cuda:1 ...")
    parser.add_argument("--skip-bad", action="store_true", help="leave unreadable images out (counted in the summary, "
                        "listed in the JSON) instead of stopping")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="JSON summary here, the per-image CSV beside "
                        "it with .csv (default: clip_score.json beside the images folder); files this command wrote "
                        "are replaced, any others refused")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """``microdiff eval clip-score``: bad input ends with a one-line error and exit status 2."""
    from .errors import run_reporting

    return run_reporting("eval clip-score", _run, args)


def score_pairs(pairs: list[Pair], clip, scale: float, batch_size: int, resolution: int | None,
                progress: bool, skip_bad: bool = False,
                skipped: list[tuple[str, str]] | None = None) -> tuple[float, Any, Any, list[int]]:
    """(mean, per-image scores, per-image cosines, indices of the scored pairs), in the pairs' order; an
    unreadable image raises, or (``skip_bad``) is left out and appended to ``skipped``."""
    import numpy as np
    from tqdm.auto import tqdm

    from .metrics import clip_score, paired_cosine

    image_rows, text_rows, kept = [], [], []
    skipped = [] if skipped is None else skipped
    batches = image_batches([p.file for p in pairs], resolution, batch_size, "skip" if skip_bad else "raise", skipped)
    with tqdm(total=len(pairs), unit="img", desc="clip score", disable=not progress, dynamic_ncols=True) as bar:
        for indices, batch in batches:
            image_rows.append(np.asarray(clip(batch).detach().cpu().double()))
            text_rows.append(np.asarray(clip.encode_text([pairs[i].prompt for i in indices]).detach().cpu().double()))
            kept += indices
            bar.update(len(batch))
    if not kept:
        raise none_readable(f"--prompts {pairs[0].file.parent}", len(pairs), skipped)
    image_feats, text_feats = np.concatenate(image_rows), np.concatenate(text_rows)
    check_finite(image_feats, [str(pairs[i].file) for i in kept], clip.name, "image")
    check_finite(text_feats, [repr(pairs[i].prompt) for i in kept], clip.name, "text")
    mean, per_image = clip_score(image_feats, text_feats, scale=scale)
    return mean, per_image, paired_cosine(image_feats, text_feats), kept


def _ours(path: Path) -> bool:
    """A JSON summary this command wrote (its stamp)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("written_by") == stamp(COMMAND)["written_by"]


def output_paths(out: Path) -> tuple[Path, Path]:
    """The JSON summary and the per-image CSV beside it, each checked (utils.files.output_file): an existing
    one is replaced only if this command wrote it (the CSV: if the JSON beside it is ours and names it)."""
    table = out.with_suffix(".csv")
    if out == table:
        raise ValueError(f"--out {out}: name the JSON summary FILE.json (the per-image CSV goes beside it)")
    output_file(out, "--out", COMMAND, ours=_ours)
    json_ours = out.is_file() and _ours(out)
    output_file(table, "--out", COMMAND, ours=lambda _: json_ours)
    return out, table


def _run(args: argparse.Namespace) -> int:
    from ..utils.devices import resolve_device
    from .features import load_clip

    pairs, folder, notes = read_pairs(args.prompts, args.images)
    out, table = output_paths(Path(args.out) if args.out else folder.resolve().parent / "clip_score.json")
    if args.quiet:
        quiet_hub_progress()
    clip = load_clip(args.features, device=resolve_device(args.device))
    skipped: list[tuple[str, str]] = []
    mean, per_image, cosine, kept = score_pairs(pairs, clip, args.scale, args.batch_size, args.resolution,
                                                not args.quiet, args.skip_bad, skipped)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "id", "seed", "prompt", "clip_score", "cosine"])
    for i, s, c in zip(kept, per_image, cosine):
        pair = pairs[i]
        writer.writerow([pair.file.name if pair.file.parent == folder else str(pair.file), pair.id, pair.seed,
                         pair.prompt, f"{s:.6f}", f"{c:.8f}"])
    write_text_atomic(table, buffer.getvalue())
    result = {**stamp(COMMAND), "clip_score": mean, "std": float(per_image.std()), "count": len(kept),
              "pairs": len(pairs), "skipped": [list(s) for s in skipped], "features": clip.name,
              "scale": float(args.scale), "convention": CONVENTION, "prompts": str(args.prompts), "images": str(folder),
              "per_image_csv": str(table), "notes": notes}
    write_text_atomic(out, json.dumps(result, indent=1))
    print(f"CLIP score ({clip.name}, {args.scale:g} * max(cos, 0)): {mean:.4f}  [{len(kept)} images, "
          f"std {result['std']:.4f}]; wrote {out} and {table}")
    if skipped:
        print(skipped_line(skipped))
    for note in notes:
        print(f"note: {note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="microdiff eval clip-score", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = ["Pair", "read_pairs", "score_pairs", "add_arguments", "run", "main", "CONVENTION"]


if __name__ == "__main__":
    sys.exit(main())
