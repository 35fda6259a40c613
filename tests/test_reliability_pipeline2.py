"""Issue 17, round 2 (the red team's cases in pipelines, sampling, convert and encoders): parts that do
not fit are refused when a pipeline is converted or loaded, not at the first denoiser call; convert
names the keys that differ from the closest preset; NaN weights or results never become black images
with exit status 0; our autoencoder and built-in text encoder folders record content hashes that every
load checks; format-2 pipelines must carry their hashes; a damaged image of sample's own is made again;
one sample run writes into an --out at a time; a prompt mix with nothing to guide towards and options
that would do nothing are refused. Through the CLI (microdiff.cli.main in-process) on 8 px models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from microdiff.cli import main
from microdiff.diffusion import EDM, Denoiser
from microdiff.encoders.autoencoder_io import save_autoencoder
from microdiff.encoders.base import IdentityAutoencoder
from microdiff.encoders.text import BuiltinTextEncoder, load_text_encoder
from microdiff.encoders.vae import KLAutoencoder
from microdiff.models import MicroDiT_Nano_2
from microdiff.pipeline import Pipeline, SamplingDefaults
from microdiff.sample import LOCK_NAME
from tiny_models import clip_tokenizer, perturb, tiny_clip

TEXT = "builtin:byte-d32-l1-h2-len32"


def _run(capsys, *argv):
    capsys.readouterr()  # what the test printed before (e.g. transformers' save progress) is not the command's
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines()  # transformers' loading bars cannot be turned off
             if line.strip() and not line.startswith(("Loading weights", "Writing model shards"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], err


def _pipe(in_channels=3, caption_channels=32, text_dim=32, seed=0) -> Pipeline:
    torch.manual_seed(seed)
    backbone = MicroDiT_Nano_2(in_channels=in_channels, caption_channels=caption_channels, input_size=8)
    perturb(backbone, seed=seed)
    return Pipeline(BuiltinTextEncoder(dim=text_dim, layers=1, heads=2, max_length=32), IdentityAutoencoder(3),
                    Denoiser(backbone.eval(), EDM(0.5)), SamplingDefaults(num_inference_steps=2, height=8, width=8))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _pipe().save_pretrained(tmp_path_factory.mktemp("ckpt") / "pipe")


def _sample(capsys, checkpoint, out, *extra, prompts=("a red circle",)):
    return _run(capsys, "sample", *prompts, "--checkpoint", checkpoint, "--out", out, "--no-progress",
                "--device", "cpu", *extra)


def _dit(tmp_path, name="dit.safetensors", **overrides) -> Path:
    torch.manual_seed(0)
    model = MicroDiT_Nano_2(**overrides)
    perturb(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / name))
    return tmp_path / name


def _convert(capsys, dit, out, *extra):
    return _run(capsys, "convert", "micro-diffusion", "--dit", dit, "--out", out, *extra)


def _flip(path, n=2000):
    data = bytearray(path.read_bytes())
    for k in range(len(data) // 2, len(data) // 2 + n):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def _small_vae(folder) -> Path:
    torch.manual_seed(0)
    return save_autoencoder(KLAutoencoder(channels=8, channel_mult=(1, 2), latent_channels=4, norm_groups=4), folder)


# ----------------------------------------------------------------------------- cv19-cv23: parts that fit

def test_convert_refuses_an_autoencoder_whose_latents_do_not_fit_the_dit(tmp_path, capsys):
    dit = _dit(tmp_path, in_channels=4, caption_channels=384)
    code, _, err = _convert(capsys, dit, tmp_path / "p", "--vae", "identity", "--text-encoder", "minilm")
    _one_line(code, err, "--vae identity", "3-channel", "in_channels=4", "dit.safetensors")
    assert not (tmp_path / "p").exists()
    # a local diffusers folder: its config.json says 16 latent channels (no weights are read)
    vae = tmp_path / "vae16"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 16,
                                                 "block_out_channels": [8, 8, 8, 8]}))
    code, _, err = _convert(capsys, dit, tmp_path / "p", "--vae", f"diffusers-kl:{vae}", "--text-encoder", "minilm")
    _one_line(code, err, "--vae", "16-channel", "in_channels=4")


def test_convert_refuses_a_text_encoder_of_another_width_and_the_unfitting_default(tmp_path, capsys):
    dit = _dit(tmp_path, in_channels=3, caption_channels=32)
    code, _, err = _convert(capsys, dit, tmp_path / "p", "--vae", "identity", "--text-encoder", "minilm")
    _one_line(code, err, "--text-encoder minilm", "384", "caption_channels=32")
    code, _, err = _convert(capsys, dit, tmp_path / "p", "--vae", "identity")  # DFN5B, 1024 wide
    _one_line(code, err, "--text-encoder", "(the default)", "1024", "caption_channels=32")
    assert not (tmp_path / "p").exists()


def test_convert_takes_the_image_size_from_our_own_autoencoders_downsampling(tmp_path, capsys):
    vae = _small_vae(tmp_path / "vae")  # latent 4, downsampling 2
    dit = _dit(tmp_path, in_channels=4, caption_channels=384)  # latent 8
    code, _, err = _convert(capsys, dit, tmp_path / "p", "--vae", f"microdiff-vae:{vae}", "--text-encoder", "minilm")
    assert code == 0, err
    defaults = yaml.safe_load((tmp_path / "p" / "pipeline.yaml").read_text())["defaults"]
    assert (defaults["height"], defaults["width"]) == (16, 16)  # latent 8 x 2, not 8


@pytest.mark.parametrize("what", ["latents", "captions"])
def test_loading_refuses_parts_that_do_not_fit_naming_pipeline_yaml(tmp_path, capsys, what):
    pipe = _pipe(in_channels=4) if what == "latents" else _pipe(caption_channels=48)
    folder = pipe.save_pretrained(tmp_path / "pipe")
    code, _, err = _sample(capsys, folder, tmp_path / "s")
    needles = ("3-channel latents", "in_channels=4") if what == "latents" else ("32 wide", "caption_channels=48")
    _one_line(code, err, "pipeline.yaml", "do not fit", "autoencoder identity", "text encoder builtin", *needles)
    assert not (tmp_path / "s").exists()


def test_pixel_space_with_other_than_three_channels_is_refused_not_written_as_rgba(tmp_path, capsys):
    dit = _dit(tmp_path, in_channels=4, caption_channels=384)
    code, _, err = _convert(capsys, dit, tmp_path / "p", "--vae", "identity:4", "--text-encoder", "minilm")
    _one_line(code, err, "--vae identity:4", "not RGB")
    pipe = _pipe(in_channels=4)
    pipe.autoencoder = IdentityAutoencoder(4)
    folder = pipe.save_pretrained(tmp_path / "pipe")
    code, _, err = _sample(capsys, folder, tmp_path / "s")
    _one_line(code, err, "pipeline.yaml", "identity:4", "not RGB")
    with pytest.raises(ValueError, match="not RGB"):
        pipe.generate(["a red circle"], num_inference_steps=1)  # built in memory: refused when it decodes


@pytest.mark.parametrize("args, needles", [
    (["--vae", "microdiff-vae:/no/such/vae"], ("--vae", "/no/such/vae", "does not exist")),
    (["--vae", "diffusers-kl:/no/such/vae"], ("--vae", "does not exist")),
    (["--vae", "diffusers-kl:owner/vae?scale=0"], ("--vae", "scale=0", "non-zero")),
    (["--vae", "diffusers-kl:owner/vae?subfolder=vae&sclae=2"], ("--vae", "unknown option 'sclae'")),
    (["--text-encoder", "hf:/no/such/encoder"], ("--text-encoder", "does not exist")),
    (["--text-encoder", "hf-clip:owner/clip?layer=top"], ("--text-encoder", "layer='top'")),
    (["--text-encoder", "openclip:ViT-B-32"], ("--text-encoder", "random weights")),
])
def test_convert_refuses_identifiers_that_can_never_load(tmp_path, capsys, args, needles):
    dit = _dit(tmp_path, in_channels=4, caption_channels=384)
    base = {"--vae": "diffusers-kl:owner/vae", "--text-encoder": "minilm"}
    base[args[0]] = args[1]
    code, _, err = _convert(capsys, dit, tmp_path / "p", *[x for kv in base.items() for x in kv])
    _one_line(code, err, *needles)
    assert not (tmp_path / "p").exists()


def test_convert_overwrite_leaves_no_stale_part_of_the_earlier_pipeline(tmp_path, capsys):
    vae = _small_vae(tmp_path / "vae")
    dit = _dit(tmp_path, in_channels=4, caption_channels=384)
    code, _, err = _convert(capsys, dit, tmp_path / "p", "--vae", f"microdiff-vae:{vae}", "--text-encoder", "minilm")
    assert code == 0 and (tmp_path / "p" / "autoencoder").is_dir(), err
    code, _, err = _convert(capsys, dit, tmp_path / "p", "--vae", "diffusers-kl:owner/vae", "--text-encoder",
                            "minilm", "--overwrite")
    assert code == 0, err
    assert not (tmp_path / "p" / "autoencoder").exists()


# ----------------------------------------------------------------------------- cv4, cv5, cv13: which keys

@pytest.fixture()
def nano_state(tmp_path):
    return load_file(str(_dit(tmp_path, in_channels=3, caption_channels=384)))


@pytest.mark.parametrize("edit, needles", [
    ("missing", ("1 missing (first: final_layer.linear.weight)", "closest, MicroDiT_Nano_2")),
    ("extra", ("1 unexpected (first: blocks.0.extra)", "closest, MicroDiT_Nano_2")),
])
def test_convert_names_the_missing_or_extra_key_and_the_closest_preset(tmp_path, capsys, nano_state, edit, needles):
    if edit == "missing":
        del nano_state["final_layer.linear.weight"]
    else:
        nano_state["blocks.0.extra"] = torch.zeros(3)
    save_file(nano_state, str(tmp_path / "edited.safetensors"))
    code, _, err = _convert(capsys, tmp_path / "edited.safetensors", tmp_path / "p", "--vae", "identity",
                            "--text-encoder", "minilm")
    _one_line(code, err, "edited.safetensors", *needles)
    assert "pass --preset" not in err
    code, _, err = _convert(capsys, tmp_path / "edited.safetensors", tmp_path / "p", "--vae", "identity",
                            "--text-encoder", "minilm", "--preset", "MicroDiT_Nano_2")
    _one_line(code, err, "does not fit --preset MicroDiT_Nano_2", needles[0])
    assert "pass --preset" not in err


def test_convert_with_the_wrong_preset_says_which_one_fits(tmp_path, capsys, nano_state):
    save_file(nano_state, str(tmp_path / "nano.safetensors"))
    code, _, err = _convert(capsys, tmp_path / "nano.safetensors", tmp_path / "p", "--vae", "identity",
                            "--text-encoder", "minilm", "--preset", "MicroDiT_Tiny_2")
    _one_line(code, err, "does not fit --preset MicroDiT_Tiny_2", "it is a MicroDiT_Nano_2 checkpoint",
              "leave --preset out")


# ----------------------------------------------------------------------------- sa43: sample's own damaged image

@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_image_of_our_own_is_made_again(checkpoint, tmp_path, capsys, damage):
    out = tmp_path / "s"
    code, _, err = _sample(capsys, checkpoint, out, "-n", 2)
    assert code == 0, err
    good = np.asarray(Image.open(out / "00000.png"))
    other = (out / "00001.png").stat().st_mtime_ns
    data = (out / "00000.png").read_bytes()
    if damage == "truncated":  # the header and text chunks still read: only the CRCs tell
        data = data[:-30]
    else:
        data = data[:-40] + bytes(b ^ 0xFF for b in data[-40:-30]) + data[-30:]
    (out / "00000.png").write_bytes(data)
    code, stdout, err = _sample(capsys, checkpoint, out, "-n", 2)
    assert code == 0, err
    assert "damaged" in stdout and "00000.png" in stdout and "making 1 image(s) again" in stdout, stdout
    assert np.array_equal(np.asarray(Image.open(out / "00000.png")), good)
    assert (out / "00001.png").stat().st_mtime_ns == other  # the intact one is kept


def test_a_damaged_image_sample_did_not_list_is_refused_as_damaged(checkpoint, tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    Image.new("RGB", (8, 8)).save(out / "00000.png")
    (out / "00000.png").write_bytes((out / "00000.png").read_bytes()[:20])
    code, _, err = _sample(capsys, checkpoint, out)
    _one_line(code, err, "00000.png: damaged", "samples.jsonl does not list it")
    assert len((out / "00000.png").read_bytes()) == 20


# ----------------------------------------------------------------------------- cv6, cv25, cg10: NaN is no image

def test_convert_refuses_nan_weights_naming_the_file_and_tensor(tmp_path, capsys, nano_state):
    nano_state["final_layer.linear.weight"][0, 0] = float("nan")
    save_file(nano_state, str(tmp_path / "nan.safetensors"))
    code, _, err = _convert(capsys, tmp_path / "nan.safetensors", tmp_path / "p", "--vae", "identity",
                            "--text-encoder", "minilm")
    _one_line(code, err, "nan.safetensors", "tensor final_layer.linear.weight holds 1 NaN/inf")
    assert not (tmp_path / "p").exists()


def test_a_pipeline_with_nan_weights_writes_no_black_image(tmp_path, capsys):
    pipe = _pipe()
    with torch.no_grad():
        pipe.denoiser.backbone.final_layer.linear.weight.fill_(float("nan"))
    folder = pipe.save_pretrained(tmp_path / "pipe")
    code, _, err = _sample(capsys, folder, tmp_path / "s")
    _one_line(code, err, "denoiser.safetensors", "final_layer.linear.weight", "NaN/inf")
    assert not (tmp_path / "s").exists()  # refused when the pipeline loads, before --out is made


def test_sampling_that_diverges_is_an_error_naming_the_checkpoint_not_a_black_png(checkpoint, tmp_path, capsys):
    code, _, err = _sample(capsys, checkpoint, tmp_path / "s", "-n", 3, "--batch-size", 2, "--cfg", "1e300")
    _one_line(code, err, "NaN/inf", str(checkpoint), "images 0..1", "nothing written")
    assert not list((tmp_path / "s").glob("*.png"))


def test_the_api_raises_on_non_finite_results(checkpoint):
    pipe = Pipeline.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="NaN/inf"):
        pipe.generate(["a red circle"], guidance_scale=1e300, num_inference_steps=2)


def test_a_damaged_clip_model_is_refused_before_sampling(checkpoint, tmp_path, capsys):
    torch.manual_seed(0)
    tokenizer = clip_tokenizer(["a red circle", "a blue square"])
    tiny_clip(tokenizer.vocab_size, image_size=16).save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    weights = tmp_path / "clip" / "model.safetensors"
    state = load_file(str(weights))
    state["vision_model.pre_layrnorm.bias"][:] = float("nan")  # what cg10's flipped bytes gave
    save_file(state, str(weights), metadata={"format": "pt"})
    code, _, err = _sample(capsys, checkpoint, tmp_path / "s", "--clip-model", tmp_path / "clip", "--cutn", 2)
    lines = [line for line in err.strip().splitlines() if "preprocessor_config" not in line]  # a known warning
    _one_line(code, "\n".join(lines), "clip", "vision_model.pre_layrnorm.bias", "NaN/inf")
    assert not (tmp_path / "s").exists()


def test_clip_guidance_that_diverges_names_the_clip_model(checkpoint, tmp_path, capsys):
    torch.manual_seed(0)
    tokenizer = clip_tokenizer(["a red circle", "a blue square"])
    tiny_clip(tokenizer.vocab_size, image_size=16).save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    code, _, err = _sample(capsys, checkpoint, tmp_path / "s", "--clip-model", tmp_path / "clip", "--cutn", 1,
                           "--clip-guidance-scale", "1e300")
    lines = [line for line in err.strip().splitlines() if "preprocessor_config" not in line]
    _one_line(code, "\n".join(lines), "NaN/inf", f"CLIP model {tmp_path / 'clip'}", str(checkpoint))
    assert not list((tmp_path / "s").glob("*.png"))


# ----------------------------------------------------------------------------- ae17-ae19, ae22: our folders' hashes

def _precompute(capsys, tmp_path, autoencoder, text=TEXT):
    return _run(capsys, "data", "precompute", "shapes:4", "--out", tmp_path / "lat", "--autoencoder", autoencoder,
                "--text-encoder", text, "--resolution", 16, "--no-progress")


def test_a_damaged_autoencoder_folder_is_refused_where_it_is_used(tmp_path, capsys):
    vae = _small_vae(tmp_path / "vae")
    assert "model.safetensors" in json.loads((vae / "config.json").read_text())["files"]
    _flip(vae / "model.safetensors")
    code, _, err = _precompute(capsys, tmp_path, f"microdiff-vae:{vae}")
    _one_line(code, err, "model.safetensors", "damaged or changed", "config.json")


def test_an_autoencoder_whose_hashes_were_deleted_is_refused_and_an_old_one_loads(tmp_path, capsys):
    from microdiff.encoders.image import load_autoencoder

    vae = _small_vae(tmp_path / "vae")
    config = json.loads((vae / "config.json").read_text())
    del config["files"]
    (vae / "config.json").write_text(json.dumps(config))
    code, _, err = _precompute(capsys, tmp_path, f"microdiff-vae:{vae}")
    _one_line(code, err, "config.json", "format 2", "'files'")
    config.pop("format")  # as written before format 2: no hash to check, still loads
    (vae / "config.json").write_text(json.dumps(config))
    assert load_autoencoder(f"microdiff-vae:{vae}").latent_channels == 4


def test_the_vqgan_scheme_on_a_vae_folder_is_refused(tmp_path, capsys):
    vae = _small_vae(tmp_path / "vae")
    code, _, err = _precompute(capsys, tmp_path, f"microdiff-vqgan:{vae}")
    _one_line(code, err, "holds a vae autoencoder, not a vqgan", f"microdiff-vae:{vae}")


def test_a_damaged_builtin_text_encoder_folder_is_refused(tmp_path, capsys):
    folder = BuiltinTextEncoder(dim=32, layers=1, heads=2, max_length=32).save(tmp_path / "te")
    assert "text_encoder.safetensors" in json.loads((folder / "text_encoder.json").read_text())["files"]
    _flip(folder / "text_encoder.safetensors", n=200)
    with pytest.raises(ValueError, match="text_encoder.safetensors: damaged or changed"):
        load_text_encoder(folder)
    code, _, err = _precompute(capsys, tmp_path, "identity", text=folder)
    _one_line(code, err, "text_encoder.safetensors", "damaged or changed")


# ----------------------------------------------------------------------------- z3: format 2 requires hashes

@pytest.mark.parametrize("edit", ["no files", "denoiser unlisted"])
def test_a_format_2_pipeline_without_its_hashes_is_refused(checkpoint, tmp_path, capsys, edit):
    import shutil

    folder = Path(shutil.copytree(checkpoint, tmp_path / "pipe"))
    config = yaml.safe_load((folder / "pipeline.yaml").read_text())
    assert config["version"] == 2 and "denoiser.safetensors" in config["files"]
    if edit == "no files":
        del config["files"]
    else:
        del config["files"]["denoiser.safetensors"]
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _flip(folder / "denoiser.safetensors", n=200)
    code, _, err = _sample(capsys, folder, tmp_path / "s")
    _one_line(code, err, "pipeline.yaml", "format version 2", "'files'")
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- sa49: one writer per --out

def test_a_second_sample_run_into_a_locked_out_is_refused(checkpoint, tmp_path, capsys):
    out = tmp_path / "s"
    code, _, err = _sample(capsys, checkpoint, out, "-n", 2)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    holder = ("import sys, time; from microdiff.utils.locks import FolderLock; "
              f"lock = FolderLock(sys.argv[1], {LOCK_NAME!r}, 'microdiff sample').acquire(); "
              "print('held', flush=True); time.sleep(60)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", holder, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        code, _, err = _sample(capsys, checkpoint, out, "-n", 4, "--seed", 5, "--overwrite")
        _one_line(code, err, f"--out {out}", "another microdiff sample", f"process {proc.pid}")
        assert {p.name: p.read_bytes() for p in out.glob("*.png")} == before
    finally:
        proc.kill()
        proc.wait()
    code, _, err = _sample(capsys, checkpoint, out, "-n", 3)  # the holder is gone: the lock is free again
    assert code == 0, err


# ----------------------------------------------------------------------------- sa16 and options that do nothing

def test_prompt_weights_that_are_all_zero_are_refused(checkpoint, tmp_path, capsys):
    code, _, err = _sample(capsys, checkpoint, tmp_path / "s", prompts=("a red circle:0", "a blue square:0"))
    _one_line(code, err, "prompt weights", "all 2 are 0")
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="all 1 are 0"):
        Pipeline.from_pretrained(checkpoint).generate_weighted([("a red circle", 0.0)])


@pytest.mark.parametrize("prompts", [("a red circle:-1",), ("a red circle:1", "a blue square:-1")])
def test_only_negative_or_zero_sum_weights_still_guide(checkpoint, tmp_path, capsys, prompts):
    code, _, err = _sample(capsys, checkpoint, tmp_path / "s", prompts=prompts)
    assert code == 0, err


@pytest.mark.parametrize("args, needles", [
    (["--cutn", "4"], ("--cutn needs --clip-model",)),
    (["--clip-guidance-scale", "100"], ("--clip-guidance-scale needs --clip-model",)),
    (["--clip-model", "some/clip", "--clip-guidance-scale", "0"], ("--clip-guidance-scale 0", "no effect")),
])
def test_clip_options_that_would_do_nothing_are_refused(checkpoint, tmp_path, capsys, args, needles):
    code, _, err = _sample(capsys, checkpoint, tmp_path / "s", *args)
    _one_line(code, err, *needles)
    assert not (tmp_path / "s").exists()
