"""Gaussian noise from explicit generators.

A *generator spec* is either ``None`` (torch's global RNG), one ``torch.Generator`` for the whole
batch, or a sequence of generators, one per sample. With one generator per sample, sample k of a
batch depends only on its own generator, so an image does not change with the batch size.
"""

from __future__ import annotations

import hashlib
from typing import Sequence, Union

import numpy as np
import torch

GeneratorSpec = Union[None, torch.Generator, Sequence[torch.Generator]]


def randn(shape, generator: GeneratorSpec = None, *, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise of ``shape``; the first dimension is the batch."""
    shape = tuple(shape)
    dtype = dtype or torch.get_default_dtype()
    if generator is None or isinstance(generator, torch.Generator):
        return _randn_one(shape, generator, device, dtype)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(
            f"got {len(generators)} per-sample generators for a batch of {shape[0]}; "
            "pass one generator per sample or a single generator"
        )
    return torch.cat([_randn_one((1, *shape[1:]), g, device, dtype) for g in generators])


def randn_like(x: torch.Tensor, generator: GeneratorSpec = None) -> torch.Tensor:
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)


def _randn_one(shape, generator, device, dtype):
    # Draw on the generator's device, then move: a CPU generator gives the same numbers whatever
    # device the sample lives on.
    gen_device = generator.device if generator is not None else device
    noise = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
    return noise.to(device)


def stream_seed(seed: int, purpose: str, *indices: int | str) -> int:
    """The 63-bit seed of the random stream named ``purpose`` at ``indices`` under ``seed``.

    One stable hash (blake2b, personalised "microdiff") of ``(seed, purpose, *indices)``: streams of
    different purposes or indices never share a seed by construction (unlike ``seed * a + step * b``
    schemes, where step s+1 at offset 0 equals step s at offset b), and the value does not depend on
    Python's per-process hash salt, the worker or the order of access."""
    if not isinstance(purpose, str) or not purpose:
        raise ValueError(f"stream: purpose must be a non-empty string; got {purpose!r}")
    parts = [_seed_part(seed, "seed"), purpose, *(_seed_part(i, "index") for i in indices)]
    digest = hashlib.blake2b("\0".join(parts).encode("utf-8"), digest_size=8, person=b"microdiff").digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def stream(seed: int, purpose: str, *indices: int | str, device="cpu") -> torch.Generator:
    """A ``torch.Generator`` for the stream ``purpose`` at ``indices`` (see ``stream_seed``)."""
    return torch.Generator(device).manual_seed(stream_seed(seed, purpose, *indices))


def numpy_stream(seed: int, purpose: str, *indices: int | str) -> np.random.Generator:
    """The numpy counterpart of ``stream``: the same seed, a ``np.random.Generator``."""
    return np.random.default_rng(stream_seed(seed, purpose, *indices))


def _seed_part(value, what: str) -> str:
    if isinstance(value, str):
        return "s:" + value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"stream: each {what} must be an integer or a string; got {value!r}")
    return str(int(value))


def per_sample_generators(seed: int, n: int, device="cpu") -> list[torch.Generator]:
    """``n`` generators seeded ``seed, seed+1, ...``: sample k gets seed + k."""
    return [torch.Generator(device).manual_seed(seed + k) for k in range(n)]
