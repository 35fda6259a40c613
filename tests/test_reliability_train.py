"""Issue 17, training: what a run folder does with damaged checkpoints, reused folders, a second writer,
a changed config and torn metrics, and the one-line errors of `microdiff train` for bad values."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from microdiff.cli import main
from microdiff.train.checkpoint import list_checkpoints, load_state

from train_helpers import env, losses, run_train, train_command, write_config  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture
def run(capsys):
    """``microdiff train CONFIG --out OUT ...`` in this process (the CLI's own entry point, without the
    seconds of a new interpreter): a CompletedProcess-like result."""

    def call(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(["train", str(config), "--out", str(out), *extra])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess([], code, captured.out, captured.err)

    return call



def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (the lock file aside) with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 12-step run with checkpoints at 4, 8 and 12."""
    root = tmp_path_factory.mktemp("finished")
    config = write_config(root / "c.yaml", train={"steps": 12}, checkpoint={"every": 4, "keep_last": 3})
    out = root / "run"
    run_train(config, out)
    assert [s for s, _ in list_checkpoints(out)] == [4, 8, 12]
    return config, out


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flipped":  # 2000 bytes in the middle, as a failing disk or a bad copy leaves them
        middle = len(data) // 2
        data[middle:middle + 2000] = bytes(b ^ 0xFF for b in data[middle:middle + 2000])
    elif how == "truncated":
        data = data[: len(data) // 3]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flipped", "truncated", "empty"])
def test_a_damaged_latest_checkpoint_is_reported_and_resume_continues_from_the_newest_intact_one(finished, tmp_path,
                                                                                                 how, run):
    config, straight = finished
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    damaged = out / "checkpoints" / "step-00000012" / "state.pt"
    damage(damaged, how)
    proc = run(config, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"checkpoint step-00000012 is damaged and is skipped: {damaged}" in proc.stdout
    assert "resuming from step-00000008, the newest intact checkpoint" in proc.stdout
    # steps 9..12 were trained again: the weights, EMA and exported pipeline equal the undamaged run's
    a, b = load_state(straight / "checkpoints" / "step-00000012"), load_state(out / "checkpoints" / "step-00000012")
    for key, value in a["model"].items():
        assert (b["model"][key] == value).all(), key
    pa, pb = (load_file(str(r / "pipeline" / "denoiser.safetensors")) for r in (straight, out))
    assert all((pa[k] == pb[k]).all() for k in pa)
    assert losses(out) == losses(straight)


def test_loading_a_damaged_state_directly_is_refused_in_one_line(finished, tmp_path):
    _, straight = finished
    ckpt = tmp_path / "step-00000012"
    shutil.copytree(straight / "checkpoints" / "step-00000012", ckpt)
    damage(ckpt / "state.pt", "flipped")
    with pytest.raises(ValueError, match=r"state.pt: content hash mismatch"):
        load_state(ckpt)


def test_no_intact_checkpoint_stops_the_run_and_touches_nothing(finished, tmp_path, run):
    config, straight = finished
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    for _, path in list_checkpoints(out):
        damage(path / "state.pt", "truncated")
    before = snapshot(out)
    proc = run(config, out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = error_lines(proc)[-1]
    assert last.startswith("microdiff train: error: ") and "none of the 3 checkpoints is intact" in last
    assert "state.pt: truncated" in last
    assert snapshot(out) == before


def test_resume_never_into_an_existing_run_is_refused_and_nothing_is_touched(finished, tmp_path, run):
    config, straight = finished
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = snapshot(out)
    proc = run(config, out, "--resume", "never")
    assert proc.returncode == 2
    assert error_lines(proc) == [f"microdiff train: error: --out {out} already holds a training run, and --resume "
                                 "never would overwrite it; pass a new --out, or --resume auto to continue that run"]
    assert snapshot(out) == before
    # a folder of other things is not a run: refused too, in any resume mode
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.png").write_bytes(b"not ours")
    proc = run(config, other)
    assert proc.returncode == 2 and "holds no microdiff run" in error_lines(proc)[-1]
    assert sorted(p.name for p in other.iterdir()) == ["cat.png"]  # not even a lock file: refused before locking
    # --out naming a file
    proc = run(config, other / "cat.png")
    assert proc.returncode == 2 and "a file, not a folder" in error_lines(proc)[-1]


def test_a_second_run_into_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, run):
    config = write_config(tmp_path / "c.yaml", train={"steps": 100000}, checkpoint={"every": 5, "keep_last": 2},
                          optim={"schedule": "constant", "warmup_steps": 0})
    out = tmp_path / "run"
    first = subprocess.Popen(train_command(config, out), env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list_checkpoints(out):
            time.sleep(0.1)
        assert list_checkpoints(out), "the first run wrote no checkpoint in time"
        second = run(config, out)
        assert second.returncode == 2
        line = error_lines(second)[-1]
        assert f"--out {out}: another training run (process {first.pid} on " in line and "pass another --out" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    at = list_checkpoints(out)[-1][0]
    third = run(config, out, f"train.steps={at + 2}")  # more or fewer steps: a resume-safe change
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"took over the lock of a run that is no longer running (process {first.pid} on" in third.stdout
    assert (out / ".lock").read_text() == ""  # released cleanly: empty


def test_a_changed_config_is_refused_with_the_changed_keys_unless_allowed_and_history_is_recorded(finished, tmp_path, run):
    config, straight = finished
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    original = (out / "config.yaml").read_text()
    before = snapshot(out)
    proc = run(config, out, "optim.lr=5e-4", "train.batch_size=4", "train.micro_batch_size=2")
    assert proc.returncode == 2
    line = error_lines(proc)[-1]
    assert "breaks an exact resume: optim.lr 0.001 -> 0.0005, train.batch_size 8 -> 4, train.micro_batch_size 4 -> 2" \
        in line and "--allow-config-change" in line
    assert snapshot(out) == before
    # a resume-safe change goes through and is recorded; config.yaml stays the original
    proc = run(config, out, "train.steps=14", "log.every=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "config.yaml").read_text() == original
    history = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 12 and history[-1]["allowed_by"] == "resume-safe keys"
    assert {c["key"]: (c["old"], c["new"]) for c in history[-1]["changes"]} == {"train.steps": (12, 14),
                                                                                "log.every": (1, 2)}
    # the user may insist; it is recorded as such, and the new value is the one trained with
    proc = run(config, out, "train.steps=16", "log.every=2", "optim.lr=5e-4", "--allow-config-change")
    assert proc.returncode == 0, proc.stderr[-2000:]
    history = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["allowed_by"] == "--allow-config-change" and history[-1]["step"] == 14
    assert {c["key"] for c in history[-1]["changes"]} == {"train.steps", "optim.lr"}
    assert load_state(list_checkpoints(out)[-1][1])["config"]["optim"]["lr"] == 5e-4
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 1e-3


def test_a_finished_stage_with_a_changed_config_is_refused_not_skipped(tmp_path, run):
    write_config(tmp_path / "s1.yaml", train={"steps": 3})
    (tmp_path / "stages.yaml").write_text("stages: [s1.yaml]\n")
    out = tmp_path / "md"
    assert run(tmp_path / "stages.yaml", out).returncode == 0
    proc = run(tmp_path / "stages.yaml", out, "optim.lr=5e-4")
    assert proc.returncode == 2 and "optim.lr 0.001 -> 0.0005" in error_lines(proc)[-1]


def test_metrics_after_a_resume_equal_the_uninterrupted_runs_and_a_torn_line_is_dropped(tmp_path, run):
    """checkpoint.every (7) is not a multiple of log.every (5): the window of steps 6-7 lives in the checkpoint."""
    common = {"optim": {"schedule": "constant", "warmup_steps": 0}, "log": {"every": 5},
              "checkpoint": {"every": 7, "keep_last": 3}}
    config = write_config(tmp_path / "c.yaml", train={"steps": 20}, **common)
    straight = tmp_path / "straight"
    assert run(config, straight).returncode == 0
    resumed = tmp_path / "resumed"
    assert run(config, resumed, "train.steps=7").returncode == 0  # ends at 7 (a partial row for 6-7), continues
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "loss": 0.3')  # what a kill mid-write leaves
    proc = run(config, resumed)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{resumed / 'metrics.jsonl'}: dropped 1 unreadable line(s)" in proc.stdout

    def rows(path):
        keep = ("step", "loss", "grad_norm", "lr")
        return [{k: v for k, v in json.loads(line).items() if k in keep or k.startswith("loss_sigma/")}
                for line in (path / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in rows(straight)] == [5, 10, 15, 20]
    assert rows(resumed) == rows(straight)


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "train.batch_size: must be at least 1, got 0"),
    ("train.micro_batch_size=-2", "train.micro_batch_size: must be between 1 and batch_size (8) or null, got -2"),
    ("optim.betas=[0.9]", "optim.betas: must be two numbers in [0, 1), e.g. [0.9, 0.999]; got [0.9]"),
    ("optim.lr=nan", "optim.lr: must be a positive number, got nan"),
    ("ema.decays=[]", "ema.decays: list at least one EMA decay, e.g. [0.999]"),
    ("ema.decays=[1.5]", "ema.decays: each decay must be a number in [0, 1), got [1.5]"),
    ("noise.options={p_man: -1.0}", "noise.options.p_man: not an option of LogNormal; its options are p_mean, "
                                    "p_std (did you mean p_mean?)"),
    ("noise.distribution=loguniform", "noise.options.p_mean: not an option of LogUniform"),
    ("train.device=gpu", "train.device=gpu: unknown device; choose one of auto, cpu, cuda, cuda:N, mps (did you mean cuda?)"),
    ("train.device=cuda:7", "train.device=cuda:7: "),
    ("sampling.sampler=hune", "sampling.sampler: unknown sampler 'hune'; choose one of"),
    ("log.every=0", "log.every: must be at least 1"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last: must be at least 1, got 0"),
    ("loss.caption_dropout=1.5", "loss.caption_dropout: must be in [0, 1], got 1.5"),
    ("model.backbone=MicroDiT_Nan_2", "(did you mean MicroDiT_Nano_2?)"),
])
def test_bad_values_end_in_one_line_naming_the_field(tmp_path, capsys, override, message):
    config = write_config(tmp_path / "c.yaml")
    out = tmp_path / "r"
    assert main(["train", str(config), "--out", str(out), override]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("microdiff train: error: ") and message in err[0], err
    assert not out.exists()


def test_an_out_that_cannot_be_a_folder_is_one_line(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    (tmp_path / "file").write_text("mine")
    assert main(["train", str(config), "--out", str(tmp_path / "file" / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {tmp_path / 'file' / 'run'}: cannot create this folder" in err[0]
    assert (tmp_path / "file").read_text() == "mine"


def test_a_checkpoint_from_before_the_hashes_is_still_checked_by_its_zip_crcs(finished, tmp_path):
    """A DONE that holds only the step (older checkpoints) has no hashes; torch's zip entries carry CRC-32s."""
    _, straight = finished
    ckpt = tmp_path / "step-00000012"
    shutil.copytree(straight / "checkpoints" / "step-00000012", ckpt)
    (ckpt / "DONE").write_text("12\n")
    (ckpt / "config.json").unlink()
    assert load_state(ckpt)["step"] == 12  # intact: loads as before
    damage(ckpt / "state.pt", "flipped")
    with pytest.raises(ValueError, match=r"state.pt: the training state is damaged \(entry .* fails its CRC check\)"):
        load_state(ckpt)


@pytest.mark.parametrize("how", ["flipped", "truncated", "empty"])
def test_every_torch_file_microdiff_reads_is_checked(tmp_path, how):
    """utils.weights.read_torch_file serves checkpoints, micro_diffusion .pt files, the quality classifier,
    Inception and VGG weights: a damaged file is one line naming it, never garbage tensors."""
    import torch

    from microdiff.models.dit import load_checkpoint_file

    path = tmp_path / "weights.pt"
    torch.save({"w": torch.arange(200_000, dtype=torch.float32)}, path)
    assert load_checkpoint_file(str(path))["w"][-1] == 199_999
    damage(path, how)
    with pytest.raises(ValueError, match=rf"^{path}: ") as err:
        load_checkpoint_file(str(path))
    assert "\n" not in str(err.value)


def test_an_allowed_change_the_checkpoint_cannot_take_is_one_line_and_recorded_nowhere(finished, tmp_path, run):
    config, straight = finished
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = snapshot(out)
    proc = run(config, out, "model.options={dim: 48}", "--allow-config-change")
    assert proc.returncode == 2
    line = error_lines(proc)[-1]
    assert f"{out / 'checkpoints' / 'step-00000012'}: weights do not match a TrainModule" in line
    assert "pass a new --out, and model.init_from=RUN" in line
    assert snapshot(out) == before  # no config_history.jsonl entry for a resume that did not happen


def test_a_damaged_run_config_is_one_line(tmp_path, run):
    config = write_config(tmp_path / "c.yaml", train={"steps": 2})
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model: [\n")
    proc = run(config, out)
    assert proc.returncode == 2 and error_lines(proc) == [
        f"microdiff train: error: {out / 'config.yaml'}: not valid YAML (while parsing a flow node); restore it "
        "from a checkpoint's config.json, or pass a new --out"]


@pytest.mark.parametrize("files, name, message", [
    ({"empty.yaml": ""}, "empty.yaml", "the config is empty; set at least the sections you mean"),
    ({"image.png": b"\x89PNG\r\n\x1a\n\x00\x00"}, "image.png", "not a YAML config (not UTF-8 text)"),
    ({"inner.yaml": "stages: [c.yaml]\n", "outer.yaml": "stages: [inner.yaml]\n"}, "outer.yaml",
     "stage inner.yaml is itself a stages file; list its stages here instead"),
    ({"a/s.yaml": None, "b/s.yaml": None, "dup.yaml": "stages: [a/s.yaml, b/s.yaml]\n"}, "dup.yaml",
     "two stages are named 's' (each stage trains into OUT/<file name>); rename one of the files"),
    ({"miss.yaml": "stages: [c.yaml, nope.yaml]\n"}, "miss.yaml", "nope.yaml does not exist; fix the name in 'stages'"),
])
def test_configs_that_cannot_be_what_was_meant_are_refused_before_anything_trains(tmp_path, run, files, name,
                                                                                   message):
    config = write_config(tmp_path / "c.yaml", train={"steps": 2})
    for rel, content in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            shutil.copy(config, path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    proc = run(tmp_path / name, tmp_path / "out")
    assert proc.returncode == 2 and len(error_lines(proc)) == 1 and message in error_lines(proc)[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_checkpoint_folders_without_done_are_not_a_silent_restart(finished, tmp_path, run):
    config, straight = finished
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    for _, path in list_checkpoints(out):
        (path / "DONE").unlink()
    before = snapshot(out)
    proc = run(config, out, "train.steps=14")
    assert proc.returncode == 2 and "none of the 3 checkpoints is intact" in error_lines(proc)[-1]
    assert "incomplete (no DONE)" in error_lines(proc)[-1]
    assert snapshot(out) == before


def test_ambient_annotations_of_another_dataset_are_refused(tmp_path, run):
    annotations = tmp_path / "annotations.csv"
    annotations.write_text("key,sigma_tn,sigma_max\n00000,0.5,\n00001,0.8,\n")
    config = write_config(tmp_path / "c.yaml", train={"steps": 2})
    proc = run(config, tmp_path / "out", "ambient.enabled=true", f"ambient.annotations={annotations}")
    assert proc.returncode == 2
    assert error_lines(proc)[-1].startswith(f"microdiff train: error: ambient.annotations={annotations}: none of its 2 "
                                            "keys is a sample of data.source=shapes:64 (its first key is '00000'")


def test_the_toy_demo_never_writes_over_another_folder(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "loss.png").write_bytes(b"my plot")
    assert main(["demo", "--toy", "--out", str(mine), "--steps", "20", "--samples", "20", "--no-progress"]) == 2
    assert "is not an earlier run of microdiff demo --toy" in capsys.readouterr().err
    assert (mine / "loss.png").read_bytes() == b"my plot"
    toy = tmp_path / "toy"
    assert main(["demo", "--toy", "--out", str(toy), "--steps", "20", "--samples", "20", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["demo", "--toy", "--out", str(toy), "--steps", "20", "--samples", "30", "--no-progress"]) == 2
    assert "made with other settings (n_samples 20 -> 30)" in capsys.readouterr().err
    assert main(["demo", "--samples", "30", "--out", str(tmp_path / "d")]) == 2  # --toy only: not ignored
    assert "--samples: applies to the toy demo only" in capsys.readouterr().err
