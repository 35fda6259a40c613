"""Performance, measured side by side in one run: the straightforward implementation beside ours.

    python benchmarks/run.py                    # CPU: MicroDiT_Small_2 and _Tiny_2, ~35 minutes on 2 cores
    python benchmarks/run.py --quick            # CPU: 256 px training only, about 5 minutes
    python benchmarks/run.py --device cuda      # GPU: MicroDiT_XL_2 at 256 and 512 px (benchmarks/gpu.sh)

Training (each case in its own process, so compile caches, memory peaks and threads do not leak):
- ``reference``: what a straightforward loop does: micro_diffusion's dense one-hot MoE dispatch, float32,
  eager, the unfused (for-each) AdamW and a ``float(loss)`` per step;
- ``optimised``: our defaults for speed: gather/scatter MoE, bf16 autocast (float32 master weights,
  float32 QK-norms), the whole MicroDiT as one compiled graph (no graph break), fused AdamW, no host
  read in the step.
Both run the real ``Trainer.train_step`` (loss, backward, clip, AdamW, EMA) on the same synthetic
precomputed batch (latents + 77 caption states) with the same weights (seeded random, so no branch is
zero) and the same seeds, at mask ratio 0 and 0.75. Model FLOPs are counted with FlopCounterMode on
one forward + backward of the gather model; MFU is against the measured matmul peak of the dtype the
variant computes in (bf16 for ``optimised``, fp32 for ``reference``). ``out_rel_err`` compares the
optimised network's output with the reference network's on one batch (same weights, same token mask);
``loss_rel_err`` compares the two first-step losses. On a GPU, ``syncs_per_step`` counts the calls in the
timed steps that made the host wait for the device (torch.cuda.set_sync_debug_mode("warn")).

Sampling: 30-step Heun with CFG 5 from the same noise. ``reference``: two separate float32 eager
forwards per denoiser call (micro_diffusion's loop); ``optimised``: the Pipeline's batched CFG with
bf16 weights and the compiled graph; on a GPU also with CUDA graph replay of each denoiser call.
Latents only (the identity autoencoder); ``mean_rel_diff`` compares final latents with the reference's.

Data: the shard loader (webdataset tars of fp16 latents + caption states), pinned batches, 0 and 2
workers, against the best training rate of the same run.

Prints tables, writes benchmarks/results/perf-<section>-<device>.csv and one section of
benchmarks/RESULTS.md per part, 'performance: <section> (<device>)', each stamped with the device,
torch version, date and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _report import markdown_table, write_csv, write_section  # noqa: E402

CAPTION_TOKENS = 77
VARIANTS = {
    "reference": ["model.options={moe_dispatch: dense}", "train.precision=fp32", "train.compile=false",
                  "optim.fused=false"],
    "optimised": ["train.precision=bf16", "train.compile=true", "optim.fused=true"],
    "optimised+ckpt": ["train.precision=bf16", "train.compile=true", "optim.fused=true",
                       "train.gradient_checkpointing=true"],
}
PLANS = {  # (preset, latent side, batch, variants); a latent side of 32 is a 256 px image through an SD VAE
    "cpu": {"training": [("MicroDiT_Small_2", 32, 8, ("reference", "optimised")),
                         ("MicroDiT_Small_2", 64, 4, ("reference", "optimised")),
                         ("MicroDiT_Tiny_2", 32, 4, ("reference", "optimised"))],
            # the masked speed-up at a batch where per-step costs (AdamW, EMA, clipping: O(params)) weigh less
            "training-batch16": [("MicroDiT_Tiny_2", 32, 16, ("optimised",))],
            "sampling": [("MicroDiT_Small_2", 32, 4)], "caption_dim": 384, "warmup": 2, "steps": 7},
    "cuda": {"training": [("MicroDiT_XL_2", 32, 32, ("reference", "optimised", "optimised+ckpt"))],
             "training-512": [("MicroDiT_XL_2", 64, 8, ("optimised",))],
             "sampling": [("MicroDiT_XL_2", 64, 16)], "caption_dim": 1024, "warmup": 5, "steps": 20},
}


# ----------------------------------------------------------------------------- machine peaks
def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The best FLOP/s of square matmuls of this dtype on this device (the MFU denominator)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5):
        a @ b
        _sync(device)
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        _sync(device)
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - start))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- training, one case
def build_trainer(preset: str, side: int, batch: int, mask: float, variant: str, device: str, caption_dim: int, tmp: Path):
    from microdiff.demo import demo_config_path
    from microdiff.train.config import load_config
    from microdiff.train.trainer import Trainer

    overrides = ["log.progress=false", "log.tensorboard=false", "log.sample_prompts=[]", "checkpoint.every=0",
                 f"train.device={device}", "train.steps=1000", f"model.backbone={preset}", "model.options={}",
                 "encoders.autoencoder=identity:4", f"data.resolution={side}", f"train.batch_size={batch}",
                 "train.micro_batch_size=null", f"loss.mask_ratio={mask}", "loss.caption_dropout=0.1",
                 f"encoders.text=builtin:byte-d{caption_dim}-l1-h4-len{CAPTION_TOKENS}",
                 "encoders.train_text_encoder=false", "data.source=shapes:64", *VARIANTS[variant]]
    trainer = Trainer(load_config(demo_config_path(), overrides), tmp / variant)
    trainer._global_batch = batch
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # seeded random weights: the same in every case, no zero branch
        for p in trainer.module.backbone.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return trainer


def synthetic_batch(batch: int, side: int, caption_dim: int, device: torch.device) -> dict:
    """A precomputed batch (latents + caption states), pinned for a GPU; the same in every case."""
    gen = torch.Generator().manual_seed(1)
    out = {"latent": torch.randn(batch, 4, side, side, generator=gen),
           "text": torch.randn(batch, CAPTION_TOKENS, caption_dim, generator=gen),
           "text_mask": torch.ones(batch, CAPTION_TOKENS, dtype=torch.bool)}
    return {k: v.pin_memory() for k, v in out.items()} if device.type == "cuda" else out


def count_flops(trainer, batch: dict) -> float:
    """Forward + backward FLOPs per image of the gather model, eager (the graph bypassed while counting)."""
    from torch.utils.flop_counter import FlopCounterMode

    backbone = trainer.module.backbone
    graph = backbone.__dict__.pop("_graph", None)
    n = batch["latent"].shape[0]
    try:
        with FlopCounterMode(display=False) as counter:
            trainer._micro_step(0, batch, trainer.noise_dist.sample(n), torch.zeros(n, dtype=torch.bool),
                                torch.randn((n, *trainer.latent_shape), device=trainer.device), True, 1)
    finally:
        if graph is not None:
            backbone.__dict__["_graph"] = graph
        trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / n


def output_error(trainer, batch: dict) -> float:
    """max |F_opt - F_ref| / max |F_ref| of the network's raw output on one batch: the optimised network
    (graph, autocast, gather) against a float32 eager copy with micro_diffusion's dense dispatch and the
    same weights and token mask. (F, not D: D's skip term would hide F's error.)"""
    from microdiff.models import MicroDiT

    backbone = trainer.module.backbone
    reference = MicroDiT(**{**backbone.config, "moe_dispatch": "dense"}).to(trainer.device)
    reference.load_state_dict(backbone.state_dict())
    x = batch["latent"].to(trainer.device)
    c_noise = torch.zeros(x.shape[0], device=trainer.device)
    y = batch["text"].to(trainer.device)[:, None]
    mask = trainer.config.loss.mask_ratio
    outputs = []
    for model, amp in ((backbone, trainer.config.train.precision == "bf16"), (reference, False)):
        # the optimised one with gradients on, as in training: the compiled training graph is reused
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=amp), \
                torch.set_grad_enabled(model is backbone):
            gen = torch.Generator(device=trainer.device).manual_seed(5)
            outputs.append(model(x, c_noise, y, mask_ratio=mask, generator=gen)["sample"].detach().float())
    del reference
    return float((outputs[0] - outputs[1]).abs().max() / outputs[1].abs().max())


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # this case's process only


def training_case(spec: dict) -> dict:
    """One (preset, side, batch, mask, variant): warm-up steps (compilation included), then timed steps."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(spec["preset"], spec["side"], spec["batch"], spec["mask"], spec["variant"],
                                spec["device"], spec["caption_dim"], Path(tmp))
        batch = synthetic_batch(spec["batch"], spec["side"], spec["caption_dim"], device)
        micro = [(0, batch)]
        reference = spec["variant"] == "reference"
        flops = None if reference else count_flops(trainer, batch)
        error = None if reference else output_error(trainer, batch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        compile_start = time.perf_counter()
        first_loss = float(trainer.train_step(micro)["loss"])  # step 0: the same seeds in every variant
        first_seconds = time.perf_counter() - compile_start
        for _ in range(spec["warmup"] - 1):
            trainer.train_step(micro)
        _sync(device)
        times, start = [], time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":  # torch warns at every synchronising call: counted below
                torch.cuda.set_sync_debug_mode("warn")
            for _ in range(spec["steps"]):
                metrics = trainer.train_step(micro)
                if reference:
                    float(metrics["loss"])  # the straightforward loop logs loss.item() every step
                if device.type == "cpu":  # per step on the CPU (a shared machine is noisy): the median
                    times.append(time.perf_counter() - start)
                    start = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        _sync(device)
        if device.type == "cuda":  # on a GPU only the total: timing each step would add a sync per step
            seconds = time.perf_counter() - start
        else:
            seconds = sorted(times)[len(times) // 2] * spec["steps"]
    return {"images_per_s": spec["steps"] * spec["batch"] / seconds, "flops_per_image": flops,
            "first_step_s": first_seconds, "first_loss": first_loss, "out_rel_err": error,
            "peak_mem_GiB": peak_memory_gib(device),
            "syncs_per_step": syncs / spec["steps"] if device.type == "cuda" else None}


def run_case_process(spec: dict, timeout: float) -> dict:
    """``training_case`` in a fresh Python process (its own compile cache, threads and memory peak)."""
    cmd = [sys.executable, __file__, "--case", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CASE ")]
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": "OOM" if "OutOfMemory" in proc.stderr else last[:160]}
    return json.loads(lines[-1][5:])


# ----------------------------------------------------------------------------- training, the table
def training_rows(args, plan: dict, peaks: dict, part: str = "training") -> list[dict]:
    rows = []
    for preset, side, batch, variants in plan[part]:
        for mask in (0.0, 0.75):
            for variant in variants:
                if variant == "optimised+ckpt" and mask:
                    continue  # checkpointing trades time for memory: shown once, unmasked
                spec = {"preset": preset, "side": side, "batch": batch, "mask": mask, "variant": variant,
                        "device": args.device, "caption_dim": plan["caption_dim"], "threads": args.threads,
                        "warmup": plan["warmup"], "steps": plan["steps"]}
                print(f"training {preset} {side * 8} px mask {mask} {variant} ...", flush=True)
                result = run_case_process(spec, args.case_timeout)
                rows.append({"preset": preset, "image_px": side * 8, "batch": batch, "mask": mask, "variant": variant,
                             **result})
                print("  ", rows[-1], flush=True)
    return add_mfu(rows, peaks)


def add_mfu(rows: list[dict], peaks: dict) -> list[dict]:
    """TFLOP/s and MFU per row. FLOPs come from the optimised (gather) case of the same shape: the
    model's FLOPs, not the dense dispatch's, nor the recomputation that activation checkpointing adds
    (MFU counts model FLOPs). The peak is the measured one of the dtype the variant computes in."""
    flops = {(r["preset"], r["image_px"], r["mask"]): r["flops_per_image"] for r in rows
             if r.get("flops_per_image") and r["variant"] == "optimised"}
    for r in rows:
        f = flops.get((r["preset"], r["image_px"], r["mask"]))
        if "images_per_s" in r and f:
            r["TFLOP_s"] = f * r["images_per_s"] / 1e12
            peak = peaks["fp32" if r["variant"] == "reference" else "bf16"]
            r["MFU_%"] = 100 * f * r["images_per_s"] / peak
    return rows


def training_ratios(rows: list[dict]) -> list[dict]:
    """Optimised over reference (same shape and mask) and masked over unmasked (same variant), with
    the FLOP ratio the mask would give if time followed FLOPs."""
    def get(preset, px, mask, variant):
        return next((r for r in rows if (r["preset"], r["image_px"], r["mask"], r["variant"]) == (preset, px, mask, variant)
                     and "images_per_s" in r), None)

    out = []
    for preset, px in dict.fromkeys((r["preset"], r["image_px"]) for r in rows):
        for mask in (0.0, 0.75):
            ref, opt = get(preset, px, mask, "reference"), get(preset, px, mask, "optimised")
            if ref and opt:
                out.append({"comparison": f"{preset} {px} px mask {mask}: optimised / reference",
                            "measured": opt["images_per_s"] / ref["images_per_s"],
                            "loss_rel_err": abs(opt["first_loss"] - ref["first_loss"]) / abs(ref["first_loss"])})
        for variant in ("reference", "optimised"):
            full, masked = get(preset, px, 0.0, variant), get(preset, px, 0.75, variant)
            if full and masked:
                flop_ratio = None
                if full.get("TFLOP_s") and masked.get("TFLOP_s"):
                    flop_ratio = (full["TFLOP_s"] / full["images_per_s"]) / (masked["TFLOP_s"] / masked["images_per_s"])
                out.append({"comparison": f"{preset} {px} px {variant}: mask 0.75 / mask 0",
                            "measured": masked["images_per_s"] / full["images_per_s"], "flop_ratio": flop_ratio})
    return out


# ----------------------------------------------------------------------------- sampling
def sampling_rows(args, plan: dict) -> list[dict]:
    from microdiff.diffusion import EDM, Denoiser
    from microdiff.diffusion.rng import per_sample_generators, randn
    from microdiff.diffusion.samplers import sample_heun
    from microdiff.diffusion import schedules
    from microdiff.encoders.builtin import BuiltinTextEncoder
    from microdiff.encoders.image import load_autoencoder
    from microdiff.models.dit import DIT_PRESETS
    from microdiff.pipeline import Pipeline, SamplingDefaults

    device = torch.device(args.device)
    rows = []
    for preset, side, batch in plan["sampling"]:
        print(f"sampling {preset} {side * 8} px ...", flush=True)
        torch.manual_seed(0)
        text = BuiltinTextEncoder(dim=plan["caption_dim"], layers=1, heads=4, max_length=CAPTION_TOKENS).to(device).eval()
        model = DIT_PRESETS[preset](input_size=side, caption_channels=plan["caption_dim"]).to(device).eval()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        defaults = SamplingDefaults(num_inference_steps=30, guidance_scale=5.0, sampler="heun", height=side,
                                    width=side, caption_layout="B1LC", caption_mask=False)
        prompts = [f"prompt {k}" for k in range(batch)]
        ref_model = type(model)(**{**model.config, "moe_dispatch": "dense"}).to(device).eval()
        ref_model.load_state_dict(model.state_dict())
        reference = Pipeline(text, load_autoencoder("identity:4"), Denoiser(ref_model, EDM(sigma_data=0.5)), defaults)

        def fast_pipeline(cuda_graphs: bool) -> Pipeline:  # bf16 weights, one compiled graph, batched CFG
            fast_model = type(model)(**model.config).to(device=device, dtype=torch.bfloat16).eval()
            fast_model.load_state_dict(model.state_dict())
            pipe = Pipeline(text, load_autoencoder("identity:4"), Denoiser(fast_model, EDM(sigma_data=0.5)), defaults)
            pipe.decode = lambda latents: [latents.float().cpu()]  # latents only: compared with the reference's
            return pipe.compile(cuda_graphs=cuda_graphs)

        def reference_sample():  # two float32 forwards per call, latents only
            with torch.inference_mode():
                cond = reference.encode_prompts(prompts)
                uncond = {"y": torch.zeros_like(cond["y"])}
                d = reference.denoiser
                sigmas = schedules.karras(30, defaults.sigma_min, defaults.sigma_max, defaults.rho, device=device,
                                          dtype=torch.float64)
                x = randn((batch, 4, side, side), per_sample_generators(3, batch), device=device,
                          dtype=torch.float64) * sigmas[0]  # the Pipeline's noise for seed 3

                def guided(x, sigma):
                    u = d(x.float(), sigma.float(), **uncond).double()
                    c = d(x.float(), sigma.float(), **cond).double()
                    return u + 5.0 * (c - u)
                return sample_heun(guided, x, sigmas, disable=True)

        def fast_sampler(pipe: Pipeline):
            def run():
                with torch.inference_mode():
                    return pipe.generate(prompts, seed=3, batch_size=batch)
            return run

        variants = [("reference", reference_sample), ("optimised", fast_sampler(fast_pipeline(False)))]
        if device.type == "cuda":
            variants.append(("optimised + CUDA graphs", fast_sampler(fast_pipeline(True))))
        times = {}
        results = {}
        for name, fn in variants:
            start = time.perf_counter()
            results[name] = fn()  # warm-up (compilation)
            _sync(device)
            warm = time.perf_counter() - start
            runs = []
            for _ in range(args.sampling_repeats):
                start = time.perf_counter()
                fn()
                _sync(device)
                runs.append(time.perf_counter() - start)
            times[name] = (min(runs), warm)
        ref = results["reference"].float().cpu()
        for name, _ in variants:
            diff = (results[name].float().cpu() - ref).abs() / ref.abs().max()
            rows.append({"preset": preset, "image_px": side * 8, "batch": batch, "steps": 30, "variant": name,
                         "images_per_s": batch / times[name][0], "speed_up": times["reference"][0] / times[name][0],
                         "first_call_s": times[name][1], "mean_rel_diff": float(diff.mean()),
                         "max_rel_diff": float(diff.max())})
            print("  ", rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------- data loading
def data_rows(args, plan: dict) -> list[dict]:
    import numpy as np

    from microdiff.data.shards import ShardStream, StreamLoader, encode_sample, write_shard

    import importlib.util

    if importlib.util.find_spec("webdataset") is None:  # the shard writer needs it
        return [{"loader": "skipped: webdataset is not installed (pip install 'microdiff[data]')"}]
    side, batch = plan["training"][0][1], plan["training"][0][2] * 4
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        per_shard, shards = 256, 4
        for k in range(shards):
            write_shard(Path(tmp) / f"{k:06d}.tar", (
                encode_sample(k * per_shard + i, rng.standard_normal((4, side, side)).astype(np.float16),
                              rng.standard_normal((CAPTION_TOKENS, plan["caption_dim"])).astype(np.float16),
                              np.ones(CAPTION_TOKENS, dtype=bool), rng.standard_normal(plan["caption_dim"]).astype(np.float16),
                              caption=f"caption {i}") for i in range(per_shard)))
        for workers in (0, 2):
            stream = ShardStream(tmp, shuffle_buffer=256, seed=0)
            loader = StreamLoader(stream, batch_size=batch, num_workers=workers, pin_memory=args.device == "cuda")
            start, n = time.perf_counter(), 0
            for b in loader:
                n += b["latent"].shape[0]
                if args.device == "cuda":
                    b["latent"].to(args.device, non_blocking=True)
            rows.append({"loader": f"shards, {workers} workers, batch {batch}" + (", pinned" if args.device == "cuda" else ""),
                         "images": n, "images_per_s": n / (time.perf_counter() - start)})
            print("  ", rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------- main
def _fmt(rows: list[dict]) -> list[dict]:
    def f(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else round(v, 3 if abs(v) < 10 else 1)
        return v
    return [{k: f(v) for k, v in r.items() if v is not None} for r in rows]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--sections", default=None,
                        help="comma-separated parts: training, training-batch16 (cpu), training-512 (cuda), sampling, "
                             "data (default: all)")
    parser.add_argument("--quick", action="store_true", help="CPU: only the 256 px training cases")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per case on the CPU (default 2)")
    parser.add_argument("--sampling-repeats", type=int, default=2)
    parser.add_argument("--case-timeout", type=float, default=1200)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print("CASE " + json.dumps(training_case(json.loads(args.case))), flush=True)
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/run.py: --device cuda but torch sees no GPU")
    torch.set_num_threads(args.threads)
    plan = dict(PLANS[device.type])
    if args.quick:
        plan["training"] = plan["training"][:1]
        args.sections = "training"
    args.sections = args.sections or ",".join([*(k for k in plan if k.startswith("training")), "sampling", "data"])
    sections = args.sections.split(",")
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    print(f"matmul peaks: fp32 {peaks['fp32'] / 1e12:.3f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s", flush=True)
    header = (f"Measured matmul peaks (MFU denominators): fp32 {peaks['fp32'] / 1e12:.3f} TFLOP/s, "
              f"bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s. Command: `python benchmarks/run.py"
              f"{' --device cuda' if device.type == 'cuda' else ''} --sections {args.sections}`.")
    results = Path(__file__).with_name("results")
    results.mkdir(exist_ok=True)
    best_train = None
    for section in sections:  # each part is its own RESULTS.md section, so parts can run separately
        if section.startswith("training") and section in plan:
            rows = training_rows(args, plan, peaks, section)
            ratios = training_ratios(rows)
            best_train = max((r["images_per_s"] for r in rows if "images_per_s" in r), default=None)
            tables = [markdown_table(_fmt(rows)), "Ratios:", markdown_table(_fmt(ratios))]
            csv_rows = [{"table": "steps", **r} for r in rows] + [{"table": "ratios", **r} for r in ratios]
        elif section == "sampling":
            rows = sampling_rows(args, plan)
            tables, csv_rows = [markdown_table(_fmt(rows))], rows
        elif section == "data":
            rows = data_rows(args, plan)
            for r in rows:
                if best_train and "images_per_s" in r:
                    r["vs_best_training_rate"] = r["images_per_s"] / best_train
            tables, csv_rows = [markdown_table(_fmt(rows))], rows
        else:
            known = ", ".join(k for k in plan if k not in ("caption_dim", "warmup", "steps"))
            raise SystemExit(f"benchmarks/run.py: unknown section {section!r} on {device.type}; use {known}, data")
        body = "\n\n".join([header, *tables])
        print(body, flush=True)
        write_csv(csv_rows, results / f"perf-{section}-{device.type}.csv")
        write_section(f"performance: {section} ({device.type})", body)


if __name__ == "__main__":
    main()
