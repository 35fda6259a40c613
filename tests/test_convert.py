"""`microdiff convert micro-diffusion`: architecture read from the checkpoint, the published XL
layout recognised without allocating it, and a small MicroDiT converted and sampled end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from microdiff.convert import convert_micro_diffusion, infer_microdit_config
from microdiff.models import MicroDiT_Nano_2
from microdiff.pipeline import Pipeline

TSV = "micro_diffusion_MicroDiT_XL_2_latent64_state_dict.tsv"


def _reference_dir() -> Path | None:
    for d in (Path(__file__).resolve().parents[2] / "shared" / "reference", Path("/work/shared/reference")):
        if (d / TSV).is_file():
            return d
    return None


def test_published_xl_layout_is_recognised_on_the_meta_device():
    ref = _reference_dir()
    if ref is None:
        pytest.skip(f"../shared/reference/{TSV} not found")
    state = {}
    for line in (ref / TSV).read_text().splitlines()[1:]:
        key, shape, _ = line.split("\t")
        state[key] = torch.empty(tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), device="meta")
    name, config = infer_microdit_config(state)
    assert name == "MicroDiT_XL_2"
    assert (config["input_size"], config["caption_channels"], config["in_channels"]) == (64, 1024, 4)
    assert config["pos_interp_scale"] == 2.0  # 512 px positions on the 256 px grid, as micro_diffusion's 512 stage


@pytest.fixture()
def nano_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = MicroDiT_Nano_2(caption_channels=32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    composer = {"state": {"model": {f"dit.{k}": v for k, v in model.state_dict().items()}
                          | {"vae.decoder.weight": torch.zeros(1)}}}
    torch.save(composer, tmp_path / "composer.pt")
    return model, tmp_path / "composer.pt"


@pytest.fixture()
def tiny_vae(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    vae.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


@pytest.fixture()
def tiny_text_encoder(tmp_path):
    """A pretrained-style CLIP text encoder folder (random weights, 32-d states, no download): convert
    names a frozen encoder; the built-in one has no weights in a micro_diffusion checkpoint."""
    from tiny_models import clip_tokenizer, tiny_clip

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(["a red circle", "a blue square", "a photo of a cat"])
    tiny_clip(tokenizer.vocab_size, image_size=16).text_model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    return f"hf-clip:{tmp_path / 'clip'}"


def test_convert_a_composer_checkpoint_and_sample(nano_checkpoint, tiny_vae, tiny_text_encoder, tmp_path):
    model, path = nano_checkpoint
    text = tiny_text_encoder
    out = convert_micro_diffusion(path, tmp_path / "pipe", vae=f"diffusers-kl:{tiny_vae}", text_encoder=text)
    config = yaml.safe_load((out / "pipeline.yaml").read_text())
    assert config["backbone"]["preset"] == "MicroDiT_Nano_2"
    assert config["parameterization"] == {"name": "edm", "sigma_data": 0.9}
    assert config["defaults"]["sampler"] == "heun" and config["defaults"]["height"] == 64  # latent 8 x VAE f 8
    pipe = Pipeline.from_pretrained(out)
    for k, v in model.state_dict().items():
        assert torch.equal(pipe.denoiser.backbone.state_dict()[k], v), k
    images = pipe.generate(["a red circle", "a blue square"], num_inference_steps=3, seed=0)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "microdiff", "sample", "a red circle", "--checkpoint", str(out),
                        "--steps", "2", "--out", str(tmp_path / "samples"), "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "samples" / "00000.png").is_file()


def test_convert_errors(tmp_path, nano_checkpoint):
    _, path = nano_checkpoint
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def convert(*args):
        return subprocess.run([sys.executable, "-m", "microdiff", "convert", "micro-diffusion", *args],
                              capture_output=True, text=True, env=env, timeout=300)

    r = convert("--dit", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no such file" in r.stderr and r.stderr.strip().count("\n") == 0
    r = convert("--dit", str(path), "--out", str(tmp_path / "o"), "--vae", "vqvae:foo")
    assert r.returncode == 2 and "unknown autoencoder scheme" in r.stderr
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    r = convert("--dit", str(tmp_path / "other.pt"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "not a micro_diffusion DiT state dict" in r.stderr
    r = convert("--dit", str(path), "--out", str(tmp_path / "o"), "--preset", "MicroDiT_XL_2")
    assert r.returncode == 2 and "does not fit --preset MicroDiT_XL_2" in r.stderr and "MicroDiT_Nano_2" in r.stderr
