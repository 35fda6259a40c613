"""`microdiff eval fid` end to end on image folders written here (pixel and shapes-free feature
spaces, so nothing is trained or downloaded), and the statistics files it reads and writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from microdiff.eval.frechet import frechet_distance, frechet_distance_from_features
from microdiff.eval.images import clean_resize, image_paths
from microdiff.eval.stats import Statistics, load_statistics, save_statistics


def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "microdiff", "eval", "fid", *args, "--quiet"], capture_output=True,
                          text=True, env=env, timeout=300)


def _folder(path, n, seed, size=16, blur=0):
    from PIL import ImageFilter

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        image.save(path / f"{i:04d}.png")
    return path


def _json(path):
    return json.loads(path.read_text())


def test_fd_of_a_folder_with_itself_is_zero_and_stats_files_give_the_same_score(tmp_path):
    a, b = _folder(tmp_path / "a", 40, 0), _folder(tmp_path / "b", 40, 1, blur=1)
    out = _cli("--gen", str(a), "--ref", str(a), "--features", "pixels:4", "--out", str(tmp_path / "self.json"))
    assert out.returncode == 0, out.stderr
    assert _json(tmp_path / "self.json")["fd"] == pytest.approx(0, abs=1e-9)
    assert "40 generated vs 40 reference images" in out.stdout
    out = _cli("--gen", str(b), "--ref", str(a), "--features", "pixels:4", "--save-ref-stats", str(tmp_path / "a.npz"),
               "--out", str(tmp_path / "folder.json"))
    assert out.returncode == 0, out.stderr
    out = _cli("--gen", str(b), "--ref", str(tmp_path / "a.npz"), "--features", "pixels:4",
               "--out", str(tmp_path / "npz.json"))
    assert out.returncode == 0, out.stderr
    by_folder, by_stats = _json(tmp_path / "folder.json"), _json(tmp_path / "npz.json")
    assert by_folder["fd"] > 0.01 and by_stats["fd"] == pytest.approx(by_folder["fd"], rel=1e-12)
    # independent check: the same images, read and featurised here
    images = lambda d: torch.from_numpy(np.stack([np.asarray(Image.open(p), np.float64).transpose(2, 0, 1)  # noqa: E731
                                                  for p in image_paths(d)])) / 255
    pooled = lambda x: torch.nn.functional.avg_pool2d(x, 4).reshape(len(x), -1)  # noqa: E731
    assert by_folder["fd"] == pytest.approx(frechet_distance_from_features(pooled(images(b)), pooled(images(a))),
                                            rel=1e-6)


def test_kid_precision_recall_and_vendi_come_with_the_fd(tmp_path):
    a, b = _folder(tmp_path / "a", 30, 0), _folder(tmp_path / "b", 30, 1)
    out = _cli("--gen", str(b), "--ref", str(a), "--features", "pixels:2", "--metrics", "fd,kid,pr,vendi",
               "--out", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    r = _json(tmp_path / "r.json")
    assert {"fd", "kid", "kid_std", "precision", "recall", "vendi"} <= set(r)
    assert 0 <= r["precision"] <= 1 and 1 <= r["vendi"] <= 30
    # kid needs raw reference features: a stats file without them is refused in one line
    _cli("--ref", str(a), "--features", "pixels:2", "--save-ref-stats", str(tmp_path / "plain.npz"))
    out = _cli("--gen", str(b), "--ref", str(tmp_path / "plain.npz"), "--features", "pixels:2", "--metrics", "kid")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--keep-features" in out.stderr
    _cli("--ref", str(a), "--features", "pixels:2", "--save-ref-stats", str(tmp_path / "kept.npz"), "--keep-features")
    out = _cli("--gen", str(b), "--ref", str(tmp_path / "kept.npz"), "--features", "pixels:2", "--metrics", "kid")
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("case", ["empty", "unreadable", "features", "resolution", "dimension"])
def test_bad_input_is_a_one_line_error(tmp_path, case):
    a = _folder(tmp_path / "a", 6, 0)
    gen = a
    args = ["--features", "pixels:4"]
    if case == "empty":
        (tmp_path / "empty").mkdir()
        gen, expected = tmp_path / "empty", "no images"
    elif case == "unreadable":
        gen = _folder(tmp_path / "g", 6, 1)
        (gen / "broken.png").write_bytes(b"not a png")
        expected = "broken.png: unreadable image"
    else:
        stats = Statistics(np.zeros(48), np.eye(48), "pixels-4", 6, 16)
        if case == "features":
            stats.features, expected = "shapes-16", "'shapes-16' features"
        elif case == "resolution":
            args += ["--resolution", "8"]
            stats = Statistics(np.zeros(48), np.eye(48), "pixels-4", 6, 16)
            expected = "resized to 16 px"
        else:
            stats = Statistics(np.zeros(12), np.eye(12), "pixels-2", 6, 16)
            expected = "12-d statistics"
        a = save_statistics(tmp_path / "ref.npz", stats)
    out = _cli("--gen", str(gen), "--ref", str(a), *args)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and expected in out.stderr, out.stderr


def test_skip_bad_leaves_unreadable_files_out_and_reports_them(tmp_path):
    a, g = _folder(tmp_path / "a", 8, 0), _folder(tmp_path / "g", 8, 1)
    (g / "broken.png").write_bytes(b"not a png")
    out = _cli("--gen", str(g), "--ref", str(a), "--features", "pixels:4", "--skip-bad", "--out", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    r = _json(tmp_path / "r.json")
    assert r["gen_count"] == 8 and r["gen_skipped"][0][0].endswith("broken.png")
    assert "1 unreadable image(s) left out" in out.stdout


def test_pytorch_fid_style_stats_files_load_and_record_nothing_else(tmp_path):
    np.savez(tmp_path / "theirs.npz", mu=np.ones(3), sigma=np.eye(3))
    stats = load_statistics(tmp_path / "theirs.npz")
    assert stats.features is None and stats.count is None and stats.resolution is None
    assert frechet_distance(stats.mu, stats.sigma, np.ones(3), np.eye(3)) == pytest.approx(0, abs=1e-12)


def test_clean_resize_is_float_bicubic_with_antialiasing():
    # a one-pixel checkerboard averages to grey when shrunk with a low-pass filter; nearest would keep 0/255
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    small = clean_resize(Image.fromarray(np.stack([board] * 3, -1)), 16)
    assert small.shape == (3, 16, 16) and small.dtype == np.float32
    assert np.abs(small[:, 2:-2, 2:-2] - 127.5).max() < 3
    same = clean_resize(Image.fromarray(np.stack([board] * 3, -1)), 64)
    assert np.array_equal(same[0], board.astype(np.float32))


def test_our_fd_equals_torchmetrics_on_the_same_features():
    fid = pytest.importorskip("torchmetrics.image.fid")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(0.3, 1.2, size=(200, 16))
    mu_a, mu_b = torch.from_numpy(a.mean(0)), torch.from_numpy(b.mean(0))
    cov_a, cov_b = torch.from_numpy(np.cov(a, rowvar=False)), torch.from_numpy(np.cov(b, rowvar=False))
    theirs = float(fid._compute_fid(mu_a, cov_a, mu_b, cov_b))
    assert frechet_distance_from_features(a, b) == pytest.approx(theirs, rel=1e-9)
