"""Issue 17, defects 6, 9 and 11 where a user meets them in `microdiff sample` and `microdiff eval
generate`: outputs are never overwritten silently and reruns notice changed inputs by content;
prompt weights follow a documented grammar in which ordinary colons stay text; non-finite values,
bad options and bad devices are one line naming the option. In-process through microdiff.cli.main
on a tiny 8 px pipeline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from microdiff.cli import main
from microdiff.diffusion import EDM, Denoiser
from microdiff.encoders.base import IdentityAutoencoder
from microdiff.encoders.text import BuiltinTextEncoder
from microdiff.models import MicroDiT_Nano_2
from microdiff.pipeline import Pipeline, SamplingDefaults
from microdiff.sample import parse_prompt
from tiny_models import perturb


def _pipe(seed: int = 0) -> Pipeline:
    torch.manual_seed(0)
    backbone = MicroDiT_Nano_2(in_channels=3, caption_channels=32, input_size=8)
    perturb(backbone, seed=seed)  # a fresh MicroDiT outputs zero; perturbed weights make prompts matter
    return Pipeline(BuiltinTextEncoder(dim=32, layers=1, heads=2, max_length=32), IdentityAutoencoder(3),
                    Denoiser(backbone.eval(), EDM(0.5)), SamplingDefaults(num_inference_steps=3, height=8, width=8))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _pipe().save_pretrained(tmp_path_factory.mktemp("ckpt") / "pipe")


def _sample(capsys, checkpoint, out, *args, prompts=("a red circle",)):
    code = main(["sample", *prompts, "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress",
                 "--device", "cpu", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(code, err, *needles):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def _snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


def _pixels(path):
    return np.asarray(Image.open(path), dtype=int)


# ----------------------------------------------------------------------------- defect 6: sample

def test_sample_into_a_folder_of_other_settings_refuses_and_touches_nothing(checkpoint, tmp_path, capsys):
    out = tmp_path / "s"
    assert _sample(capsys, checkpoint, out, "-n", 2)[0] == 0
    before = _snapshot(out)
    code, _, err = _sample(capsys, checkpoint, out, "-n", 2, "--cfg", 2)
    _one_line(code, err, "--out", "cfg", "--overwrite")
    code, _, err = _sample(capsys, checkpoint, out, "-n", 2, prompts=("a blue square",))
    _one_line(code, err, "--out", "prompts")
    assert _snapshot(out) == before


def test_a_rerun_with_the_same_settings_makes_only_the_missing_images(checkpoint, tmp_path, capsys):
    out = tmp_path / "s"
    assert _sample(capsys, checkpoint, out, "-n", 2, "--seed", 5)[0] == 0
    before = _snapshot(out)
    code, stdout, err = _sample(capsys, checkpoint, out, "-n", 2, "--seed", 5)
    assert code == 0 and "wrote 0 images" in stdout, err
    assert {k: v for k, v in _snapshot(out).items() if k.endswith(".png")} == \
        {k: v for k, v in before.items() if k.endswith(".png")}  # not even rewritten
    code, stdout, err = _sample(capsys, checkpoint, out, "-n", 4, "--seed", 5, "--batch-size", 3)
    assert code == 0 and "wrote 2 images" in stdout and "kept 2" in stdout, err
    fresh = tmp_path / "fresh"
    assert _sample(capsys, checkpoint, fresh, "-n", 4, "--seed", 5)[0] == 0
    for k in range(4):  # the added images are the ones a single run makes
        assert np.abs(_pixels(out / f"{k:05d}.png") - _pixels(fresh / f"{k:05d}.png")).max() <= 1
    log = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["file"] for r in log] == [f"{k:05d}.png" for k in range(4)] and [r["seed"] for r in log] == [5, 6, 7, 8]


def test_overwrite_replaces_our_images_of_other_settings_and_leaves_no_stale_one(checkpoint, tmp_path, capsys):
    out = tmp_path / "s"
    assert _sample(capsys, checkpoint, out, "-n", 3)[0] == 0
    code, _, err = _sample(capsys, checkpoint, out, "-n", 2, "--steps", 2, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["00000.png", "00001.png", "samples.jsonl"]
    assert Image.open(out / "00000.png").info["microdiff:steps"] == "2"


def test_files_sample_did_not_write_are_never_replaced(checkpoint, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out / "00000.png")  # a user's own image with our name
    before = _snapshot(out)
    for extra in ((), ("--overwrite",)):
        code, _, err = _sample(capsys, checkpoint, out, *extra)
        _one_line(code, err, "--out", "did not write", "00000.png")
    assert _snapshot(out) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "samples.jsonl").write_text('{"my": "data"}\n')  # the user's own log under our name
    code, _, err = _sample(capsys, checkpoint, other)
    _one_line(code, err, "--out", "samples.jsonl")
    assert (other / "samples.jsonl").read_text() == '{"my": "data"}\n'


def test_a_retrained_checkpoint_in_the_same_folder_is_other_settings(checkpoint, tmp_path, capsys):
    ckpt = shutil.copytree(checkpoint, tmp_path / "ckpt")
    out = tmp_path / "s"
    assert _sample(capsys, ckpt, out)[0] == 0
    _pipe(seed=7).save_pretrained(ckpt)  # other weights, same path
    code, _, err = _sample(capsys, ckpt, out)
    _one_line(code, err, "--out", "checkpoint_hash")
    moved = shutil.copytree(checkpoint, tmp_path / "moved")  # the same content elsewhere: the same images
    out2 = tmp_path / "s2"
    assert _sample(capsys, checkpoint, out2)[0] == 0
    code, stdout, err = _sample(capsys, moved, out2)
    assert code == 0 and "wrote 0 images" in stdout, err


# ----------------------------------------------------------------------------- defect 6: eval generate

def _generate(capsys, checkpoint, prompts, out, *extra):
    try:  # a range-checked flag ends in argparse's one usage line (SystemExit 2)
        code = main(["eval", "generate", "--prompts", str(prompts), "--checkpoint", str(checkpoint), "--out",
                     str(out), "--quiet", "--device", "cpu", *map(str, extra)])
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_generate_redoes_an_image_whose_prompt_changed(checkpoint, tmp_path, capsys):
    prompts, out = tmp_path / "p.txt", tmp_path / "gen"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    assert _generate(capsys, checkpoint, prompts, out, "--batch-size", 2)[0] == 0
    kept = (out / "images" / "1_s0.png").read_bytes()
    prompts.write_text("a red circle\na purple star\na green triangle\n")  # row 2 changed its text
    code, stdout, err = _generate(capsys, checkpoint, prompts, out, "--batch-size", 2)
    assert code == 0 and "generated 1 images (1 of them again" in stdout and "skipped 2" in stdout, err
    assert (out / "images" / "1_s0.png").read_bytes() == kept
    assert Image.open(out / "images" / "2_s0.png").info["microdiff:prompt"] == "a purple star"
    fresh = tmp_path / "fresh"
    assert _generate(capsys, checkpoint, prompts, fresh)[0] == 0
    assert np.array_equal(_pixels(out / "images" / "2_s0.png"), _pixels(fresh / "images" / "2_s0.png"))


def test_eval_generate_refuses_other_weights_and_foreign_files(checkpoint, tmp_path, capsys):
    ckpt = shutil.copytree(checkpoint, tmp_path / "ckpt")
    prompts, out = tmp_path / "p.txt", tmp_path / "gen"
    prompts.write_text("a red circle\na blue square\n")
    assert _generate(capsys, ckpt, prompts, out)[0] == 0
    _pipe(seed=7).save_pretrained(ckpt)
    code, _, err = _generate(capsys, ckpt, prompts, out)
    _one_line(code, err, "generate.json", "checkpoint", "another --out")

    out2 = tmp_path / "gen2"
    (out2 / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(out2 / "images" / "1_s0.png")  # someone else's image
    before = (out2 / "images" / "1_s0.png").read_bytes()
    code, _, err = _generate(capsys, checkpoint, prompts, out2)
    _one_line(code, err, "1_s0.png", "another --out")
    assert (out2 / "images" / "1_s0.png").read_bytes() == before


# ----------------------------------------------------------------------------- defect 9: prompt weights

@pytest.mark.parametrize("prompt, parsed", [
    ("a red circle:1.5", ("a red circle", 1.5)),
    ("blurry:-0.3", ("blurry", -0.3)),
    ("sharp:+.5", ("sharp", 0.5)),
    ("fox.png:0.5", ("fox.png", 0.5)),
    ("a clock showing 10:30", ("a clock showing 10:30", 1.0)),
    ("ratio 16:9", ("ratio 16:9", 1.0)),
    ("time: 5", ("time: 5", 1.0)),
    ("https://example.com/a.png", ("https://example.com/a.png", 1.0)),
    ("photo 2 :0.5", ("photo 2", 0.5)),
    ("a clock showing 10:30 :2", ("a clock showing 10:30", 2.0)),
    ("example.com\\:8080", ("example.com:8080", 1.0)),
    ("dir:with/colon.png", ("dir:with/colon.png", 1.0)),
])
def test_prompt_grammar(prompt, parsed):
    assert parse_prompt(prompt) == parsed


@pytest.mark.parametrize("prompt", ["blurry:nan", "blurry:inf", "blurry:-inf", "blurry:1e3", ":0.5", "  :2"])
def test_prompt_weights_that_cannot_be_meant_are_refused(prompt):
    with pytest.raises(ValueError, match="weight"):
        parse_prompt(prompt)


def test_a_time_in_a_prompt_is_text_not_a_weight_of_30(checkpoint, tmp_path, capsys):
    out = tmp_path / "s"
    code, _, err = _sample(capsys, checkpoint, out, "--seed", 1, prompts=("a clock showing 10:30",))
    assert code == 0, err
    pipe = Pipeline.from_pretrained(checkpoint)
    want = Pipeline.to_pil(pipe.generate_weighted([("a clock showing 10:30", 1.0)], seed=1))[0]
    assert np.abs(_pixels(out / "00000.png") - np.asarray(want, dtype=int)).max() <= 1


@pytest.mark.parametrize("args, needle", [
    (["--cfg", "nan"], "--cfg"),
    (["--cfg", "inf"], "--cfg"),
    (["--eta", "nan", "--sampler", "ddim"], "--eta"),
    (["--truncate-sigma", "nan"], "--truncate-sigma"),
    (["--clip-guidance-scale", "inf"], "--clip-guidance-scale"),
])
def test_non_finite_scales_are_refused(checkpoint, tmp_path, capsys, args, needle):
    code, _, err = _sample(capsys, checkpoint, tmp_path / "s", *args)
    _one_line(code, err, needle, "finite")
    assert not (tmp_path / "s").exists()


def test_non_finite_prompt_weight_through_the_cli(checkpoint, tmp_path, capsys):
    code, _, err = _sample(capsys, checkpoint, tmp_path / "s", prompts=("a red circle", "blurry:nan"))
    _one_line(code, err, "blurry:nan")
    assert not (tmp_path / "s").exists()


def test_the_api_refuses_non_finite_guidance_and_weights(checkpoint):
    pipe = Pipeline.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe.generate(["a red circle"], guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="weight"):
        pipe.generate_weighted([("a red circle", float("inf"))])


# ----------------------------------------------------------------------------- defect 11: one line each

@pytest.mark.parametrize("args, needles", [
    (["--sampler", "foo"], ["sampler", "euler", "heun", "ddim"]),
    (["--sampler", "eulr"], ["did you mean euler"]),
    (["--eta", "0.5"], ["eta", "heun", "ddim"]),  # the pipeline's default sampler is heun
    (["--eta", "0.5", "--sampler", "dpmpp_2m"], ["eta", "dpmpp_2m"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["-n", "0"], ["--num-images"]),
    (["--steps", "0"], ["--steps"]),
    (["--steps", "-3"], ["--steps"]),
    (["--size", "0"], ["--size"]),
    (["--eta", "-1", "--sampler", "ddim"], ["--eta"]),
    (["--device", "gpu"], ["--device", "did you mean cuda"]),
    (["--device", "cuda:99"], ["--device", "cuda:99"]),
    (["--compile", "--cuda-graphs"], ["--cuda-graphs"]),
    (["--dtype", "int8"], ["--dtype", "float32"]),
    (["--seed", str(2**70)], ["--seed"]),
    (["--size", "16"], ["16x16", "8x8 px"]),  # this MicroDiT's positional table is for 8 px
    (["--truncate-sigma", "100"], ["truncate_sigma", "sigma_max"]),
])
def test_bad_options_are_one_line_and_write_nothing(checkpoint, tmp_path, capsys, args, needles):
    if "--cuda-graphs" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device is there")
    code, _, err = _sample(capsys, checkpoint, tmp_path / "s", *args)
    _one_line(code, err, *needles)
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it(checkpoint, tmp_path, capsys):
    code = main(["sample", "x", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "s"), "--device", "cuda"])
    _one_line(code, capsys.readouterr().err, "--device", "CUDA is not available", "cpu")


def test_a_run_folder_as_checkpoint_points_to_its_pipeline(checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run / "pipeline")
    code, _, err = _sample(capsys, run, tmp_path / "s")
    _one_line(code, err, "no pipeline.yaml", str(run / "pipeline"))


def test_out_that_is_a_file_or_cannot_be_made(checkpoint, tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    code, _, err = _sample(capsys, checkpoint, tmp_path / "taken")
    _one_line(code, err, "--out", "a file")
    code, _, err = _sample(capsys, checkpoint, tmp_path / "taken" / "sub")
    _one_line(code, err, "--out", "cannot create")
    assert (tmp_path / "taken").read_text() == "mine"


def test_sample_with_the_weights_of_another_model(checkpoint, tmp_path, capsys):
    import yaml

    folder = shutil.copytree(checkpoint, tmp_path / "ckpt")
    torch.manual_seed(0)
    other = MicroDiT_Nano_2(in_channels=3, caption_channels=32, input_size=8, dim=48, head_dim=16)  # wider
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(folder / "denoiser.safetensors"))
    config = yaml.safe_load((folder / "pipeline.yaml").read_text())
    config.pop("files", None)  # no hash to catch it first: the shapes must
    config["version"] = 1  # (as written before format 2, which requires the hashes)
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(config))
    code, _, err = _sample(capsys, folder, tmp_path / "s")
    _one_line(code, err, "denoiser.safetensors")


@pytest.mark.parametrize("args, needle", [
    (["--steps", "0"], "--steps"),
    (["--eta", "1"], "eta"),
    (["--guidance", "nan"], "--guidance"),
    (["--device", "gpu"], "--device"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_eval_generate_bad_options(checkpoint, tmp_path, capsys, args, needle):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    code, _, err = _generate(capsys, checkpoint, prompts, tmp_path / "gen", *args)
    _one_line(code, err, needle)
    assert not (tmp_path / "gen").exists()
