"""diffusion.rng.stream: one named seed function for every random stream."""

import hashlib

import pytest
import torch

from microdiff.diffusion.rng import numpy_stream, stream, stream_seed


def test_stream_seed_is_the_documented_blake2b_of_its_parts():
    digest = hashlib.blake2b(b"3\x00noise\x0017\x00s:k", digest_size=8, person=b"microdiff").digest()
    assert stream_seed(3, "noise", 17, "k") == int.from_bytes(digest, "little") & (2**63 - 1)


def test_streams_of_neighbouring_steps_and_purposes_differ():
    # The old trainer scheme seed*7919 + step*131 + offset gave step s+1 (offset 0) the stream of
    # step s (offset 131); named streams cannot collide that way.
    seeds = {stream_seed(0, p, s, o) for p in ("a", "b") for s in range(200) for o in range(0, 262, 131)}
    assert len(seeds) == 2 * 200 * 2  # every (purpose, step, offset) its own seed
    assert stream_seed(1, "a", 2) != stream_seed(1, "a", "2")


def test_streams_repeat_and_numpy_uses_the_same_seed():
    a = torch.randn(5, generator=stream(7, "x", 1))
    b = torch.randn(5, generator=stream(7, "x", 1))
    assert torch.equal(a, b)
    assert numpy_stream(7, "x", 1).integers(1 << 30) == numpy_stream(7, "x", 1).integers(1 << 30)


@pytest.mark.parametrize("bad", [1.5, True, None])
def test_a_bad_index_is_refused(bad):
    with pytest.raises(ValueError, match="index"):
        stream_seed(0, "x", bad)
    with pytest.raises(ValueError, match="purpose"):
        stream_seed(0, "", 1)
