"""``microdiff sample``: images from a pipeline folder with weighted prompts, as v-diffusion's
``cfg_sample.py`` users know it.

    microdiff sample "a red circle:1" "blurry:-0.3" --checkpoint runs/shapes/pipeline \\
        --sampler heun --steps 30 --cfg 5 --seed 0 -n 16 --batch-size 8 --out samples --grid

Prompts are ``text`` or ``text:weight`` (negative weights push away); every image uses the same
mix, image k the seed ``seed + k``. Writes ``00000.png`` ... with the settings in PNG text chunks,
``samples.jsonl`` (one line per image) and, with ``--grid``, ``grid.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .clip_guidance import add_arguments as add_clip_arguments
from .utils.grids import image_grid
from .clip_guidance import parse_weighted as parse_prompt  # "text:weight" -> (text, weight), one rule for both

PNG_KEYS = ("prompt", "negative_prompt", "seed", "sampler", "steps", "cfg", "eta", "checkpoint", "clip_model",
            "clip_guidance_scale", "images")


def pick_device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="+", help="prompts as 'text' or 'text:weight' (negative weights push away)")
    parser.add_argument("--checkpoint", required=True, help="pipeline folder (Pipeline.save_pretrained) or hub id")
    parser.add_argument("--negative-prompt", default=None, help="replaces the empty caption as the guidance baseline")
    parser.add_argument("--sampler", default=None, help="euler, euler_ancestral, heun, ddim, dpmpp_2m, ... "
                        "(default: the pipeline's)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the pipeline's)")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the pipeline's)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (ddim sampler; 1 = ancestral)")
    parser.add_argument("--truncate-sigma", type=float, default=None,
                        help="stop at this sigma and return the denoiser's x0 estimate (models trained on data "
                             "noisy at that level; default: the pipeline's, usually off)")
    parser.add_argument("--seed", type=int, default=0, help="image k uses seed + k (default: 0)")
    parser.add_argument("-n", "--num-images", type=int, default=1, help="images to make (default: 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward (default: 8)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the pipeline's)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="backbone weights dtype (auto: bfloat16 on cuda, float32 elsewhere)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone first")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="with --compile on a GPU: replay each denoiser call as a CUDA graph")
    parser.add_argument("--decode-batch", type=int, default=None,
                        help="latents per autoencoder decode call (default: the whole batch; lower it at 512 px)")
    parser.add_argument("--out", default="samples", help="output folder (default: samples)")
    parser.add_argument("--grid", action="store_true", help="also write grid.png")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_clip_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch
    from PIL.PngImagePlugin import PngInfo
    from tqdm.auto import tqdm

    from .pipeline import Pipeline

    prompts = [parse_prompt(p) for p in args.prompts]
    device = pick_device(args.device)
    try:
        from .encoders.image import resolve_dtype

        auto = torch.bfloat16 if device.startswith("cuda") else torch.float32
        dtype = auto if args.dtype == "auto" else resolve_dtype(args.dtype)
        pipe = Pipeline.from_pretrained(args.checkpoint, device=device, dtype=dtype)
    except (FileNotFoundError, OSError, ValueError) as err:
        print(f"microdiff sample: {err}", file=sys.stderr)
        return 2
    clip = None
    if args.images and not args.clip_model:
        print("microdiff sample: --images needs --clip-model (image prompts steer through CLIP guidance)",
              file=sys.stderr)
        return 2
    if args.clip_model:
        from .clip_guidance import load_clip
        from .pipeline import ClipOptions

        try:
            model = load_clip(args.clip_model, device=device)
            images = [parse_prompt(p) for p in args.images]
            clip = ClipOptions(model, args.clip_guidance_scale, images, args.cutn, args.cut_pow)
            clip.image_targets()  # read the image prompts now: a bad path fails before sampling
        except (FileNotFoundError, OSError, ValueError) as err:
            print(f"microdiff sample: {err}", file=sys.stderr)
            return 2
    if args.truncate_sigma is not None:
        pipe.defaults.truncate_sigma = args.truncate_sigma or None
    if args.cuda_graphs and not args.compile:
        print("microdiff sample: --cuda-graphs works through torch.compile: add --compile", file=sys.stderr)
        return 2
    if args.decode_batch is not None and args.decode_batch < 1:
        print(f"microdiff sample: --decode-batch={args.decode_batch}: must be at least 1", file=sys.stderr)
        return 2
    pipe.decode_batch_size = args.decode_batch
    if args.compile:
        pipe.compile(cuda_graphs=args.cuda_graphs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = {"height": args.size, "width": args.size} if args.size else {}
    settings = {"sampler": args.sampler or pipe.defaults.sampler, "steps": args.steps or pipe.defaults.num_inference_steps,
                "cfg": pipe.defaults.guidance_scale if args.cfg is None else args.cfg, "eta": args.eta,
                "truncate_sigma": pipe.defaults.truncate_sigma, "checkpoint": str(args.checkpoint),
                "clip_model": args.clip_model,
                "clip_guidance_scale": args.clip_guidance_scale if args.clip_model else None,
                "images": " | ".join(args.images) or None}
    prompt_text = " | ".join(f"{t}:{w:g}" for t, w in prompts)
    images = []
    bar = tqdm(total=args.num_images, unit="img", disable=args.no_progress, desc="sample")
    try:
        for start in range(0, args.num_images, args.batch_size):
            n = min(args.batch_size, args.num_images - start)
            batch = pipe.generate_weighted(prompts, num_images=n, negative_prompt=args.negative_prompt,
                                           num_inference_steps=settings["steps"], guidance_scale=settings["cfg"],
                                           sampler=settings["sampler"], seed=args.seed + start, eta=args.eta,
                                           batch_size=args.batch_size, clip=clip, **size)
            images += Pipeline.to_pil(batch)
            bar.update(n)
    except torch.cuda.OutOfMemoryError:
        print(f"microdiff sample: out of GPU memory at --batch-size {args.batch_size}; try a smaller --batch-size",
              file=sys.stderr)
        return 2
    finally:
        bar.close()
    with open(out / "samples.jsonl", "w") as log:
        for k, img in enumerate(images):
            record = {"file": f"{k:05d}.png", "prompt": prompt_text, "negative_prompt": args.negative_prompt,
                      "seed": args.seed + k, **settings}
            info = PngInfo()
            for key in PNG_KEYS:
                info.add_text(f"microdiff:{key}", str(record[key]))
            img.save(out / record["file"], pnginfo=info)
            log.write(json.dumps(record) + "\n")
    if args.grid:
        image_grid(images).save(out / "grid.png")
    print(f"wrote {len(images)} images to {out}" + (" (+ grid.png)" if args.grid else "") + " and samples.jsonl")
    return 0


__all__ = ["parse_prompt", "pick_device", "image_grid", "add_arguments", "run"]
