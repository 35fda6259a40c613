"""Read mosaicml-streaming's MDS shards (micro_diffusion's precomputed latents) without that package.

Dataset folder: ``index.json`` = ``{"version": 2, "shards": [shard, ...]}``, each shard::

    {"format": "mds", "version": 2, "samples": n, "column_names": [...], "column_encodings": [...],
     "column_sizes": [bytes or null, ...], "compression": null | "zstd" | "zstd:7" | "gz" | "bz2" | ...,
     "raw_data": {"basename": "shard.00000.mds", "bytes": ..., "hashes": {}},
     "zip_data": null | {"basename": "shard.00000.mds.zstd", ...}, "hashes": [], "size_limit": ...}

``basename`` may hold a sub-folder (``0/shard.00000.mds``: streaming's ``merge_index`` of per-rank
folders). A folder without ``index.json`` whose sub-folders have one is read as their
concatenation (sorted by name). Shard file (all integers little-endian uint32)::

    [n] [offset_0 ... offset_n] [the shard's JSON config] [sample 0] ... [sample n-1]

``offset_i`` is the absolute file position of sample i, ``offset_n`` the file size. A sample is
``[uint32 size of each variable-size column, in column order]`` then each column's bytes in column
order (columns sorted by name). Column encodings: ``bytes``, ``str`` (UTF-8), ``int`` (int64),
``uint8..int64`` / ``float16..float64`` (one scalar), ``str_int`` / ``str_float`` / ``str_decimal``,
``json``, ``ndarray[:dtype[:d0,d1,..]]`` (a missing dtype is one code byte before the values, a
missing shape is a byte ``ndim << 2 | k`` then ndim uint{8,16,32,64}[k] dims), ``pil`` (uint32 width,
height, mode length, mode, raw), ``jpeg``/``png`` (the file bytes; decoded with PIL), ``pkl``
(refused unless ``allow_pickle=True``: unpickling runs arbitrary code). Scalars come back as
Python numbers.

Compressed shards (``zip_data``) are decompressed in memory (the last shard is cached): ``zstd``
needs the ``zstandard`` package (or Python 3.14's ``compression.zstd``), ``gz``/``bz2`` use the
standard library; ``br`` and ``snappy`` are not supported. :func:`write_mds` writes the same layout
(used to make test fixtures). :class:`MDSLatentDataset` maps micro_diffusion's latent columns to the
samples :class:`~microdiff.data.shards.ShardStream` yields.
"""

from __future__ import annotations

import bisect
import bz2
import gzip
import io
import json
import os
import pickle
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

INDEX = "index.json"
NDARRAY_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32", 33: "int32",
                  34: "float32", 64: "uint64", 65: "int64", 66: "float64"}
NDARRAY_CODES = {v: k for k, v in NDARRAY_DTYPES.items()}
SHAPE_DTYPES = ("uint8", "uint16", "uint32", "uint64")
SCALARS = {name: np.dtype(name) for name in ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32",
                                             "int64", "float16", "float32", "float64")}
SIMPLE = {"bytes", "str", "int", "str_int", "str_float", "str_decimal", "json", "pil", "jpeg", "png", "pkl"}


# ----------------------------------------------------------------------------- encodings
def _parse_ndarray(encoding: str) -> tuple[str | None, tuple[int, ...] | None]:
    parts = encoding.split(":")
    dtype = parts[1] if len(parts) > 1 and parts[1] else None
    shape = tuple(int(d) for d in parts[2].split(",")) if len(parts) > 2 and parts[2] else None
    if len(parts) > 3 or (dtype is not None and dtype not in NDARRAY_CODES) or (shape and min(shape) < 1):
        raise ValueError(f"bad ndarray encoding {encoding!r}: write ndarray[:dtype[:d0,d1,...]] with dtype one of "
                         f"{', '.join(NDARRAY_CODES)}")
    return dtype, shape


def check_encoding(encoding: str) -> None:
    """Raise ValueError for an encoding this reader does not know."""
    name = encoding.split(":", 1)[0]
    if name == "ndarray":
        _parse_ndarray(encoding)
    elif not (name in SCALARS or name in SIMPLE) or (":" in encoding and name != "jpeg"):
        raise ValueError(f"unknown MDS encoding {encoding!r}; supported: ndarray[:dtype[:shape]], "
                         f"{', '.join(sorted(SIMPLE | set(SCALARS)))}")


def encoded_size(encoding: str) -> int | None:
    """Fixed byte size of a column, or None when it varies."""
    name = encoding.split(":", 1)[0]
    if name in SCALARS:
        return SCALARS[name].itemsize
    if name == "int":
        return 8
    if name == "ndarray":
        dtype, shape = _parse_ndarray(encoding)
        if dtype is not None and shape is not None:
            return int(np.prod(shape)) * np.dtype(dtype).itemsize
    return None


def decode_value(encoding: str, data: bytes, allow_pickle: bool = False) -> Any:
    """Bytes of one column -> its value."""
    name = encoding.split(":", 1)[0]
    if name == "bytes":
        return bytes(data)
    if name == "str":
        return bytes(data).decode("utf-8")
    if name == "int":
        return int(np.frombuffer(data, "<i8", count=1)[0])
    if name in SCALARS:
        return np.frombuffer(data, SCALARS[name].newbyteorder("<"), count=1)[0].item()
    if name in ("str_int", "str_float", "str_decimal"):
        return {"str_int": int, "str_float": float, "str_decimal": Decimal}[name](bytes(data).decode("utf-8"))
    if name == "json":
        return json.loads(bytes(data).decode("utf-8"))
    if name == "ndarray":
        return _decode_ndarray(encoding, data)
    if name in ("jpeg", "png"):
        from PIL import Image

        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    if name == "pil":
        from PIL import Image

        width, height, mode_size = np.frombuffer(data, "<u4", count=3).tolist()
        mode = bytes(data[12:12 + mode_size]).decode("utf-8")
        return Image.frombytes(mode, (width, height), bytes(data[12 + mode_size:]))
    if name == "pkl":
        if not allow_pickle:
            raise ValueError("a 'pkl' column: unpickling can run arbitrary code; pass allow_pickle=True only "
                             "for data you trust")
        return pickle.loads(data)
    raise ValueError(f"unknown MDS encoding {encoding!r}")


def _decode_ndarray(encoding: str, data: bytes) -> np.ndarray:
    dtype, shape = _parse_ndarray(encoding)
    i = 0
    if dtype is None:
        if data[0] not in NDARRAY_DTYPES:
            raise ValueError(f"ndarray value has unknown dtype code {data[0]}")
        dtype, i = NDARRAY_DTYPES[data[0]], 1
    if shape is None:
        ndim, k = data[i] >> 2, data[i] & 3
        width = 1 << k
        shape_dtype = np.dtype(SHAPE_DTYPES[k]).newbyteorder("<")
        shape = tuple(np.frombuffer(data, shape_dtype, count=ndim, offset=i + 1).tolist())
        i += 1 + ndim * width
    values = np.frombuffer(data, np.dtype(dtype).newbyteorder("<"), offset=i)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"ndarray value holds {values.size} numbers, its shape {shape} needs {int(np.prod(shape))}")
    return values.reshape(shape).astype(np.dtype(dtype))


def encode_value(encoding: str, value: Any) -> bytes:
    """Value -> bytes of one column (the inverse of :func:`decode_value`; pil/jpeg/png take PIL images)."""
    name = encoding.split(":", 1)[0]
    if name == "bytes":
        return bytes(value)
    if name == "str":
        return value.encode("utf-8")
    if name == "int":
        return np.int64(value).astype("<i8").tobytes()
    if name in SCALARS:
        return np.array(value, SCALARS[name].newbyteorder("<")).tobytes()
    if name in ("str_int", "str_float", "str_decimal"):
        return str(value).encode("utf-8")
    if name == "json":
        return json.dumps(value).encode("utf-8")
    if name == "ndarray":
        dtype, shape = _parse_ndarray(encoding)
        value = np.asarray(value)
        head = b""
        if dtype is None:
            head += bytes([NDARRAY_CODES[value.dtype.name]])
        elif value.dtype != np.dtype(dtype):
            raise ValueError(f"ndarray column {encoding!r} got dtype {value.dtype}")
        if shape is None:
            k = next(k for k, t in enumerate(SHAPE_DTYPES) if max(value.shape) < 1 << (8 << k))
            shape_dtype = np.dtype(SHAPE_DTYPES[k]).newbyteorder("<")
            head += bytes([value.ndim << 2 | k]) + np.array(value.shape, shape_dtype).tobytes()
        elif value.shape != shape:
            raise ValueError(f"ndarray column {encoding!r} got shape {value.shape}")
        return head + np.ascontiguousarray(value, value.dtype.newbyteorder("<")).tobytes()
    if name in ("jpeg", "png"):
        buf = io.BytesIO()
        value.save(buf, format="JPEG" if name == "jpeg" else "PNG")
        return buf.getvalue()
    if name == "pil":
        mode = value.mode.encode("utf-8")
        return np.array([value.width, value.height, len(mode)], "<u4").tobytes() + mode + value.tobytes()
    if name == "pkl":
        return pickle.dumps(value)
    raise ValueError(f"unknown MDS encoding {encoding!r}")


# ----------------------------------------------------------------------------- compression
def decompress(algorithm: str, data: bytes, where: str = "") -> bytes:
    family = algorithm.split(":", 1)[0]
    if family == "gz":
        return gzip.decompress(data)
    if family == "bz2":
        return bz2.decompress(data)
    if family == "zstd":
        try:
            import zstandard
        except ImportError:
            try:
                from compression import zstd as stdlib_zstd  # Python >= 3.14
            except ImportError:
                raise ImportError(f"{where}: shards are zstd-compressed; pip install zstandard to read them") from None
            return stdlib_zstd.decompress(data)
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    raise ValueError(f"{where}: compression {algorithm!r} is not supported (gz, bz2, zstd are); decompress the "
                     "shards with mosaicml-streaming first")


def compress(algorithm: str, data: bytes) -> bytes:
    family, _, level = algorithm.partition(":")
    if family == "gz":
        return gzip.compress(data, int(level or 9), mtime=0)
    if family == "bz2":
        return bz2.compress(data, int(level or 9))
    if family == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=int(level or 3)).compress(data)
    raise ValueError(f"compression {algorithm!r} is not supported (gz, bz2, zstd are)")


# ----------------------------------------------------------------------------- reading
def read_index(root: str | os.PathLike) -> list[dict[str, Any]]:
    """The shard entries of an MDS folder (or of its sub-folders, when it has no index.json of its
    own), each with ``root`` (the folder its basenames are relative to) added."""
    root = Path(root)
    path = root / INDEX
    if not path.is_file():
        subs = sorted(p for p in root.iterdir() if (p / INDEX).is_file()) if root.is_dir() else []
        if not subs:
            raise FileNotFoundError(f"{path}: not found; pass the MDS folder that holds index.json")
        return [shard for sub in subs for shard in read_index(sub)]
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if index.get("version") != 2:
        raise ValueError(f"{path}: index version {index.get('version')!r}; this reader knows version 2")
    shards = []
    for i, shard in enumerate(index.get("shards", [])):
        where = f"{path} shard {i}"
        if shard.get("format") != "mds":
            raise ValueError(f"{where}: format {shard.get('format')!r}; only 'mds' shards are supported")
        missing = [k for k in ("column_names", "column_encodings", "column_sizes", "samples", "raw_data")
                   if k not in shard]
        if missing:
            raise ValueError(f"{where}: lacks {', '.join(missing)}")
        for encoding in shard["column_encodings"]:
            check_encoding(encoding)
        shards.append({**shard, "root": str(root)})
    return shards


class MDSDataset(Dataset):
    """Random access to the decoded samples of one or more MDS folders (concatenated in order).

    ``columns``: decode only these (default: all; each must be in every shard). A ``pkl`` column
    among them needs ``allow_pickle=True``.
    """

    def __init__(self, roots: str | os.PathLike | Sequence[str | os.PathLike], columns: Sequence[str] | None = None,
                 allow_pickle: bool = False):
        roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
        self.shards = [shard for root in roots for shard in read_index(root)]
        if not self.shards:
            raise ValueError(f"{roots}: the index lists no shards")
        self.allow_pickle = allow_pickle
        self.columns = list(columns) if columns is not None else list(self.shards[0]["column_names"])
        for shard in self.shards:
            present = shard["column_names"]
            absent = [c for c in self.columns if c not in present]
            if absent:
                raise ValueError(f"{self._where(shard)}: no column {', '.join(map(repr, absent))} (columns: "
                               f"{', '.join(present)})")
            for name in self.columns:
                encoding = shard["column_encodings"][present.index(name)]
                if encoding == "pkl" and not allow_pickle:
                    raise ValueError(f"{self._where(shard)}: column {name!r} is 'pkl'; unpickling can run arbitrary "
                                     "code: pass allow_pickle=True only for data you trust, or leave it out of columns")
        self.ends = np.cumsum([int(s["samples"]) for s in self.shards]).tolist()
        self._cache: tuple[int, bytes] | None = None
        self._offsets: dict[int, np.ndarray] = {}

    @staticmethod
    def _where(shard: dict[str, Any]) -> str:
        return os.path.join(shard["root"], shard["raw_data"]["basename"])

    def __len__(self) -> int:
        return self.ends[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, sample index inside it) of a global index."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        s = bisect.bisect_right(self.ends, index)
        return s, index - (self.ends[s - 1] if s else 0)

    def _shard_bytes(self, s: int) -> bytes | None:
        """Whole decompressed shard for compressed shards (cached), None for raw ones."""
        shard = self.shards[s]
        raw = Path(shard["root"]) / shard["raw_data"]["basename"]
        if raw.is_file() or not shard.get("zip_data"):
            return None
        if self._cache is None or self._cache[0] != s:
            packed = Path(shard["root"]) / shard["zip_data"]["basename"]
            if not packed.is_file():
                raise FileNotFoundError(f"{raw}: shard missing (nor is {packed.name} there)")
            self._cache = (s, decompress(shard["compression"], packed.read_bytes(), str(packed)))
        return self._cache[1]

    def _read(self, s: int, start: int, size: int) -> bytes:
        data = self._shard_bytes(s)
        if data is not None:
            return data[start:start + size]
        path = Path(self.shards[s]["root"]) / self.shards[s]["raw_data"]["basename"]
        try:
            with open(path, "rb", buffering=0) as f:
                f.seek(start)
                return f.read(size)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: shard missing (listed in {INDEX})") from None

    def _offsets_of(self, s: int) -> np.ndarray:
        if s not in self._offsets:
            shard, where = self.shards[s], self._where(self.shards[s])
            n = int(shard["samples"])
            head = self._read(s, 0, 4 * (n + 2))
            if len(head) < 4 * (n + 2):
                raise ValueError(f"{where}: truncated ({len(head)} bytes of header)")
            count = int(np.frombuffer(head, "<u4", count=1)[0])
            if count != n:
                raise ValueError(f"{where}: holds {count} samples, {INDEX} says {n}; the index and shard disagree")
            offsets = np.frombuffer(head, "<u4", count=n + 1, offset=4).astype(np.int64)
            data = self._shard_bytes(s)
            size = len(data) if data is not None else os.path.getsize(self._where(shard))
            if offsets[-1] != size or np.any(np.diff(offsets) < 0):
                raise ValueError(f"{where}: {size} bytes but its offsets end at {offsets[-1]}: the shard is "
                                 "truncated or corrupt")
            self._offsets[s] = offsets
        return self._offsets[s]

    def raw_sample(self, index: int) -> tuple[int, int, bytes]:
        s, i = self.locate(index)
        offsets = self._offsets_of(s)
        return s, i, self._read(s, int(offsets[i]), int(offsets[i + 1] - offsets[i]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        s, i, data = self.raw_sample(index)
        shard = self.shards[s]
        names, encodings, sizes = shard["column_names"], shard["column_encodings"], list(shard["column_sizes"])
        pos = 0
        for c, size in enumerate(sizes):
            if size is None:
                sizes[c] = int(np.frombuffer(data, "<u4", count=1, offset=pos)[0])
                pos += 4
        if pos + sum(sizes) != len(data):
            raise ValueError(f"{self._where(shard)}: sample {i} is {len(data)} bytes, its column sizes add up to "
                             f"{pos + sum(sizes)}: corrupt shard")
        out = {}
        for name, encoding, size in zip(names, encodings, sizes):
            if name in self.columns:
                try:
                    out[name] = decode_value(encoding, data[pos:pos + size], self.allow_pickle)
                except (ValueError, OSError, UnicodeDecodeError) as e:
                    raise ValueError(f"{self._where(shard)}: sample {i} column {name!r} ({encoding}): {e}") from e
            pos += size
        return out


# ----------------------------------------------------------------------------- micro_diffusion latents
class MDSLatentDataset(Dataset):
    """micro_diffusion's precomputed MDS latents as the samples :class:`ShardStream` yields.

    Columns (micro_diffusion ``datasets/prepare/*/precompute.py``): ``caption`` str,
    ``caption_latents`` bytes = float16 (1, 77, 1024) text states (DFN5B CLIP ViT-H/14),
    ``latents_256`` bytes = float16 (C, 32, 32) and ``latents_512`` float16 (C, 64, 64) scaled SDXL
    VAE latents (C = 4, inferred when ``latent_channels`` is None). ``ndarray`` columns are accepted too.

    Sample: ``latent`` (C,h,w), ``text`` (L,D) float32, ``text_mask`` all True (micro_diffusion
    attends to all 77 states), ``pooled`` = mean of the states, ``caption``, ``meta`` (source folder,
    shard, index), ``key``, ``index``.
    """

    def __init__(self, roots: str | os.PathLike | Sequence[str | os.PathLike], resolution: int = 256,
                 text_length: int = 77, text_dim: int = 1024, latent_channels: int | None = None,
                 stored_dtype: str = "float16"):
        if resolution % 8:
            raise ValueError(f"resolution {resolution}: must be a multiple of 8 (the VAE's factor), e.g. 256 or 512")
        self.latent_column = f"latents_{resolution}"
        self.side = resolution // 8
        self.text_shape = (text_length, text_dim)
        self.latent_channels = latent_channels
        self.stored_dtype = np.dtype(stored_dtype).newbyteorder("<")
        self.data = MDSDataset(roots, columns=["caption", "caption_latents", self.latent_column])

    def __len__(self) -> int:
        return len(self.data)

    def _array(self, value: Any, column: str, where: str) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value.astype(np.float32)
        if not isinstance(value, bytes) or len(value) % self.stored_dtype.itemsize:
            raise ValueError(f"{where}: column {column!r} holds {type(value).__name__} of {len(value)} bytes, not "
                             f"{self.stored_dtype.name} values")
        return np.frombuffer(value, self.stored_dtype).astype(np.float32)

    def key_meta(self, index: int) -> tuple[str, dict[str, Any]]:
        """(key, meta) of sample ``index`` without reading it (for selection by source or annotation)."""
        s, i = self.data.locate(index)
        shard = self.data.shards[s]
        return f"{shard['raw_data']['basename']}/{i}", {"source": shard["root"], "shard": shard["raw_data"]["basename"],
                                                        "index": i}

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.data[index]
        s, i = self.data.locate(index)
        shard = self.data.shards[s]
        where = f"{MDSDataset._where(shard)} sample {i}"
        text = self._array(row["caption_latents"], "caption_latents", where)
        if text.size != int(np.prod(self.text_shape)):
            raise ValueError(f"{where}: caption_latents has {text.size} values ({tuple(text.shape)}), expected 1x"
                             f"{self.text_shape[0]}x{self.text_shape[1]}; set text_length/text_dim to your encoder's")
        latent = self._array(row[self.latent_column], self.latent_column, where)
        plane = self.side * self.side
        channels = self.latent_channels or latent.size // plane
        if latent.size != channels * plane or channels == 0:
            raise ValueError(f"{where}: {self.latent_column} has {latent.size} values, expected "
                             f"{self.latent_channels or 'C'}x{self.side}x{self.side}")
        text = torch.from_numpy(text.reshape(self.text_shape).copy())
        return {
            "latent": torch.from_numpy(latent.reshape(channels, self.side, self.side).copy()),
            "text": text,
            "text_mask": torch.ones(self.text_shape[0], dtype=torch.bool),
            "pooled": text.mean(0),
            "caption": row["caption"],
            "meta": {"source": shard["root"], "shard": shard["raw_data"]["basename"], "index": i},
            "key": f"{shard['raw_data']['basename']}/{i}",
            "index": index,
        }


# ----------------------------------------------------------------------------- writing (fixtures)
def write_mds(out: str | os.PathLike, columns: dict[str, str], samples: Iterable[dict[str, Any]],
              size_limit: int | None = 1 << 26, compression: str | None = None) -> dict[str, Any]:
    """Write ``samples`` as an MDS folder (the layout above), a new shard whenever ``size_limit``
    bytes would be passed. Minimal: for test fixtures and small exports. Returns the index."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(columns)
    encodings = [columns[n] for n in names]
    for encoding in encodings:
        check_encoding(encoding)
    sizes = [encoded_size(e) for e in encodings]
    config = {"column_encodings": encodings, "column_names": names, "column_sizes": sizes,
              "compression": compression, "format": "mds", "hashes": [], "size_limit": size_limit, "version": 2}
    config_bytes = json.dumps(config, sort_keys=True).encode("utf-8")
    shards: list[dict[str, Any]] = []
    pending: list[bytes] = []

    def flush() -> None:
        n = len(pending)
        offsets = np.cumsum([0] + [len(p) for p in pending]) + 4 * (n + 2) + len(config_bytes)
        raw = np.uint32(n).astype("<u4").tobytes() + offsets.astype("<u4").tobytes() + config_bytes + b"".join(pending)
        base = f"shard.{len(shards):05d}.mds"
        entry = {**config, "samples": n, "raw_data": {"basename": base, "bytes": len(raw), "hashes": {}},
                 "zip_data": None}
        if compression:
            packed = compress(compression, raw)
            zip_name = f"{base}.{compression.split(':')[0]}"
            (out / zip_name).write_bytes(packed)
            entry["zip_data"] = {"basename": zip_name, "bytes": len(packed), "hashes": {}}
        else:
            (out / base).write_bytes(raw)
        shards.append(entry)
        pending.clear()

    used = 8 + len(config_bytes)
    for sample in samples:
        parts = [encode_value(e, sample[n]) for n, e in zip(names, encodings)]
        for n, e, size, part in zip(names, encodings, sizes, parts):
            if size is not None and len(part) != size:
                raise ValueError(f"column {n!r} ({e}) encodes to {len(part)} bytes, expected {size}")
        head = np.array([len(p) for p, size in zip(parts, sizes) if size is None], "<u4").tobytes()
        encoded = head + b"".join(parts)
        if size_limit and pending and used + len(encoded) + 4 > size_limit:
            flush()
            used = 8 + len(config_bytes)
        pending.append(encoded)
        used += len(encoded) + 4
    if pending:
        flush()
    index = {"version": 2, "shards": shards}
    (out / INDEX).write_text(json.dumps(index, sort_keys=True))
    return index


__all__ = ["MDSDataset", "MDSLatentDataset", "read_index", "decode_value", "encode_value", "encoded_size",
           "check_encoding", "decompress", "compress", "write_mds"]
