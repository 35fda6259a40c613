"""The trainer's pure parts against closed forms: schedules, EMA, parameter groups, batch splits,
loss by sigma, checkpoint bookkeeping, stage initialisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from microdiff.models import MicroDiT_Nano_2, UNet_Small
from microdiff.train.checkpoint import latest_checkpoint, list_checkpoints, resolve_resume, save_checkpoint
from microdiff.train.data import global_batch_indices, split_batch
from microdiff.train.ema import EMA, ema_decay
from microdiff.train.monitor import loss_by_sigma, truncate_metrics
from microdiff.train.optim import lr_factor, parameter_groups


def test_lr_schedules_closed_form():
    kw = dict(total_steps=110, warmup_steps=10, final_lr_ratio=0.33)
    assert [lr_factor(s, schedule="cosine", **kw) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(60, schedule="cosine", **kw) == pytest.approx(0.33 + 0.67 * 0.5)  # half way: cos = 0
    assert lr_factor(110, schedule="cosine", **kw) == pytest.approx(0.33)
    assert lr_factor(200, schedule="cosine", **kw) == pytest.approx(0.33)  # stays at the floor
    assert lr_factor(35, schedule="linear", **kw) == pytest.approx(1 - 0.67 * 0.25)
    assert lr_factor(50, schedule="constant", **kw) == 1.0
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_factor(50, schedule="exp", **kw)


def test_ema_matches_float64_recursion():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", p)], decays=[0.9, 0.5], warmup=True, start_step=2)
    ref = {0.9: np.zeros(3), 0.5: np.zeros(3)}
    updates = 0
    for step in range(12):
        with torch.no_grad():
            p.copy_(torch.tensor([step, -step, 0.5 * step ** 2], dtype=torch.float32))
        ema.update(step)
        value = p.detach().double().numpy()
        for d in ref:
            if step < 2:
                ref[d] = value.copy()
            else:
                beta = min(d, (1 + updates) / (10 + updates))
                ref[d] = beta * ref[d] + (1 - beta) * value
        updates += step >= 2
    for d in ref:
        np.testing.assert_allclose(ema.weights(d)["w"].double().numpy(), ref[d], rtol=1e-6)
    assert ema_decay(0.9999, 0) == pytest.approx(0.1) and ema_decay(0.9999, 10**7) == 0.9999
    state = ema.state_dict()
    other = EMA([("w", p)], decays=[0.9, 0.5])
    other.load_state_dict(state)
    assert other.updates == ema.updates and torch.equal(other.weights(0.5)["w"], ema.weights(0.5)["w"])
    with pytest.raises(ValueError, match="differ from the config"):
        EMA([("w", p)], decays=[0.99]).load_state_dict(state)
    with pytest.raises(ValueError, match="no EMA with decay 0.3"):
        ema.weights(0.3)


def test_parameter_groups_find_experts_by_module_type_and_skip_decay_on_norms():
    model = MicroDiT_Nano_2()
    groups = parameter_groups(model, lr=1.0, weight_decay=0.1, expert_lr_scale=0.5)
    by_name = {g["name"]: g for g in groups}
    names = {id(p): n for n, p in model.named_parameters()}
    experts = [names[id(p)] for p in by_name["experts/decay"]["params"]]
    # micro_diffusion's own filter ('moe' in the name) finds none of these
    assert experts and not any("moe" in n for n in experts)
    assert all(n.endswith((".mlp.w1", ".mlp.w2", ".mlp.gate.weight")) for n in experts)
    assert by_name["experts/decay"]["lr"] == 0.5 and by_name["backbone/decay"]["lr"] == 1.0
    no_decay = [names[id(p)] for p in by_name["backbone/no_decay"]["params"]]
    assert by_name["backbone/no_decay"]["weight_decay"] == 0.0
    assert all(("norm" in n) or n.endswith("bias") or model.get_parameter(n).ndim < 2 for n in no_decay)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    flat = parameter_groups(UNet_Small(), lr=1.0, weight_decay=0.1, no_decay_on_norms=False)
    assert [g["name"] for g in flat] == ["backbone/decay"]


def test_global_batches_are_the_same_for_any_split():
    n, batch = 37, 8
    seen = [i for step in range(20) for i in global_batch_indices(n, batch, step, seed=3)]
    # an endless sequence of permutations: every epoch holds each index once
    for epoch in range(len(seen) // n):
        assert sorted(seen[epoch * n:(epoch + 1) * n]) == list(range(n))
    one = split_batch(8, 1, 0, 4)
    two = split_batch(8, 2, 0, 4) + split_batch(8, 2, 1, 4)
    assert one == two == [(0, 4), (4, 4)]
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        split_batch(9, 2, 0, 1)
    with pytest.raises(ValueError, match="micro_batch_size=3 must divide"):
        split_batch(8, 1, 0, 3)


def test_loss_by_sigma_buckets():
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0])
    sigma = torch.tensor([0.05, 0.2, 0.3, 10.0])
    out = loss_by_sigma(per_sample, sigma, [0.1, 1.0])
    assert out == {"0-0.1": (1.0, 1), "0.1-1": (5.0, 2), "1-inf": (4.0, 1)}


def test_checkpoints_keep_last_and_ignore_incomplete(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"step": step, "x": torch.ones(2) * step}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    # a half-written checkpoint (no DONE marker) is never picked
    broken = tmp_path / "checkpoints" / "step-00000009"
    broken.mkdir()
    (broken / "state.pt").write_bytes(b"garbage")
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    assert resolve_resume(tmp_path, "auto").name == "step-00000003"
    assert resolve_resume(tmp_path, "never") is None
    assert resolve_resume(tmp_path / "empty", "auto") is None
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))


def test_truncate_metrics_drops_lines_after_the_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"step": {s}, "loss": {s}}}\n' for s in range(1, 8)))
    truncate_metrics(path, 4)
    assert [int(line.split(":")[1].split(",")[0]) for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_stage_init_loads_weights_at_a_new_resolution_and_honours_ignore_keys(tmp_path):
    from microdiff.diffusion.denoiser import EDM
    from microdiff.train.trainer import TrainModule, load_init_weights

    small = MicroDiT_Nano_2(input_size=8)
    torch.save(small.state_dict(), tmp_path / "dit.pt")
    big = TrainModule(MicroDiT_Nano_2(input_size=16), EDM(), None, "B1LC", False)
    report = load_init_weights(big, str(tmp_path / "dit.pt"), use_ema=True, ignore=[])
    assert report["loaded"] == len(small.state_dict())
    torch.testing.assert_close(big.backbone.x_embedder.proj.weight, small.x_embedder.proj.weight)
    assert big.backbone.pos_embed.shape[1] == 64  # recomputed for the 8x8 grid of the new size
    torch.testing.assert_close(big.backbone.pos_embed, big.backbone.positional_table())

    fresh = TrainModule(MicroDiT_Nano_2(input_size=16), EDM(), None, "B1LC", False)
    before = fresh.backbone.final_layer.linear.weight.clone()
    load_init_weights(fresh, str(tmp_path / "dit.pt"), use_ema=True, ignore=["final_layer.*"])
    torch.testing.assert_close(fresh.backbone.final_layer.linear.weight, before)

    other = TrainModule(MicroDiT_Nano_2(input_size=8, dim=96, head_dim=16), EDM(), None, "B1LC", False)
    with pytest.raises(ValueError, match="add it to model.init_ignore_keys"):
        load_init_weights(other, str(tmp_path / "dit.pt"), use_ema=True, ignore=[])
    with pytest.raises(FileNotFoundError, match="model.init_from"):
        load_init_weights(other, str(tmp_path / "missing.pt"), use_ema=True, ignore=[])
    assert math.isfinite(float(big.backbone.pos_embed.sum()))


def test_stage_init_from_a_pipeline_folder_takes_the_trained_text_encoder_too(tmp_path):
    from microdiff.diffusion.denoiser import EDM, Denoiser
    from microdiff.encoders.base import IdentityAutoencoder
    from microdiff.encoders.builtin import BuiltinTextEncoder
    from microdiff.pipeline import Pipeline
    from microdiff.train.trainer import TrainModule, load_init_weights

    trained_te = BuiltinTextEncoder(dim=32, layers=1, heads=2, max_length=32)
    with torch.no_grad():
        trained_te.token_embedding.weight.add_(1.0)  # "trained": differs from the seeded init
    dit = MicroDiT_Nano_2(in_channels=3)
    Pipeline(trained_te, IdentityAutoencoder(), Denoiser(dit, EDM())).save_pretrained(tmp_path / "pipe")

    fresh = TrainModule(MicroDiT_Nano_2(in_channels=3), EDM(), BuiltinTextEncoder(dim=32, layers=1, heads=2, max_length=32),
                        "B1LC", True)
    report = load_init_weights(fresh, str(tmp_path / "pipe"), use_ema=True, ignore=[])
    assert report["loaded"] == len(fresh.state_dict())
    torch.testing.assert_close(fresh.text_encoder.token_embedding.weight, trained_te.token_embedding.weight)
    torch.testing.assert_close(fresh.backbone.x_embedder.proj.weight, dit.x_embedder.proj.weight)
