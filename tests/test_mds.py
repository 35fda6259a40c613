"""The MDS reader against a shard built byte by byte here from the documented layout (independent of
our writer), against our writer for every encoding, compression and merged-folder indexes, and
MDSLatentDataset against micro_diffusion's columns (float16 bytes, 1x77x1024 text, 4x32x32 /
4x64x64 latents).
"""

import importlib.util
import json
import struct
from decimal import Decimal

import numpy as np
import pytest
import torch
from PIL import Image

from microdiff.data.mds import MDSDataset, MDSLatentDataset, decompress, read_index, write_mds
from microdiff.data.shards import collate_latents

# ----------------------------------------------------------------------------- hand-built fixture
NAMES = ["arr", "blob", "caption", "dyn", "n", "x"]  # streaming sorts column names
ENCODINGS = ["ndarray:float16:2,3", "bytes", "str", "ndarray", "int", "float32"]
SIZES = [12, None, None, None, 8, 4]
ROWS = [
    {"arr": np.arange(6, dtype=np.float16).reshape(2, 3) / 4, "blob": b"\x00\x01\xff", "caption": "a cat",
     "dyn": np.arange(6, dtype=np.int32).reshape(3, 2), "n": -7, "x": 1.5},
    {"arr": -np.ones((2, 3), np.float16), "blob": b"", "caption": "ünïcode dög",
     "dyn": np.array([[0.25, -2.0]]), "n": 2 ** 40, "x": -0.125},
]


def _config(size_limit=None, compression=None):
    return {"column_encodings": ENCODINGS, "column_names": NAMES, "column_sizes": SIZES, "compression": compression,
            "format": "mds", "hashes": [], "size_limit": size_limit, "version": 2}


def _hand_sample(row):
    """[uint32 sizes of the variable columns] + column bytes, in column order."""
    dyn = row["dyn"]
    dtype_code = {"int32": 33, "float64": 66}[dyn.dtype.name]
    values = dyn.astype(dyn.dtype.newbyteorder("<")).tobytes()
    dyn_bytes = bytes([dtype_code, (dyn.ndim << 2) | 0]) + bytes(dyn.shape) + values  # uint8 dims
    blob, caption = row["blob"], row["caption"].encode("utf-8")
    head = struct.pack("<3I", len(blob), len(caption), len(dyn_bytes))
    return (head + row["arr"].astype("<f2").tobytes() + blob + caption + dyn_bytes + struct.pack("<q", row["n"])
            + struct.pack("<f", row["x"]))


def _hand_shard(rows, config):
    samples = [_hand_sample(r) for r in rows]
    config_bytes = json.dumps(config, sort_keys=True).encode()
    start = 4 + 4 * (len(rows) + 1) + len(config_bytes)
    offsets = [start]
    for s in samples:
        offsets.append(offsets[-1] + len(s))
    return struct.pack(f"<{len(rows) + 2}I", len(rows), *offsets) + config_bytes + b"".join(samples)


def _write_hand_dataset(folder, rows=ROWS):
    folder.mkdir(parents=True, exist_ok=True)
    data = _hand_shard(rows, _config())
    (folder / "shard.00000.mds").write_bytes(data)
    entry = {**_config(), "samples": len(rows), "raw_data": {"basename": "shard.00000.mds", "bytes": len(data),
                                                             "hashes": {}}, "zip_data": None}
    (folder / "index.json").write_text(json.dumps({"version": 2, "shards": [entry]}))
    return data


def _assert_row(got, want):
    assert got["arr"].dtype == np.float16 and np.array_equal(got["arr"], want["arr"])
    assert got["dyn"].dtype == want["dyn"].dtype and np.array_equal(got["dyn"], want["dyn"])
    assert (got["blob"], got["caption"], got["n"], got["x"]) == (want["blob"], want["caption"], want["n"], want["x"])


def test_reads_a_hand_built_shard(tmp_path):
    _write_hand_dataset(tmp_path)
    data = MDSDataset(tmp_path)
    assert len(data) == 2
    for i, row in enumerate(ROWS):
        _assert_row(data[i], row)
    _assert_row(data[-1], ROWS[-1])
    assert set(MDSDataset(tmp_path, columns=["caption"])[0]) == {"caption"}


def test_our_writer_produces_the_same_bytes(tmp_path):
    hand = _write_hand_dataset(tmp_path / "hand")
    write_mds(tmp_path / "ours", dict(zip(NAMES, ENCODINGS)), ROWS, size_limit=None)
    assert (tmp_path / "ours" / "shard.00000.mds").read_bytes() == hand
    assert read_index(tmp_path / "ours")[0]["column_sizes"] == SIZES


# ----------------------------------------------------------------------------- every encoding
def test_round_trip_of_every_encoding(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    y, x = np.mgrid[0:16, 0:24]
    smooth = np.stack([x * 10, y * 15, x * 5 + y * 5], -1).astype(np.uint8)  # JPEG keeps smooth pictures
    columns = {"u8": "uint8", "i16": "int16", "u64": "uint64", "f16": "float16", "f64": "float64", "si": "str_int",
               "sf": "str_float", "sd": "str_decimal", "js": "json", "png": "png", "jpg": "jpeg", "pil": "pil",
               "long": "ndarray:float64", "fixed": "ndarray:uint8:2,2"}
    row = {"u8": 255, "i16": -300, "u64": 2 ** 63, "f16": 0.5, "f64": np.pi, "si": 10 ** 30, "sf": 0.1,
           "sd": Decimal("1.10"), "js": {"a": [1, 2], "b": None}, "png": image, "jpg": Image.fromarray(smooth),
           "pil": image,
           "long": rng.normal(size=300), "fixed": np.array([[1, 2], [3, 4]], np.uint8)}
    write_mds(tmp_path, columns, [row])
    got = MDSDataset(tmp_path)[0]
    for name in ("u8", "i16", "u64", "f16", "f64", "si", "sf", "sd", "js"):
        assert got[name] == row[name] and type(got[name]) is type(row[name]), name
    assert np.array_equal(np.asarray(got["png"]), pixels) and np.array_equal(np.asarray(got["pil"]), pixels)
    assert np.abs(np.asarray(got["jpg"]).astype(int) - smooth).mean() < 3  # lossy (quality 75), same picture
    assert np.array_equal(got["long"], row["long"]) and np.array_equal(got["fixed"], row["fixed"])


def test_pickle_needs_consent(tmp_path):
    write_mds(tmp_path, {"obj": "pkl", "caption": "str"}, [{"obj": {"a": (1, 2)}, "caption": "c"}])
    with pytest.raises(ValueError, match="'obj' is 'pkl'.*allow_pickle=True"):
        MDSDataset(tmp_path)
    assert MDSDataset(tmp_path, columns=["caption"])[0] == {"caption": "c"}
    assert MDSDataset(tmp_path, allow_pickle=True)[0]["obj"] == {"a": (1, 2)}


# ----------------------------------------------------------------------------- shards, compression, folders
@pytest.mark.parametrize("compression", [None, "gz", "bz2:5"])
def test_many_shards_and_compression(tmp_path, compression):
    rows = [{"caption": f"caption {i}", "v": np.full(50, i, np.float32)} for i in range(9)]
    index = write_mds(tmp_path, {"caption": "str", "v": "ndarray:float32:50"}, rows, size_limit=700,
                      compression=compression)
    assert len(index["shards"]) > 2
    if compression:
        assert not list(tmp_path.glob("*.mds")) and all(s["zip_data"] for s in index["shards"])
    data = MDSDataset(tmp_path)
    assert [data[i]["caption"] for i in range(len(data))] == [r["caption"] for r in rows]
    assert all(np.array_equal(data[i]["v"], rows[i]["v"]) for i in range(9))


def _zstd_raw_frame(payload: bytes) -> bytes:
    """A valid zstd frame holding ``payload`` in one raw (stored) block, from RFC 8878."""
    assert len(payload) < 1 << 17
    header = b"\x28\xb5\x2f\xfd" + bytes([0x00, 0x50])  # magic; no checksum/size/dict; 1 MiB window
    block = len(payload) << 3 | 0 << 1 | 1  # size, type raw, last block
    return header + block.to_bytes(3, "little") + payload


def _importable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


def test_zstd_shards(tmp_path):
    raw = _write_hand_dataset(tmp_path)
    (tmp_path / "shard.00000.mds").unlink()
    (tmp_path / "shard.00000.mds.zstd").write_bytes(_zstd_raw_frame(raw))
    index = json.loads((tmp_path / "index.json").read_text())
    index["shards"][0].update(compression="zstd", zip_data={"basename": "shard.00000.mds.zstd", "bytes": 0,
                                                            "hashes": {}})
    (tmp_path / "index.json").write_text(json.dumps(index))
    data = MDSDataset(tmp_path)
    if not _importable("zstandard") and not _importable("compression.zstd"):
        with pytest.raises(ImportError, match="shard.00000.mds.zstd.*pip install zstandard"):
            data[0]
    else:
        _assert_row(data[1], ROWS[1])
    with pytest.raises(ValueError, match="'snappy' is not supported"):
        decompress("snappy", b"", "x")


def test_merged_and_unmerged_rank_folders(tmp_path):
    """micro_diffusion writes one MDS folder per rank and merges the indexes (basenames '0/...')."""
    columns = {"caption": "str"}
    for rank in range(2):
        write_mds(tmp_path / str(rank), columns, [{"caption": f"r{rank} s{i}"} for i in range(3)], size_limit=30)
    want = [f"r{r} s{i}" for r in range(2) for i in range(3)]
    unmerged = MDSDataset(tmp_path)  # no top-level index.json: the sub-folders in order
    assert [unmerged[i]["caption"] for i in range(6)] == want
    shards = []
    for rank in range(2):
        for shard in json.loads((tmp_path / str(rank) / "index.json").read_text())["shards"]:
            shard["raw_data"]["basename"] = f"{rank}/{shard['raw_data']['basename']}"
            shards.append(shard)
    (tmp_path / "index.json").write_text(json.dumps({"version": 2, "shards": shards}))
    merged = MDSDataset(tmp_path)
    assert [merged[i]["caption"] for i in range(6)] == want and len(merged.shards) == len(shards)


def test_damaged_datasets_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json"):
        MDSDataset(tmp_path)
    data = _write_hand_dataset(tmp_path)
    (tmp_path / "shard.00000.mds").write_bytes(data[:-5])
    with pytest.raises(ValueError, match="shard.00000.mds: .*truncated"):
        MDSDataset(tmp_path)[0]
    (tmp_path / "shard.00000.mds").unlink()
    with pytest.raises(FileNotFoundError, match="shard.00000.mds: shard missing"):
        MDSDataset(tmp_path)[0]
    index = json.loads((tmp_path / "index.json").read_text())
    index["shards"][0]["column_encodings"][0] = "tensor:float16"
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="unknown MDS encoding 'tensor:float16'"):
        MDSDataset(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"version": 1, "shards": []}))
    with pytest.raises(ValueError, match="version 1"):
        MDSDataset(tmp_path)


# ----------------------------------------------------------------------------- micro_diffusion latents
def _micro_diffusion_rows(n, channels=4):
    """Rows as micro_diffusion's precompute.py writes them: float16 arrays stored with .tobytes()."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        text = rng.normal(size=(1, 77, 1024)).astype(np.float16)
        rows.append({"caption": f"a photo number {i}", "caption_latents": np.reshape(text, -1).tobytes(),
                     "latents_256": rng.normal(size=(channels, 32, 32)).astype(np.float16).tobytes(),
                     "latents_512": rng.normal(size=(channels, 64, 64)).astype(np.float16).tobytes()})
    return rows


MD_COLUMNS = {"caption": "str", "caption_latents": "bytes", "latents_256": "bytes", "latents_512": "bytes"}


@pytest.mark.parametrize("resolution", [256, 512])
def test_micro_diffusion_latents_become_shard_samples(tmp_path, resolution):
    rows = _micro_diffusion_rows(3)
    write_mds(tmp_path, MD_COLUMNS, rows)
    data = MDSLatentDataset(tmp_path, resolution=resolution)
    side = resolution // 8
    for i, row in enumerate(rows):
        s = data[i]
        text = np.frombuffer(row["caption_latents"], np.float16).reshape(77, 1024)
        latent = np.frombuffer(row[f"latents_{resolution}"], np.float16).reshape(4, side, side)
        assert torch.equal(s["text"], torch.from_numpy(text.astype(np.float32)))
        assert torch.equal(s["latent"], torch.from_numpy(latent.astype(np.float32)))
        assert s["text_mask"].all() and s["text_mask"].shape == (77,)
        # pooled: mean of the float16 states, float32 sum of 77 terms vs float64
        np.testing.assert_allclose(s["pooled"].numpy(), text.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
        assert s["caption"] == row["caption"]
    batch = collate_latents([data[0], data[2]])
    assert batch["latent"].shape == (2, 4, side, side) and batch["text"].shape == (2, 77, 1024)
    assert batch["text_mask"].all()


def test_micro_diffusion_column_and_shape_errors(tmp_path):
    rows = _micro_diffusion_rows(1)
    write_mds(tmp_path / "only256", {k: v for k, v in MD_COLUMNS.items() if k != "latents_512"},
              [{k: v for k, v in rows[0].items() if k != "latents_512"}])
    present = "caption, caption_latents, latents_256"
    with pytest.raises(ValueError, match=f"no column 'latents_512' \\(columns: {present}\\)"):
        MDSLatentDataset(tmp_path / "only256", resolution=512)
    write_mds(tmp_path / "all", MD_COLUMNS, rows)
    with pytest.raises(ValueError, match="caption_latents has 78848 values.*expected 1x77x2048"):
        MDSLatentDataset(tmp_path / "all", text_dim=2048)[0]
    with pytest.raises(ValueError, match="latents_256 has 4096 values, expected 16x32x32"):
        MDSLatentDataset(tmp_path / "all", latent_channels=16)[0]
    sixteen = _micro_diffusion_rows(1, channels=16)  # e.g. an SD3/FLUX VAE: channels are inferred
    write_mds(tmp_path / "c16", MD_COLUMNS, sixteen)
    assert MDSLatentDataset(tmp_path / "c16")[0]["latent"].shape == (16, 32, 32)
