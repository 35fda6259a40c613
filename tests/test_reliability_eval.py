"""Issue 17 (round 2) where a user meets it in the `microdiff eval` commands: one reader of image files with
one error and one --skip-bad (fid, clip-score, memorization); range-checked numeric flags; messages that
name the file, folder or model; output folders that are new, empty or the command's own (same settings),
locked while written; output files replaced only when the command wrote them; eval generate replaces only
its own images and says which; options that would be ignored, NaN features and degenerate inputs refused.

In-process through microdiff.cli.main on tiny 16 px folders, pixels features, a tiny random CLIP and an
8 px pipeline, so nothing is downloaded or trained."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from microdiff.cli import main
from microdiff.utils.locks import FolderLock
from tiny_models import clip_tokenizer, perturb, tiny_clip

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow star", "a black square", "a big circle"]


# ----------------------------------------------------------------------------- helpers and fixtures

def _cli(capsys, *args):
    try:  # a range-checked flag ends in argparse's one usage line (SystemExit 2)
        code = main([str(a) for a in args])
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(result, *needles) -> str:
    code, _, err = result
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0].split(": error: ", 1)[1]


def _ok(result) -> str:
    code, out, err = result
    assert code == 0, err
    return out


def _images(folder, n, seed, size=16):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(PROMPTS[i % len(PROMPTS)])  # a caption: a training source
    return folder


def _index(folder, n, seed):
    """folder/images/*.png and folder/index.csv (file, prompt), as eval generate writes them."""
    _images(folder / "images", n, seed)
    with open(folder / "index.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "seed", "prompt", "file"])
        writer.writerows([i, 0, PROMPTS[i % len(PROMPTS)], f"{i:05d}.png"] for i in range(n))
    return folder / "index.csv"


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _clip_folder(path, nan=False):
    import transformers

    tok = clip_tokenizer(PROMPTS)
    torch.manual_seed(4)
    model = tiny_clip(len(tok), image_size=16)
    if nan:  # damaged weights: what flipped bytes in model.safetensors can give (safetensors has no checksum)
        with torch.no_grad():
            model.visual_projection.weight.fill_(float("nan"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor  # no torchvision
    cls(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return _clip_folder(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    from microdiff.diffusion import EDM, Denoiser
    from microdiff.encoders.base import IdentityAutoencoder
    from microdiff.encoders.text import BuiltinTextEncoder
    from microdiff.models import MicroDiT_Nano_2
    from microdiff.pipeline import Pipeline, SamplingDefaults

    torch.manual_seed(0)
    backbone = MicroDiT_Nano_2(in_channels=3, caption_channels=32, input_size=8)
    perturb(backbone)
    pipe = Pipeline(BuiltinTextEncoder(dim=32, layers=1, heads=2, max_length=32), IdentityAutoencoder(3),
                    Denoiser(backbone.eval(), EDM(0.5)), SamplingDefaults(num_inference_steps=2, height=8, width=8))
    return pipe.save_pretrained(tmp_path_factory.mktemp("pipe") / "pipe")


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "a", 8, 0)
    _images(tmp_path / "b", 8, 1)
    return tmp_path


FID = ("eval", "fid", "--quiet", "--features", "pixels:4")
MEM = ("eval", "memorization", "--quiet", "--features", "pixels:4", "--k", "2")


def _clip(clip_dir, *args):
    return ("eval", "clip-score", "--quiet", "--features", f"clip:{clip_dir}", *args)


def _gen(pipe_dir, prompts, out, *args):
    return ("eval", "generate", "--quiet", "--device", "cpu", "--prompts", prompts, "--checkpoint", pipe_dir,
            "--out", out, *args)


# ----------------------------------------------------------------------------- 1, 2: one image reader, one --skip-bad

def test_a_truncated_image_is_the_same_one_line_error_in_fid_clip_score_and_memorization(here, clip_dir, capsys):
    """me17: memorization said only 'Truncated File Read'. Every eval command reads through eval/images.py."""
    index = _index(here / "g", 6, 2)
    (here / "g" / "images" / "00001.png").write_bytes((here / "g" / "images" / "00001.png").read_bytes()[:20])
    gen = here / "g" / "images"
    fid = _one_line(_cli(capsys, *FID, "--gen", gen, "--ref", "a"), "00001.png: unreadable image", "--skip-bad")
    mem = _one_line(_cli(capsys, *MEM, "--gen", gen, "--train", "a", "--out", "m"), "00001.png")
    clip = _one_line(_cli(capsys, *_clip(clip_dir, "--prompts", index)), "00001.png")
    assert fid == mem == clip
    assert not (here / "m" / "memorization.json").exists()

    out = _ok(_cli(capsys, *FID, "--gen", gen, "--ref", "a", "--skip-bad", "--out", "fid.json"))
    assert "1 unreadable image(s) left out" in out
    assert json.loads((here / "fid.json").read_text())["gen_skipped"][0][0].endswith("00001.png")
    out = _ok(_cli(capsys, *MEM, "--gen", gen, "--train", "a", "--out", "m", "--skip-bad"))
    assert "1 unreadable image(s) left out" in out
    report = json.loads((here / "m" / "memorization.json").read_text())
    assert report["n_generated"] == 5 and report["gen_skipped"][0][0].endswith("00001.png")


def test_clip_score_has_skip_bad_and_lists_what_it_left_out(here, clip_dir, capsys):
    """cs20: the message suggested --skip-bad, which clip-score did not have."""
    index = _index(here / "g", 6, 2)
    (here / "g" / "images" / "00003.png").write_bytes(b"")
    message = _one_line(_cli(capsys, *_clip(clip_dir, "--prompts", index)), "00003.png", "--skip-bad")
    assert "empty" in message or "0 bytes" in message
    out = _ok(_cli(capsys, *_clip(clip_dir, "--prompts", index, "--skip-bad")))
    assert "1 unreadable image(s) left out" in out and "00003.png" in out
    result = json.loads((here / "g" / "clip_score.json").read_text())
    assert result["count"] == 5 and result["pairs"] == 6 and result["skipped"][0][0].endswith("00003.png")
    rows = list(csv.DictReader(open(here / "g" / "clip_score.csv")))
    assert [r["file"] for r in rows] == [f"{i:05d}.png" for i in (0, 1, 2, 4, 5)]
    for name in [f"{i:05d}.png" for i in range(6) if i != 5]:
        (here / "g" / "images" / name).write_bytes(b"")
    assert _ok(_cli(capsys, *_clip(clip_dir, "--prompts", index, "--skip-bad")))  # one image left is enough
    (here / "g" / "images" / "00005.png").write_bytes(b"")
    _one_line(_cli(capsys, *_clip(clip_dir, "--prompts", index, "--skip-bad")), "none of its 6 images")
    _, help_text, _ = _cli(capsys, "eval", "clip-score", "--help")
    assert "--skip-bad" in help_text


# ----------------------------------------------------------------------------- 3: range-checked flags

@pytest.mark.parametrize("command, flag, value", [
    ("fid", "--resolution", "-5"), ("fid", "--resolution", "0"), ("fid", "--k", "0"), ("fid", "--batch-size", "0"),
    ("clip-score", "--resolution", "0"), ("clip-score", "--scale", "nan"), ("clip-score", "--scale", "-1"),
    ("clip-score", "--batch-size", "0"),
    ("memorization", "--k", "0"), ("memorization", "--resolution", "0"), ("memorization", "--batch-size", "0"),
    ("memorization", "--pairs", "-1"), ("memorization", "--workers", "-1"), ("memorization", "--train-seed", "-1"),
    ("generate", "--steps", "0"), ("generate", "--size", "0"), ("generate", "--batch-size", "0"),
    ("generate", "--limit", "0"), ("generate", "--guidance", "nan"), ("generate", "--eta", "-1"),
    ("generate", "--eta", "inf"),
])
def test_every_numeric_flag_is_range_checked_where_it_is_read(here, capsys, command, flag, value):
    """cs17, ef18, ef21, ef24: --resolution 0 was ignored, -5 blamed on the images."""
    base = {"fid": ("--gen", "a", "--ref", "b", "--features", "pixels:4"),
            "clip-score": ("--prompts", "index.csv"),
            "memorization": ("--gen", "a", "--train", "b", "--features", "pixels:4", "--out", "m"),
            "generate": ("--prompts", "p.txt", "--checkpoint", "pipe", "--out", "g")}[command]
    message = _one_line(_cli(capsys, "eval", command, *base, f"{flag}={value}", "--quiet"), f"argument {flag}")
    assert "png" not in message and not (here / "m").exists() and not (here / "g").exists()


# ----------------------------------------------------------------------------- 4: messages that name the file

def test_nan_in_a_training_features_file_names_the_file_and_row(here, capsys):
    """me12: 'bank_shard contains NaN or infinite values'."""
    nan = np.ones((8, 48))
    nan[3, 5] = np.nan
    np.save(here / "nan.npy", nan)
    _one_line(_cli(capsys, *MEM, "--gen", "a", "--train", "nan.npy", "--out", "m"), "--train nan.npy", "row 3")


def test_nan_features_of_damaged_clip_weights_name_the_model_folder(here, capsys):
    """cs22: 'image_features contains NaN or infinite values'."""
    index = _index(here / "g", 4, 2)
    broken = _clip_folder(here / "clip_nan", nan=True)
    capsys.readouterr()  # save_pretrained's progress bar
    _one_line(_cli(capsys, *_clip(broken, "--prompts", index)), f"clip:{broken}", "NaN", "weights")


def test_too_few_images_name_the_folder_and_the_minimum(here, capsys):
    """ef15: 'features has 1 sample(s); a covariance needs at least 2 rows'."""
    (here / "one").mkdir()
    shutil.copy(here / "a" / "00000.png", here / "one")
    _one_line(_cli(capsys, *FID, "--gen", "one", "--ref", "a"), "--gen one", "1 readable image", "at least 2")
    _one_line(_cli(capsys, *FID, "--gen", "a", "--ref", "one"), "--ref one", "at least 2")


def test_a_feature_space_mismatch_suggests_a_valid_features_spec(here, capsys):
    """me10: memorization suggested '--features pixels-8', which is not a spec (pixels:8 is)."""
    _ok(_cli(capsys, *MEM, "--gen", "a", "--train", "b", "--features", "pixels:8", "--save-train-features", "t8.npz",
             "--out", "m2"))
    message = _one_line(_cli(capsys, *MEM, "--gen", "a", "--train", "t8.npz", "--out", "m3"), "--features pixels:8")
    assert "--features pixels-8" not in message
    _ok(_cli(capsys, *FID, "--ref", "b", "--features", "pixels:8", "--save-ref-stats", "r8.npz"))
    _one_line(_cli(capsys, *FID, "--gen", "a", "--ref", "r8.npz"), "r8.npz", "--features pixels:8")


def test_clip_score_says_no_such_file_for_a_missing_prompts_file(here, clip_dir, capsys):
    """cs4: 'nope.csv: not an index.csv ... pass --images'."""
    _one_line(_cli(capsys, *_clip(clip_dir, "--prompts", "nope.csv")), "--prompts nope.csv", "no such file")


# ----------------------------------------------------------------------------- 5: output folders

def test_memorization_out_is_new_empty_or_its_own_report_with_the_same_settings(here, capsys):
    """an/me8/me16 (D16): pixels:8 then pixels:4 into one --out replaced the report; foreign folders were used."""
    _ok(_cli(capsys, *MEM, "--gen", "a", "--train", "b", "--features", "pixels:8", "--out", "m"))
    before = _snapshot(here / "m")
    _one_line(_cli(capsys, *MEM, "--gen", "a", "--train", "b", "--out", "m"), "--out m", "pixels-8 -> pixels-4")
    _one_line(_cli(capsys, *MEM, "--gen", "a", "--train", "b", "--features", "pixels:8", "--k", "3", "--out", "m"),
              "k 2 -> 3")
    assert _snapshot(here / "m") == before
    _ok(_cli(capsys, *MEM, "--gen", "a", "--train", "b", "--features", "pixels:8", "--out", "m"))  # the same: redone
    assert _snapshot(here / "m")["memorization.json"] == before["memorization.json"]

    (here / "mine").mkdir()
    (here / "mine" / "notes.txt").write_text("my notes")
    _one_line(_cli(capsys, *MEM, "--gen", "a", "--train", "b", "--out", "mine"), "--out mine", "notes.txt")
    assert sorted(p.name for p in (here / "mine").iterdir()) == ["notes.txt"]
    (here / "theirs").mkdir()
    (here / "theirs" / "memorization.json").write_text('{"mine": 1}')  # a report of someone else's
    _one_line(_cli(capsys, *MEM, "--gen", "a", "--train", "b", "--out", "theirs"), "memorization.json")
    assert (here / "theirs" / "memorization.json").read_text() == '{"mine": 1}'

    with FolderLock(here / "m", ".lock", "test"):  # another process writing there
        _one_line(_cli(capsys, *MEM, "--gen", "a", "--train", "b", "--features", "pixels:8", "--out", "m"),
                  "--out", "writing to this folder")


def test_eval_generate_refuses_a_foreign_folder_and_a_locked_one(here, pipe_dir, capsys):
    """eg12: eval generate wrote images/, index.csv and generate.json into a user's folder."""
    (here / "p.txt").write_text("a red circle\na blue square\n")
    (here / "mine").mkdir()
    (here / "mine" / "index.csv").write_text("my,own,table\n")
    _one_line(_cli(capsys, *_gen(pipe_dir, "p.txt", "mine")), "--out mine", "index.csv")
    assert _snapshot(here / "mine") == {"index.csv": b"my,own,table\n"}
    _ok(_cli(capsys, *_gen(pipe_dir, "p.txt", "g")))
    with FolderLock(here / "g", ".lock", "test"):
        _one_line(_cli(capsys, *_gen(pipe_dir, "p.txt", "g")), "writing to this folder")
    assert "skipped 2 that existed" in _ok(_cli(capsys, *_gen(pipe_dir, "p.txt", "g")))
    shutil.copy(here / "a" / "00000.png", here / "g" / "images" / "photo.png")  # eval fid would score it too
    _one_line(_cli(capsys, *_gen(pipe_dir, "p.txt", "g")), "photo.png", "not an image that microdiff eval generate")
    (here / "g" / "images" / "notes.txt").write_text("not an image: never read, never written")
    (here / "g" / "images" / "photo.png").unlink()
    assert "skipped 2 that existed" in _ok(_cli(capsys, *_gen(pipe_dir, "p.txt", "g")))


# ----------------------------------------------------------------------------- 6: output files

def test_named_output_files_are_replaced_only_when_the_command_wrote_them(here, clip_dir, capsys):
    """di6-like, ef16: an existing --out / --save-ref-stats file was overwritten even when the user made it."""
    (here / "user.json").write_text('{"my": "results"}')
    _one_line(_cli(capsys, *FID, "--gen", "a", "--ref", "b", "--out", "user.json"), "--out user.json")
    assert (here / "user.json").read_text() == '{"my": "results"}'
    for _ in range(2):  # its own file: replaced
        _ok(_cli(capsys, *FID, "--gen", "a", "--ref", "b", "--out", "fid.json"))
    assert json.loads((here / "fid.json").read_text())["written_by"] == "microdiff eval fid"

    np.savez(here / "theirs.npz", mu=np.zeros(48), sigma=np.eye(48))  # pytorch-fid's layout, no stamp
    before = (here / "theirs.npz").read_bytes()
    _one_line(_cli(capsys, *FID, "--ref", "b", "--save-ref-stats", "theirs.npz"), "--save-ref-stats theirs.npz")
    assert (here / "theirs.npz").read_bytes() == before
    out = _ok(_cli(capsys, *FID, "--gen", "a", "--ref", "theirs.npz"))  # still read as before
    assert "does not record its feature space" in out
    for _ in range(2):
        _ok(_cli(capsys, *FID, "--ref", "b", "--save-ref-stats", "ours.npz"))
    _ok(_cli(capsys, *FID, "--gen", "a", "--ref", "ours.npz"))

    index = _index(here / "g", 3, 2)
    (here / "g" / "clip_score.csv").write_text("a user's table\n")
    _one_line(_cli(capsys, *_clip(clip_dir, "--prompts", index)), "clip_score.csv")
    (here / "g" / "clip_score.csv").unlink()
    _one_line(_cli(capsys, *_clip(clip_dir, "--prompts", index, "--out", "user.json")), "--out user.json")
    for _ in range(2):
        _ok(_cli(capsys, *_clip(clip_dir, "--prompts", index)))
    assert (here / "user.json").read_text() == '{"my": "results"}'

    (here / "train.npz").write_bytes(before)
    _one_line(_cli(capsys, *MEM, "--gen", "a", "--train", "b", "--save-train-features", "train.npz", "--out", "m"),
              "--save-train-features train.npz")
    assert (here / "train.npz").read_bytes() == before and not (here / "m").exists()
    for _ in range(2):
        _ok(_cli(capsys, *MEM, "--gen", "a", "--train", "b", "--save-train-features", "m/train.npz", "--out", "m"))


# ----------------------------------------------------------------------------- 7: eval generate replaces only its own

def test_eval_generate_names_the_images_it_made_again_and_never_replaces_others(here, pipe_dir, capsys):
    """eg3: a changed prompt's image is made again (documented): the summary says which; a PNG of microdiff
    sample (text chunks, but not eval generate's) put into images/ is refused, never replaced."""
    prompts = here / "p.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    _ok(_cli(capsys, *_gen(pipe_dir, prompts, "g")))
    prompts.write_text("a red circle\na purple star\na green triangle\n")
    out = _ok(_cli(capsys, *_gen(pipe_dir, prompts, "g")))
    assert "generated 1 images (1 of them again" in out and "2_s0.png" in out
    assert Image.open(here / "g" / "images" / "2_s0.png").text["microdiff:prompt"] == "a purple star"

    _ok(_cli(capsys, "sample", "a blue square", "--checkpoint", pipe_dir, "--out", "s", "--no-progress",
             "--device", "cpu"))
    shutil.copy(here / "s" / "00000.png", here / "g" / "images" / "3_s0.png")
    before = (here / "g" / "images" / "3_s0.png").read_bytes()
    prompts.write_text("a red circle\na purple star\na blue square\n")
    _one_line(_cli(capsys, *_gen(pipe_dir, prompts, "g")), "3_s0.png", "not an image that microdiff eval generate")
    assert (here / "g" / "images" / "3_s0.png").read_bytes() == before


# ----------------------------------------------------------------------------- 8: nothing silently ignored or wrong

def test_options_that_would_be_ignored_are_refused(here, capsys):
    _one_line(_cli(capsys, *FID, "--gen", "a", "--ref", "b", "--keep-features"), "--keep-features", "--save-ref-stats")
    _one_line(_cli(capsys, *FID, "--gen", "a", "--ref", "b", "--k", "5"), "--k 5", "pr")
    _one_line(_cli(capsys, *FID, "--ref", "b", "--save-ref-stats", "r.npz", "--metrics", "kid"), "--metrics")
    _one_line(_cli(capsys, *MEM, "--gen", "a", "--train", "b", "--train-seed", "3", "--out", "m"), "--train-seed")
    assert not (here / "r.npz").exists() and not (here / "m").exists()


def test_outputs_that_would_spoil_the_inputs_or_each_other_are_refused(here, capsys):
    """A report inside --gen (its PNGs read as generated images next time), --out naming the
    --save-ref-stats file, --prompts naming a folder, a --ref file that is no statistics file."""
    for out in ("a/mem", "b"):
        _one_line(_cli(capsys, *MEM, "--gen", "a", "--train", "b", "--out", out), f"--out {out}", "inside")
    assert sorted(p.name for p in (here / "a").iterdir() if p.suffix == ".png") == [f"{i:05d}.png" for i in range(8)]
    _one_line(_cli(capsys, *FID, "--gen", "a", "--ref", "b", "--out", "x.npz", "--save-ref-stats", "x.npz"),
              "--save-ref-stats")
    assert not (here / "x.npz").exists()
    _one_line(_cli(capsys, *FID, "--gen", "a", "--ref", "a/00000.txt"), "--ref a/00000.txt", ".npz")
    _one_line(_cli(capsys, *FID, "--gen", "a", "--ref", "b", "--resolution", "3"), "pixels:4", "--resolution")
    _one_line(_cli(capsys, "eval", "clip-score", "--prompts", "a", "--quiet"), "--prompts a", "a folder")


def test_degenerate_inputs_and_non_finite_features_are_one_line_naming_the_input(here, capsys):
    _one_line(_cli(capsys, *FID, "--gen", "a", "--ref", "b", "--metrics", "pr", "--k", "8"), "--k 8", "--gen a")
    np.savez(here / "nan.npz", mu=np.full(48, np.nan), sigma=np.eye(48))
    _one_line(_cli(capsys, *FID, "--gen", "a", "--ref", "nan.npz"), "nan.npz", "NaN")
    _ok(_cli(capsys, *FID, "--ref", "b", "--save-ref-stats", "cut.npz"))
    (here / "cut.npz").write_bytes((here / "cut.npz").read_bytes()[:-200])  # a torn copy
    _one_line(_cli(capsys, *FID, "--gen", "a", "--ref", "cut.npz"), "cut.npz")

    (here / "inffeat.py").write_text("import torch\n\ndef fn(images):\n"
                                     "    out = images.flatten(1)[:, :8].double()\n"
                                     "    out[images.flatten(1)[:, 0] > 0.5] = float('inf')\n    return out\n")
    import sys

    sys.path.insert(0, str(here))
    try:  # the reference is read first: its first image with a bright top-left pixel is named
        first_bright = next(i for i in range(8) if np.asarray(Image.open(here / "b" / f"{i:05d}.png"))[0, 0, 0] > 127)
        _one_line(_cli(capsys, "eval", "fid", "--quiet", "--features", "inffeat:fn", "--gen", "a", "--ref", "b"),
                  f"b/{first_bright:05d}.png", "NaN or infinite")
    finally:
        sys.path.remove(str(here))
    with pytest.raises(ValueError):  # --debug: the traceback, not the line
        main(["eval", "fid", *FID[2:], "--gen", "a", "--ref", "nan.npz", "--debug"])
    with pytest.raises(ValueError):
        main(["eval", "memorization", *MEM[2:], "--gen", "a", "--train", "nan.npz", "--out", "m", "--debug"])
