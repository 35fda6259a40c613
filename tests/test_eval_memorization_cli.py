"""`microdiff eval memorization` end to end on tiny folders written here: exact copies of training
images are found (similarity exactly 1, rank 1, above every threshold) and distinct images are not;
report files; a saved training-features file gives the same result; a real two-process torchrun run
equals one process; one-line errors.

The feature space is a user module (``memtest_feats:centred``, pixels minus 0.5: elementwise, so exact
and batch-independent), under which independent random images have cosine ~0 +- 0.07; the built-in
pixels/DINOv2 spaces give every image pair a high cosine, which would hide a wrong match."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from microdiff.eval.memorize_cli import main

FEATS = "memtest_feats:centred"
COPIES = {0: 3, 1: 7, 2: 20}  # generated copy j (file copyj.png, gen index j) of training image i
N_TRAIN, N_NEW, SIZE = 23, 8, 16
FEATURE_MODULE = ("import torch\n\n"
                  "def centred(images):\n"
                  "    return images[:, :, ::2, ::2].flatten(1).double() - 0.5\n")


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """train/ (23 captioned random images), gen/ (3 byte copies of training images + 8 new ones), and
    the feature module on sys.path (and PYTHONPATH, for subprocesses)."""
    (tmp_path / "memtest_feats.py").write_text(FEATURE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    train, gen = tmp_path / "train", tmp_path / "gen"
    train.mkdir()
    gen.mkdir()
    for i in range(N_TRAIN):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(train / f"{i:03d}.png")
        (train / f"{i:03d}.txt").write_text(f"random image {i}")
    for j, i in COPIES.items():
        shutil.copy(train / f"{i:03d}.png", gen / f"copy{j}.png")
    for j in range(N_NEW):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(gen / f"new{j}.png")
    return tmp_path


def _run(*args, out="out", features=FEATS):
    return main(["--features", features, "--out", str(out), "--quiet", *map(str, args)])


def _json(path):
    return json.loads(Path(path).read_text())


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("microdiff eval memorization: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_copies_are_found_at_rank_1_with_similarity_1_and_distinct_images_are_not(folders, capsys):
    assert _run("--gen", "gen", "--train", "train", "--k", 3, "--batch-size", 4, "--pairs", 6) == 0
    summary = capsys.readouterr().out
    report = _json("out/memorization.json")
    assert report["n_generated"] == len(COPIES) + N_NEW and report["n_train"] == N_TRAIN and report["k"] == 3
    assert report["resolution"] == SIZE and report["features"] == f"module:{FEATS}"
    assert [t["threshold"] for t in report["thresholds"]] == [0.95, 0.9, 0.85]
    for t in report["thresholds"]:  # the copies, and nothing else, above every threshold
        assert (t["count"], t["distinct_train"]) == (len(COPIES), len(COPIES))
    rows = _csv("out/top_k.csv")
    assert len(rows) == report["n_generated"] * 3
    top1 = {int(r["gen"]): r for r in rows if r["rank"] == "1"}
    for j, i in COPIES.items():
        assert int(top1[j]["train"]) == i and float(top1[j]["similarity"]) == 1.0
        assert top1[j]["gen_file"].endswith(f"copy{j}.png") and top1[j]["train_file"].endswith(f"{i:03d}.png")
    for g in range(len(COPIES), report["n_generated"]):
        assert float(top1[g]["similarity"]) < 0.5
    pairs = report["closest_pairs"]
    assert len(pairs) == 6 and [(p["gen"], p["train"], p["similarity"]) for p in pairs[:3]] == \
        [(j, i, 1.0) for j, i in COPIES.items()]
    assert report["top1_max"] == 1.0 and report["top1_median"] < 0.5
    for name, size in (("top1_hist.png", None), ("closest_pairs.png", None)):
        with Image.open(f"out/{name}") as image:
            image.load()
            assert image.size[0] > 100 and image.size[1] > 50
    # the one-paragraph summary: counts at each threshold and the median top-1
    assert summary.count("\n") == 1 and ">= 0.95: 3 (27.3%" in summary and ">= 0.85: 3" in summary
    assert f"median {report['top1_median']:.4f}" in summary and "closest_pairs.png" in summary


def test_shapes_source_and_a_tiny_dinov2_find_copies(tmp_path, monkeypatch, capsys):
    """Any trainer source: copies of shapes:N items (written as PNG) are found with DINOv2 features
    (a random ViT saved here; nothing is downloaded)."""
    import torch
    import transformers
    from transformers import Dinov2Config, Dinov2Model

    from microdiff.data.shapes import ShapesDataset

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32,
                             patch_size=8)).save_pretrained("dino")
    processor = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
              image_std=[0.25] * 3).save_pretrained("dino")
    data, gen = ShapesDataset(30, resolution=32), tmp_path / "gen"
    gen.mkdir()
    for j, i in enumerate([4, 11, 29]):
        array = ((data[i]["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(array).save(gen / f"c{j}.png")
    assert _run("--gen", "gen", "--train", "shapes:30", "--k", 2, "--batch-size", 8, features="dinov2:dino") == 0
    rows = {int(r["gen"]): r for r in _csv("out/top_k.csv") if r["rank"] == "1"}
    for j, i in enumerate([4, 11, 29]):
        assert float(rows[j]["similarity"]) == pytest.approx(1.0, abs=1e-6)
        assert np.array_equal(data[int(rows[j]["train"])]["image"], data[i]["image"])  # i itself or a twin
    report = _json("out/memorization.json")
    assert report["features"] == f"dinov2:{tmp_path / 'dino'}" and report["resolution"] == 32
    assert all(t["count"] == 3 for t in report["thresholds"])
    assert report["closest_pairs"][0]["train_key"].startswith("shapes-0-")


def test_saved_training_features_give_identical_results_and_refuse_another_space(folders, capsys):
    assert _run("--gen", "gen", "--train", "train", "--k", 3, "--save-train-features", "train.npz", out="a") == 0
    with np.load("train.npz") as z:
        assert str(z["features"]) == f"module:{FEATS}" and int(z["resolution"]) == SIZE
        assert z["feats"].shape == (N_TRAIN, 3 * (SIZE // 2) ** 2) and list(z["index"]) == list(range(N_TRAIN))
    assert _run("--gen", "gen", "--train", "train.npz", "--k", 3, out="b") == 0
    a, b = _json("a/memorization.json"), _json("b/memorization.json")
    assert a.pop("train_source") == "train" and b.pop("train_source") == "train.npz"
    sa, sb = a.pop("settings"), b.pop("settings")  # the same but for the training source
    assert sa.pop("train").endswith("train") and sb.pop("train").endswith("train.npz") and sa == sb
    assert a == b
    strip = lambda rows: [(r["gen"], r["rank"], r["train"], r["similarity"], r["gen_file"]) for r in rows]  # noqa: E731
    assert strip(_csv("a/top_k.csv")) == strip(_csv("b/top_k.csv"))
    assert Path("a/closest_pairs.png").read_bytes() == Path("b/closest_pairs.png").read_bytes()
    capsys.readouterr()
    # another feature space: refused by name (.npz), or by dimension (a plain .npy)
    assert _run("--gen", "gen", "--train", "train.npz", features="pixels:4") == 2
    message = _error(capsys)
    assert f"module:{FEATS}" in message and "pixels-4" in message and "--save-train-features" in message
    np.save("plain.npy", np.ones((N_TRAIN, 7)))
    assert _run("--gen", "gen", "--train", "plain.npy") == 2
    assert "D=7" in _error(capsys)
    assert _run("--gen", "gen", "--train", "train.npz", "--resolution", 8) == 2
    assert "--resolution 16" in _error(capsys)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_processes_equal_one_process(folders):
    """Uneven shards (11 generated / 23 training images in batches of 4), a bad training image left
    out on one rank (so bank rows and dataset indices differ), training features saved from 2 ranks."""
    (folders / "train" / "005.png").write_bytes(b"not a png")
    common = ["--gen", "gen", "--train", "train", "--k", 4, "--batch-size", 4, "--skip-bad", "--pairs", 8]
    assert _run(*common, out="one") == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "microdiff.eval.memorize_cli", "--features", FEATS, "--quiet",
           "--out", "two", "--save-train-features", "two.npz", *map(str, common)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("Memorization:") == 1  # rank 0 alone reports
    one, two = _json("one/memorization.json"), _json("two/memorization.json")
    assert one == two
    assert one["n_train"] == N_TRAIN - 1 and one["train_skipped"][0][0].endswith("005.png")
    assert all(t["count"] == len(COPIES) for t in one["thresholds"])
    assert Path("one/top_k.csv").read_bytes() == Path("two/top_k.csv").read_bytes()
    assert Path("one/closest_pairs.png").read_bytes() == Path("two/closest_pairs.png").read_bytes()
    with np.load("two.npz") as z:
        assert 5 not in z["index"] and len(z["index"]) == N_TRAIN - 1 and list(z["index"]) == sorted(z["index"])


def test_one_line_errors(folders, capsys):
    (folders / "empty").mkdir()
    assert _run("--gen", "empty", "--train", "train") == 2
    assert "empty: no images" in _error(capsys)

    bad = folders / "badgen"
    shutil.copytree(folders / "gen", bad)
    (bad / "zz.png").write_bytes(b"garbage")
    assert _run("--gen", "badgen", "--train", "train") == 2
    message = _error(capsys)
    assert "zz.png: unreadable image" in message and "--skip-bad" in message  # as every eval command says it
    assert _run("--gen", "badgen", "--train", "train", "--skip-bad", out="skipped") == 0
    report = _json("skipped/memorization.json")
    assert report["n_generated"] == len(COPIES) + N_NEW and report["gen_skipped"][0][0].endswith("zz.png")
    assert "generated: 1 unreadable image(s) left out" in capsys.readouterr().out

    (folders / "train" / "010.png").write_bytes(b"")
    assert _run("--gen", "gen", "--train", "train") == 2
    message = _error(capsys)
    assert "010.png: unreadable image" in message and "--skip-bad" in message

    for args, expected in [(("--k", 40), "--k 40: the training set holds"),
                           (("--thresholds", "0.9,high"), "--thresholds"),
                           (("--save-train-features", "x.npy"), "FILE.npz")]:
        assert _run("--gen", "gen", "--train", "train", "--skip-bad", *args) == 2
        assert expected in _error(capsys)
    assert _run("--gen", "gen", "--train", "nowhere") == 2
    assert "nowhere" in _error(capsys)
    assert _run("--gen", "gen", "--train", "missing.npz") == 2
    assert "--save-train-features" in _error(capsys)
