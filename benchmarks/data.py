"""Data-loading throughput: raw images vs precomputed shards, and precompute itself.

1. Writes N shapes images (PNG, --image-size px) as a folder with caption sidecars.
2. Raw loader: ImageFolderDataset (decode + bicubic resize + crop to --resolution) through a
   DataLoader with 0 and 2 workers -> images/s.
3. Precompute: encode the folder into webdataset shards with an SD-shaped autoencoder (diffusers
   AutoencoderKL, downsample 8, 4 latent channels, random weights — the speed of the real SD VAE
   needs its weights; this measures the pipeline around a light encoder), and a text
   encoder (the built-in one, and MiniLM when installed) -> images/s.
4. Shard loader: ShardStream + StreamLoader over the precomputed shards, 0 and 2 workers -> samples/s.

Usage:  python benchmarks/data.py [--n 512] [--resolution 256] [--device cuda]
Prints a table, writes benchmarks/results/data.csv and replaces the 'data' section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _report import markdown_table, write_csv, write_section  # noqa: E402

from microdiff.data.captioned import ImageFolderDataset, collate_records  # noqa: E402
from microdiff.data.precompute import precompute  # noqa: E402
from microdiff.data.shapes import write_shapes_folder  # noqa: E402
from microdiff.data.shards import ShardStream, StreamLoader  # noqa: E402
from microdiff.data.transforms import ImageTransform  # noqa: E402
from microdiff.encoders.text import load_text_encoder  # noqa: E402


def sd_shaped_autoencoder(device: str):
    """diffusers AutoencoderKL with SD's downsampling (8) and latent channels (4), narrow and random."""
    from diffusers import AutoencoderKL

    from microdiff.encoders.image import DiffusersAutoencoderKL

    model = AutoencoderKL(block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=4,
                          norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4)
    return DiffusersAutoencoderKL(model.to(device).eval(), source="benchmark-sd-shaped-random", max_batch=64)


def time_loader(loader, limit: int | None = None) -> tuple[int, float]:
    count, start = 0, time.perf_counter()
    for batch in loader:
        if batch is None:
            continue
        count += len(batch["caption"])
        if limit and count >= limit:
            break
    return count, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512, help="images (default 512)")
    parser.add_argument("--image-size", type=int, default=384, help="side of the stored PNGs (default 384)")
    parser.add_argument("--resolution", type=int, default=256, help="training resolution (default 256)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        write_shapes_folder(folder, args.n, resolution=args.image_size, seed=0, progress=False)
        transform = ImageTransform(args.resolution, crop="random", flip=True)
        for workers in (0, 2):
            dataset = ImageFolderDataset(folder, transform)
            loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, num_workers=workers,
                                                 collate_fn=collate_records)
            n, seconds = time_loader(loader)
            rows.append({"stage": "load raw images", "detail": f"PNG {args.image_size}px -> {args.resolution}px, "
                         f"{workers} workers", "items": n, "seconds": round(seconds, 2),
                         "items/s": round(n / seconds, 1)})
            print(rows[-1], flush=True)

        encoders = [("sd-shaped VAE (random)", sd_shaped_autoencoder(args.device), "builtin")]
        try:
            load_text_encoder("minilm")
            encoders.append(("sd-shaped VAE (random)", encoders[0][1], "minilm"))
        except Exception as err:  # noqa: BLE001 - the row says why it is missing
            print(f"MiniLM unavailable ({err}); skipping that row")
        for ae_name, autoencoder, text_id in encoders:
            text_encoder = load_text_encoder(text_id, device=args.device)
            shards = Path(tmp) / f"shards-{text_id}"
            dataset = ImageFolderDataset(folder, ImageTransform(args.resolution))
            start = time.perf_counter()
            report = precompute(dataset, autoencoder, text_encoder, shards, shard_size=128, batch_size=args.batch,
                                device=args.device, progress=False)
            seconds = time.perf_counter() - start
            n = report.get("samples_written", args.n)
            size_mb = sum(p.stat().st_size for p in shards.glob("*.tar")) / 2**20
            rows.append({"stage": "precompute", "detail": f"{ae_name} + {text_id} text encoder on {args.device}, "
                         f"{size_mb / max(n, 1) * 1024:.0f} KiB/sample", "items": n, "seconds": round(seconds, 2),
                         "items/s": round(n / seconds, 1)})
            print(rows[-1], flush=True)
            for workers in (0, 2):
                loader = StreamLoader(ShardStream(shards, shuffle_buffer=256, seed=0), batch_size=args.batch,
                                      num_workers=workers)
                n, seconds = time_loader(loader)
                rows.append({"stage": "load shards", "detail": f"latents 4x{args.resolution // 8}x{args.resolution // 8} "
                             f"+ {text_id} states, {workers} workers", "items": n, "seconds": round(seconds, 2),
                             "items/s": round(n / seconds, 1)})
                print(rows[-1], flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "data.csv")
    table = markdown_table(rows)
    print(table)
    write_section(f"data ({torch.device(args.device).type})", (
        f"{args.n} shapes images stored as {args.image_size}-px PNGs, batch {args.batch}. Raw loading decodes, "
        f"resizes (bicubic, antialiased) and random-crops to {args.resolution} px; shard loading reads fp16 latents and "
        f"text states from webdataset tars (shuffle buffer 256).\n\n{table}"))
    print(f"wrote {out / 'data.csv'}")


if __name__ == "__main__":
    main()
