"""What makes the training step fast, checked on the CPU: no host-device sync inside a step, the fused
AdamW kernel, deferred divergence checks that still stop a run at the right step, page-locked batches,
and the compiled step (one graph, no break) computing what the eager one computes."""

from __future__ import annotations

import json

import pytest
import torch

from microdiff.train.config import load_config
from microdiff.train.monitor import _on_host
from microdiff.train.trainer import HealthCheck, Trainer, TrainingDiverged

from train_helpers import write_config


def _trainer(tmp_path, *overrides: str, **sections) -> Trainer:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_config(tmp_path / "c.yaml", **sections)
    trainer = Trainer(load_config(path, list(overrides)), tmp_path / "run")
    trainer._global_batch = trainer.config.train.batch_size
    return trainer


# Tensor.numpy() is not here: it refuses device tensors, so host code that uses it is host code.
_SYNCING = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "__index__")


# Functions that work on host tensors by design (sigmas drawn on CPU generators, per-sample ranges):
# their reads cost nothing on a GPU run.
_HOST_SIDE = {"truncated_sigma", "sigma_first_batch"}


class _NoReads:
    """Makes every Python-side read of a tensor's value raise. On a GPU each such read (``float(loss)``,
    ``if (x < 0).any():``, ``.item()``) waits for the device; a step that does none of them on the CPU
    does none on the GPU either. Reads inside the host-side helpers above are let through."""

    def __enter__(self):
        import sys

        self.saved = {name: getattr(torch.Tensor, name) for name in _SYNCING}
        saved = self.saved

        def refuse(name):
            def method(t, *args, **kwargs):
                frame = sys._getframe(1)
                while frame is not None:
                    if frame.f_code.co_name in _HOST_SIDE:
                        return saved[name](t, *args, **kwargs)
                    frame = frame.f_back
                raise AssertionError(f"the training step read a tensor's value with Tensor.{name}")
            return method

        for name in _SYNCING:
            setattr(torch.Tensor, name, refuse(name))
        return self

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("sections", [
    {},  # MicroDiT, 2 micro-batches, built-in text encoder, grad clipping
    {"loss": {"mask_ratio": 0.5}},
    {"data": {"source": "shapes:64", "resolution": 16, "cache": True, "corruption": [[0.5, "noise:0.2"]]},
     "ambient": {"enabled": True, "selection": "sample_first"}},
], ids=["plain", "masked", "ambient"])
def test_a_training_step_never_reads_a_tensor_value_on_the_host(tmp_path, sections):
    trainer = _trainer(tmp_path, **sections)
    trainer.health.immediate = False  # what a GPU run does
    batches = trainer.data.steps(0, 4)
    trainer.train_step(next(batches))  # first call: lazy set-up (caption cache, optimizer state)
    micro = next(batches)
    with _NoReads():
        metrics = trainer.train_step(micro)
    assert isinstance(metrics["loss"], torch.Tensor) and isinstance(metrics["grad_norm"], torch.Tensor)
    row = _on_host([metrics])[0]  # what the monitor writes: plain numbers, in one transfer
    assert isinstance(row["loss"], float) and row["loss"] > 0 and isinstance(row["grad_norm"], float)
    assert row["per_sample"].shape == (8,) and row["sigma"].device.type == "cpu"


def test_the_optimizer_is_fused_adamw_and_matches_the_unfused_update(tmp_path):
    fused = _trainer(tmp_path / "a")
    assert fused.optimizer.defaults["fused"] is True
    plain = _trainer(tmp_path / "b", "optim.fused=false")
    assert not plain.optimizer.defaults["fused"]
    for t in (fused, plain):
        batches = t.data.steps(0, 3)
        for _ in range(3):
            t.train_step(next(batches))
    a, b = fused.module.state_dict(), plain.module.state_dict()
    worst = max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-8)).item() for k in a)
    assert worst < 1e-4  # the same AdamW (lr 1e-3, 3 steps) to float32 round-off


def test_deferred_health_check_names_the_first_bad_step():
    check = HealthCheck(immediate=False)
    for step, (loss, norm) in enumerate([(1.0, 2.0), (0.5, float("inf")), (float("nan"), 1.0)]):
        check.add(step, torch.tensor(loss), torch.tensor(norm))
    assert check.first_bad() == (1, "gradient norm", float("inf"))
    assert check.first_bad() is None  # every pending value was looked at once
    check.add(7, torch.tensor(float("nan")), torch.tensor(1.0))
    step, what, value = check.first_bad()
    assert (step, what) == (7, "loss") and value != value


def test_a_deferred_divergence_stops_before_the_next_checkpoint(tmp_path):
    """GPU mode (checks every log.every steps): the run stops at the first check after the bad step,
    names that step, and the bad weights never reach a checkpoint."""
    path = write_config(tmp_path / "c.yaml", train={"steps": 12}, optim={"lr": 1e8, "grad_clip": None, "warmup_steps": 0},
                        checkpoint={"every": 4, "keep_last": 5}, log={"every": 4, "progress": False, "tensorboard": False})
    trainer = Trainer(load_config(path), tmp_path / "run")
    trainer.health.immediate = False
    with pytest.raises(TrainingDiverged, match=r"^step (\d+): the (loss|gradient norm) is") as err:
        trainer.fit(resume=None)
    bad_step = int(str(err.value).split()[1].rstrip(":"))
    saved = sorted(int(p.name.split("-")[-1]) for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert all(s <= bad_step for s in saved)  # step-k holds the weights after k updates: never the bad one


def test_batches_are_pinned_for_gpu_runs(tmp_path):
    """data.pin_memory defaults to on for CUDA and off on the CPU (where page-locking buys nothing)."""
    assert _trainer(tmp_path / "a").data._loader(0, 1).pin_memory is False
    assert _trainer(tmp_path / "b", "data.pin_memory=true").data._loader(0, 1).pin_memory is True
    if torch.cuda.is_available():
        trainer = _trainer(tmp_path / "c", "train.device=cuda")
        (_, batch), *_ = next(trainer.data.steps(0, 1))
        assert batch["image"].is_pinned()


def test_compiled_training_matches_eager_and_keeps_one_graph(tmp_path):
    """train.compile=true compiles MicroDiT's network with fullgraph=True (a graph break is an error), the
    token mask drawn from the step's generator outside it; Dynamo's capture with the eager backend keeps
    this test fast. Same losses as eager to round-off."""
    torch._dynamo.reset()
    try:
        runs = {}
        for name, compile_ in (("eager", False), ("compiled", True)):
            trainer = _trainer(tmp_path / name, f"train.compile={str(compile_).lower()}", "loss.mask_ratio=0.5")
            if compile_:
                trainer.module.backbone.compile_graph(backend="eager")
            batches = trainer.data.steps(0, 3)
            runs[name] = [float(trainer.train_step(next(batches))["loss"]) for _ in range(3)]
        assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-5)
    finally:
        torch._dynamo.reset()


def test_metrics_rows_are_plain_json(tmp_path):
    trainer = _trainer(tmp_path, "train.steps=2", "log.every=1")
    trainer.fit(resume=None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(isinstance(r["loss"], float) for r in rows)


def test_activation_checkpointing_inside_the_compiled_graph_gives_the_same_gradients():
    from microdiff.models import MicroDiT_Nano_2

    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        plain = MicroDiT_Nano_2().train()
        with torch.no_grad():
            for p in plain.parameters():
                p.normal_(0, 0.05)
        ckpt = type(plain)(**{**plain.config, "gradient_checkpointing": True}).train().compile_graph(backend="eager")
        ckpt.load_state_dict(plain.state_dict())
        x, t, y = torch.randn(2, 4, 8, 8), torch.randn(2), torch.randn(2, 1, 5, 32)
        for model in (plain, ckpt):
            model(x, t, y, mask_ratio=0.5, generator=torch.Generator().manual_seed(1))["sample"].square().sum().backward()
        for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    finally:
        torch._dynamo.reset()
