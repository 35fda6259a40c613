"""The ``microdiff`` command."""

from __future__ import annotations

import argparse
import importlib

from .utils.argtypes import Parser
from .utils.errors import run_command

EVAL_COMMANDS = {
    "fid": ("microdiff.eval.fid", "Fréchet distance (and KID, precision/recall, Vendi) of a folder of images "
            "against a reference folder or .npz statistics, in Inception, DINOv2, CLIP or your own features",
            ["microdiff eval fid --gen samples/ --ref data/val/ --features inception:pt_inception-2015-12-05.pth",
             "microdiff eval fid --gen samples/ --ref val-dinov2.npz --features dinov2 --metrics fd,kid,pr,vendi",
             "microdiff eval fid --ref data/val/ --features dinov2 --save-ref-stats val-dinov2.npz"]),
    "generate": ("microdiff.eval.generate", "generate one image per prompt and seed of a prompts file (COCO-style "
                 "CSV, txt, jsonl) from a pipeline folder; resumable, sharded over processes with torchrun",
                 ["microdiff eval generate --prompts coco30k.csv --checkpoint DIR --out gen/coco",
                  "torchrun --nproc_per_node 8 -m microdiff eval generate --prompts coco30k.csv --checkpoint DIR "
                  "--out gen/coco"]),
    "clip-score": ("microdiff.eval.clipscore", "CLIP score of generated images against their prompts "
                   "(max(100 cos, 0) per image, as torchmetrics)",
                   ["microdiff eval clip-score --prompts gen/coco/index.csv"]),
    "memorization": ("microdiff.eval.memorize_cli", "nearest training images of generated images (Ambient "
                     "Diffusion's memorisation check): top-k cosine search, counts above thresholds, closest "
                     "pairs; exact under torchrun",
                     ["microdiff eval memorization --gen gen/coco/images --train data/train --features dinov2 "
                      "--out runs/memorization"]),
}

# name -> (module with add_arguments(parser) and run(args) -> int, summary, examples)
DATA_COMMANDS = {
    "shapes": ("microdiff.data.shapes", "write the built-in procedural 'shapes' dataset as a folder of "
               "images with caption and metadata sidecars",
               ["microdiff data shapes --out data/shapes --n 1000 --resolution 64",
                "microdiff data shapes --out data/noisy --n 500 --corruption noise:0.2"]),
    "download": ("microdiff.data.download", "download the images of a URL manifest or Hugging Face "
                 "dataset into webdataset shards, with retries, checks, resume and a failure report",
                 ["microdiff data download urls.parquet --out data/web --resolution 256 --workers 16"]),
    "precompute": ("microdiff.data.precompute", "encode images to latents and captions to text states "
                   "into resumable webdataset shards (torchrun for several processes/GPUs)",
                   ["microdiff data precompute shapes:2000 --out data/shapes-lat --autoencoder identity "
                    "--text-encoder minilm --resolution 32",
                    "torchrun --nproc-per-node 8 -m microdiff data precompute data/images --out shards "
                    "--autoencoder diffusers-kl:stabilityai/sd-vae-ft-ema --text-encoder hf-clip:openai/clip-vit-large-patch14"]),
    "check": ("microdiff.data.check", "decode every image of a source (folder, manifest, Hugging Face dataset, "
              "image shards) and report unreadable, too-small or uncaptioned items (path + reason); read every "
              "sample of latent shards",
              ["microdiff data check data/images --resolution 256 --min-size 128 --out skips"]),
    "inspect": ("microdiff.data.inspect", "summarise a dataset or shard folder: counts, caption lengths, "
                "sources, quality and corruption mix",
                ["microdiff data inspect data/shapes", "microdiff data inspect shards/ --json report.json"]),
}
TOP_COMMANDS = {
    "train": ("microdiff.train.cli", "train a text-to-image diffusion model from a YAML config (one process, "
              "or torchrun for DDP / FSDP), with EMA, checkpoints, exact resume and multi-stage runs",
              ["microdiff train configs/demo.yaml --out runs/demo",
               "microdiff train configs/demo.yaml train.steps=3000 optim.lr=5e-4 --out runs/longer",
               "torchrun --nproc_per_node 8 -m microdiff train configs/micro_diffusion/stages.yaml --out runs/md"]),
    "convert": ("microdiff.convert", "turn a published checkpoint (micro_diffusion / Ambient-o DiT) into a "
                "pipeline folder that sample and Pipeline.from_pretrained use",
                ["microdiff convert micro-diffusion --dit ambient_o.safetensors --out pipelines/ambient-o"]),
    "sample": ("microdiff.sample", "generate images from a pipeline folder with weighted prompts",
               ['microdiff sample "a red circle:1" "blurry:-0.3" --checkpoint runs/shapes/pipeline -n 16 --grid',
                'microdiff sample "a small blue square" --checkpoint DIR --sampler ddim --eta 1 --steps 50 --seed 3']),
    "annotate": ("microdiff.ambient.annotate", "train a noise-conditional quality classifier and annotate each "
                 "low-quality sample with the noise level sigma_tn above which training may use it (Ambient-o)",
                 ["microdiff annotate shapes:2000 --corruption noise:0.1@0.25,blur:1.0@0.25 --resolution 32 --out runs/annotate",
                  "microdiff annotate data/mixed --split corruption --autoencoder microdiff-vae:runs/vae/autoencoder "
                  "--out runs/annotate-latent"]),
    "train-autoencoder": ("microdiff.encoders.train_autoencoder", "train a KL-VAE or VQGAN on your images "
                          "(L1 + optional perceptual + PatchGAN losses), then train latent diffusion on it",
                          ["microdiff train-autoencoder --data shapes:2000 --out runs/vae --kind vae "
                           "--resolution 32 --steps 500"]),
}


def _add_module_command(sub, name: str, module: str, summary: str, examples: list[str],
                        parent: str | None = None) -> None:
    """A subcommand whose arguments and behaviour live in ``module`` (add_arguments / run)."""
    mod = importlib.import_module(module)
    p = sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n" + "\n".join(f"  {e}" for e in examples))
    mod.add_arguments(p)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the Python traceback of an error instead of one line (also: MICRODIFF_DEBUG=1)")
    p.set_defaults(func=mod.run, command_name=name if parent is None else f"{parent} {name}")


def _add_group(sub, name: str, summary: str, description: str, commands: dict) -> None:
    """``microdiff NAME COMMAND``: a group of module commands; ``microdiff NAME`` alone prints its help."""
    group = sub.add_parser(name, help=summary, description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="examples:\n" + "\n".join(f"  {e}" for _, _, ex in commands.values() for e in ex[:1]))
    group_sub = group.add_subparsers(dest=f"{name}_command", metavar=f"{name.upper()}_COMMAND")
    group.set_defaults(func=lambda args: (group.print_help(), 0)[1])
    for command, spec in commands.items():
        _add_module_command(group_sub, command, *spec, parent=name)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="microdiff",
        description="Train and sample text-to-image diffusion models on a micro budget.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  microdiff demo --out runs/demo\n  microdiff demo --help",
    )
    from microdiff import __version__

    parser.add_argument("--version", action="version", version=f"microdiff {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error instead of one line (also: MICRODIFF_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_module_command(sub, "demo", "microdiff.demo", "the embedded default: train a small text-to-image model "
                        "on the built-in shapes data on this machine, sample all 18 colour x shape prompts and "
                        "score them (prompt alignment, Fréchet distance); writes one run folder",
                        ["microdiff demo", "microdiff demo --out runs/demo2 --steps 6000 --resolution 64 --device cuda",
                         "microdiff demo --toy   # the 2-D sampler comparison instead, < 1 minute"])

    _add_group(sub, "data", "build, download, precompute and inspect datasets",
               "Datasets: the built-in shapes set, downloads, precomputed shards, summaries.", DATA_COMMANDS)
    _add_group(sub, "eval", "FID/FD, KID, precision/recall, CLIP score, prompt suites, memorisation",
               "Evaluation: distances to reference images in pluggable feature spaces.", EVAL_COMMANDS)
    for name, spec in TOP_COMMANDS.items():
        _add_module_command(sub, name, *spec)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `microdiff train CONFIG --out DIR key=value`: overrides may also come after the options
    if extra and isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides.extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    return run_command(getattr(args, "command_name", args.command), args.func, args)


if __name__ == "__main__":
    raise SystemExit(main())
