"""`microdiff eval generate` and `microdiff eval clip-score` end to end on a tiny untrained pipeline
(8 px, 2 steps) and a tiny random CLIP saved here: the prompts file formats, the documented seeding
rule, resume, batch-size and process-count invariance (torchrun, gloo), the one-line errors, and a
CLIP score checked against the transformers model called directly. Nothing is downloaded."""

from __future__ import annotations

import argparse
import csv
import json
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from microdiff.eval import clipscore, generate
from microdiff.eval.generate import SEED_STRIDE
from tiny_models import clip_tokenizer, perturb, tiny_clip

PROMPTS = ["a red circle", "two blue squares", "a small green triangle at the top left", "a large yellow star",
           "the background is black"]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    from microdiff.diffusion import EDM, Denoiser
    from microdiff.encoders.base import IdentityAutoencoder
    from microdiff.encoders.text import BuiltinTextEncoder
    from microdiff.models import MicroDiT_Nano_2
    from microdiff.pipeline import Pipeline, SamplingDefaults

    torch.manual_seed(0)
    text = BuiltinTextEncoder(dim=32, layers=1, heads=2, max_length=32)
    backbone = MicroDiT_Nano_2(in_channels=3, caption_channels=32, input_size=8)
    perturb(backbone)
    defaults = SamplingDefaults(num_inference_steps=2, height=8, width=8, guidance_scale=3.0)
    path = tmp_path_factory.mktemp("pipe") / "pipeline"
    Pipeline(text, IdentityAutoencoder(3), Denoiser(backbone.eval(), EDM(0.5)), defaults).save_pretrained(path)
    return path


def _run(module, *argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args([str(a) for a in argv]))


def _generate(capsys, pipe_dir, prompts, out, *extra):
    rc = _run(generate, "--prompts", prompts, "--checkpoint", pipe_dir, "--out", out, "--quiet", *extra)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _pixels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def _index(out):
    with open(out / "index.csv", newline="") as f:
        return list(csv.DictReader(f))


def _txt(path, prompts=PROMPTS):
    path.write_text("\n".join(prompts) + "\n")
    return path


# ----------------------------------------------------------------------------- prompts files and outputs

def test_csv_txt_and_jsonl_prompts_and_the_seeding_rule(tmp_path, pipe_dir, capsys):
    from microdiff.pipeline import Pipeline

    table = tmp_path / "coco.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "url", "caption"])
        w.writerows([[100 + k, f"http://x/{k}.jpg", p] for k, p in enumerate(PROMPTS[:3])])
    rc, out, err = _generate(capsys, pipe_dir, table, tmp_path / "csv", "--seeds", "0,1", "--batch-size", "2")
    assert rc == 0, err
    assert "generated 6 images, skipped 0" in out
    names = sorted(f"{100 + k}_s{s}.png" for k in range(3) for s in (0, 1))
    assert sorted(_pixels(tmp_path / "csv" / "images")) == names
    rows = _index(tmp_path / "csv")
    assert [(r["id"], r["seed"], r["prompt"], r["file"]) for r in rows[:2]] == [
        ("100", "0", PROMPTS[0], "100_s0.png"), ("101", "0", PROMPTS[1], "101_s0.png")]
    settings = json.loads((tmp_path / "csv" / "generate.json").read_text())
    assert settings["guidance"] == 1.5 and settings["steps"] == 2 and settings["sampler"] == "heun"

    # the documented rule: row i with seed s is pipe.generate([prompt_i], seed=s * SEED_STRIDE + i)
    pipe = Pipeline.from_pretrained(pipe_dir)
    for i, s in [(0, 0), (2, 1)]:
        expected = np.asarray(Pipeline.to_pil(pipe.generate([PROMPTS[i]], seed=s * SEED_STRIDE + i,
                                                            guidance_scale=1.5))[0])
        assert np.array_equal(np.asarray(Image.open(tmp_path / "csv" / "images" / f"{100 + i}_s{s}.png")), expected)
    meta = Image.open(tmp_path / "csv" / "images" / "102_s1.png").text
    assert meta["microdiff:prompt"] == PROMPTS[2] and meta["microdiff:noise_seed"] == str(SEED_STRIDE + 2)

    # .txt: id = line number (1-based; blank lines skipped but counted)
    (tmp_path / "p.txt").write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    rc, out, err = _generate(capsys, pipe_dir, tmp_path / "p.txt", tmp_path / "txt")
    assert rc == 0, err
    assert sorted(_pixels(tmp_path / "txt" / "images")) == ["1_s0.png", "3_s0.png"]

    # .jsonl of {id, prompt} (ids made file-safe), with --limit
    lines = [json.dumps({"id": f"dB/{k}", "prompt": p}) for k, p in enumerate(PROMPTS)]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    rc, out, err = _generate(capsys, pipe_dir, tmp_path / "p.jsonl", tmp_path / "jsonl", "--limit", "2")
    assert rc == 0, err
    assert sorted(_pixels(tmp_path / "jsonl" / "images")) == ["dB_0_s0.png", "dB_1_s0.png"]
    assert [r["id"] for r in _index(tmp_path / "jsonl")] == ["dB/0", "dB/1"]
    # same rows, same seed -> same pixels, whatever the file format
    assert np.array_equal(_pixels(tmp_path / "jsonl" / "images")["dB_0_s0.png"],
                          _pixels(tmp_path / "csv" / "images")["100_s0.png"])


def test_resume_skips_existing_images_and_refuses_other_settings(tmp_path, pipe_dir, capsys):
    prompts, out = _txt(tmp_path / "p.txt"), tmp_path / "gen"
    assert _generate(capsys, pipe_dir, prompts, out, "--batch-size", "2")[0] == 0
    before = _pixels(out / "images")
    (out / "images" / "3_s0.png").unlink()
    (out / "images" / ".4_s0.png.999.tmp").write_bytes(b"half a png")  # what a killed run leaves
    rc, stdout, err = _generate(capsys, pipe_dir, prompts, out, "--batch-size", "2")
    assert rc == 0, err
    assert "generated 1 images, skipped 4 that existed" in stdout
    after = _pixels(out / "images")
    assert sorted(after) == sorted(before) and all(np.array_equal(after[k], before[k]) for k in before)
    assert not list((out / "images").glob(".*"))  # stale temporary removed
    assert len(_index(out)) == len(PROMPTS)

    rc, stdout, err = _generate(capsys, pipe_dir, prompts, out, "--guidance", "3")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "guidance=1.5" in err and "guidance=3.0" in err and "another --out" in err


def test_images_do_not_depend_on_batch_size(tmp_path, pipe_dir, capsys):
    prompts = _txt(tmp_path / "p.txt")
    for b in (1, 4):
        rc, _, err = _generate(capsys, pipe_dir, prompts, tmp_path / f"b{b}", "--batch-size", b, "--seeds", "0,3")
        assert rc == 0, err
    one, four = _pixels(tmp_path / "b1" / "images"), _pixels(tmp_path / "b4" / "images")
    assert sorted(one) == sorted(four) and len(one) == 10
    assert all(np.array_equal(one[k], four[k]) for k in one)
    assert not np.array_equal(one["1_s0.png"], one["1_s3.png"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_the_same_images_as_one(tmp_path, pipe_dir, capsys):
    from train_helpers import env

    prompts = _txt(tmp_path / "p.txt")
    rc, _, err = _generate(capsys, pipe_dir, prompts, tmp_path / "one", "--batch-size", "2", "--seeds", "0,1")
    assert rc == 0, err
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "microdiff.eval.generate", "--prompts", str(prompts),
           "--checkpoint", str(pipe_dir), "--out", str(tmp_path / "two"), "--batch-size", "2", "--seeds", "0,1"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("generated 10 images, skipped 0") == 1  # rank 0 reports for everyone
    assert "2 process(es)" in proc.stdout
    one, two = _pixels(tmp_path / "one" / "images"), _pixels(tmp_path / "two" / "images")
    assert sorted(one) == sorted(two) and len(one) == 10
    assert all(np.array_equal(one[k], two[k]) for k in one)
    assert (tmp_path / "one" / "index.csv").read_text() == (tmp_path / "two" / "index.csv").read_text()


@pytest.mark.parametrize("name, content, match", [
    ("bad.csv", "image_id,url\n1,http://x\n", r"bad.csv: no caption column; expected one of caption, prompt.*"
                                              r"columns found: image_id, url"),
    ("empty.txt", "\n  \n", r"empty.txt: the file is empty"),
    ("header.csv", "id,caption\n", r"header.csv: no prompts"),
    ("dup.csv", "id,caption\n7,a\n7,b\n", r"dup.csv: id '7' appears twice"),
    ("blank.csv", "id,caption\n1,a\n2,\n", r"blank.csv: data row 2 has an empty 'caption'"),
    ("p.json", '{"prompt": "a"}', r"p.json: expected a list"),
    ("p.yaml", "- a\n", r"p.yaml: unknown prompts file type"),
])
def test_bad_prompts_files_give_one_line_errors(tmp_path, pipe_dir, capsys, name, content, match):
    (tmp_path / name).write_text(content)
    rc, out, err = _generate(capsys, pipe_dir, tmp_path / name, tmp_path / "gen")
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("microdiff eval generate: error: ")
    assert re.search(match, err), err
    assert not (tmp_path / "gen").exists()  # nothing written before the input is known good


def test_missing_prompts_file_and_bad_seeds(tmp_path, pipe_dir, capsys):
    rc, _, err = _generate(capsys, pipe_dir, tmp_path / "nope.csv", tmp_path / "gen")
    assert rc == 2 and "nope.csv: no such prompts file" in err
    rc, _, err = _generate(capsys, pipe_dir, _txt(tmp_path / "p.txt"), tmp_path / "gen", "--seeds", "0,x")
    assert rc == 2 and "--seeds '0,x'" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- CLIP score

def _clip_dir(root):
    import transformers

    tok = clip_tokenizer(PROMPTS)
    torch.manual_seed(4)  # a random CLIP whose cosines on these images have both signs (tests the clipping)
    model = tiny_clip(len(tok), image_size=16)
    path = root / "clip"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor  # no torchvision
    cls(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(path)
    return path


def _independent_cosines(clip_path, files, prompts):
    """cos(image, prompt) of CLIPModel called directly on torch-resized images (eval.features' documented
    preprocessing: bicubic antialiased resize, clamp, CLIP mean/std) and the tokenised prompts."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_path).eval()
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(f), np.float32)).permute(2, 0, 1) / 255
                          for f in files])
    x = F.interpolate(images, size=(16, 16), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    tokens = AutoTokenizer.from_pretrained(clip_path)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        i = model.get_image_features(pixel_values=(x - mean) / std)
        t = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    i, t = (v if isinstance(v, torch.Tensor) else v.pooler_output for v in (i, t))
    return F.cosine_similarity(i.double(), t.double(), dim=-1).numpy()


def test_clip_score_of_generated_images_equals_an_independent_computation(tmp_path, pipe_dir, capsys):
    prompts, out = _txt(tmp_path / "p.txt"), tmp_path / "gen"
    assert _generate(capsys, pipe_dir, prompts, out, "--seeds", "0,1")[0] == 0
    clip_path = _clip_dir(tmp_path)
    rc = _run(clipscore, "--prompts", out / "index.csv", "--features", f"clip:{clip_path}", "--batch-size", "3",
              "--quiet")
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads((out / "clip_score.json").read_text())
    rows = list(csv.DictReader(open(out / "clip_score.csv")))
    index = _index(out)
    assert result["count"] == len(rows) == len(index) == 10 and result["scale"] == 100
    assert [r["file"] for r in rows] == [r["file"] for r in index]
    cosine = _independent_cosines(clip_path, [out / "images" / r["file"] for r in index], [r["prompt"] for r in index])
    assert (cosine > 0.01).sum() >= 3 and (cosine < -0.01).sum() >= 2  # both signs: the clipping matters
    expected = np.maximum(100 * cosine, 0)  # torchmetrics' documented max(100 cos, 0), per image
    assert result["clip_score"] == pytest.approx(expected.mean(), rel=1e-5, abs=1e-5)
    np.testing.assert_allclose([float(r["clip_score"]) for r in rows], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose([float(r["cosine"]) for r in rows], cosine, rtol=1e-4, atol=1e-6)
    assert f"{result['clip_score']:.4f}" in stdout and "max(cos(image, prompt), 0)" in result["convention"]

    # the prompts file + {id}_s{seed}.png naming finds the same pairs, so the same score
    rc = _run(clipscore, "--prompts", prompts, "--images", out / "images", "--features", f"clip:{clip_path}",
              "--out", tmp_path / "by_name.json", "--quiet")
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "by_name.json").read_text())["clip_score"] == pytest.approx(result["clip_score"],
                                                                                                rel=1e-6)
    capsys.readouterr()
    # one-line errors: a prompts file without --images, an index whose images are gone
    rc = _run(clipscore, "--prompts", prompts, "--features", f"clip:{clip_path}")
    assert rc == 2 and "pass --images" in capsys.readouterr().err
    (out / "images" / "1_s0.png").unlink()
    rc = _run(clipscore, "--prompts", out / "index.csv", "--features", f"clip:{clip_path}")
    err = capsys.readouterr().err
    assert rc == 2 and "1_s0.png: listed in" in err and len(err.strip().splitlines()) == 1
