"""Expert-choice MoE (Zhou et al. 2022) against an independent naive implementation.

The reference below is written from the paper's definition in numpy float64, one sample and one expert
at a time: router probabilities p = softmax(x G^T) over experts; expert e picks the k = int(capacity *
T / E) tokens with the largest p[:, e]; token j picked by e receives p[j, e] * W2_e gelu(W1_e x_j)
(exact erf GELU); a token picked by no expert gets 0. The "gather" and "dense" (micro_diffusion's
one-hot einsum) dispatches must both equal it: float64 to 1e-12 (round-off of a few dozen terms),
float32 to 1e-5 relative; their gradients must agree to the same tolerances, and the gather
dispatch passes torch.autograd.gradcheck (finite differences) in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from microdiff.models.moe import ExpertChoiceMoE, tokens_per_expert

D, H, E = 8, 16, 4

# (tokens T, capacity): k = int(capacity * T / E)
CASES = [
    (8, 2.0),   # k = 4, T divisible by E
    (10, 2.0),  # k = 5, T not divisible by E
    (10, 1.0),  # k = 2
    (5, 1.0),   # k = 1: the smallest non-empty choice
    (7, 0.5),   # k = 0: no expert picks a token, the output is exactly 0
    (6, 4.0),   # k = 6 = T: capacity = E, every expert takes every token
]

_erf = np.vectorize(math.erf)


def _naive_moe(x, gate_w, w1, w2, capacity):
    """x (B, T, D), gate_w (E, D), w1 (E, D, H), w2 (E, H, D), all numpy float64."""
    b_, t_, _ = x.shape
    e_ = gate_w.shape[0]
    k = int(capacity * t_ / e_)
    out = np.zeros_like(x)
    for b in range(b_):
        logits = x[b] @ gate_w.T  # (T, E)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        for e in range(e_):
            for j in np.argsort(-p[:, e], kind="stable")[:k]:
                a = x[b, j] @ w1[e]
                h = 0.5 * a * (1 + _erf(a / math.sqrt(2)))
                out[b, j] += p[j, e] * (h @ w2[e])
    return out


def _moe(capacity, dispatch, dtype, seed=0):
    torch.manual_seed(seed)
    moe = ExpertChoiceMoE(D, H, num_experts=E, capacity=capacity, multiple_of=8, dispatch=dispatch)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # O(1) weights so every term matters (the default init is 0.02-scale)
        moe.gate.weight.copy_(torch.randn(E, D, generator=g))
        moe.w1.copy_(torch.randn(E, D, H, generator=g) / math.sqrt(D))
        moe.w2.copy_(torch.randn(E, H, D, generator=g) / math.sqrt(H))
    return moe.to(dtype)


def _pair(capacity, dtype):
    gather = _moe(capacity, "gather", dtype)
    dense = _moe(capacity, "dense", dtype)
    dense.load_state_dict(gather.state_dict())
    return gather, dense


def _x(t, dtype, batch=3, seed=5):
    return torch.randn(batch, t, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _np(moe):
    return [a.detach().double().numpy() for a in (moe.gate.weight, moe.w1, moe.w2)]


@pytest.mark.parametrize("t,capacity", CASES)
def test_dispatches_equal_naive_reference_float64(t, capacity):
    gather, dense = _pair(capacity, torch.float64)
    assert gather.hidden_dim == H
    x = _x(t, torch.float64)
    want = _naive_moe(x.numpy(), *_np(gather), capacity)
    with torch.no_grad():
        for moe in (gather, dense):
            got = moe(x)
            assert got.shape == x.shape and got.dtype == torch.float64
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    if tokens_per_expert(t, E, capacity) == 0:
        assert not want.any()


@pytest.mark.parametrize("t,capacity", CASES)
def test_dispatches_equal_naive_reference_float32(t, capacity):
    """float32 forward vs the float64 reference on the same (float32) weights and inputs: 1e-5 relative
    (norm of the difference over the norm of the reference)."""
    gather, dense = _pair(capacity, torch.float32)
    x = _x(t, torch.float32)
    want = _naive_moe(x.double().numpy(), *_np(gather), capacity)
    with torch.no_grad():
        outs = [moe(x) for moe in (gather, dense)]
    for got in outs:
        assert got.dtype == torch.float32
        if want.any():
            assert np.linalg.norm(got.double().numpy() - want) / np.linalg.norm(want) < 1e-5
        else:
            assert not got.any()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("t,capacity", [c for c in CASES if tokens_per_expert(c[0], E, c[1]) > 0])
def test_gradients_of_both_dispatches_agree(t, capacity, dtype, tol):
    gather, dense = _pair(capacity, dtype)
    weights = torch.randn(3, t, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype)
    grads = []
    for moe in (gather, dense):
        x = _x(t, dtype).requires_grad_(True)
        (moe(x) * weights).sum().backward()
        grads.append([x.grad, moe.gate.weight.grad, moe.w1.grad, moe.w2.grad])
    for a, b in zip(*grads):
        assert b.norm() > 0
        assert float((a - b).norm() / b.norm()) < tol


def test_gather_dispatch_passes_gradcheck():
    """Finite differences in float64 (the top-k choice is locally constant for untied inputs)."""
    moe = _moe(2.0, "gather", torch.float64)
    x = _x(6, torch.float64, batch=2).requires_grad_(True)
    params = [moe.gate.weight, moe.w1, moe.w2]

    def f(x, gate, w1, w2):
        return torch.func.functional_call(moe, {"gate.weight": gate, "w1": w1, "w2": w2}, (x,))

    assert torch.autograd.gradcheck(f, (x, *[p.detach().requires_grad_(True) for p in params]),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("t,capacity", CASES)
def test_each_expert_takes_k_tokens_and_unpicked_tokens_get_zero(t, capacity):
    moe = _moe(capacity, "gather", torch.float64)
    x = _x(t, torch.float64)
    k = int(capacity * t / E)
    assert tokens_per_expert(t, E, capacity) == k
    with torch.no_grad():
        gates, idx = moe.route(x)
        out = moe(x)
    assert gates.shape == idx.shape == (3, E, k)
    probs = torch.softmax(x @ moe.gate.weight.detach().T, dim=-1)  # (B, T, E)
    for b in range(3):
        for e in range(E):
            chosen = idx[b, e].tolist()
            assert len(set(chosen)) == k  # k distinct tokens
            top = np.argsort(-probs[b, :, e].numpy(), kind="stable")[:k].tolist()
            assert sorted(chosen) == sorted(top)
            torch.testing.assert_close(gates[b, e], probs[b, idx[b, e], e], rtol=1e-15, atol=0)
        picked = set(idx[b].flatten().tolist())
        for j in range(t):
            assert bool(out[b, j].any()) == (j in picked), (b, j)


def test_invalid_arguments_raise():
    for capacity in (0, -1.0, E + 0.5):
        with pytest.raises(ValueError, match="expert_capacity"):
            ExpertChoiceMoE(D, H, num_experts=E, capacity=capacity)
    ExpertChoiceMoE(D, H, num_experts=E, capacity=float(E))  # the upper end is allowed
    with pytest.raises(ValueError, match="dispatch 'sparse'"):
        ExpertChoiceMoE(D, H, num_experts=E, dispatch="sparse")
    with pytest.raises(ValueError, match=r"\(B, T, D\)"):
        ExpertChoiceMoE(D, H, num_experts=E)(torch.randn(5, D))


def test_hidden_width_is_rounded_up_and_parameter_shapes():
    moe = ExpertChoiceMoE(64, 100, num_experts=8, capacity=2.0, multiple_of=32)
    assert moe.hidden_dim == 128
    assert moe.w1.shape == (8, 64, 128) and moe.w2.shape == (8, 128, 64) and moe.gate.weight.shape == (8, 64)
    assert moe.gate.bias is None
