"""Guidance wrappers (GuidedDenoiser, cfg, zeros_like_cond) against separate calls of the wrapped
denoiser combined by the published formula

    D(x) = D_null(x) + s(sigma) * sum_i w_i (D_i(x) - D_null(x)),

s(sigma) = scale inside the guidance interval [lo, hi], 1 outside it.

The wrapped thing is a small, deterministic, nonlinear fake denoiser (below) that records every
call, so the tests can see how many forwards the wrapper makes and what batch each one has. The
references call the fake once per branch, never through the wrapper. Everything is float64; the
wrapper does the same arithmetic on the same numbers in a different order, so 1e-12 absolute/relative
is round-off headroom, not slack.
"""

import numpy as np
import pytest
import torch

from microdiff.diffusion.guidance import GuidedDenoiser, cfg, zeros_like_cond
from microdiff.diffusion.samplers import sample_euler
from microdiff.diffusion.schedules import karras

B, C, L, Y = 5, 3, 4, 6
TOL = dict(rtol=1e-12, atol=1e-12)  # float64 round-off of a few adds/multiplies


class FakeDenoiser:
    """D(x, sigma, y) = tanh(x * mean(y)) + sigma^2/(1+sigma^2) * sin(x) + 0.1 * sum(y) / (1 + sigma).

    Nonlinear in x and in y, and sigma-dependent, so mixing up branches, samples or noise levels
    changes the output. Records (batch size, sigma, y, extra kwargs) of every call.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, y, **extra):
        assert sigma.shape == (x.shape[0],), "the wrapper must pass a per-sample sigma"
        assert y.shape[0] == x.shape[0], "condition batch must match x's batch"
        self.calls.append({"batch": x.shape[0], "sigma": sigma.clone(), "y": y.clone(), "extra": extra})
        s = sigma[:, None, None]
        ym = y.mean(dim=1)[:, None, None]
        out = torch.tanh(x * ym) + s**2 / (1 + s**2) * torch.sin(x) + 0.1 * y.sum(1)[:, None, None] / (1 + s)
        if "shift" in extra:  # an extra per-sample model argument, as a sampler's extra_args would pass
            out = out + extra["shift"][:, None, None]
        return out


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, L, generator=g, dtype=torch.float64)
    sigma = torch.exp(torch.randn(B, generator=g, dtype=torch.float64))
    y = torch.randn(B, Y, generator=g, dtype=torch.float64) + 0.5
    return g, x, sigma, y


def test_zeros_like_cond_zeroes_tensors_and_keeps_the_rest():
    y = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = zeros_like_cond({"y": y, "mode": "text", "n": 7})
    assert out["y"].shape == y.shape and out["y"].dtype == y.dtype
    assert bool((out["y"] == 0).all())
    assert out["mode"] == "text" and out["n"] == 7
    assert bool((y != 0).all()), "the input condition must not be zeroed in place"


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.5, -2.0])
def test_cfg_equals_u_plus_s_times_c_minus_u_in_one_batched_forward(scale):
    _, x, sigma, y = _data()
    cond = {"y": y}
    uncond = zeros_like_cond(cond)
    fake = FakeDenoiser()
    out = cfg(fake, cond, uncond, scale)(x, sigma)

    ref = FakeDenoiser()
    u, c = ref(x, sigma, **uncond), ref(x, sigma, **cond)
    torch.testing.assert_close(out, u + scale * (c - u), **TOL)
    if scale == 1.0:
        # one prompt of weight 1 at scale 1 is just the conditional model: no null branch
        assert [k["batch"] for k in fake.calls] == [B]
    else:
        assert [k["batch"] for k in fake.calls] == [2 * B]
        call = fake.calls[0]
        torch.testing.assert_close(call["sigma"], torch.cat([sigma, sigma]), rtol=0, atol=0)
        torch.testing.assert_close(call["y"], torch.cat([torch.zeros_like(y), y]), rtol=0, atol=0)


def test_cfg_accepts_a_scalar_sigma():
    _, x, _, y = _data(3)
    cond = {"y": y}
    out = cfg(FakeDenoiser(), cond, zeros_like_cond(cond), 2.0)(x, torch.tensor(0.7, dtype=torch.float64))
    s = torch.full((B,), 0.7, dtype=torch.float64)
    ref = FakeDenoiser()
    u, c = ref(x, s, y=torch.zeros_like(y)), ref(x, s, y=y)
    torch.testing.assert_close(out, u + 2.0 * (c - u), **TOL)


def test_weighted_multi_prompt_with_a_negative_weight():
    g, x, sigma, _ = _data(1)
    conds = [{"y": torch.randn(B, Y, generator=g, dtype=torch.float64), "mode": "a"} for _ in range(3)]
    uncond = {"y": torch.randn(B, Y, generator=g, dtype=torch.float64) * 0.1, "mode": "a"}
    weights, scale = [1.5, -0.7, 0.3], 2.5
    fake = FakeDenoiser()
    out = GuidedDenoiser(fake, conds, uncond, scale=scale, weights=weights)(x, sigma)

    ref = FakeDenoiser()
    d_null = ref(x, sigma, y=uncond["y"])
    want = d_null + scale * sum(w * (ref(x, sigma, y=c["y"]) - d_null) for w, c in zip(weights, conds))
    torch.testing.assert_close(out, want, **TOL)
    assert [k["batch"] for k in fake.calls] == [4 * B]  # (k+1)*B in exactly one forward
    torch.testing.assert_close(fake.calls[0]["y"], torch.cat([uncond["y"]] + [c["y"] for c in conds]),
                               rtol=0, atol=0)


def test_multi_prompt_default_weights_are_one():
    g, x, sigma, _ = _data(2)
    conds = [{"y": torch.randn(B, Y, generator=g, dtype=torch.float64)} for _ in range(2)]
    uncond = zeros_like_cond(conds[0])
    out = GuidedDenoiser(FakeDenoiser(), conds, uncond, scale=1.7)(x, sigma)
    ref = FakeDenoiser()
    d0 = ref(x, sigma, **uncond)
    want = d0 + 1.7 * ((ref(x, sigma, **conds[0]) - d0) + (ref(x, sigma, **conds[1]) - d0))
    torch.testing.assert_close(out, want, **TOL)


def test_guidance_interval_inside_outside_and_straddling():
    _, x, _, y = _data(4)
    cond = {"y": y}
    uncond = zeros_like_cond(cond)
    lo, hi, scale = 0.5, 2.0, 4.0
    ref = FakeDenoiser()

    def reference(sigma):
        u, c = ref(x, sigma, **uncond), ref(x, sigma, **cond)
        inside = ((sigma >= lo) & (sigma <= hi)).numpy()
        s = torch.from_numpy(np.where(inside, scale, 1.0))[:, None, None]
        return u + s * (c - u), c

    # all inside (including both closed ends of the interval)
    sigma_in = torch.tensor([0.5, 0.8, 1.0, 1.5, 2.0], dtype=torch.float64)
    fake = FakeDenoiser()
    out = cfg(fake, cond, uncond, scale, interval=(lo, hi))(x, sigma_in)
    u, c = ref(x, sigma_in, **uncond), ref(x, sigma_in, **cond)
    torch.testing.assert_close(out, u + scale * (c - u), **TOL)
    assert [k["batch"] for k in fake.calls] == [2 * B]

    # all outside: exactly the conditional denoiser, and the null branch is skipped
    sigma_out = torch.tensor([0.01, 0.1, 0.49, 2.01, 30.0], dtype=torch.float64)
    fake = FakeDenoiser()
    out = cfg(fake, cond, uncond, scale, interval=(lo, hi))(x, sigma_out)
    torch.testing.assert_close(out, ref(x, sigma_out, **cond), **TOL)
    assert [k["batch"] for k in fake.calls] == [B]

    # per-sample sigma straddling the interval: scale applies elementwise
    sigma_mix = torch.tensor([0.05, 0.5, 1.0, 2.0, 5.0], dtype=torch.float64)
    fake = FakeDenoiser()
    out = cfg(fake, cond, uncond, scale, interval=(lo, hi))(x, sigma_mix)
    want, c = reference(sigma_mix)
    torch.testing.assert_close(out, want, **TOL)
    torch.testing.assert_close(out[[0, 4]], c[[0, 4]], **TOL)  # outside rows: conditional model
    assert not torch.allclose(out[[1, 2, 3]], c[[1, 2, 3]])  # inside rows really are guided
    assert [k["batch"] for k in fake.calls] == [2 * B]


def test_interval_outside_with_weight_not_one_keeps_the_formula_at_scale_one():
    """Outside the interval s = 1, but a prompt of weight 2 still extrapolates: u + 2 (c - u)."""
    _, x, _, y = _data(5)
    cond = {"y": y}
    uncond = zeros_like_cond(cond)
    sigma = torch.full((B,), 10.0, dtype=torch.float64)
    fake = FakeDenoiser()
    out = GuidedDenoiser(fake, [cond], uncond, scale=3.0, weights=[2.0], interval=(0.1, 1.0))(x, sigma)
    ref = FakeDenoiser()
    u, c = ref(x, sigma, **uncond), ref(x, sigma, **cond)
    torch.testing.assert_close(out, u + 2.0 * (c - u), **TOL)
    assert [k["batch"] for k in fake.calls] == [2 * B]


def test_batch_one_conditions_broadcast_to_the_batch():
    g, x, sigma, _ = _data(6)
    y1 = torch.randn(1, Y, generator=g, dtype=torch.float64)
    cond = {"y": y1}
    uncond = zeros_like_cond(cond)  # also batch 1
    fake = FakeDenoiser()
    out = cfg(fake, cond, uncond, 3.0)(x, sigma)
    ref = FakeDenoiser()
    yB = y1.repeat(B, 1)
    u, c = ref(x, sigma, y=torch.zeros_like(yB)), ref(x, sigma, y=yB)
    torch.testing.assert_close(out, u + 3.0 * (c - u), **TOL)
    assert [k["batch"] for k in fake.calls] == [2 * B]

    # the skipped-null path broadcasts as well
    fake = FakeDenoiser()
    out = cfg(fake, cond, uncond, 1.0)(x, sigma)
    torch.testing.assert_close(out, c, **TOL)
    assert [k["batch"] for k in fake.calls] == [B]


def test_per_sample_extra_arguments_are_replicated_per_branch():
    g, x, sigma, y = _data(7)
    shift = torch.randn(B, generator=g, dtype=torch.float64)
    cond = {"y": y}
    uncond = zeros_like_cond(cond)
    fake = FakeDenoiser()
    out = cfg(fake, cond, uncond, 2.0)(x, sigma, shift=shift)
    ref = FakeDenoiser()
    u, c = ref(x, sigma, **uncond, shift=shift), ref(x, sigma, **cond, shift=shift)
    torch.testing.assert_close(out, u + 2.0 * (c - u), **TOL)
    torch.testing.assert_close(fake.calls[0]["extra"]["shift"], torch.cat([shift, shift]), rtol=0, atol=0)


def test_condition_with_wrong_batch_raises_naming_the_key():
    _, x, sigma, _ = _data(8)
    bad = {"y": torch.zeros(B - 2, Y, dtype=torch.float64)}
    with pytest.raises(ValueError, match="'y'"):
        cfg(FakeDenoiser(), bad, zeros_like_cond(bad), 2.0)(x, sigma)
    # the skipped-null path checks too
    with pytest.raises(ValueError, match="'y'"):
        cfg(FakeDenoiser(), bad, zeros_like_cond(bad), 1.0)(x, sigma)
    # a bad unconditional branch alone is caught
    good = {"y": torch.zeros(B, Y, dtype=torch.float64)}
    with pytest.raises(ValueError, match="'y'"):
        cfg(FakeDenoiser(), good, {"y": torch.zeros(B + 1, Y, dtype=torch.float64)}, 2.0)(x, sigma)


def test_mismatched_condition_keys_raise():
    _, x, sigma, y = _data(9)
    with pytest.raises(ValueError, match="same keys"):
        cfg(FakeDenoiser(), {"y": y}, {"z": torch.zeros_like(y)}, 2.0)(x, sigma)
    with pytest.raises(ValueError, match="same keys"):
        GuidedDenoiser(FakeDenoiser(), [{"y": y}, {"y": y, "extra": y}], {"y": y}, scale=2.0)(x, sigma)


def test_non_tensor_condition_differing_between_branches_raises():
    _, x, sigma, y = _data(10)
    with pytest.raises(ValueError, match="'mode'"):
        cfg(FakeDenoiser(), {"y": y, "mode": "a"}, {"y": y, "mode": "b"}, 2.0)(x, sigma)


def test_constructor_validation():
    y = torch.zeros(B, Y, dtype=torch.float64)
    fake = FakeDenoiser()
    with pytest.raises(ValueError, match="2 weights for 3 prompts"):
        GuidedDenoiser(fake, [{"y": y}] * 3, {"y": y}, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="at least one condition"):
        GuidedDenoiser(fake, [], {"y": y})
    with pytest.raises(ValueError, match="interval"):
        GuidedDenoiser(fake, [{"y": y}], {"y": y}, interval=(2.0, 1.0))
    with pytest.raises(ValueError, match="interval"):
        GuidedDenoiser(fake, [{"y": y}], {"y": y}, interval=(-1.0, 1.0))
    assert fake.calls == []


def test_guided_denoiser_composes_with_the_euler_sampler():
    """The wrapper is a plain denoiser: sample_euler runs through it and matches a hand-written Euler
    loop on the reference formula (same float64 arithmetic, 1e-12)."""
    g, _, _, y = _data(11)
    sigmas = karras(5, 0.1, 10.0, dtype=torch.float64)
    x = torch.randn(B, C, L, generator=g, dtype=torch.float64) * sigmas[0]
    cond = {"y": y}
    uncond = zeros_like_cond(cond)
    fake = FakeDenoiser()
    out = sample_euler(cfg(fake, cond, uncond, 3.0), x, sigmas, disable=True)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    assert [k["batch"] for k in fake.calls] == [2 * B] * 5

    # reference: Karras et al.'s Euler step x <- x + (x - D(x))/sigma * (sigma_next - sigma)
    ref = FakeDenoiser()
    xr = x.clone()
    for i in range(5):
        s = sigmas[i].expand(B)
        u, c = ref(xr, s, **uncond), ref(xr, s, **cond)
        d = u + 3.0 * (c - u)
        xr = xr + (xr - d) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    torch.testing.assert_close(out, xr, **TOL)


def test_scalar_tensor_conditions_are_shared_not_batched():
    """A 0-d tensor condition (e.g. a shared scale) is passed through to every branch unchanged."""
    seen = []

    def D(x, sigma, y, scale):
        seen.append(scale)
        return x * scale + y

    x = torch.ones(3, 2, dtype=torch.float64)
    cond = {"y": torch.full((3, 2), 2.0, dtype=torch.float64), "scale": torch.tensor(0.5, dtype=torch.float64)}
    out = cfg(D, cond, zeros_like_cond(cond) | {"scale": cond["scale"]}, scale=3.0)(x, torch.ones(3))
    # u = 0.5, c = 2.5 -> u + 3 (c - u) = 6.5
    torch.testing.assert_close(out, torch.full((3, 2), 6.5, dtype=torch.float64), rtol=0, atol=1e-12)
    assert seen[0].ndim == 0
    mismatched = {"y": cond["y"], "scale": torch.tensor(0.7, dtype=torch.float64)}
    with pytest.raises(ValueError, match="'scale' differs between branches"):
        cfg(D, cond, mismatched, scale=2.0)(x, torch.ones(3))
