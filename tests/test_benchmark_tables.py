"""The arithmetic of benchmarks/run.py's tables (the timing itself runs in the benchmark, not here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import run  # noqa: E402


def _row(mask, variant, rate, flops=None, loss=2.0):
    row = {"preset": "P", "image_px": 256, "mask": mask, "variant": variant, "images_per_s": rate, "first_loss": loss}
    if flops:
        row["TFLOP_s"] = flops * rate / 1e12
    return row


def test_ratios_compare_variants_at_one_mask_and_masks_within_one_variant():
    rows = [_row(0.0, "reference", 10.0, 6e9, 2.0), _row(0.0, "optimised", 15.0, 6e9, 2.002),
            _row(0.75, "reference", 20.0, 3e9), _row(0.75, "optimised", 33.0, 3e9),
            {"preset": "P", "image_px": 256, "mask": 0.75, "variant": "optimised+ckpt", "error": "OOM"}]
    got = {r["comparison"]: r for r in run.training_ratios(rows)}
    assert got["P 256 px mask 0.0: optimised / reference"]["measured"] == pytest.approx(1.5)
    assert got["P 256 px mask 0.0: optimised / reference"]["loss_rel_err"] == pytest.approx(1e-3)
    assert got["P 256 px mask 0.75: optimised / reference"]["measured"] == pytest.approx(1.65)
    masked = got["P 256 px optimised: mask 0.75 / mask 0"]
    assert masked["measured"] == pytest.approx(2.2) and masked["flop_ratio"] == pytest.approx(2.0)
    assert len(got) == 4  # the failed case adds no ratio


def test_section_names_follow_the_plan():
    assert [k for k in run.PLANS["cuda"] if k.startswith("training")] == ["training", "training-512"]
    assert all(len(case) == 4 and set(case[3]) <= set(run.VARIANTS) for plan in run.PLANS.values()
               for key, cases in plan.items() if key.startswith("training") for case in cases)


def test_mfu_counts_model_flops_not_the_recomputation_of_checkpointing():
    peaks = {"fp32": 1e12, "bf16": 2e12}
    rows = [{"preset": "P", "image_px": 256, "mask": 0.0, "variant": v, "images_per_s": 10.0, "flops_per_image": f}
            for v, f in (("optimised", 6e9), ("optimised+ckpt", 8e9), ("reference", None))]
    got = run.add_mfu(rows, peaks)  # 6e9 FLOPs x 10 img/s = 0.06 TFLOP/s for every variant
    assert [r["MFU_%"] for r in got] == pytest.approx([3.0, 3.0, 6.0])  # bf16 peak, bf16, fp32 peak
