"""``microdiff sample``: images from a pipeline folder with weighted prompts, as v-diffusion's
``cfg_sample.py`` users know it.

    microdiff sample "a red circle:1" "blurry:-0.3" --checkpoint runs/shapes/pipeline \\
        --sampler heun --steps 30 --cfg 5 --seed 0 -n 16 --batch-size 8 --out samples --grid

Prompts are TEXT or TEXT:WEIGHT (negative weights push away); every image uses the same mix,
image k the seed seed + k. A weight is a trailing :NUMBER, a plain signed decimal (0.5, -1),
directly after the colon, after text that does not end in a digit: "a clock showing 10:30",
"ratio 16:9" and "time: 5" stay text. "photo 2 :0.5" gives "photo 2" the weight 0.5; \\: is a
literal colon ("example.com\\:8080"). ":nan", ":inf", ":1e3", a weight with no text and weights
that are all 0 (nothing to guide towards) are refused. --images take the same PATH[:WEIGHT] form.

Writes 00000.png ... with the settings in PNG text chunks, samples.jsonl (one line per image) and,
with --grid, grid.png. Nothing is overwritten silently: every image carries a hash of everything
that made it (prompts, negative prompt, seed, sampler, steps, cfg, eta, size, dtype, CLIP options,
the image prompts' and the checkpoint's content). A rerun into the same --out with the same
settings keeps the images that are there and makes only the missing ones (e.g. a larger -n, or the
rest of a killed run) and makes again its own images that are damaged (truncated, flipped bytes). A
folder holding images made with other settings is refused (pass another --out, or --overwrite to
replace those images); one holding files that sample did not write is always refused. One run
writes into an --out at a time (a lock, OUT/.sample.lock): a second one is refused.

A result that comes out NaN or inf (damaged weights, a diverging model or CLIP guidance) is an
error naming its cause, never a black image.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from .clip_guidance import add_arguments as add_clip_arguments
from .clip_guidance import check_arguments as check_clip_arguments
from .prompts import check_mix, format_weighted, parse_weighted
from .utils.checks import finite, whole
from .utils.devices import backbone_dtype, resolve_device
from .utils.errors import UserError
from .utils.files import output_folder, write_png_atomic, write_text_atomic
from .utils.grids import image_grid
from .utils.locks import FolderLock
from .utils.weights import path_digest

parse_prompt = parse_weighted  # "text:weight" -> (text, weight): one grammar for text and image prompts
LOG_NAME = "samples.jsonl"
LOCK_NAME = ".sample.lock"  # held while a run writes into --out (utils/locks.FolderLock)
GRID_NAME = "grid.png"
IMAGE_NAME = re.compile(r"(\d{5,})\.png")
PNG_KEYS = ("prompt", "negative_prompt", "seed", "sampler", "steps", "cfg", "eta", "checkpoint", "clip_model",
            "clip_guidance_scale", "images", "settings")
# what an image depends on besides its seed; paths are left out (their content is in *_hash)
HASHED = ("prompts", "negative_prompt", "seed", "sampler", "steps", "cfg", "eta", "truncate_sigma", "height",
          "width", "dtype", "checkpoint_hash", "clip_model_hash", "clip_guidance_scale", "cutn", "cut_pow",
          "image_hashes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (parser.description or "") + "\n\n" + __doc__.split("\n\n", 2)[2]
    parser.add_argument("prompts", nargs="+", help="prompts as TEXT or TEXT:WEIGHT (negative weights push away; "
                        "see above for when a colon is a weight)")
    parser.add_argument("--checkpoint", required=True, help="pipeline folder (Pipeline.save_pretrained) or hub id")
    parser.add_argument("--negative-prompt", default=None, help="replaces the empty caption as the guidance baseline")
    parser.add_argument("--sampler", default=None, help="euler, euler_ancestral, heun, ddim, dpmpp_2m, ... "
                        "(default: the pipeline's)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps, >= 1 (default: the pipeline's)")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the pipeline's)")
    parser.add_argument("--eta", type=float, default=None, help="noise of the samplers that have it (ddim: 1 = "
                        "ancestral; euler_ancestral, dpmpp_3m_sde); refused for the others")
    parser.add_argument("--truncate-sigma", type=float, default=None,
                        help="stop at this sigma and return the denoiser's x0 estimate (models trained on data "
                             "noisy at that level; 0: off; default: the pipeline's, usually off)")
    parser.add_argument("--seed", type=int, default=0, help="image k uses seed + k (default: 0)")
    parser.add_argument("-n", "--num-images", type=int, default=1, help="images to make (default: 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward (default: 8)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the pipeline's)")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is a GPU, else cpu), cpu, cuda, "
                        "cuda:1, mps")
    parser.add_argument("--dtype", default="auto", help="backbone weights dtype: auto (bfloat16 on cuda, float32 "
                        "elsewhere), float32, bfloat16, float16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone first")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="with --compile on a GPU: replay each denoiser call as a CUDA graph")
    parser.add_argument("--decode-batch", type=int, default=None,
                        help="latents per autoencoder decode call (default: the whole batch; lower it at 512 px)")
    parser.add_argument("--out", default="samples", help="output folder (default: samples); a rerun with the same "
                        "settings adds only the missing images, other settings are refused")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the images of an earlier `microdiff sample` run with other settings in --out "
                             "(files that sample did not write are never touched: that is refused)")
    parser.add_argument("--grid", action="store_true", help="also write grid.png")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_clip_arguments(parser)


def check_args(args: argparse.Namespace) -> None:
    """Range checks of the options, before anything is loaded (one line naming the option)."""
    n = whole(args.num_images, "-n/--num-images")
    if not -2**63 <= args.seed <= 2**63 - 1 - n:
        raise UserError(f"--seed={args.seed}: out of range; image k uses seed + k, which must stay within "
                        f"[-2^63, 2^63 - 1]")
    whole(args.batch_size, "--batch-size")
    for flag, value in (("--steps", args.steps), ("--size", args.size), ("--decode-batch", args.decode_batch)):
        if value is not None:
            whole(value, flag)
    if args.cfg is not None:
        finite(args.cfg, "--cfg")
    if args.eta is not None:
        finite(args.eta, "--eta", minimum=0.0)
    if args.truncate_sigma is not None:
        finite(args.truncate_sigma, "--truncate-sigma", minimum=0.0)
    check_clip_arguments(args)
    if args.cuda_graphs and not args.compile:
        raise UserError("--cuda-graphs works through torch.compile: add --compile")


# ----------------------------------------------------------------------------- the output folder

def settings_hash(settings: dict[str, Any]) -> str:
    """A short content hash of what makes the images (``HASHED``), stored in every PNG and log line."""
    payload = json.dumps({k: settings.get(k) for k in HASHED}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


DAMAGED = "damaged"  # _png_settings of a PNG that cannot be read to its end (truncated, flipped bytes)


def _png_settings(path: Path) -> str | None:
    """The settings hash a PNG of ours carries; "" for one of ours from before hashes (a microdiff
    text chunk but no hash); ``DAMAGED`` for a PNG that is not intact (its chunks' CRCs are checked,
    so a truncated or flipped file is noticed); None for a file that is not ours."""
    from PIL import Image, UnidentifiedImageError

    info: dict = {}
    try:
        with Image.open(path) as img:
            info = dict(img.info)
            img.verify()  # every chunk to the end, with its CRC
    except PermissionError:
        raise  # not damage: one line from the CLI
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError):  # PIL's ways to say "broken"
        return DAMAGED
    except Exception:  # noqa: BLE001 - struct.error and the like from a truncated chunk
        return DAMAGED
    if not any(str(k).startswith("microdiff:") for k in info):
        return None
    return str(info.get("microdiff:settings", ""))


def _logged_settings(path: Path) -> dict[str, str]:
    """File name -> settings hash of every image an intact samples.jsonl of ours lists ({} otherwise)."""
    if not (path.is_file() and _our_log(path)):
        return {}
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {str(r["file"]): str(r.get("settings", "")) for r in records}


def _our_log(path: Path) -> bool:
    """Whether a samples.jsonl is one that sample wrote (every line a record with file, prompt, sampler)."""
    try:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return all(isinstance(r, dict) and {"file", "prompt", "sampler"} <= set(r) for r in records)


def _old_settings(out: Path) -> dict[str, Any]:
    """The settings of the first line of an earlier samples.jsonl (for saying what changed)."""
    try:
        first = (out / LOG_NAME).read_text(encoding="utf-8").splitlines()[0]
        record = json.loads(first)
        if isinstance(record, dict) and isinstance(record.get("seed"), int) and IMAGE_NAME.fullmatch(str(record.get("file"))):
            record["seed"] -= int(IMAGE_NAME.fullmatch(record["file"]).group(1))  # the run's seed, not the image's
        return record if isinstance(record, dict) else {}
    except (OSError, IndexError, ValueError):
        return {}


def plan_output(out: Path, settings: dict[str, Any], overwrite: bool, apply: bool = True) -> tuple[set[int], list[str]]:
    """Check what ``out`` already holds and return (the indices of the images there that were made with
    these settings: they are kept, the names of damaged images of ours that are made again). Files that
    sample did not write: refused. Images of other settings: refused, or with ``overwrite`` removed
    (with the old log and grid). A damaged image (truncated, flipped bytes) that samples.jsonl lists as
    ours is removed and made again when it had these settings, and counts as other settings otherwise.
    ``apply=False``: only check (nothing is removed)."""
    digest = settings["settings"]
    logged = _logged_settings(out / LOG_NAME)
    same: set[int] = set()
    other: list[Path] = []
    damaged: list[Path] = []
    foreign: list[str] = []
    for entry in sorted(out.iterdir()) if out.is_dir() else []:
        if entry.name.startswith("."):  # our lock and temporary files, .DS_Store and the like
            continue
        match = IMAGE_NAME.fullmatch(entry.name)
        if entry.name == LOG_NAME and entry.is_file():
            if not _our_log(entry):
                foreign.append(entry.name)
            continue  # ours: rewritten from the images that stay
        if entry.is_file() and (match or entry.name == GRID_NAME):
            tag = _png_settings(entry)
            if tag == DAMAGED:  # ours if our log lists it (the grid: if there is a log of ours)
                tag = logged.get(entry.name) if match else (digest if logged else None)
                if tag is None:
                    foreign.append(f"{entry.name}: damaged, and {LOG_NAME} does not list it")
                    continue
                if tag == digest:
                    damaged.append(entry)
                    continue
            if tag is None:
                foreign.append(entry.name)
            elif tag != digest:
                other.append(entry)
            elif match:
                same.add(int(match.group(1)))
            continue
        foreign.append(entry.name)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"--out {out}: holds files that microdiff sample did not write ({shown}); pass another "
                        "--out (nothing was changed)")
    if other and not overwrite:
        old = _old_settings(out)
        changed = [k for k in HASHED if k in old and old.get(k) != settings.get(k)]
        what = f"changed: {', '.join(changed)}" if changed else "other settings"
        images = sum(1 for p in other if p.name != GRID_NAME)
        raise UserError(f"--out {out}: holds {images} image(s) made with other settings ({what}); pass another "
                        "--out, or --overwrite to replace them")
    if apply:
        for path in other + damaged:
            path.unlink()
        if other:
            (out / LOG_NAME).unlink(missing_ok=True)
    return same, [p.name for p in damaged]


def _content_hashes(args: argparse.Namespace, images: list[tuple[str, float]]) -> dict[str, Any]:
    clip_hash = None
    if args.clip_model:
        folder = Path(os.path.expanduser(args.clip_model))
        clip_hash = path_digest(folder) if folder.is_dir() else f"id:{args.clip_model}"
    return {"clip_model_hash": clip_hash,
            "image_hashes": [[path_digest(p) if Path(p).is_file() else None, w] for p, w in images] or None}


# ----------------------------------------------------------------------------- the command

def run(args: argparse.Namespace) -> int:
    """Bad input ends as one line on stderr (microdiff.cli): exit status 2."""
    from .pipeline import ClipOptions, Pipeline

    prompts = [parse_weighted(p) for p in args.prompts]
    image_prompts = [parse_weighted(p, "image prompt") for p in args.images]
    check_args(args)
    check_mix([w for _, w in prompts], [w for _, w in image_prompts])
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file, not a folder; pass a folder to write the images into")
    device = resolve_device(args.device, "--device")
    dtype = backbone_dtype(args.dtype, device, "--dtype")
    if args.cuda_graphs and device.type != "cuda":
        raise UserError(f"--cuda-graphs needs a CUDA device (--device is {device}); leave it out")
    pipe = Pipeline.from_pretrained(args.checkpoint, device=device, dtype=dtype)
    clip = None
    if args.clip_model:
        from .clip_guidance import load_clip

        model = load_clip(args.clip_model, device=device)
        clip = ClipOptions(model, args.clip_guidance_scale, image_prompts, args.cutn, args.cut_pow)
        clip.image_targets()  # read the image prompts now: a bad path fails before sampling
    if args.truncate_sigma is not None:
        pipe.defaults.truncate_sigma = args.truncate_sigma or None
    pipe.decode_batch_size = args.decode_batch
    d = pipe.defaults
    size = {"height": args.size, "width": args.size} if args.size else {}
    settings = {"prompts": [[t, w] for t, w in prompts], "negative_prompt": args.negative_prompt, "seed": args.seed,
                "sampler": args.sampler or d.sampler, "steps": args.steps or d.num_inference_steps,
                "cfg": d.guidance_scale if args.cfg is None else args.cfg, "eta": args.eta,
                "truncate_sigma": d.truncate_sigma, "height": args.size or d.height, "width": args.size or d.width,
                "dtype": str(dtype).replace("torch.", ""), "checkpoint": str(args.checkpoint),
                "checkpoint_hash": pipe.fingerprint(), "clip_model": args.clip_model,
                "clip_guidance_scale": args.clip_guidance_scale if args.clip_model else None,
                "cutn": args.cutn if args.clip_model else None, "cut_pow": args.cut_pow if args.clip_model else None,
                "images": " | ".join(args.images) or None, **_content_hashes(args, image_prompts)}
    settings["settings"] = settings_hash(settings)
    pipe.check_options(args.steps, args.sampler, args.eta, args.size, args.size, args.cfg)  # before any file
    plan_output(out, settings, args.overwrite, apply=False)  # a refusal leaves the folder as it was
    output_folder(out, "--out")
    with FolderLock(out, LOCK_NAME, "microdiff sample"):  # one writer: a second run into --out is refused
        return _write_images(args, pipe, clip, prompts, settings, size, out)


def _write_images(args: argparse.Namespace, pipe, clip, prompts: list[tuple[str, float]], settings: dict[str, Any],
                  size: dict[str, int], out: Path) -> int:
    """The images, samples.jsonl and grid of one run into ``out`` (locked by the caller)."""
    import torch
    from tqdm.auto import tqdm

    kept, redo = plan_output(out, settings, args.overwrite)  # again, now that no other run can change it
    todo = [k for k in range(args.num_images) if k not in kept]
    if redo:
        again = sum(1 for name in redo if IMAGE_NAME.fullmatch(name) and int(name[:-4]) in todo)
        print(f"{len(redo)} file(s) microdiff sample wrote here earlier are damaged (unreadable: {', '.join(redo[:3])}"
              f"{' ...' if len(redo) > 3 else ''}): removed" + (f", making {again} image(s) again" if again else ""))
    if todo and args.compile:
        pipe.compile(cuda_graphs=args.cuda_graphs)
    prompt_text = format_weighted(prompts)

    def record(k: int) -> dict[str, Any]:
        return {"file": f"{k:05d}.png", "prompt": prompt_text, **settings, "seed": args.seed + k}

    def write_log(indices: set[int]) -> None:
        write_text_atomic(out / LOG_NAME, "".join(json.dumps(record(k)) + "\n" for k in sorted(indices)))

    done = set(kept)
    bar = tqdm(total=len(todo), unit="img", disable=args.no_progress, desc="sample")
    try:
        for run_start, run_stop in _runs(todo, args.batch_size):
            batch = pipe.generate_weighted(prompts, num_images=run_stop - run_start,
                                           negative_prompt=args.negative_prompt,
                                           num_inference_steps=settings["steps"], guidance_scale=settings["cfg"],
                                           sampler=settings["sampler"], seed=args.seed + run_start, eta=args.eta,
                                           batch_size=args.batch_size, clip=clip, **size)
            for k, img in zip(range(run_start, run_stop), pipe.to_pil(batch)):
                rec = record(k)
                write_png_atomic(img, out / rec["file"], {key: rec[key] for key in PNG_KEYS})
                done.add(k)
            write_log(done)  # after every batch: a killed run's images are listed
            bar.update(run_stop - run_start)
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"out of GPU memory at --batch-size {args.batch_size}; try a smaller --batch-size") from None
    finally:
        bar.close()
    if not todo:
        write_log(done)
    if args.grid:
        from PIL import Image

        grid = image_grid([Image.open(out / f"{k:05d}.png").convert("RGB") for k in range(args.num_images)])
        write_png_atomic(grid, out / GRID_NAME, {"settings": settings["settings"], "prompt": prompt_text})
    kept_note = f", kept {len(kept & set(range(args.num_images)))} made earlier with the same settings" if kept else ""
    print(f"wrote {len(todo)} images to {out}{kept_note}" + (" (+ grid.png)" if args.grid else "") + f" and {LOG_NAME}")
    return 0


def _runs(indices: list[int], batch_size: int) -> list[tuple[int, int]]:
    """Consecutive indices cut into [start, stop) pieces of at most ``batch_size`` (image k keeps seed + k)."""
    runs: list[tuple[int, int]] = []
    for k in indices:
        if runs and runs[-1][1] == k and runs[-1][1] - runs[-1][0] < batch_size:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    return runs


__all__ = ["parse_prompt", "settings_hash", "plan_output", "check_args", "image_grid", "add_arguments", "run"]
