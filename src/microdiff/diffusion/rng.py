"""Gaussian noise from explicit generators.

A *generator spec* is either ``None`` (torch's global RNG), one ``torch.Generator`` for the whole
batch, or a sequence of generators, one per sample. With one generator per sample, sample k of a
batch depends only on its own generator, so an image does not change with the batch size.
"""

from __future__ import annotations

from typing import Sequence, Union

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


def per_sample_generators(seed: int, n: int, device="cpu") -> list[torch.Generator]:
    """``n`` generators seeded ``seed, seed+1, ...``: sample k gets seed + k."""
    return [torch.Generator(device).manual_seed(seed + k) for k in range(n)]
