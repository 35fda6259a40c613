"""Memorisation check: blocked/sharded top-k against a numpy brute force, report numbers, files,
and a real two-process (gloo) run that must equal the one-process result bit for bit."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from microdiff.eval.memorization import (distributed_top_k, memorization_report, save_report, shard_range,
                                         top_k_similar)
from microdiff.train.distributed import DistInfo


def brute_force(queries: np.ndarray, bank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Full float64 cosine matrix, rounded to 1e-9 so equal vectors tie exactly, stable argsort:
    ties go to the lower bank index."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    s = q @ b.T
    order = np.argsort(-np.round(s, 9), axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


def features_with_ties(seed: int = 0, n: int = 503, q: int = 37, d: int = 32):
    g = np.random.default_rng(seed)
    bank = g.standard_normal((n, d))
    queries = g.standard_normal((q, d))
    bank[[40, 90, 91, 200, 260, 261, 300, 480]] = queries[0] * np.array([1, 2, 0.5, 4, 1, 1, 0.25, 1])[:, None]
    bank[[10, 330]] = bank[7]  # a duplicated training sample: ties that are not at the top
    queries[1] = bank[7] + 1e-3 * g.standard_normal(d)
    bank[[150, 151]] = queries[2]
    return queries, bank


@pytest.mark.parametrize("batch_size", [2, 7, 64, 4096])
def test_blocked_top_k_equals_brute_force(batch_size):
    queries, bank = features_with_ties()
    want_s, want_i = brute_force(queries, bank, k=5)
    sims, idx = top_k_similar(torch.from_numpy(queries), torch.from_numpy(bank), k=5, batch_size=batch_size)
    assert sims.dtype == torch.float64 and idx.dtype == torch.int64 and sims.shape == idx.shape == (37, 5)
    np.testing.assert_array_equal(idx.numpy(), want_i)
    np.testing.assert_allclose(sims.numpy(), want_s, atol=1e-6, rtol=0)
    assert (sims[:, :-1] >= sims[:, 1:]).all()
    # 8 copies of query 0 (power-of-two scales are exact copies): the 5 lowest indices, similarity exactly 1
    assert idx[0].tolist() == [40, 90, 91, 200, 260] and (sims[0] == 1.0).all()
    assert idx[2, :2].tolist() == [150, 151]
    # the rows 7, 10, 330 are equal: query 1 (near row 7) sees them in index order with one similarity
    assert idx[1, :3].tolist() == [7, 10, 330] and sims[1, 0] == sims[1, 1] == sims[1, 2]
    # bit for bit the same whatever the block size (the point of the exact integer dot products)
    ref_s, ref_i = top_k_similar(queries, bank, k=5, batch_size=100)
    assert torch.equal(sims, ref_s) and torch.equal(idx, ref_i)


@pytest.mark.parametrize("n, copies", [(16, 8), (100, 20), (1000, 50)])
def test_ties_at_the_kth_place_go_to_the_lowest_indices(n, copies):
    """torch.topk returns an arbitrary subset of a tie that straddles the k-th place."""
    g = torch.Generator().manual_seed(n)
    queries, bank = torch.randn(3, 12, generator=g), torch.randn(n, 12, generator=g)
    where = torch.randperm(n, generator=g)[:copies]
    bank[where] = queries[0]
    sims, idx = top_k_similar(queries, bank, k=5, batch_size=4096)
    assert idx[0].tolist() == sorted(where.tolist())[:5] and (sims[0] == 1.0).all()


def test_float32_numpy_memmap_bank(tmp_path):
    queries, bank = features_with_ties(seed=1)
    path = tmp_path / "bank.npy"
    np.save(path, bank.astype(np.float32))
    mm = np.load(path, mmap_mode="r")
    sims, idx = top_k_similar(queries.astype(np.float32), mm, k=3, batch_size=50)
    want_s, want_i = brute_force(queries.astype(np.float32).astype(np.float64), bank.astype(np.float32), 3)
    np.testing.assert_array_equal(idx.numpy(), want_i)
    np.testing.assert_allclose(sims.numpy(), want_s, atol=1e-6, rtol=0)


def test_exact_copies_count_random_gaussians_do_not():
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(2000, 256, generator=g)
    copies = [5, 17, 999, 1500, 1999]
    queries = torch.cat([bank[copies], torch.randn(45, 256, generator=g)])
    sims, idx = top_k_similar(queries, bank, k=4, batch_size=512)
    assert (sims[:5, 0] == 1.0).all() and idx[:5, 0].tolist() == copies
    assert sims[5:, 0].max() < 0.4  # independent 256-d Gaussians: cosine ~ N(0, 1/256)
    report = memorization_report(sims, idx)
    assert [t["threshold"] for t in report["thresholds"]] == [0.95, 0.9, 0.85]
    assert all(t["count"] == 5 and t["fraction"] == 0.1 and t["distinct_train"] == 5 for t in report["thresholds"])
    assert [p["gen"] for p in report["closest_pairs"][:5]] == [0, 1, 2, 3, 4]


def test_report_numbers_on_a_constructed_case():
    sims = np.array([[0.97, 0.5], [0.91, 0.2], [0.97, 0.96], [0.86, 0.1], [0.2, 0.1], [0.9, 0.8]])
    idx = np.array([[3, 1], [4, 0], [3, 2], [7, 1], [8, 9], [4, 2]])
    report = memorization_report(sims, idx, thresholds=(0.95, 0.9, 0.85), n_closest=4)
    assert report["n_generated"] == 6 and report["k"] == 2
    by = {t["threshold"]: t for t in report["thresholds"]}
    assert (by[0.95]["count"], by[0.9]["count"], by[0.85]["count"]) == (2, 4, 5)  # 0.9 counts at >= 0.9
    assert by[0.9]["fraction"] == pytest.approx(4 / 6)
    assert (by[0.95]["distinct_train"], by[0.9]["distinct_train"], by[0.85]["distinct_train"]) == (1, 2, 3)
    assert report["top1_mean"] == pytest.approx((0.97 + 0.91 + 0.97 + 0.86 + 0.2 + 0.9) / 6)
    assert report["top1_median"] == pytest.approx(0.905)
    assert (report["top1_min"], report["top1_max"]) == (0.2, 0.97)
    assert report["closest_pairs"] == [{"gen": 0, "train": 3, "similarity": 0.97},
                                       {"gen": 2, "train": 3, "similarity": 0.97},
                                       {"gen": 1, "train": 4, "similarity": 0.91},
                                       {"gen": 5, "train": 4, "similarity": 0.9}]
    json.dumps(report)  # plain Python numbers only


def test_save_report_writes_every_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    train = torch.rand(40, 3, 16, 16, generator=g) * 2 - 1
    gen = torch.cat([train[[3, 9]], torch.rand(6, 3, 16, 16, generator=g) * 2 - 1])
    feats = lambda x: x.flatten(1)  # noqa: E731 - pixels as features
    sims, idx = top_k_similar(feats(gen), feats(train), k=3)
    report = memorization_report(sims, idx)
    records = [{"image": im, "caption": "x"} for im in train]  # a dataset's records, indexed lazily
    paths = save_report(tmp_path / "mem", report, (sims, idx), gen, records, pairs=5)
    assert sorted(p.name for p in (tmp_path / "mem").iterdir()) == ["closest_pairs.png", "memorization.json",
                                                                    "top1_hist.png", "top_k.csv"]
    assert json.loads(paths["json"].read_text()) == report
    rows = list(csv.reader(paths["csv"].open()))
    assert rows[0] == ["gen", "rank", "train", "similarity"] and len(rows) == 1 + 8 * 3
    assert rows[1] == ["0", "1", "3", "1.0"] and float(rows[3][3]) == sims[0, 2].item()
    for name in ("top1_hist.png", "closest_pairs.png"):
        with Image.open(tmp_path / "mem" / name) as im:
            im.verify()
    with Image.open(paths["pairs"]) as im:
        assert im.width > 4 * 2 * 96 and im.height > 2 * 96  # 5 pairs: 4 per row, 2 rows
    # similarities alone, without images: no pairs figure; without indices: a clear error
    paths = save_report(tmp_path / "b", report, sims, indices=idx)
    assert "pairs" not in paths and paths["hist"].is_file()
    with pytest.raises(ValueError, match="indices"):
        save_report(tmp_path / "c", report, sims)


def test_errors_name_the_problem():
    bank = torch.randn(4, 8)
    with pytest.raises(ValueError, match="k <= 4"):
        top_k_similar(torch.randn(2, 8), bank, k=5)
    with pytest.raises(ValueError, match="D=8 features, queries D=6"):
        top_k_similar(torch.randn(2, 6), bank, k=2)
    bank[2] = 0
    with pytest.raises(ValueError, match="bank row 2 is all zeros"):
        top_k_similar(torch.randn(2, 8), bank, k=2, batch_size=2)


def test_one_process_distributed_is_plain_top_k():
    queries, bank = features_with_ties(seed=2)
    info = DistInfo()
    assert shard_range(10, DistInfo(rank=1, world_size=3)) == (4, 7)
    got = distributed_top_k(queries, bank[100:], 100, 4, info)
    want = top_k_similar(queries, bank[100:], k=4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1] + 100)


WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from microdiff.eval.memorization import distributed_top_k, shard_range
    from microdiff.train.distributed import DistInfo
    rank, folder = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    info = DistInfo(rank=rank, world_size=2)
    data = torch.load(f"{folder}/data.pt")
    q, bank, out = data["queries"], data["bank"], {}
    n = len(bank)
    for name, cut, bs in [("uneven", 123, 16), ("tiny_shard", n - 3, 64), ("empty_shard", n, 4096)]:
        lo, hi = (0, cut) if rank == 0 else (cut, len(bank))
        out[name] = distributed_top_k(q, bank[lo:hi], lo, 5, info, batch_size=bs)
    lo, hi = shard_range(len(bank), info)
    mine = q[:11] if rank == 0 else q[11:]
    out["sharded_queries"] = distributed_top_k(mine, bank[lo:hi], lo, 5, info, queries_sharded=True, batch_size=50)
    try:
        distributed_top_k(q, bank[:200], 0 if rank == 0 else 150, 5, info)
    except ValueError as err:
        out["overlap_error"] = str(err)
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()
""")


def test_two_processes_match_one_process_exactly(tmp_path):
    queries, bank = features_with_ties(seed=4, q=29, d=48)
    bank[[122, 123, 124]] = queries[5]  # a tie across the shard boundary: rank 0's row must win
    bank[[499, 501]] = queries[6]  # and one across the 3-row shard (rows 500-502)
    torch.save({"queries": torch.from_numpy(queries).float(), "bank": torch.from_numpy(bank).float()},
               tmp_path / "data.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(r), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for p in procs:
        log = p.communicate(timeout=120)[0]
        assert p.returncode == 0, log[-3000:]
    want_s, want_i = top_k_similar(torch.from_numpy(queries).float(), torch.from_numpy(bank).float(), k=5)
    assert want_i[5, :3].tolist() == [122, 123, 124] and want_i[6, :2].tolist() == [499, 501]
    for r in range(2):
        out = torch.load(tmp_path / f"rank{r}.pt")
        for name in ("uneven", "tiny_shard", "empty_shard", "sharded_queries"):
            s, i = out[name]
            assert torch.equal(s, want_s) and torch.equal(i, want_i), (r, name)
        assert "overlap at row 150" in out["overlap_error"]
