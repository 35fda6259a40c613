"""precompute: encodings land in the right shards, skipped items are counted, an interrupted run
resumes to the same bytes as an uninterrupted one, and ranks split the work.

The text encoder here is a real (tiny) one: a fixed random embedding table over characters, states
= table[codes] (padded to the batch's longest caption), pooled = masked mean. Expected values are
computed from it caption by caption, independently of batching, and compared after float16
rounding. The autoencoder is the identity, so latents must equal the images rounded to float16.
"""

import json
import os

import numpy as np
import pytest
import torch

from microdiff.data.precompute import precompute, resolve_device, resolve_dist
from microdiff.utils.devices import parse_device
from microdiff.data.shards import ShardStream, read_dataset_info, shard_name
from microdiff.encoders.base import IdentityAutoencoder, TextEncoding

RES = 8


class CharEncoder:
    """Characters -> rows of a fixed N(0, 1) table (seeded): a real, tiny text encoder."""

    dim, max_length = 5, 12

    def __init__(self, seed: int = 0):
        self.table = torch.randn(256, self.dim, generator=torch.Generator().manual_seed(seed))
        self.identifier = f"test-chars:d{self.dim}-seed{seed}"

    def encode(self, captions):
        codes = [list(c.encode("utf-8")[: self.max_length]) or [0] for c in captions]
        length = max(len(c) for c in codes)
        states = torch.zeros(len(codes), length, self.dim)
        mask = torch.zeros(len(codes), length, dtype=torch.bool)
        for b, c in enumerate(codes):
            states[b, : len(c)] = self.table[torch.tensor(c)]
            mask[b, : len(c)] = True
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return TextEncoding(states, mask, pooled)


class Images(torch.utils.data.Dataset):
    """Item i: an image from torch.Generator(i), or None for indices in ``skip`` (a corrupt file the
    dataset reported); raises at ``fail_at`` (a crash mid-run)."""

    def __init__(self, n, skip=(), fail_at=None, with_mask=False):
        self.n, self.skip, self.fail_at, self.with_mask = n, set(skip), fail_at, with_mask

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError(f"simulated crash at item {i}")
        if i in self.skip:
            return None
        g = torch.Generator().manual_seed(i)
        record = {"image": torch.rand(3, RES, RES, generator=g) * 2 - 1, "caption": "x" * (1 + i % 7) + f" {i}",
                  "key": f"img.{i}.png", "meta": {"source": "test", "quality": (i % 3) / 2}}
        if self.with_mask:
            record["mask"] = (torch.rand(1, RES, RES, generator=g) > 0.5).float()
        return record


def _run(out, dataset, **kw):
    kw = {"shard_size": 10, "batch_size": 4, "progress": False, **kw}
    return precompute(dataset, IdentityAutoencoder(), CharEncoder(), out, **kw)


def _tars(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))}


def test_samples_hold_the_encodings_and_skips_are_counted(tmp_path):
    data = Images(23, skip=(4, 17))
    report = _run(tmp_path, data)
    assert report["complete"] and report["shards_total"] == 3 and report["samples_written"] == 21
    assert report["skipped_written"] == 2

    info = read_dataset_info(tmp_path)
    assert (info["num_samples"], info["num_skipped"], info["skipped_items"]) == (21, 2, [4, 17])
    assert [s["samples"] for s in info["shards"]] == [9, 9, 3]  # items 4 and 17 skipped
    assert [s["items"] for s in info["shards"]] == [[0, 10], [10, 20], [20, 23]]
    assert info["latent_shape"] == [3, RES, RES] and info["text_shape"][1] == CharEncoder.dim
    assert (info["autoencoder"], info["text_encoder"]) == ("identity", CharEncoder().identifier)

    encoder = CharEncoder()
    got = list(ShardStream(tmp_path, shuffle_buffer=0))
    assert [s["index"] for s in got] == [i for i in range(23) if i not in (4, 17)]
    for s in got:
        record = data[s["index"]]
        assert torch.equal(s["latent"], record["image"].half().float())
        alone = encoder.encode([record["caption"]])  # no batch padding
        n = alone.states.shape[1]
        assert s["text_mask"][:n].all() and not s["text_mask"][n:].any()
        assert torch.equal(s["text"][:n], alone.states[0].half().float())
        assert not s["text"][n:][~s["text_mask"][n:]].any()  # padding of this encoder is zeros
        torch.testing.assert_close(s["pooled"], alone.pooled[0], rtol=2 ** -11, atol=1e-6)
        assert (s["caption"], s["key"], s["meta"]) == (record["caption"], record["key"], record["meta"])


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    reference = tmp_path / "reference"
    _run(reference, Images(35, skip=(3,)))

    out = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="item 25"):  # dies inside shard 2
        _run(out, Images(35, skip=(3,), fail_at=25))
    assert sorted(set(os.listdir(out)) - {".precompute-rank0.lock"}) == ["shard-000000.json", "shard-000000.tar",
                                                                         "shard-000001.json",
                                       "shard-000001.tar"]  # no half shard, no dataset.json
    (out / ".shard-000003.tar.tmp-99999").write_bytes(b"left by a killed process")

    report = _run(out, Images(35, skip=(3,)))
    assert (report["shards_already_done"], report["shards_written"]) == (2, 2)
    assert report["samples_written"] == 15 and report["complete"]
    assert [p.name for p in out.glob(".*")] == [".precompute-rank0.lock"]  # the stale temporary is gone
    assert _tars(out) == _tars(reference)  # byte for byte
    assert read_dataset_info(out) == read_dataset_info(reference)

    again = _run(out, Images(35, skip=(3,)))  # a finished folder: nothing to do
    assert again["shards_written"] == 0 and again["complete"]


def test_ranks_split_shards_and_the_last_one_writes_dataset_json(tmp_path):
    reference = tmp_path / "one"
    _run(reference, Images(42, skip=(11,)), rank=0, world_size=1)

    out = tmp_path / "two"
    first = _run(out, Images(42, skip=(11,)), rank=1, world_size=2)
    assert first["shards_written"] == 2 and not first["complete"] and first["dataset_json"] is None
    assert sorted(p.name for p in out.glob("*.tar")) == [shard_name(1), shard_name(3)]
    assert not (out / "dataset.json").exists()
    second = _run(out, Images(42, skip=(11,)), rank=0, world_size=2)
    assert second["shards_written"] == 3 and second["complete"]
    assert _tars(out) == _tars(reference)
    info, ref = read_dataset_info(out), read_dataset_info(reference)
    assert info.pop("settings")["world_size"] == 2 and ref.pop("settings")["world_size"] == 1
    assert info == ref


def test_extra_array_fields_are_kept(tmp_path):
    data = Images(6, with_mask=True)
    _run(tmp_path, data)
    assert read_dataset_info(tmp_path)["extra_fields"] == ["mask"]
    for s in ShardStream(tmp_path, shuffle_buffer=0):
        assert torch.equal(s["mask"], data[s["index"]]["mask"])


def test_rerun_with_other_encoders_is_refused(tmp_path):
    _run(tmp_path, Images(12))
    with pytest.raises(ValueError, match="text_encoder 'test-chars:d5-seed0' \\(now 'test-chars:d5-seed1'\\)"):
        precompute(Images(12), IdentityAutoencoder(), CharEncoder(seed=1), tmp_path, shard_size=10, progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        _run(tmp_path, Images(12), shard_size=5)


def test_bad_records_are_clear_errors(tmp_path):
    class NoCaption(Images):
        def __getitem__(self, i):
            return {"image": torch.zeros(3, RES, RES), "text": "a"}

    with pytest.raises(ValueError, match="dataset item 0: expected a dict with 'image' and 'caption'"):
        _run(tmp_path / "a", NoCaption(3))

    class Mixed(Images):
        def __getitem__(self, i):
            return {"image": torch.zeros(3, RES + i % 2, RES), "caption": "c"}

    with pytest.raises(ValueError, match="images of different sizes"):
        _run(tmp_path / "b", Mixed(3))

    class Huge(Images):
        def __getitem__(self, i):
            return {"image": torch.full((3, RES, RES), 1e6), "caption": "c"}

    with pytest.raises(ValueError, match="not finite in float16.*dtype=float32"):
        _run(tmp_path / "c", Huge(2))
    report = _run(tmp_path / "d", Huge(2), dtype="float32")
    assert report["complete"] and next(iter(ShardStream(tmp_path / "d")))["latent"].max() == 1e6


def test_rank_and_device_come_from_torchrun_env(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_dist() == (3, 4) and resolve_dist(0, 1) == (0, 1)
    assert parse_device("cuda") == torch.device("cuda", 1)  # parse only: this machine may have no GPU
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="rank"):
        resolve_dist(4, 4)


def test_cli_run_on_the_builtin_shapes(tmp_path):
    pytest.importorskip("microdiff.data.shapes")
    pytest.importorskip("microdiff.encoders.text")
    import argparse

    from microdiff.data import precompute as module

    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    identifier = "builtin:byte-d16-l1-h2-len96-mlp2-seed0"
    args = parser.parse_args(["shapes:5", "--out", str(tmp_path), "--autoencoder", "identity", "--text-encoder",
                              identifier, "--resolution", "16", "--shard-size", "2", "--batch-size", "2",
                              "--device", "cpu", "--no-progress"])
    assert module.run(args) == 0
    info = read_dataset_info(tmp_path)
    assert (info["num_samples"], info["num_shards"], info["text_encoder"]) == (5, 3, identifier)
    assert info["settings"]["source"] == "shapes:5" and info["latent_shape"] == [3, 16, 16]
    samples = list(ShardStream(tmp_path, shuffle_buffer=0))
    assert [s["meta"]["index"] for s in samples] == list(range(5)) and "shape" in samples[0]["meta"]
    assert json.loads((tmp_path / "shard-000002.json").read_text())["items"] == [4, 5]


def test_loader_workers_and_all_skipped_shards_change_nothing(tmp_path):
    data = Images(25, skip=range(10, 20))  # shard 1 loses every item
    report = _run(tmp_path / "serial", data)
    assert report["samples_written"] == 15
    _run(tmp_path / "workers", data, num_workers=2)
    assert _tars(tmp_path / "workers") == _tars(tmp_path / "serial")
    shard = read_dataset_info(tmp_path / "serial")["shards"][1]
    assert shard.pop("file")["bytes"] == (tmp_path / "serial" / shard_name(1)).stat().st_size
    assert shard == {"name": shard_name(1), "samples": 0, "skipped": 10, "items": [10, 20]}
    assert [s["index"] for s in ShardStream(tmp_path / "serial", shuffle_buffer=0)] == [*range(10), *range(20, 25)]


def test_corrupt_files_of_an_image_folder_are_reported_with_path_and_reason(tmp_path):
    captioned = pytest.importorskip("microdiff.data.captioned")
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((12, 12, 3), 60 * i, np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a flat picture number {i}")
    (folder / "img2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    data = captioned.make_dataset(folder, resolution=RES, progress=False)
    _run(tmp_path / "out", data, shard_size=3)
    info = read_dataset_info(tmp_path / "out")
    assert (info["num_samples"], info["skipped_items"]) == (3, [2])
    (why,) = info["skipped_why"]
    assert why["index"] == 2 and why["path"].endswith("img2.png") and why["reason"]
    latents = {s["key"]: s["latent"] for s in ShardStream(tmp_path / "out")}
    assert sorted(latents) == ["img0", "img1", "img3"]
    assert torch.allclose(latents["img3"], torch.full((3, RES, RES), 180 / 127.5 - 1), atol=1e-2)
