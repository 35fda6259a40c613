"""Ambient options of the trainer: noise levels per sample, sigma-first selection, masked inputs,
sampling with fixed masks, and whole runs through ``microdiff train``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from train_helpers import losses, run_train, write_config

from microdiff.ambient.annotations import write_annotations
from microdiff.ambient.sampling import FixedMaskDenoiser, sampling_masks
from microdiff.diffusion.noise import LogNormal
from microdiff.ambient.corruptions import sample_generator
from microdiff.train.ambient import (AmbientStep, EligibilityIndex, Levels, LevelTable, check_rules, sigma_first_batch,
                                     truncated_sigma)
from microdiff.train.config import AmbientConfig, ConfigError


# ----------------------------------------------------------------------------- levels
def test_levels_precedence_annotations_then_meta_then_rules(tmp_path):
    path = write_annotations(tmp_path / "a.csv", {"k1": {"sigma_tn": 0.7, "sigma_max": None},
                                                  "k4": {"sigma_tn": 0.1, "sigma_max": 5.0}})
    cfg = AmbientConfig(enabled=True, annotations=str(path),
                        rules=[{"match": {"source": ["diffusiondb", "laion"]}, "sigma_tn": 2.0},
                               {"match": {"corruption": "blur"}, "sigma_tn": 0.5, "sigma_max": 10.0}])
    table = LevelTable(cfg, pixel_space=True)
    noisy = {"corruption": "noise", "corruption_params": {"sigma": 0.2}, "sigma_tn": 0.2, "source": "diffusiondb"}
    assert table.levels("k1", noisy) == Levels(0.7, None, 0.2)  # annotation wins
    assert table.levels("k2", noisy) == Levels(0.2, None, 0.2)  # then the record's own level
    assert table.levels("k3", {"source": "laion"}) == Levels(2.0, None, 0.0)  # then the first matching rule
    assert table.levels("k3", {"corruption": "blur"}) == Levels(0.5, 10.0, 0.0)
    assert table.levels("k3", {"source": "cc12m"}) == Levels()  # clean
    # never trusted below the noise the pixels carry
    assert table.levels("k4", noisy).sigma_tn == 0.2
    # in latent space pixel noise is not "present" in the data
    assert LevelTable(cfg, pixel_space=False).levels("k2", noisy) == Levels(0.2, None, 0.0)


def test_bounds_use_the_buffer_only_for_noisy_samples():
    table = LevelTable(AmbientConfig(enabled=True, buffer=0.1), pixel_space=True)
    assert table.bounds(Levels(0.0, None)) == (0.0, math.inf)
    assert table.bounds(Levels(0.5, 3.0)) == (0.6, 3.0)


@pytest.mark.parametrize("rule,message", [
    ({"sigma_tn": 1}, "a non-empty match"),
    ({"match": {"a": 1}, "sigma_tn": -1}, r"ambient.rules\[0\].sigma_tn: expected a number >= 0"),
    ({"match": {"a": 1}, "sigma_tn": 1, "sigma_max": 0.5}, "sigma_max=0.5 must be above sigma_tn=1"),
    ({"match": {"a": 1}, "sigmatn": 1}, "unknown keys"),
])
def test_bad_rules_are_one_line_errors(rule, message):
    with pytest.raises(ConfigError, match=message):
        check_rules([rule])


# ----------------------------------------------------------------------------- selection
def test_sigma_first_picks_only_eligible_samples_uniformly():
    lo = np.array([0.0] * 10 + [0.5] * 30 + [2.0] * 60)
    hi = np.array([np.inf] * 10 + [np.inf] * 30 + [np.inf] * 60)
    index = EligibilityIndex(lo, hi)
    rng = np.random.default_rng(0)
    low = index.choose(np.full(4000, 0.3), rng)
    assert set(low.tolist()) <= set(range(10))
    mid = index.choose(np.full(8000, 1.0), rng)
    assert set(mid.tolist()) <= set(range(40))
    assert abs((mid < 10).mean() - 0.25) < 0.02  # uniform over the 40 eligible: 10/40 clean (seeds 0-19: <= 0.013)
    high = index.choose(np.full(20000, 5.0), rng)
    counts = np.bincount(high, minlength=100)
    assert counts.min() > 120 and counts.max() < 290  # ~200 each (binomial sd 14; seeds 0-19: 158-246)
    assert index.fraction_eligible(1.0) == 0.4


def test_sigma_max_limits_use_to_low_noise():
    index = EligibilityIndex(np.array([0.0, 0.0]), np.array([np.inf, 0.5]))
    picks = index.choose(np.array([0.3] * 500 + [2.0] * 500), np.random.default_rng(1))
    assert set(picks[500:].tolist()) == {0} and set(picks[:500].tolist()) == {0, 1}


def test_sigma_first_batch_redraws_where_nothing_is_eligible_and_is_deterministic():
    index = EligibilityIndex(np.array([1.0, 1.0, 3.0]), np.array([np.inf] * 3))  # nothing clean
    dist = LogNormal(0.0, 1.0)

    def run():
        gen = torch.Generator().manual_seed(5)
        sigma = dist.sample(64, generator=torch.Generator().manual_seed(4))
        return sigma_first_batch(index, sigma, lambda n, _r: dist.sample(n, generator=gen), seed=0, step=7)

    (idx, sigma), (idx2, sigma2) = run(), run()
    assert idx == idx2 and torch.equal(sigma, sigma2)
    lo = np.array([1.0, 1.0, 3.0])[idx]
    assert bool((sigma.numpy() > lo).all())
    empty = EligibilityIndex(np.array([np.inf]), np.array([np.inf]))
    with pytest.raises(ValueError, match="no eligible sample"):
        sigma_first_batch(empty, torch.ones(4), lambda n, _r: torch.ones(n), 0, 0, max_rounds=3)


def test_truncated_sigma_is_the_conditional_distribution():
    """sigma | lo < sigma <= hi under a log-normal: compare with the closed-form truncated CDF."""
    from scipy.stats import norm

    dist = LogNormal(-0.4, 1.0)
    n = 20000
    lo, hi = torch.full((n,), 0.5, dtype=torch.float64), torch.full((n,), 3.0, dtype=torch.float64)
    sigma = truncated_sigma(dist, lo, hi, torch.Generator().manual_seed(0)).numpy()
    assert sigma.min() > 0.5 and sigma.max() <= 3.0
    z = (np.log(np.sort(sigma)) + 0.4) / 1.0
    a, b = norm.cdf((math.log(0.5) + 0.4)), norm.cdf((math.log(3.0) + 0.4))
    cdf = (norm.cdf(z) - a) / (b - a)
    ks = np.abs(cdf - np.arange(1, n + 1) / n).max()
    # Kolmogorov-Smirnov at the 0.1% level (the 5% level with 1.2x slack fails about one seed in 100); over
    # generator seeds 0-19: ks * sqrt(n) 0.38-1.37; clipping to [0.5, 3] instead of truncating gives 55.
    assert ks < 1.95 / math.sqrt(n)


# ----------------------------------------------------------------------------- per batch
def _batch(keys, metas, mask=None):
    b = {"key": keys, "meta": metas}
    if mask is not None:
        b["mask"] = mask
    return b


def test_fixed_noise_realisation_is_per_sample_and_the_same_every_step():
    cfg = AmbientConfig(enabled=True, rules=[{"match": {"corruption": "blur"}, "sigma_tn": 0.5}])
    step = AmbientStep(cfg, LevelTable(cfg, pixel_space=True), LogNormal(0, 1), seed=3)
    x0 = torch.zeros(3, 3, 8, 8)
    metas = [{"corruption": "blur"}, {"corruption": "none"}, {"corruption": "noise", "sigma_tn": 0.2,
                                                              "corruption_params": {"sigma": 0.2}}]
    sigma = torch.tensor([1.0, 1.0, 1.0])
    a = step(_batch(["a", "b", "c"], metas), x0, sigma, step=0, offset=0)
    b = step(_batch(["c", "a", "b"], [metas[2], metas[0], metas[1]]), x0, sigma, step=9, offset=4)
    torch.testing.assert_close(a[0][0], b[0][1], rtol=0, atol=0)  # sample "a": same noise at any step/position
    assert float(a[0][0].std()) == pytest.approx(0.5, rel=0.15)  # 192 values (seeds 0-19: within 7.7%)
    assert torch.equal(a[0][1], x0[1]) and torch.equal(a[0][2], x0[2])  # clean, and already noisy: untouched
    torch.testing.assert_close(a[2]["sigma_tn"], torch.tensor([0.5, 0.0, 0.2]))
    z = torch.randn(3, 8, 8, generator=sample_generator("a", 3))
    torch.testing.assert_close(a[0][0], 0.5 * z)


def test_sample_first_redraws_sigma_inside_each_range():
    cfg = AmbientConfig(enabled=True, selection="sample_first", buffer=0.05)
    step = AmbientStep(cfg, LevelTable(cfg, pixel_space=True), LogNormal(0, 1), seed=0)
    metas = [{"sigma_tn": 0.8}, {"sigma_tn": 0.0}, {"sigma_tn": 0.1, "sigma_max": 0.3}]
    sigma_in = torch.tensor([0.1, 0.1, 2.0])
    _, sigma, _, _ = step(_batch(["a", "b", "c"], metas), torch.zeros(3, 1, 4, 4), sigma_in, step=0, offset=0)
    assert float(sigma[0]) > 0.85 and float(sigma[1]) == pytest.approx(0.1) and 0.15 < float(sigma[2]) <= 0.3


def test_masked_inputs_hide_more_than_the_data_and_delta_zero_is_refused():
    cfg = AmbientConfig(enabled=True, mask_input=True, delta=0.2)
    step = AmbientStep(cfg, LevelTable(cfg, pixel_space=True), LogNormal(0, 1), seed=0)
    observed = (torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    _, _, kwargs, loss_mask = step(_batch(list("abcd"), [{}] * 4, observed), torch.zeros(4, 3, 32, 32),
                                   torch.ones(4), step=0, offset=0)
    seen = kwargs["input_mask"]
    assert torch.equal(loss_mask, observed) and bool((seen <= observed).all())
    assert float(seen.sum() / observed.sum()) == pytest.approx(0.8, abs=0.03)  # seeds 0-19: within 0.018
    with pytest.raises(ConfigError, match="nothing it cannot see is ever supervised"):
        AmbientStep(AmbientConfig(enabled=True, mask_input=True, delta=0.0), LevelTable(cfg, True), LogNormal(), 0)
    plain = AmbientStep(AmbientConfig(enabled=True), LevelTable(cfg, True), LogNormal(), 0)
    with pytest.raises(ValueError, match="set ambient.mask_input=true"):
        plain(_batch(["a"], [{}], observed[:1]), torch.zeros(1, 3, 32, 32), torch.ones(1), 0, 0)


# ----------------------------------------------------------------------------- sampling with masks
def test_fixed_mask_denoiser_repeats_masks_over_guidance_branches():
    calls = []

    class Recorder:
        parameterization = None

        def __call__(self, x, sigma, input_mask=None, **cond):
            calls.append(input_mask)
            return x * input_mask

    gens = [torch.Generator().manual_seed(k) for k in range(3)]
    masks = sampling_masks(gens, (3, 8, 8), keep_prob=0.5, draws=2)
    assert masks.shape == (2, 3, 1, 8, 8)
    again = sampling_masks([torch.Generator().manual_seed(k) for k in range(3)], (3, 8, 8), 0.5, 2)
    assert torch.equal(masks, again)
    den = FixedMaskDenoiser(Recorder(), masks)
    x = torch.ones(6, 3, 8, 8)  # two guidance branches of 3 images
    out = den(x, torch.ones(6))
    assert len(calls) == 2 and torch.equal(calls[0][:3], calls[0][3:])
    torch.testing.assert_close(out[:3], masks.mean(0).expand(-1, 3, -1, -1))


# ----------------------------------------------------------------------------- whole runs
def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_ambient_noise_run_trains_resumes_exactly_and_samples(tmp_path):
    cfg = write_config(tmp_path / "c.yaml",
                       data={"source": "shapes:48", "resolution": 16, "cache": True,
                             "corruption": [[0.6, "noise:0.3"], [0.3, "blur:1.0"]]},
                       optim={"lr": 1e-3, "schedule": "constant", "warmup_steps": 0},
                       ambient={"enabled": True, "rules": [{"match": {"corruption": "blur"}, "sigma_tn": 0.8}]},
                       train={"steps": 6, "batch_size": 8, "micro_batch_size": 4, "threads": 1},
                       checkpoint={"every": 3, "keep_last": 3})
    full = tmp_path / "full"
    proc = run_train(cfg, full)
    assert "ambient: sigma_first over 48 samples" in proc.stdout + proc.stderr
    part = tmp_path / "part"
    run_train(cfg, part, "train.steps=3")
    run_train(cfg, part)
    a, b = losses(full), losses(part)
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-6) for k in a)
    proc = __import__("subprocess").run(
        [__import__("sys").executable, "-m", "microdiff", "sample", "a red circle", "--checkpoint",
         str(full / "pipeline"), "-n", "1", "--steps", "2", "--out", str(tmp_path / "s")],
        capture_output=True, text=True, env=__import__("train_helpers").env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_sigma_first_batches_respect_every_samples_levels(tmp_path):
    from microdiff.train.config import load_config
    from microdiff.train.trainer import Trainer

    path = write_config(tmp_path / "c.yaml",
                        data={"source": "shapes:40", "resolution": 16, "cache": True,
                              "corruption": [[0.5, "noise:0.3"], [0.3, "blur:1.0"]]},
                        ambient={"enabled": True, "buffer": 0.05,
                                 "rules": [{"match": {"corruption": "blur"}, "sigma_tn": 1.5}]},
                        train={"steps": 30, "batch_size": 8, "micro_batch_size": 8, "threads": 1})
    trainer = Trainer(load_config(path), tmp_path / "run")
    seen_noisy = 0
    for micro in trainer.data.steps(0, 30):
        for _, batch in micro:
            for meta, s in zip(batch["meta"], batch["sigma"].tolist()):
                lo = {"noise": 0.35, "blur": 1.55}.get(meta["corruption"], 0.0)
                assert s > lo
                seen_noisy += meta["corruption"] != "none"
    assert seen_noisy > 0


def test_masked_ambient_run_builds_mask_channels(tmp_path):
    cfg = write_config(tmp_path / "c.yaml",
                       model={"backbone": "MicroDiT_Nano_2"},
                       data={"source": "shapes:24", "resolution": 16, "cache": True, "corruption": [[0.8, "mask:0.5"]]},
                       ambient={"enabled": True, "mask_input": True, "delta": 0.1, "mask_block": 2},
                       train={"steps": 2, "batch_size": 8, "micro_batch_size": 8, "threads": 1})
    run_train(cfg, tmp_path / "run")
    pipe_cfg = json.loads(json.dumps(__import__("yaml").safe_load((tmp_path / "run/pipeline/pipeline.yaml").read_text())))
    assert pipe_cfg["defaults"]["mask_keep_prob"] == pytest.approx(0.9)
    from microdiff.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert pipe.denoiser.backbone.in_channels == 6 and pipe.denoiser.backbone.out_channels == 3
    images = pipe.generate(["a red circle", "a blue square"], num_inference_steps=2, seed=1)
    again = pipe.generate(["a red circle", "a blue square"], num_inference_steps=2, seed=1)
    assert images.shape == (2, 3, 16, 16) and torch.equal(images, again)


def test_rules_match_globs_and_lists():
    from microdiff.train.ambient import rule_matches

    assert rule_matches({"source": "*diffdb*"}, {"source": "./datadir/diffdb/mds_latents"})
    assert not rule_matches({"source": "*diffdb*"}, {"source": "./datadir/cc12m/mds"})
    assert rule_matches({"source": ["a", "b*"], "corruption": "blur"}, {"source": "bx", "corruption": "blur"})
    assert not rule_matches({"corruption": "blur"}, {})


def test_ambient_o_stages_file_applies_its_ambient_section_to_every_stage():
    from importlib import resources

    from microdiff.train.config import load_config, shared_sections, stage_files

    path = resources.files("microdiff") / "configs" / "micro_diffusion" / "ambient_o.yaml"
    stages = stage_files(path)
    assert len(stages) == 4
    for stage in stages:
        config = load_config(stage, data=shared_sections(path))
        assert config.ambient.enabled and config.ambient.weighting == "ambient_o"
        assert config.ambient.rules == [{"match": {"source": "*diffdb*"}, "sigma_tn": 2.0}]
    assert load_config(stages[1], data=shared_sections(path)).loss.mask_ratio == 0.0  # the stage's own values stay


def test_image_folder_sources_are_corrupted_per_key_the_same_every_time(tmp_path):
    from microdiff.data.shapes import write_shapes_folder
    from microdiff.train.config import DataConfig
    from microdiff.train.data import build_map_dataset

    write_shapes_folder(tmp_path / "imgs", 6, resolution=16, progress=False)
    config = DataConfig(source=str(tmp_path / "imgs"), resolution=16, corruption=[[1.0, "noise:0.2"]])
    a, b = build_map_dataset(config), build_map_dataset(config)
    for i in range(6):
        x, y = a[i], b[i]
        assert x["meta"]["corruption"] == "noise" and x["meta"]["sigma_tn"] == 0.2
        assert torch.equal(x["image"], y["image"])
    assert not torch.equal(a[0]["image"] - a[1]["image"], torch.zeros_like(a[0]["image"]))


def test_finetune_a_plain_model_on_masked_data_without_mask_channels(tmp_path):
    base = write_config(tmp_path / "base.yaml", train={"steps": 2, "batch_size": 8, "micro_batch_size": 8,
                                                       "threads": 1})
    run_train(base, tmp_path / "base")
    tune = write_config(tmp_path / "tune.yaml",
                        model={"backbone": "MicroDiT_Nano_2", "init_from": str(tmp_path / "base")},
                        data={"source": "shapes:16", "resolution": 16, "cache": True, "corruption": [[1.0, "dust:0.6"]]},
                        ambient={"enabled": True, "mask_input": True, "mask_channels": False, "delta": 0.1},
                        train={"steps": 2, "batch_size": 8, "micro_batch_size": 8, "threads": 1})
    proc = run_train(tune, tmp_path / "tune")
    assert "initialised from" in proc.stdout + proc.stderr
    from microdiff.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(tmp_path / "tune" / "pipeline")
    assert pipe.denoiser.backbone.in_channels == 3 and pipe.defaults.mask_keep_prob == pytest.approx(0.9)
    assert pipe.generate(["a red circle"], num_inference_steps=2).shape == (1, 3, 16, 16)


def test_truncated_sampling_returns_the_x0_estimate_at_the_stop_level():
    from microdiff.diffusion import schedules
    from microdiff.diffusion.samplers import get_sampler

    grid = schedules.truncate(schedules.karras(10, 0.002, 80.0, dtype=torch.float64), 0.5)
    assert float(grid[-2]) == 0.5 and float(grid[-1]) == 0 and bool((grid[:-2] > 0.5).all())
    seen = []

    def denoiser(x, sigma):
        seen.append(float(sigma[0]))
        return x * 0.5  # any deterministic function of (x, sigma)

    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80
    states = []
    for name in ("euler", "heun"):
        seen.clear()
        out = get_sampler(name)(denoiser, x, grid, callback=lambda d: states.append(d), disable=True)
        last = states[-1]
        assert float(last["sigma"]) == 0.5 and min(seen) == 0.5
        torch.testing.assert_close(out, last["x"] * 0.5)  # D(x, sigma_stop)
    with pytest.raises(ValueError, match="must be > 0"):
        schedules.truncate(grid, 0.0)


def test_min_quality_keeps_only_samples_at_or_above_it():
    from microdiff.train.config import DataConfig
    from microdiff.train.data import build_batches, build_map_dataset, split_batch

    config = DataConfig(source="shapes:60", resolution=16, corruption=[[0.7, "noise:0.2"]], min_quality=0.5)
    full = build_map_dataset(DataConfig(source="shapes:60", resolution=16, corruption=[[0.7, "noise:0.2"]]))
    clean = [i for i in range(60) if full[i]["meta"]["quality"] >= 0.5]
    batches = build_batches(config, 4, split_batch(4, 1, 0, 4), 0, 1, progress=False)
    assert len(batches.dataset) == len(clean) and 5 < len(clean) < 40
    assert all(batches.dataset[j]["meta"]["corruption"] == "none" for j in range(len(clean)))
    with pytest.raises(ValueError, match="no sample has quality >= min_quality=0.5"):
        build_batches(DataConfig(source="shapes:8", resolution=16, corruption=[[1.0, "noise:0.2"]], min_quality=0.5),
                      4, split_batch(4, 1, 0, 4), 0, 1, progress=False)
    with pytest.raises(ValueError, match=r"min_quality: must be in \[0, 1\]"):  # range-checked with the config
        DataConfig(source="shapes:8", min_quality=2.0)


# ----------------------------------------------------------------------------- consistency phase
@pytest.mark.parametrize("options,message", [
    ({"consistency_weight": -1.0}, "must be >= 0"),
    ({"consistency_weight": 0.5, "consistency_steps": 0}, "both must be integers >= 1"),
    ({"consistency_weight": 0.5, "target": "plain"}, "needs ambient.target=tweedie"),
    ({"consistency_weight": 0.5, "mask_input": True}, "cannot be combined with ambient.mask_input"),
])
def test_consistency_options_are_checked(options, message):
    cfg = AmbientConfig(enabled=True, **options)
    with pytest.raises(ConfigError, match=message):
        AmbientStep(cfg, LevelTable(cfg, pixel_space=True), LogNormal(0, 1), seed=0)


def test_consistency_inputs_pick_noisy_samples_below_their_level_and_repeat_per_step():
    cfg = AmbientConfig(enabled=True, consistency_weight=0.5, consistency_samples=2)
    step = AmbientStep(cfg, LevelTable(cfg, pixel_space=True), LogNormal(-1.2, 1.2), seed=1)
    metas = [{"sigma_tn": 0.0}, {"sigma_tn": 0.3}, {"sigma_tn": 0.0}, {"sigma_tn": 0.8}, {"sigma_tn": 0.5}]
    batch = _batch(list("abcde"), metas)
    x0 = torch.randn(5, 3, 8, 8)
    x_tn, _, kwargs, _ = step(batch, x0, torch.full((5,), 2.0), step=4, offset=0)
    out = kwargs["consistency"]
    assert out["index"].tolist() == [1, 3]  # the first two noisy samples
    assert bool((out["sigma"] > 0).all()) and bool((out["sigma"] <= torch.tensor([0.3, 0.8])).all())
    torch.testing.assert_close(out["x_tn"], x_tn[[1, 3]])  # with their fixed noise realisation added
    assert not torch.equal(out["x_tn"], x0[[1, 3]])
    again = step(batch, x0, torch.full((5,), 2.0), step=4, offset=0)[2]["consistency"]
    torch.testing.assert_close(again["sigma"], out["sigma"], rtol=0, atol=0)
    clean = step(_batch(["a"], [{"sigma_tn": 0.0}]), x0[:1], torch.ones(1), step=0, offset=0)[2]
    assert clean["consistency"] is None


def test_train_module_adds_the_weighted_consistency_loss_to_the_denoising_loss():
    from microdiff.ambient.consistency import consistency_loss
    from microdiff.diffusion.denoiser import Denoiser, make_parameterization
    from microdiff.diffusion.loss import denoising_loss, make_weighting
    from microdiff.models.unet import UNet
    from microdiff.train.trainer import TrainModule

    torch.manual_seed(0)
    backbone = UNet(in_channels=3, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_downsample=(2,),
                    attention_head_dim=8, caption_channels=4, norm_groups=4)
    param = make_parameterization("edm", sigma_data=0.5)
    weighting = make_weighting("edm", param)
    module = TrainModule(backbone, param, None, "BLC", caption_mask=True)
    x, noise = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    sigma, sigma_tn = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0.0, 0.4, 0.3])
    text = {"text": torch.randn(3, 2, 4), "text_mask": torch.ones(3, 2, dtype=torch.bool)}
    drop = torch.tensor([False, True, False])
    inputs = {"index": torch.tensor([1, 2]), "x_tn": x[[1, 2]], "sigma_tn": sigma_tn[[1, 2]],
              "sigma": torch.tensor([0.1, 0.2]), "steps": 2, "weight": 0.25}
    ambient = {"sigma_tn": sigma_tn, "consistency": {**inputs, "generator": torch.Generator().manual_seed(7)}}
    loss, _ = module(x, sigma, noise, text, drop, weighting, "mean", None, ambient)

    denoiser = Denoiser(backbone, param)
    cond = module.condition(text, drop)
    plain = denoising_loss(denoiser, x, sigma, noise=noise, weighting=weighting, reduction="mean", cond=cond,
                           sigma_tn=sigma_tn).loss
    sub = {k: v[[1, 2]] for k, v in cond.items()}
    extra = consistency_loss(denoiser, x[[1, 2]], sigma_tn[[1, 2]], inputs["sigma"], 2,
                             torch.Generator().manual_seed(7), **sub).mean() / x[0].numel()
    assert float(extra.detach()) != 0
    torch.testing.assert_close(loss, plain + 0.25 * extra)
    torch.testing.assert_close(module.last_consistency, extra)


def test_a_run_with_the_consistency_phase_logs_it(tmp_path):
    cfg = write_config(tmp_path / "c.yaml",
                       data={"source": "shapes:24", "resolution": 16, "cache": True, "corruption": [[0.7, "noise:0.4"]]},
                       ambient={"enabled": True, "consistency_weight": 0.5, "consistency_steps": 2},
                       log={"every": 2}, train={"steps": 4, "batch_size": 8, "threads": 1})
    run_train(cfg, tmp_path / "run")
    rows = _metrics(tmp_path / "run")
    assert rows and all("consistency" in r and math.isfinite(r["consistency"]) for r in rows)
