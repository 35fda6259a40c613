"""Issue 17, defect 5 and the pipeline-folder parts of defect 11: no path that loads weights may
silently initialise weights that were supposed to be loaded. A pipeline folder's parts must all be
there, match the content hashes pipeline.yaml records and load strictly; every loader (text
encoders, autoencoders, backbones, convert, CLIP, init_from) refuses missing, unexpected, reshaped,
truncated or damaged weights with one line naming the file. Through the CLI where a user meets it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from microdiff.cli import main
from microdiff.diffusion import EDM, Denoiser
from microdiff.encoders.base import IdentityAutoencoder
from microdiff.encoders.text import BuiltinTextEncoder
from microdiff.models import MicroDiT_Nano_2
from microdiff.pipeline import Pipeline, SamplingDefaults
from tiny_models import clip_tokenizer, perturb, tiny_clip


def _pipe(dim: int = 32, seed: int = 0) -> Pipeline:
    torch.manual_seed(seed)
    text = BuiltinTextEncoder(dim=32, layers=1, heads=2, max_length=32)
    with torch.no_grad():
        text.token_embedding.weight.add_(0.5)  # "trained": differs from the encoder its seed rebuilds
    backbone = MicroDiT_Nano_2(in_channels=3, caption_channels=32, input_size=8, dim=dim, head_dim=16)
    perturb(backbone, seed=seed)
    return Pipeline(text, IdentityAutoencoder(3), Denoiser(backbone.eval(), EDM(0.5)),
                    SamplingDefaults(num_inference_steps=2, height=8, width=8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _pipe().save_pretrained(tmp_path_factory.mktemp("pipe") / "pipeline")


@pytest.fixture()
def folder(saved, tmp_path):
    """A fresh copy of the saved pipeline for a test to damage."""
    return Path(shutil.copytree(saved, tmp_path / "pipeline"))


def _sample(capsys, folder, tmp_path, *extra):
    code = main(["sample", "a red circle", "--checkpoint", str(folder), "--out", str(tmp_path / "out"),
                 "--no-progress", "--device", "cpu", *extra])
    return code, capsys.readouterr().err


def _one_line(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def _flip_middle(path, n=2000):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for k in range(middle, middle + n):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_hashes(folder):
    """Make the folder look like one written before content hashes were recorded."""
    config = yaml.safe_load((folder / "pipeline.yaml").read_text())
    config.pop("files", None)
    config["version"] = 1  # format 1: hashes were optional (format 2 requires them)
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


# ----------------------------------------------------------------------------- defect 5: parts must exist

def test_a_missing_text_encoder_folder_is_refused_not_reinitialised(folder, tmp_path, capsys):
    shutil.rmtree(folder / "text_encoder")
    code, err = _sample(capsys, folder, tmp_path)
    _one_line(code, err, "text_encoder")
    assert not (tmp_path / "out").exists()  # nothing sampled from a fresh encoder


def test_missing_text_encoder_weights_are_refused(folder, tmp_path, capsys):
    _drop_hashes(folder)  # the hash list would name the file too; the loader itself must refuse
    (folder / "text_encoder" / "text_encoder.safetensors").unlink()
    code, err = _sample(capsys, folder, tmp_path)
    _one_line(code, err, "text_encoder.safetensors")


def test_a_missing_denoiser_is_refused(folder, tmp_path, capsys):
    (folder / "denoiser.safetensors").unlink()
    code, err = _sample(capsys, folder, tmp_path)
    _one_line(code, err, "denoiser.safetensors")


# ----------------------------------------------------------------------------- damaged files

def test_flipped_bytes_in_the_denoiser_are_refused(folder, tmp_path, capsys):
    """safetensors loads this file without complaint; the content hash in pipeline.yaml does not."""
    _flip_middle(folder / "denoiser.safetensors")
    load_file(str(folder / "denoiser.safetensors"))  # the library alone does not notice
    code, err = _sample(capsys, folder, tmp_path)
    _one_line(code, err, "denoiser.safetensors", "damaged")


def test_a_truncated_denoiser_is_refused_with_or_without_hashes(folder, tmp_path, capsys):
    path = folder / "denoiser.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, err = _sample(capsys, folder, tmp_path)
    _one_line(code, err, "denoiser.safetensors")
    _drop_hashes(folder)
    code, err = _sample(capsys, folder, tmp_path)
    _one_line(code, err, "denoiser.safetensors", "truncated")


def test_an_empty_text_encoder_weights_file_is_refused(folder, tmp_path, capsys):
    _drop_hashes(folder)
    (folder / "text_encoder" / "text_encoder.safetensors").write_bytes(b"")
    code, err = _sample(capsys, folder, tmp_path)
    _one_line(code, err, "text_encoder.safetensors")


def test_the_weights_of_another_model_are_refused(folder, tmp_path, capsys):
    other = _pipe(dim=48, seed=1).save_pretrained(tmp_path / "other")
    shutil.copy(other / "denoiser.safetensors", folder / "denoiser.safetensors")
    code, err = _sample(capsys, folder, tmp_path)  # the recorded hash differs
    _one_line(code, err, "denoiser.safetensors")
    _drop_hashes(folder)  # an old folder: the shapes differ
    code, err = _sample(capsys, folder, tmp_path)
    _one_line(code, err, "denoiser.safetensors", "another model")


def test_a_folder_without_hashes_still_loads_and_samples_the_same(saved, folder):
    _drop_hashes(folder)
    new, old = Pipeline.from_pretrained(saved), Pipeline.from_pretrained(folder)
    torch.testing.assert_close(old.generate(["a red circle"], seed=3), new.generate(["a red circle"], seed=3),
                               atol=0, rtol=0)


def test_pipeline_yaml_records_the_hash_of_every_file_it_names(saved):
    config = yaml.safe_load((saved / "pipeline.yaml").read_text())
    assert set(config["files"]) == {"denoiser.safetensors", "text_encoder/text_encoder.json",
                                    "text_encoder/text_encoder.safetensors"}
    assert all(v.startswith("sha256:") and len(v) == 7 + 64 for v in config["files"].values())


# ----------------------------------------------------------------------------- pipeline.yaml itself

@pytest.mark.parametrize("text, needle", [
    ("format: microdiff-pipeline\nbackbone: [unclosed\n", "not valid YAML"),
    ("format: microdiff-pipeline\nversion: 1\n", "text_encoder"),
])
def test_a_pipeline_yaml_that_is_not_yaml_or_misses_keys(folder, tmp_path, capsys, text, needle):
    (folder / "pipeline.yaml").write_text(text)
    code, err = _sample(capsys, folder, tmp_path)
    _one_line(code, err, "pipeline.yaml", needle)


def test_a_misspelt_default_in_pipeline_yaml(folder, tmp_path, capsys):
    config = yaml.safe_load((folder / "pipeline.yaml").read_text())
    config["defaults"]["num_inference_step"] = config["defaults"].pop("num_inference_steps")
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(config))
    code, err = _sample(capsys, folder, tmp_path)
    _one_line(code, err, "pipeline.yaml", "num_inference_step", "did you mean num_inference_steps")


def test_a_checkpoint_that_is_a_file(folder, tmp_path, capsys):
    code, err = _sample(capsys, folder / "pipeline.yaml", tmp_path)
    _one_line(code, err, "pipeline.yaml", "a file, not a pipeline folder", str(folder))


# ----------------------------------------------------------------------------- the other loaders

def test_init_from_a_damaged_pipeline_folder_is_refused(folder):
    from microdiff.train.trainer import TrainModule, load_init_weights

    module = TrainModule(MicroDiT_Nano_2(in_channels=3, caption_channels=32, input_size=8, dim=32, head_dim=16),
                         EDM(0.5), BuiltinTextEncoder(dim=32, layers=1, heads=2, max_length=32), "B1LC", False)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    _flip_middle(folder / "text_encoder" / "text_encoder.safetensors", n=200)
    with pytest.raises(ValueError, match="text_encoder.safetensors"):
        load_init_weights(module, str(folder), use_ema=True, ignore=[])
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_init_from_refuses_weights_that_have_no_place_here(folder):
    """A pipeline whose built-in encoder was trained, into a run whose encoder does not train: its
    trained weights would be dropped and the frozen encoder stay at its seeded initialisation."""
    from microdiff.train.trainer import TrainModule, load_init_weights

    module = TrainModule(MicroDiT_Nano_2(in_channels=3, caption_channels=32, input_size=8, dim=32, head_dim=16),
                         EDM(0.5), None, "B1LC", False)
    with pytest.raises(ValueError, match="no place in this model.*text_encoder.*init_ignore_keys"):
        load_init_weights(module, str(folder), use_ema=True, ignore=[])
    report = load_init_weights(module, str(folder), use_ema=True, ignore=["text_encoder.*"])
    assert report["loaded"] == len(module.state_dict())


def _hf_clip_folder(root):
    torch.manual_seed(0)
    tokenizer = clip_tokenizer(["a red circle", "a blue square"])
    model = tiny_clip(tokenizer.vocab_size, image_size=16)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def _drop_one_tensor(path, startswith=""):
    state = load_file(str(path))
    key = sorted(k for k in state if k.startswith(startswith))[1]
    del state[key]
    save_file(state, str(path), metadata={"format": "pt"})
    return key


def test_hf_text_encoder_clip_and_clip_features_with_missing_weights_are_refused(tmp_path):
    """transformers initialises missing weights at random with only a warning; we refuse."""
    from microdiff.clip_guidance import load_clip
    from microdiff.encoders.text import load_text_encoder

    folder = _hf_clip_folder(tmp_path / "clip")
    load_text_encoder(f"hf-clip:{folder}")  # intact: loads
    _drop_one_tensor(folder / "model.safetensors", "text_model.")
    with pytest.raises(ValueError, match=r"clip.*1 missing"):
        load_text_encoder(f"hf-clip:{folder}")
    with pytest.raises(ValueError, match=r"clip.*1 missing"):
        load_clip(folder)
    from microdiff.eval.features import load_features

    with pytest.raises(ValueError, match=r"clip.*1 missing"):  # CLIP features for FID / CLIP score
        load_features(f"clip:{folder}")


def test_diffusers_autoencoder_with_missing_weights_is_refused(tmp_path):
    from diffusers import AutoencoderKL

    from microdiff.encoders.image import load_autoencoder

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(tmp_path / "vae")
    load_autoencoder(f"diffusers-kl:{tmp_path / 'vae'}")  # intact: loads
    key = _drop_one_tensor(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=rf"vae.*1 missing \(first: {key}\)"):
        load_autoencoder(f"diffusers-kl:{tmp_path / 'vae'}")


def test_our_autoencoder_and_builtin_encoder_folders_refuse_damaged_weights(tmp_path):
    from microdiff.encoders.autoencoder_io import load_trained_autoencoder, save_autoencoder
    from microdiff.encoders.vae import KLAutoencoder

    save_autoencoder(KLAutoencoder(channels=8, channel_mult=(1, 2), latent_channels=4, norm_groups=4), tmp_path / "vae")
    _as_saved_before_hashes(tmp_path / "vae" / "config.json")  # the loader itself must refuse, not the hash
    weights = tmp_path / "vae" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        load_trained_autoencoder(tmp_path / "vae")

    small = BuiltinTextEncoder(dim=32, layers=1, heads=2, max_length=32).save(tmp_path / "te")
    BuiltinTextEncoder(dim=64, layers=1, heads=2, max_length=32).save(tmp_path / "te64")
    _as_saved_before_hashes(small / "text_encoder.json")
    shutil.copy(tmp_path / "te64" / "text_encoder.safetensors", small / "text_encoder.safetensors")
    with pytest.raises(ValueError, match="text_encoder.safetensors.*another shape"):
        BuiltinTextEncoder.load(small)


def _as_saved_before_hashes(config_json):
    """An autoencoder or built-in text encoder folder as written before content hashes were recorded."""
    import json

    config = json.loads(config_json.read_text())
    config.pop("files")
    config.pop("format")
    config_json.write_text(json.dumps(config))


# ----------------------------------------------------------------------------- convert

@pytest.fixture()
def dit_file(tmp_path):
    torch.manual_seed(0)
    model = MicroDiT_Nano_2(in_channels=3, caption_channels=384)  # pixels and MiniLM's width: the parts it is given
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "dit.safetensors"))
    return tmp_path / "dit.safetensors"


def _convert(capsys, *args):
    code = main(["convert", "micro-diffusion", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.err


def test_convert_writes_through_the_one_writer_and_refuses_to_overwrite(dit_file, tmp_path, capsys):
    out = tmp_path / "converted"
    code, err = _convert(capsys, "--dit", dit_file, "--out", out, "--vae", "identity", "--text-encoder", "minilm")
    assert code == 0, err
    config = yaml.safe_load((out / "pipeline.yaml").read_text())
    assert set(config["files"]) == {"denoiser.safetensors"} and config["backbone"]["preset"] == "MicroDiT_Nano_2"
    before = (out / "denoiser.safetensors").read_bytes()
    code, err = _convert(capsys, "--dit", dit_file, "--out", out, "--vae", "identity", "--text-encoder", "minilm")
    _one_line(code, err, "--out", "--overwrite")
    code, err = _convert(capsys, "--dit", dit_file, "--out", out, "--vae", "identity", "--text-encoder", "minilm",
                         "--overwrite")
    assert code == 0 and (out / "denoiser.safetensors").read_bytes() == before, err


def test_convert_refuses_a_file_as_out_and_a_builtin_text_encoder(dit_file, tmp_path, capsys):
    code, err = _convert(capsys, "--dit", dit_file, "--out", dit_file)
    _one_line(code, err, "--out", "a file")
    code, err = _convert(capsys, "--dit", dit_file, "--out", dit_file / "sub", "--vae", "identity",
                         "--text-encoder", "minilm")
    _one_line(code, err, "--out")
    assert dit_file.is_file()
    code, err = _convert(capsys, "--dit", dit_file, "--out", tmp_path / "c", "--text-encoder", "builtin")
    _one_line(code, err, "--text-encoder", "built-in")


def test_convert_refuses_a_truncated_checkpoint(dit_file, tmp_path, capsys):
    dit_file.write_bytes(dit_file.read_bytes()[:1000])
    code, err = _convert(capsys, "--dit", dit_file, "--out", tmp_path / "c")
    _one_line(code, err, "dit.safetensors")
