"""`microdiff annotate` (Ambient-o quality annotation): the pure sigma_tn rule against hand-computed
cases, the classifier's determinism, and the command end to end on noisy shapes (a real subprocess)."""

import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from microdiff.ambient.annotate import (annotate_sigma_tn, balanced_accuracy, is_low_quality, low_quality_probability,
                                        moving_average, parse_mixture, sigma_grid, train_quality_classifier)
from microdiff.ambient.annotations import read_annotations

GRID = np.array([0.1, 0.2, 0.4, 0.8])


# ----------------------------------------------------------------------------- the pure rule
def test_moving_average_shrinks_the_window_at_the_ends():
    row = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    np.testing.assert_allclose(moving_average(row, 1), row)
    np.testing.assert_allclose(moving_average(row, 3), [[1.5, 2.0, 3.0, 4.0, 4.5]])
    np.testing.assert_allclose(moving_average(row, 2), [[1.5, 2.5, 3.5, 4.5, 5.0]])  # i .. i+1
    np.testing.assert_allclose(moving_average(row, 5), [[2.0, 2.5, 3.0, 3.5, 4.0]])
    with pytest.raises(ValueError, match="smooth must be an integer >= 1"):
        moving_average(row, 0)


def test_sigma_tn_is_the_first_grid_sigma_below_half_plus_eps():
    prob = np.array([[0.9, 0.7, 0.5, 0.4],  # 0.5 < 0.55 first at index 2
                     [0.9, 0.9, 0.9, 0.9],  # never: top of the grid, flagged
                     [0.3, 0.9, 0.9, 0.9],  # confused already at the smallest sigma
                     [0.9, 0.56, 0.551, 0.549]])  # just above, above, below
    sigma_tn, flagged = annotate_sigma_tn(prob, GRID, eps=0.05, smooth=1)
    np.testing.assert_array_equal(sigma_tn, [0.4, 0.8, 0.1, 0.8])
    np.testing.assert_array_equal(flagged, [False, True, False, False])


def test_smoothing_ignores_a_single_dip():
    prob = np.array([[0.9, 0.3, 0.9, 0.2]])
    assert annotate_sigma_tn(prob, GRID, eps=0.05, smooth=1)[0][0] == 0.2  # the dip at index 1 counts
    # width 3: [mean(.9,.3), mean(.9,.3,.9), mean(.3,.9,.2), mean(.9,.2)] = [.6, .7, .467, .55]
    sigma_tn, flagged = annotate_sigma_tn(prob, GRID, eps=0.05, smooth=3)
    assert sigma_tn[0] == 0.4 and not flagged[0]


def test_negative_eps_is_the_stricter_rule():
    prob = np.array([[0.9, 0.7, 0.5, 0.45]])
    assert annotate_sigma_tn(prob, GRID, eps=0.05, smooth=1)[0][0] == 0.4
    sigma_tn, flagged = annotate_sigma_tn(prob, GRID, eps=-0.1, smooth=1)  # needs p < 0.4
    assert sigma_tn[0] == 0.8 and flagged[0]


def test_heldout_threshold_compares_with_what_the_classifier_says_about_unseen_clean_images():
    # a classifier that memorised its few clean images calls unseen ones "low" (0.6) even at high noise
    null = np.array([0.1, 0.3, 0.6, 0.6])
    prob = np.array([[0.9, 0.8, 0.64, 0.6],  # indistinguishable from unseen clean images at index 2
                     [0.9, 0.9, 0.9, 0.9]])
    sigma_tn, flagged = annotate_sigma_tn(prob, GRID, eps=0.05, smooth=1, null=null)
    np.testing.assert_array_equal(sigma_tn, [0.4, 0.8])
    np.testing.assert_array_equal(flagged, [False, True])
    assert annotate_sigma_tn(prob, GRID, eps=0.05, smooth=1)[1][0]  # the 0.5 + eps rule never crosses for row 0
    with pytest.raises(ValueError, match="one value per grid sigma"):
        annotate_sigma_tn(prob, GRID, null=null[:3])


@pytest.mark.parametrize("prob, grid, eps, smooth, message", [
    (np.zeros((2, 3)), GRID, 0.05, 1, r"prob must be \(N, 4\)"),
    (np.zeros((2, 4)), GRID[::-1], 0.05, 1, "ascending"),
    (np.zeros((2, 4)), GRID, 0.5, 1, r"eps must be in \(-0.5, 0.5\)"),
    (np.zeros((2, 4)), GRID, 0.05, 0, "smooth must be an integer >= 1"),
])
def test_bad_inputs_say_what_to_fix(prob, grid, eps, smooth, message):
    with pytest.raises(ValueError, match=message):
        annotate_sigma_tn(prob, grid, eps, smooth)


def test_grid_and_accuracy_helpers():
    grid = sigma_grid(0.01, 10, 4)
    np.testing.assert_allclose(grid, [0.01, 0.1, 1.0, 10.0])
    with pytest.raises(ValueError, match="grid-min < grid-max"):
        sigma_grid(1.0, 0.5, 4)
    p_high = np.array([[0.1, 0.6], [0.2, 0.4]])  # 2 images x 2 sigmas
    p_low = np.array([[0.9, 0.5], [0.4, 0.3]])
    np.testing.assert_allclose(balanced_accuracy(p_high, p_low), [0.5 * (1 + 0.5), 0.5 * (0.5 + 0.5)])


def test_split_rules():
    assert not is_low_quality({}) and is_low_quality({"quality": 0.2})
    assert not is_low_quality({"quality": 0.5}) and is_low_quality({"quality": 0.5}, quality_threshold=0.6)
    assert not is_low_quality({"corruption": "none"}, "corruption") and not is_low_quality({}, "corruption")
    assert is_low_quality({"corruption": "blur"}, "corruption")
    assert is_low_quality({"corruption": {"name": "jpeg", "quality": 20}}, "corruption")
    with pytest.raises(ValueError, match="unknown split rule"):
        is_low_quality({}, "vibes")


def test_corruption_mixture_forms():
    assert parse_mixture("noise:0.3") == [(0.5, {"name": "noise", "sigma": 0.3})]
    assert parse_mixture("noise:0.1@0.25, blur:1.5@0.25") == [(0.25, {"name": "noise", "sigma": 0.1}),
                                                              (0.25, {"name": "blur", "sigma_px": 1.5})]
    assert parse_mixture("[[0.5, null], [0.5, 'mask:0.5:4']]") == [[0.5, None], [0.5, "mask:0.5:4"]]
    with pytest.raises(ValueError, match="give every entry its fraction"):
        parse_mixture("noise:0.1,blur:1.5")
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        parse_mixture("noise:0.1@1.5")


# ----------------------------------------------------------------------------- classifier
def test_training_and_scoring_are_deterministic_given_the_seed():
    gen = torch.Generator().manual_seed(0)
    high = torch.rand(8, 3, 8, 8, generator=gen) * 2 - 1
    low = high + 0.3 * torch.randn(8, 3, 8, 8, generator=gen)
    runs = [train_quality_classifier(high, low, steps=4, batch_size=8, width=8, seed=seed, progress=False)
            for seed in (3, 3, 4)]
    assert runs[0][1] == runs[1][1] and runs[0][1] != runs[2][1]
    for (name, a), b in zip(runs[0][0].state_dict().items(), runs[1][0].state_dict().values()):
        assert torch.equal(a, b), name
    grid = sigma_grid(0.05, 2.0, 3)
    p = low_quality_probability(runs[0][0], low, grid, draws=2, seed=1)
    assert p.shape == (8, 3) and np.all((p >= 0) & (p <= 1))
    np.testing.assert_array_equal(p, low_quality_probability(runs[1][0], low, grid, draws=2, seed=1))
    with pytest.raises(ValueError, match="batch-size must be an even number"):
        train_quality_classifier(high, low, steps=1, batch_size=7, progress=False)


# ----------------------------------------------------------------------------- end to end
def _run(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "microdiff", "annotate", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


MIXTURE = [[0.25, "noise:0.1"], [0.25, "noise:0.3"]]  # a quarter each; the other half clean


def test_annotate_noisy_shapes_end_to_end(tmp_path):
    """400 shapes at 16 px: half clean, a quarter with noise 0.1, a quarter with noise 0.3; this test runs
    --seed 0 --data-seed 0. Measured over 14 runs (--seed 0-9 with data seed 0, and (0, 1), (1, 2), (2, 1),
    (3, 2)); torch 2.13.0 and 2.14.1 give the same numbers in the 8 runs tried on both:
    held-out accuracy 0.974-1.0 at sigma 0.01 and 0.464-0.506 at sigma 10; median sigma_tn 0.10-2.5 for
    noise 0.1 and 0.63-10 for noise 0.3, equal in 4 runs (seed 0 among them: 1.58 and 1.58), so the medians'
    order is no test; the mean of log10 sigma_tn is 0.10-1.28 higher for noise 0.3; 90-100% of noise-0.3
    samples and 67-100% of noise-0.1 samples are trusted only at or above their own noise; 0-46% of the
    low-quality samples flagged (0 in 10 runs). 16-80 s on one thread. The bounds below lie outside those
    ranges: what they catch is written beside each."""
    out = tmp_path / "annotate"
    started = time.perf_counter()
    result = _run("shapes:400", "--resolution", "16", "--corruption", "noise:0.1@0.25,noise:0.3@0.25",
                  "--steps", "600", "--width", "16", "--grid-min", "0.01", "--grid-max", "10", "--grid-size", "16",
                  "--draws", "2", "--seed", "0", "--data-seed", "0", "--device", "cpu", "--out", str(out),
                  "--no-progress")
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert "sigma_tn" in result.stdout and "annotations.csv" in result.stdout
    for name in ["annotations.csv", "sigma_tn_hist.png", "probability_curves.png", "curves.csv", "summary.json",
                 "classifier.pt"]:
        assert (out / name).is_file(), name

    from microdiff.ambient.annotate import load_quality_classifier
    from microdiff.data.shapes import ShapesDataset

    data = ShapesDataset(400, resolution=16, seed=0, corruption=MIXTURE)
    noise = {data[i]["key"]: data[i]["meta"].get("sigma_tn", 0.0) for i in range(len(data))}
    annotations = read_annotations(out / "annotations.csv")
    assert set(annotations) == set(noise)
    by_level = {level: [annotations[k]["sigma_tn"] for k, v in noise.items() if v == level] for level in (0.0, 0.1, 0.3)}
    assert all(tn == 0.0 for tn in by_level[0.0]), "clean samples are annotated 0"
    assert all(a["sigma_max"] is None for a in annotations.values())

    summary = json.loads((out / "summary.json").read_text())
    counts, accuracy = summary["counts"], summary["heldout_accuracy"]
    assert counts["total"] == 400 and counts["low"] == len(by_level[0.1]) + len(by_level[0.3])
    assert sum(summary["sigma_tn"]["histogram"]["count"]) == counts["low"]
    assert len(accuracy) == len(summary["grid"]) == 16
    # the classifier separates the classes at low noise and is at chance at high noise (a classifier that
    # learnt nothing is at 0.5 everywhere; one that ignores sigma stays near 1)
    assert accuracy[0] >= 0.95, accuracy
    assert accuracy[-1] <= 0.6, accuracy
    # a noisy sample is trusted only above the noise it carries (0.90-1.0 and 0.67-1.0 measured; a rule
    # that ignored the classifier's curve, or read it backwards, would put them at the bottom of the grid)
    tn_01, tn_03 = np.array(by_level[0.1]), np.array(by_level[0.3])
    assert np.mean(tn_03 >= 0.3) >= 0.8 and np.mean(tn_01 >= 0.1) >= 0.5, (tn_01, tn_03)
    # noise 0.3 hides the difference only at larger sigma: on average (log scale) above noise 0.1's
    # (0.10-1.28 measured; swapped levels give a negative difference)
    log_gap = float(np.log10(tn_03).mean() - np.log10(tn_01).mean())
    assert log_gap >= 0.05, (log_gap, np.median(tn_01), np.median(tn_03))
    # a few samples may never cross the threshold (0-46% measured); a threshold nothing crosses flags all
    assert counts["flagged"] <= 0.6 * counts["low"], counts

    with (out / "curves.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and float(rows[0]["heldout_accuracy"]) == pytest.approx(accuracy[0], abs=1e-5)
    model = load_quality_classifier(out / "classifier.pt")
    assert model(torch.zeros(2, 3, 16, 16), 0.5).shape == (2,)
    print(f"annotate e2e: {seconds:.1f}s, accuracy {accuracy[0]:.3f} -> {accuracy[-1]:.3f}, "
          f"median sigma_tn noise 0.1: {np.median(tn_01):.3g}, noise 0.3: {np.median(tn_03):.3g}, "
          f"log10 gap {log_gap:.2f}")


def test_annotate_without_low_quality_data_fails_in_one_line(tmp_path):
    result = _run("shapes:20", "--resolution", "16", "--out", str(tmp_path / "x"), "--no-progress")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "0 low quality" in result.stderr and "--corruption" in result.stderr
    result = _run(str(tmp_path), "--corruption", "noise:0.2", "--out", str(tmp_path / "x"), "--no-progress")
    # --corruption applies to any image source now (as data.corruption); an empty folder is the error here
    assert result.returncode == 2 and "no usable items" in result.stderr


def test_annotate_in_latent_units(tmp_path):
    """--autoencoder: images are encoded once and the classifier sees (and sigma_tn is in) latents."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    vae = subprocess.run([sys.executable, "-m", "microdiff", "train-autoencoder", "--data", "shapes:64", "--out",
                          str(tmp_path / "vae"), "--kind", "vae", "--resolution", "32", "--steps", "5", "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert vae.returncode == 0, vae.stderr
    out = tmp_path / "annotate"
    result = _run("shapes:120", "--resolution", "32", "--corruption", "noise:0.3@0.5", "--autoencoder",
                  f"microdiff-vae:{tmp_path / 'vae' / 'autoencoder'}", "--steps", "20", "--width", "8",
                  "--grid-size", "6", "--draws", "1", "--device", "cpu", "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["space"].startswith("latents of microdiff-vae:")
    assert len(read_annotations(out / "annotations.csv")) == 120
    state = torch.load(out / "classifier.pt", weights_only=True)
    assert state["config"]["in_channels"] == 4 and state["autoencoder"].startswith("microdiff-vae:")
