"""Latent shards: exact round trip, the rank x worker split (real DataLoader workers), deterministic
shuffling, exact resume, and clear errors for damaged shards.

Shards are written here with shards.encode_sample / write_shard (webdataset.TarWriter) from random
arrays; expected values are those arrays rounded to float16 by numpy. Coverage of the split is
checked by brute force over every (shards, slots) pair and by running real DataLoader workers with
ranks simulated through the rank / world_size arguments.
"""

import gzip
import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from microdiff.data.shards import (ShardError, ShardStream, StreamLoader, assign_shards, buffer_shuffle, check_encoders,
                                   collate_latents, encode_sample, iter_tar, shard_name, write_json_atomic, write_shard)

D = 6


def _arrays(index: int):
    rng = np.random.default_rng(index)
    length = 2 + index % 4  # text lengths vary between samples
    mask = np.ones(length, bool)
    mask[length - 1:] = index % 2 == 0  # some samples end with a padding token
    return {"latent": rng.normal(size=(4, 3, 3)).astype(np.float32),
            "text": rng.normal(size=(length, D)).astype(np.float32),
            "text_mask": mask, "pooled": rng.normal(size=D).astype(np.float32),
            "caption": f"caption {index} ünïcode", "meta": {"quality": index / 10, "source": "test"},
            "key": f"img.{index}.jpg"}


def _sample(index: int):
    a = _arrays(index)
    return encode_sample(index, a["latent"].astype(np.float16), a["text"].astype(np.float16), a["text_mask"],
                         a["pooled"].astype(np.float16), a["caption"], a["meta"], a["key"])


def _make(tmp_path, counts, info=True, start=0):
    """Shards holding consecutive item indices; dataset.json with per-shard counts."""
    folder = tmp_path / "shards"
    shards, i = [], start
    for k, count in enumerate(counts):
        write_shard(folder / shard_name(k), (_sample(j) for j in range(i, i + count)))
        shards.append({"name": shard_name(k), "samples": count, "skipped": 0, "items": [i, i + count]})
        i += count
    if info:
        write_json_atomic(folder / "dataset.json", {"shards": shards, "num_samples": sum(counts),
                                                    "autoencoder": "identity", "text_encoder": "chars:6"})
    return folder


def _indices(samples):
    return [int(s["index"]) for s in samples]


# ----------------------------------------------------------------------------- round trip
def test_round_trip_is_exact_to_float16(tmp_path):
    folder = _make(tmp_path, [5, 4])
    got = list(ShardStream(folder, shuffle_buffer=0))
    assert _indices(got) == list(range(9))
    for s in got:
        a = _arrays(s["index"])
        for name in ("latent", "text", "pooled"):
            want = torch.from_numpy(a[name].astype(np.float16).astype(np.float32))
            assert s[name].dtype == torch.float32 and torch.equal(s[name], want)
            # float16 keeps 11 significant bits: relative error <= 2^-11 of the original
            torch.testing.assert_close(s[name], torch.from_numpy(a[name]), rtol=2 ** -11, atol=1e-7)
        assert s["text_mask"].dtype == torch.bool and s["text_mask"].tolist() == a["text_mask"].tolist()
        assert (s["caption"], s["meta"], s["key"]) == (a["caption"], a["meta"], a["key"])


def test_writing_is_reproducible_and_atomic(tmp_path):
    a = _make(tmp_path / "a", [3])
    b = _make(tmp_path / "b", [3])
    assert (a / shard_name(0)).read_bytes() == (b / shard_name(0)).read_bytes()

    def failing():
        yield _sample(0)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_shard(tmp_path / "c" / shard_name(0), failing())
    assert os.listdir(tmp_path / "c") == []  # neither the shard nor its temporary file


def test_collate_pads_text_to_the_longest():
    samples = [{k: (torch.as_tensor(v) if isinstance(v, np.ndarray) else v) for k, v in _arrays(i).items()}
               for i in (0, 3, 1)]
    for i, s in enumerate(samples):
        s["index"], s["position"] = i, (0, i, 1)
    batch = collate_latents(samples)
    lengths = [len(s["text"]) for s in samples]
    assert batch["text"].shape == (3, max(lengths), D) and batch["latent"].shape == (3, 4, 3, 3)
    for b, s in enumerate(samples):
        n = lengths[b]
        assert torch.equal(batch["text"][b, :n], s["text"]) and not batch["text"][b, n:].any()
        assert batch["text_mask"][b].tolist() == s["text_mask"].tolist() + [False] * (max(lengths) - n)
    assert batch["position"].tolist() == [[0, 0, 1], [0, 1, 1], [0, 2, 1]]
    assert batch["caption"] == [s["caption"] for s in samples]


# ----------------------------------------------------------------------------- splitting
@pytest.mark.parametrize("num_shards", range(1, 8))
@pytest.mark.parametrize("num_slots", range(1, 7))
def test_assign_shards_covers_every_sample_once(num_shards, num_slots):
    counts = [3 + (k * 5) % 4 for k in range(num_shards)]
    seen = Counter()
    for slot in range(num_slots):
        for shard, modulus, remainder in assign_shards(num_shards, num_slots, slot):
            seen.update((shard, j) for j in range(counts[shard]) if j % modulus == remainder)
    assert seen == Counter((k, j) for k in range(num_shards) for j in range(counts[k]))


def _ranks_with_workers(folder, world_size=2, num_workers=2, epoch=0, **kw):
    per_rank = []
    for rank in range(world_size):
        stream = ShardStream(folder, rank=rank, world_size=world_size, epoch=epoch, **kw)
        loader = StreamLoader(stream, batch_size=3, num_workers=num_workers)
        per_rank.append([i for batch in loader for i in batch["index"].tolist()])
    return per_rank


@pytest.mark.parametrize("counts", [[11], [4, 5, 3], [3, 2, 4, 3, 2]], ids=["1-shard", "3-shards", "5-shards"])
def test_ranks_times_workers_read_every_sample_exactly_once(tmp_path, counts):
    folder = _make(tmp_path, counts)
    per_rank = _ranks_with_workers(folder, shuffle_buffer=4, seed=3)
    everything = sorted(i for r in per_rank for i in r)
    assert everything == list(range(sum(counts)))  # none lost, none twice
    assert all(per_rank)  # both ranks got work, also with one shard


def test_shuffle_is_deterministic_per_seed_and_epoch(tmp_path):
    folder = _make(tmp_path, [6, 6, 6])

    def order(seed, epoch):
        return _indices(ShardStream(folder, shuffle_buffer=5, seed=seed, epoch=epoch))

    first = order(0, 0)
    assert sorted(first) == list(range(18))
    assert order(0, 0) == first
    assert order(0, 1) != first and sorted(order(0, 1)) == list(range(18))
    assert order(1, 0) != first
    assert order(0, 0) != list(range(18))


def test_buffer_shuffle_keeps_every_item():
    out = list(buffer_shuffle(range(50), 7, np.random.default_rng(0)))
    assert sorted(out) == list(range(50)) and out != list(range(50))
    assert list(buffer_shuffle(range(5), 0, np.random.default_rng(0))) == list(range(5))


# ----------------------------------------------------------------------------- resume
def test_resume_in_the_main_process_continues_exactly(tmp_path):
    folder = _make(tmp_path, [5, 4, 6])
    full = _indices(ShardStream(folder, shuffle_buffer=4, seed=7, epoch=2))
    stream = ShardStream(folder, shuffle_buffer=4, seed=7, epoch=2)
    it = iter(stream)
    head = [next(it)["index"] for _ in range(6)]
    state = json.loads(json.dumps(stream.state_dict()))  # checkpoints store it as JSON
    resumed = ShardStream(folder, shuffle_buffer=4, seed=7)
    resumed.load_state_dict(state)
    assert resumed.epoch == 2
    assert head + _indices(resumed) == full


@pytest.mark.parametrize("stop_after", [1, 4])
def test_resume_with_workers_gives_the_remaining_batches_in_order(tmp_path, stop_after):
    folder = _make(tmp_path, [7, 5, 6])  # uneven: workers run out at different times
    kw = dict(shuffle_buffer=4, seed=1, rank=1, world_size=2)

    def batches(stream, stop=None):
        out = []
        for batch in StreamLoader(stream, batch_size=2, num_workers=2):
            out.append(batch["index"].tolist())
            if len(out) == stop:
                break
        return out

    full = batches(ShardStream(folder, **kw))
    stream = ShardStream(folder, **kw)
    head = batches(stream, stop_after)
    resumed = ShardStream(folder, **kw)
    resumed.load_state_dict(json.loads(json.dumps(stream.state_dict())))
    assert head + batches(resumed) == full

    resumed.set_epoch(1)  # the next epoch starts from its beginning, in another order
    nxt = batches(resumed)
    assert nxt == batches(ShardStream(folder, epoch=1, **kw)) and nxt != full


def test_resume_refuses_another_worker_count(tmp_path):
    folder = _make(tmp_path, [4, 4])
    stream = ShardStream(folder, rank=0, world_size=1)
    next(iter(StreamLoader(stream, batch_size=2, num_workers=2)))
    resumed = ShardStream(folder, rank=0, world_size=1)
    resumed.load_state_dict(stream.state_dict())
    with pytest.raises(ValueError, match="num_workers"):
        list(resumed)
    with pytest.raises(ValueError, match="seed"):
        ShardStream(folder, seed=5).load_state_dict(stream.state_dict())


# ----------------------------------------------------------------------------- errors
def test_truncated_shard_is_an_error_naming_it(tmp_path):
    folder = _make(tmp_path, [4, 4])
    path = folder / shard_name(1)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2 + 100])  # mid-member, not a whole block
    with pytest.raises(ShardError, match="shard-000001.tar.*truncated"):
        list(ShardStream(folder, shuffle_buffer=0))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # cut right after the first sample's members
        last = tar.getmembers()[len(_sample(0)) - 2]
    path.write_bytes(data[:last.offset_data + -(-last.size // 512) * 512])
    with pytest.raises(ShardError, match="shard-000001.tar.*end-of-archive"):
        list(iter_tar(str(path)))


def test_replaced_shard_with_other_count_is_caught(tmp_path):
    folder = _make(tmp_path, [4, 4])
    write_shard(folder / shard_name(0), (_sample(j) for j in range(3)))  # a valid tar, one sample short
    with pytest.raises(ShardError, match="shard-000000.tar.*dataset.json"):
        list(ShardStream(folder, shuffle_buffer=0))


def test_corrupt_member_is_an_error_naming_shard_and_sample(tmp_path):
    folder = _make(tmp_path, [2], info=False)
    path = folder / shard_name(0)
    data = bytearray(path.read_bytes())
    at = data.index(b"\x93NUMPY")  # the first .npy header
    data[at:at + 6] = b"garbag"
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-000000.tar: sample 000000000"):
        list(ShardStream(folder, shuffle_buffer=0))


def test_missing_paths_and_encoder_mismatch(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        ShardStream(tmp_path / "nope.tar")
    folder = _make(tmp_path, [2])
    stream = ShardStream(folder)
    stream.check_encoders("identity", "chars:6")
    with pytest.raises(ValueError, match="text_encoder: shards have 'chars:6', you use 'clip'"):
        stream.check_encoders(text_encoder="clip")
    with pytest.raises(ValueError, match="autoencoder"):
        check_encoders(stream.info, autoencoder="diffusers-kl:x")


def test_folder_glob_brace_and_gzip_inputs_agree(tmp_path):
    folder = _make(tmp_path, [3, 3, 3], info=False)
    by_folder = _indices(ShardStream(folder, shuffle_buffer=0))
    by_glob = _indices(ShardStream(str(folder / "shard-*.tar"), shuffle_buffer=0))
    by_brace = _indices(ShardStream(str(folder / "shard-{000000..000002}.tar"), shuffle_buffer=0))
    assert by_folder == by_glob == by_brace == list(range(9))
    packed = tmp_path / "one.tar.gz"
    packed.write_bytes(gzip.compress((folder / shard_name(1)).read_bytes()))
    assert _indices(ShardStream(packed, shuffle_buffer=0)) == [3, 4, 5]
    packed.write_bytes(packed.read_bytes()[:-40])
    with pytest.raises(ShardError, match="one.tar.gz: truncated or corrupt"):
        list(ShardStream(packed, shuffle_buffer=0))
