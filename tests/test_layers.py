"""Backbone building blocks against naive numpy float64 implementations written here.

Attention with QK-norm (micro_diffusion's: one non-affine LayerNorm over the whole q (k) vector, i.e.
over all heads at once, then heads split as contiguous head_dim chunks, softmax(q k^T / sqrt(head_dim))),
with and without key masks; SwiGLU and its width rounding; AdaLN modulation. Everything float64,
so 1e-12 is round-off headroom.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from microdiff.models.layers import CrossAttention, SelfAttention, SwiGLU, modulate

TOL = dict(rtol=1e-12, atol=1e-12)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _np_layer_norm(a, eps):
    mu = a.mean(-1, keepdims=True)
    var = ((a - mu) ** 2).mean(-1, keepdims=True)
    return (a - mu) / np.sqrt(var + eps)


def _np_attention(q, k, v, heads, key_mask, eps):
    """q (N, Hd), k/v (L, Hd) of one sample; key_mask (L,) bool or None (all keys)."""
    q, k = _np_layer_norm(q, eps), _np_layer_norm(k, eps)
    hd = q.shape[-1] // heads
    keep = np.ones(k.shape[0], bool) if key_mask is None or not key_mask.any() else key_mask
    out = np.zeros_like(q)
    for h in range(heads):
        s = slice(h * hd, (h + 1) * hd)
        logits = q[:, s] @ k[:, s].T / math.sqrt(hd)
        logits = np.where(keep[None], logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[:, s] = w @ v[:, s]
    return out


def _randomise(module, seed):
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(p.shape[-1]))
    return module


def _np_linear(x, lin):
    out = x @ lin.weight.detach().numpy().T
    return out if lin.bias is None else out + lin.bias.detach().numpy()


@pytest.mark.parametrize("hidden", [None, 24])
@pytest.mark.parametrize("masked", [False, True])
def test_self_attention_matches_numpy(hidden, masked):
    dim, head_dim, eps = 16, 8, 1e-6
    attn = _randomise(SelfAttention(dim, head_dim, hidden, bias=True, norm_eps=eps).double(), 0)
    x = torch.randn(3, 7, dim, generator=_gen(1), dtype=torch.float64)
    key_mask = None
    if masked:  # sample 0: 4 real tokens, sample 1: all, sample 2: none (attends to all, no NaN)
        key_mask = torch.zeros(3, 7, dtype=torch.bool)
        key_mask[0, :4] = True
        key_mask[1] = True
    with torch.no_grad():
        got = attn(x, key_mask).numpy()
    width = hidden or dim
    for b in range(3):
        qkv = _np_linear(x[b].numpy(), attn.qkv)
        q, k, v = qkv[:, :width], qkv[:, width:2 * width], qkv[:, 2 * width:]
        m = None if key_mask is None else key_mask[b].numpy()
        want = _np_linear(_np_attention(q, k, v, width // head_dim, m, eps), attn.proj)
        np.testing.assert_allclose(got[b], want, **TOL)


@pytest.mark.parametrize("masked", [False, True])
def test_cross_attention_matches_numpy(masked):
    dim, head_dim, eps = 16, 4, 1e-6
    attn = _randomise(CrossAttention(dim, head_dim, bias=False, norm_eps=eps).double(), 2)
    x = torch.randn(2, 5, dim, generator=_gen(3), dtype=torch.float64)
    ctx = torch.randn(2, 6, dim, generator=_gen(4), dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool) if masked else None
    with torch.no_grad():
        got = attn(x, ctx, mask).numpy()
    for b in range(2):
        q = _np_linear(x[b].numpy(), attn.q_linear)
        kv = _np_linear(ctx[b].numpy(), attn.kv_linear)
        m = None if mask is None else mask[b].numpy()
        want = _np_linear(_np_attention(q, kv[:, :dim], kv[:, dim:], dim // head_dim, m, eps), attn.proj)
        np.testing.assert_allclose(got[b], want, **TOL)


def test_masked_keys_do_not_influence_the_output():
    attn = _randomise(SelfAttention(16, 8).double(), 5)
    x = torch.randn(1, 6, 16, generator=_gen(6), dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False, False, False]])
    x2 = x.clone()
    x2[:, 3:] = 1e3 * torch.randn(1, 3, 16, generator=_gen(7), dtype=torch.float64)
    with torch.no_grad():
        a, b = attn(x, mask)[:, :3], attn(x2, mask)[:, :3]
        c = attn(x[:, :3])
    torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(a, c, **TOL)


def test_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of head_dim"):
        SelfAttention(16, 5)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        SelfAttention(16, 8)(torch.randn(2, 3, 16), torch.ones(2, 1, 3, dtype=torch.bool))


@pytest.mark.parametrize("dim,hidden,multiple,want",
                         [(64, 256, 32, 192), (1024, 4096, 256, 2816), (48, 48, 32, 32)])
def test_swiglu_width_and_formula(dim, hidden, multiple, want):
    """hidden = round_up(int(2/3 * hidden), multiple); out = w3(silu(w1 x) * w2 x)."""
    ff = SwiGLU(dim, hidden, multiple).double()
    assert ff.hidden_dim == want
    if dim > 64:
        return
    _randomise(ff, 8)
    x = torch.randn(4, dim, generator=_gen(9), dtype=torch.float64).numpy()
    a, b = _np_linear(x, ff.w1), _np_linear(x, ff.w2)
    expected = _np_linear(a / (1 + np.exp(-a)) * b, ff.w3)
    with torch.no_grad():
        np.testing.assert_allclose(ff(torch.from_numpy(x)).numpy(), expected, **TOL)


def test_modulate():
    g = _gen(10)
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    shift = torch.randn(2, 4, generator=g, dtype=torch.float64)
    scale = torch.randn(2, 4, generator=g, dtype=torch.float64)
    want = np.stack([x[b].numpy() * (1 + scale[b].numpy()) + shift[b].numpy() for b in range(2)])
    np.testing.assert_allclose(modulate(x, shift, scale).numpy(), want, **TOL)


def test_attention_under_cpu_autocast_computes_in_float32():
    """CPU bf16 autocast would run SDPA in bf16, which torch's CPU flash kernel does more slowly than
    float32; our attention() keeps it in float32 there and returns the autocast dtype."""
    from microdiff.models.layers import attention

    gen = _gen(9)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=gen).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention(q, k, v, None)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float()).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # what autocast alone would do
    assert low.dtype == torch.bfloat16
