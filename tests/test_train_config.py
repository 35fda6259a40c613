"""Configs are data: YAML + extends + dotted overrides, each mistake one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from microdiff.train.config import ConfigError, RunConfig, load_config, save_config, stage_files

from train_helpers import env

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 1.0e-3}\ntrain: {steps: 10}\n")
    c = load_config(path, ["optim.lr=5e-4", "optim.betas=[0.9,0.95]", "model.init_from=null", "optim.grad_clip=null",
                           "ema.decays=[0.99]", "train.precision=bf16", "log.sample_prompts=[a red circle, b]"])
    assert c.optim.lr == 5e-4 and c.optim.betas == [0.9, 0.95] and c.train.steps == 10
    assert c.optim.grad_clip is None and c.model.init_from is None and c.ema.decays == [0.99]
    assert c.train.precision == "bf16" and c.log.sample_prompts == ["a red circle", "b"]
    assert isinstance(c.optim.weight_decay, float) and c.data.resolution == RunConfig().data.resolution
    load_config(path, ["optim.lr=3"]).optim.lr == 3.0  # an int is a fine float


def test_extends_merges_mappings(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {lr: 1.0e-3, weight_decay: 0.1}\ntrain: {steps: 5}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\noptim: {lr: 2.0e-3}\n")
    c = load_config(tmp_path / "child.yaml")
    assert (c.optim.lr, c.optim.weight_decay, c.train.steps) == (2e-3, 0.1, 5)


def test_saved_config_reloads_identically(tmp_path):
    c = load_config(CONFIGS / "demo.yaml", ["train.steps=7"])
    save_config(c, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == c


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1"], "unknown key optim.lrr; did you mean optim.lr?"),
    (["optimizer.lr=1"], "unknown key optimizer; did you mean optim?"),
    (["optim.lr=fast"], "optim.lr: expected float, got 'fast' (str)"),
    (["train.steps=1.5"], "train.steps: expected int, got 1.5 (float)"),
    (["train.compile=maybe"], "train.compile: expected bool, got 'maybe' (str)"),
    (["optim.schedule=exp"], "optim.schedule: 'exp' is not one of constant, cosine, linear"),
    (["optim"], "override 'optim': write it as section.key=value"),
    (["optim.lr.x=1"], "optim.lr: expected float, got {'x': 1} (dict)"),
])
def test_mistakes_are_one_clear_line(tmp_path, override, message):
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, override)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("optim: {lr: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "typo.yaml").write_text("trian: {steps: 3}\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key trian; did you mean train\?"):
        load_config(tmp_path / "typo.yaml")


def test_cli_reports_config_errors_in_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 3}\n")
    proc = subprocess.run([sys.executable, "-m", "microdiff", "train", str(path), "--out", str(tmp_path / "r"),
                           "optim.lr=abc"], env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"microdiff train: error: {path}: optim.lr: expected float, got 'abc' (str)"]
    assert not (tmp_path / "r").exists()


def test_every_shipped_config_validates():
    files = sorted(CONFIGS.rglob("*.yaml"))
    assert len(files) >= 8
    for path in files:
        stages = stage_files(path)
        for stage in stages or [path]:
            c = load_config(stage)
            assert c.train.steps > 0, stage
            if stages is not None:
                assert stage.is_file(), stage


def test_micro_diffusion_stages_carry_the_paper_settings():
    stages = stage_files(CONFIGS / "micro_diffusion" / "stages.yaml")
    cs = [load_config(s) for s in stages]
    assert [c.loss.mask_ratio for c in cs] == [0.75, 0.0, 0.75, 0.0]
    assert [c.data.resolution for c in cs] == [256, 256, 512, 512]
    assert [c.optim.grad_clip for c in cs] == [0.25, 0.25, 0.5, 0.5]
    assert [c.noise.options for c in cs] == [{"p_mean": -0.6, "p_std": 1.2}] * 2 + [{"p_mean": 0.0, "p_std": 0.6}] * 2
    assert all(c.model.backbone == "MicroDiT_XL_2" and c.model.sigma_data == 0.9 for c in cs)
    assert all(c.train.batch_size == 2048 and c.optim.weight_decay == 0.1 for c in cs)
    assert cs[0].optim.schedule == "cosine" and cs[0].optim.lr == 2.4e-4 and cs[0].optim.final_lr_ratio == 0.33
    assert all(c.optim.lr == 8e-5 and c.optim.schedule == "constant" for c in cs[1:])
    assert all(c.optim.expert_lr_scale == 0.5 for c in cs)  # in effect here, unlike in micro_diffusion's trainer
    assert [c.model.init_from for c in cs] == [None, "previous", "previous", "previous"]
    assert cs[2].model.options.get("pos_interp_scale") == 2.0
    raw = yaml.safe_load((CONFIGS / "micro_diffusion" / "stages.yaml").read_text())
    assert len(raw["stages"]) == 4
