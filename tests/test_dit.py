"""MicroDiT backbone against independent references.

- micro_diffusion's own ``DiT`` (tensors in ../shared/reference/microdit_small.safetensors, produced by
  running that class): plain, guided and token-masked forwards, float32 on the CPU, relative error
  |ours - ref| / |ref| < 1e-5 (DESIGN.md, "Reference tensors");
- the layout of the published XL checkpoint (../shared/reference/*.tsv), built on the meta device;
- closed forms written here in numpy float64: the 2-D sin-cos positional table and the sinusoidal
  timestep features (atol 1e-6, float32 round-off of arguments up to ~30);
- hand computations of the loss over visible patches, pixel masks and token gathering;
- invariances: checkpoint round trips and gradient checkpointing (same numbers), caption padding
  under y_mask, input shapes that must agree, torch.compile without graph breaks.

Everything that runs forward/backward uses MicroDiT_Nano_2 or small custom configs (fast on 2 CPU cores).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from microdiff.diffusion.denoiser import EDM, Denoiser
from microdiff.diffusion.guidance import GuidedDenoiser, cfg, zeros_like_cond
from microdiff.diffusion.loss import denoising_loss, eps_weight
from microdiff.models import MicroDiT, MicroDiT_Nano_2, MicroDiT_XL_2
from microdiff.models import dit as dit_module
from microdiff.models.dit import (DiTBlock, attention_width, draw_token_mask, gather_tokens, load_microdit,
                                  microdit, moe_blocks, restore_tokens, spread)
from microdiff.models.layers import timestep_embedding
from microdiff.models.moe import ExpertChoiceMoE


def _reference_dir() -> Path | None:
    for d in (Path(__file__).resolve().parents[2] / "shared" / "reference", Path("/work/shared/reference")):
        if d.is_dir():
            return d
    return None


REF_DIR = _reference_dir()
REF_FILE = None if REF_DIR is None else REF_DIR / "microdit_small.safetensors"
XL_TSV = None if REF_DIR is None else REF_DIR / "micro_diffusion_MicroDiT_XL_2_latent64_state_dict.tsv"


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _perturb(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Add N(0, scale^2) noise to every parameter. A freshly built MicroDiT has zero AdaLN, prompt-block
    output and final layers, so F == 0 and most branches get no gradient: checks on such a model
    would pass vacuously."""
    g = _gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def _nano(seed: int = 0, **overrides) -> MicroDiT:
    torch.manual_seed(seed)
    return _perturb(MicroDiT_Nano_2(**overrides), seed + 100)


def _inputs(model: MicroDiT, batch: int = 2, tokens: int = 5, seed: int = 1, hw=None):
    g = _gen(seed)
    h, w = hw or model.input_hw
    x = torch.randn(batch, model.in_channels, h, w, generator=g)
    t = torch.randn(batch, generator=g) * 0.5
    y = torch.randn(batch, 1, tokens, model.caption_channels, generator=g)
    return x, t, y


# ============================================================================ 1. reference reproduction

@pytest.fixture(scope="module")
def reference():
    if REF_FILE is None or not REF_FILE.exists():
        pytest.skip("reference tensors ../shared/reference/microdit_small.safetensors not found")
    from safetensors import safe_open

    with safe_open(str(REF_FILE), "pt") as f:
        config = json.loads(f.metadata()["config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = {k[len("state_dict/"):]: v for k, v in tensors.items() if k.startswith("state_dict/")}
    return {"config": config, "state": state, **{k: v for k, v in tensors.items() if not k.startswith("state_dict/")}}


def _reference_model(reference, dispatch: str) -> MicroDiT:
    model = MicroDiT(**reference["config"], moe_dispatch=dispatch)
    model.load_state_dict(reference["state"], strict=True)  # micro_diffusion's key names, strict
    return model.eval()


DISPATCHES = ["gather", "dense"]


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_reference_plain_forward(reference, dispatch):
    """outputs/plain = micro_diffusion DiT.forward(x, t, y); rel err < 1e-5 in float32."""
    model = _reference_model(reference, dispatch)
    x, t, y = reference["inputs/x"], reference["inputs/t"], reference["inputs/y"]
    with torch.no_grad():
        out = model(x, t, y)
    assert out["mask"] is None and out["loss_mask"] is None
    assert _rel(out["sample"], reference["outputs/plain"]) < 1e-5


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_reference_guided_from_two_forwards(reference, dispatch):
    """outputs/cfg_3.5 = u + 3.5 (c - u), u with zeros_like(y); rel err < 1e-5."""
    model = _reference_model(reference, dispatch)
    x, t, y = reference["inputs/x"], reference["inputs/t"], reference["inputs/y"]
    with torch.no_grad():
        c = model(x, t, y)["sample"]
        u = model(x, t, torch.zeros_like(y))["sample"]
    assert _rel(u + 3.5 * (c - u), reference["outputs/cfg_3.5"]) < 1e-5


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_reference_guided_through_denoiser_and_guidance_wrapper(reference, dispatch):
    """GuidedDenoiser(Denoiser(model, EDM())) at scale 3.5. D = c_skip x + c_out F is affine in F at
    fixed sigma, so guidance on D equals c_skip x + c_out (guided F). sigma = exp(4 t_ref) makes the
    backbone see c_noise = ln(sigma)/4 = t_ref, and x = x_ref / c_in makes it see c_in x = x_ref.
    The sampler-side state is float64, so D and the recovered F are checked to 1e-5 relative."""
    model = _reference_model(reference, dispatch)
    x_ref, t_ref, y = reference["inputs/x"], reference["inputs/t"], reference["inputs/y"]
    sd = 0.5
    sigma = torch.exp(4 * t_ref.double())
    s = sigma[:, None, None, None]
    c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()
    x = x_ref.double() / c_in
    den = Denoiser(model, EDM(sigma_data=sd))
    guided = GuidedDenoiser(den, [{"y": y}], zeros_like_cond({"y": y}), scale=3.5)
    with torch.no_grad():
        d = guided(x, sigma)
        d_cfg = cfg(den, {"y": y}, {"y": torch.zeros_like(y)}, 3.5)(x, sigma)
    want = c_skip * x + c_out * reference["outputs/cfg_3.5"].double()
    assert _rel(d, want) < 1e-5
    assert _rel(d_cfg, want) < 1e-5
    # the guided F itself, recovered in float64 (no cancellation problem: D is float64 from a float32 F)
    assert _rel((d - c_skip * x) / c_out, reference["outputs/cfg_3.5"]) < 1e-5


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_reference_masked_forward(reference, dispatch):
    """outputs/masked_0.5_seed1234 and its mask: forward(mask_ratio=0.5) right after
    torch.manual_seed(1234). The mask must be equal exactly, the output to rel 1e-5."""
    model = _reference_model(reference, dispatch)
    x, t, y = reference["inputs/x"], reference["inputs/t"], reference["inputs/y"]
    torch.manual_seed(1234)
    with torch.no_grad():
        out = model(x, t, y, mask_ratio=0.5)
    assert torch.equal(out["mask"], reference["outputs/mask_0.5_seed1234"])
    assert _rel(out["sample"], reference["outputs/masked_0.5_seed1234"]) < 1e-5
    # an explicit generator seeded the same way draws the same mask as the global RNG
    with torch.no_grad():
        out_g = model(x, t, y, mask_ratio=0.5, generator=_gen(1234))
    assert torch.equal(out_g["mask"], reference["outputs/mask_0.5_seed1234"])
    assert _rel(out_g["sample"], reference["outputs/masked_0.5_seed1234"]) < 1e-5


# ============================================================================ 2. XL layout

def _read_tsv(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    lines = path.read_text().strip().splitlines()
    assert lines[0].split("\t") == ["key", "shape", "kind"]
    rows = []
    for line in lines[1:]:
        key, shape, kind = line.split("\t")
        rows.append((key, tuple(int(s) for s in re.findall(r"\d+", shape)), kind))
    return rows


@pytest.fixture(scope="module")
def xl_meta():
    with torch.device("meta"):
        return MicroDiT_XL_2(input_size=64)


@pytest.fixture(scope="module")
def xl_rows():
    if XL_TSV is None or not XL_TSV.exists():
        pytest.skip("../shared/reference/micro_diffusion_MicroDiT_XL_2_latent64_state_dict.tsv not found")
    return _read_tsv(XL_TSV)


def test_xl_layout_matches_published_checkpoint(xl_meta, xl_rows):
    """Keys, shapes and parameter/buffer kinds equal the published XL checkpoint (latent 64) exactly;
    1,165,442,320 parameters; nothing allocated (all on the meta device)."""
    model = xl_meta
    sd = model.state_dict()
    assert list(sd) == [k for k, _, _ in xl_rows] or set(sd) == {k for k, _, _ in xl_rows}
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: s for k, s, _ in xl_rows}
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for key, _, kind in xl_rows:
        assert kind in ("param", "buffer"), kind
        assert (key in params) == (kind == "param") and (key in buffers) == (kind == "buffer"), key
    assert sum(p.numel() for p in model.parameters()) == 1_165_442_320
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "meta" for b in model.buffers())


# ============================================================================ 3. checkpoints

def test_safetensors_round_trip_with_config(tmp_path):
    """save_file(state_dict) + MicroDiT(**config) (config through JSON: it is data) + strict load
    gives bit-identical outputs, masked and unmasked."""
    from safetensors.torch import load_file, save_file

    model = _nano(0).eval()
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    config = json.loads(json.dumps(model.config))
    clone = MicroDiT(**config).eval()
    clone.load_state_dict(load_file(str(path)), strict=True)
    x, t, y = _inputs(model)
    with torch.no_grad():
        assert torch.equal(clone(x, t, y)["sample"], model(x, t, y)["sample"])
        a = clone(x, t, y, mask_ratio=0.5, generator=_gen(3))
        b = model(x, t, y, mask_ratio=0.5, generator=_gen(3))
    assert torch.equal(a["sample"], b["sample"]) and torch.equal(a["mask"], b["mask"])
    # and through load_microdit with a .safetensors path
    other = load_microdit(MicroDiT(**config).eval(), str(path))
    with torch.no_grad():
        assert torch.equal(other(x, t, y)["sample"], model(x, t, y)["sample"])


def _wrapped_checkpoints(sd: dict[str, torch.Tensor]) -> dict[str, dict]:
    extra = {"vae.encoder.weight": torch.randn(3, 3), "text_encoder.x": torch.randn(2)}
    return {
        "composer": {"state": {"model": {**{"dit." + k: v for k, v in sd.items()}, **extra}}},
        "composer_compiled": {"state": {"model": {**{"dit._orig_mod." + k: v for k, v in sd.items()}, **extra}}},
        "ddp": {"module." + k: v for k, v in sd.items()},
        "compiled": {"_orig_mod." + k: v for k, v in sd.items()},
        "state_dict": {"state_dict": dict(sd)},
        "plain": dict(sd),
    }


@pytest.mark.parametrize("layout", ["composer", "composer_compiled", "ddp", "compiled", "state_dict", "plain"])
def test_wrapped_checkpoints_load_strictly(tmp_path, layout):
    """Composer (DiT under state/model with prefix dit., next to VAE and text-encoder weights),
    torch.compile (_orig_mod.) and DDP (module.) layouts saved with torch.save load through
    load_microdit(strict=True) into a differently initialised model and give identical outputs."""
    source = _nano(0).eval()
    ckpt = _wrapped_checkpoints(source.state_dict())[layout]
    path = tmp_path / f"{layout}.pt"
    torch.save(ckpt, path)
    target = _nano(5).eval()
    x, t, y = _inputs(source)
    with torch.no_grad():
        assert not torch.equal(target(x, t, y)["sample"], source(x, t, y)["sample"])
        load_microdit(target, str(path))
        assert torch.equal(target(x, t, y)["sample"], source(x, t, y)["sample"])


class _NotATensor:  # a custom class: torch.load(weights_only=True) must refuse to unpickle it
    def __init__(self):
        self.payload = 3


def test_non_weights_only_pickle_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "unsafe_ckpt.pt"
    torch.save({"state_dict": MicroDiT_Nano_2().state_dict(), "extra": _NotATensor()}, path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_microdit(MicroDiT_Nano_2(), str(path))


def _np_pos_table(dim: int, h: int, w: int, scale: float = 1.0) -> np.ndarray:
    """2-D sin-cos table written out from the formula (float64): for patch (r, c) in raster order,
    features [sin(c'w_i), cos(c'w_i), sin(r'w_i), cos(r'w_i)], c' = c/scale, r' = r/scale, i < dim/4,
    omega_i = 10000^(-i/(dim/4))."""
    q = dim // 4
    omega = 10000.0 ** (-np.arange(q, dtype=np.float64) / q)
    table = np.zeros((h * w, dim))
    for r in range(h):
        for c in range(w):
            a, b = (c / scale) * omega, (r / scale) * omega
            table[r * w + c] = np.concatenate([np.sin(a), np.cos(a), np.sin(b), np.cos(b)])
    return table


def test_checkpoint_from_another_resolution_uses_the_models_own_positions():
    """A checkpoint trained at input_size=8 loads strictly into input_size=16, pos_interp_scale=2;
    the loaded pos_embed is the 16-px model's own table (not the checkpoint's, which has another
    shape), and on that table patch (2a, 2b) sits exactly at the 8-px table's position (a, b)."""
    small = _nano(0)
    ckpt = small.state_dict()
    big = MicroDiT_Nano_2(input_size=16, pos_interp_scale=2)
    own = big.positional_table().clone()
    with torch.no_grad():
        big.pos_embed.zero_()  # so that the load must write the table, not leave it in place
    load_microdit(big, ckpt, strict=True)
    assert ckpt["pos_embed"].shape == small.pos_embed.shape  # the caller's dict is not modified
    assert torch.equal(big.pos_embed, own)
    dim = big.pos_embed.shape[-1]
    np.testing.assert_allclose(big.pos_embed[0].numpy(), _np_pos_table(dim, 8, 8, scale=2.0), atol=1e-6)
    # all other weights came from the checkpoint
    for k, v in ckpt.items():
        if k != "pos_embed":
            assert torch.equal(big.state_dict()[k], v), k
    p_small, p_big = small.pos_embed[0], big.pos_embed[0]
    for a in range(4):
        for b in range(4):
            assert torch.equal(p_big[(2 * a) * 8 + 2 * b], p_small[a * 4 + b]), (a, b)
    x, t, y = _inputs(big)
    with torch.no_grad():
        assert torch.isfinite(big(x, t, y)["sample"]).all()


# ============================================================================ 4. positions, time features

@pytest.mark.parametrize("input_size", [8, (8, 12), (12, 4)])
def test_positional_table_matches_numpy_formula(input_size):
    model = MicroDiT_Nano_2(input_size=input_size)
    h, w = model.grid
    assert model.pos_embed.shape == (1, h * w, 64)
    np.testing.assert_allclose(model.pos_embed[0].numpy(), _np_pos_table(64, h, w), atol=1e-6)
    # and directly, a wider non-square table with interpolation
    from microdiff.models.layers import sincos_pos_embed_2d

    np.testing.assert_allclose(sincos_pos_embed_2d(128, (5, 9), 2.0).numpy(), _np_pos_table(128, 5, 9, 2.0),
                               atol=1e-6)


@pytest.mark.parametrize("dim", [512, 64, 7])
def test_timestep_embedding_closed_form(dim):
    """[cos(t f_i), sin(t f_i)], f_i = exp(-ln(1e4) i / half), i < half = dim // 2; odd dim: a zero
    column at the end. float32 arguments up to |t| ~ 30: atol 1e-6 after relative 1e-7."""
    t = torch.tensor([-2.5, -0.75, 0.0, 0.3, 1.0, 7.25, 30.0])
    half = dim // 2
    f = np.exp(-math.log(1e4) * np.arange(half) / half)
    args = t.numpy().astype(np.float64)[:, None] * f[None]
    want = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    if dim % 2:
        want = np.concatenate([want, np.zeros((len(t), 1))], axis=1)
    got = timestep_embedding(t, dim)
    assert got.shape == (len(t), dim) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, atol=2e-6, rtol=0)


# ============================================================================ 5. initialisation

def test_fresh_model_outputs_exactly_zero():
    torch.manual_seed(0)
    model = MicroDiT_Nano_2()
    x, t, y = _inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x, t, y)["sample"], torch.zeros_like(x))
        assert torch.equal(model(x, t, y, mask_ratio=0.5)["sample"], torch.zeros_like(x))
    for block in [*model.blocks, *model.patch_mixer]:
        assert torch.equal(block.adaLN_modulation[-1].weight, torch.zeros_like(block.adaLN_modulation[-1].weight))
    zero = [model.final_layer.adaLN_modulation[-1].weight, model.final_layer.linear.weight,
            model.y_emb_preprocess.attn.proj.weight, model.y_emb_preprocess.mlp.w3.weight]
    assert all(torch.count_nonzero(w) == 0 for w in zero)
    # every linear bias starts at zero (micro_diffusion's basic init)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            assert torch.count_nonzero(m.bias) == 0, name
    # the prompt block's other weights are N(0, 0.02) (not zero)
    assert abs(model.y_emb_preprocess.mlp.w1.weight.std().item() - 0.02) < 0.004


def _output_weights(block: DiTBlock) -> list[torch.Tensor]:
    mlp_out = block.mlp.w2 if isinstance(block.mlp, ExpertChoiceMoE) else block.mlp.w3.weight
    return [block.attn.proj.weight, block.cross_attn.proj.weight, mlp_out]


@pytest.mark.parametrize("depth_init", [True, False])
def test_output_projection_std_is_depth_scaled(depth_init):
    """Output projections of block i: std 0.02/sqrt(2(i+1)) (depth_init) or 0.02/sqrt(2 depth);
    patch-mixer blocks 0.02/sqrt(2 depth); inputs 0.02. >= 16k samples each: a 10% band is ~20 sigma."""
    torch.manual_seed(0)
    depth = 4
    model = MicroDiT(input_size=4, patch_size=2, dim=256, depth=depth, head_dim=64, multiple_of=64,
                     caption_channels=16, depth_init=depth_init, qkv_ratio=[0.5, 1.0], mlp_ratio=[1.0, 2.0],
                     patch_mixer_depth=2, patch_mixer_dim=128, patch_mixer_mlp_ratio=1.0, use_bias=False,
                     num_experts=2, expert_capacity=1.0, experts_every_n=2)
    assert any(isinstance(b.mlp, ExpertChoiceMoE) for b in model.blocks)
    for i, block in enumerate(model.blocks):
        want = 0.02 / math.sqrt(2 * ((i + 1) if depth_init else depth))
        for w in _output_weights(block):
            assert abs(w.std().item() / want - 1) < 0.1, (i, w.shape)
        assert abs(block.attn.qkv.weight.std().item() / 0.02 - 1) < 0.1
    for block in model.patch_mixer:
        for w in _output_weights(block):
            assert abs(w.std().item() / (0.02 / math.sqrt(2 * depth)) - 1) < 0.1


# ============================================================================ 6. gradients

def test_every_parameter_gets_a_finite_nonzero_gradient():
    """Perturbed weights (zero-initialised AdaLN/output layers would block all upstream gradients at
    step 0). Nano at 8x8: 16 tokens -> the mixer's MoE experts take k = int(2*16/8) = 4 tokens each, the
    backbone's k = 4 (unmasked) or 2 (mask 0.5): every expert sees tokens in both runs."""
    model = _nano(0).train()
    den = Denoiser(model, EDM(0.5))
    x0, _, y = _inputs(model, batch=2)
    sigma = torch.tensor([0.4, 3.0])
    grads = []
    for ratio in (0.0, 0.5):
        model.zero_grad(set_to_none=True)
        res = denoising_loss(den, x0, sigma, noise=torch.randn(x0.shape, generator=_gen(9)),
                             cond={"y": y, "mask_ratio": ratio, "generator": _gen(4)})
        res.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    names = [n for n, _ in model.named_parameters()]
    for g in grads:
        assert set(g) == set(names), set(names) - set(g)
        for n in names:
            assert torch.isfinite(g[n]).all(), n
    missing = [n for n in names if all(torch.count_nonzero(g[n]) == 0 for g in grads)]
    assert not missing, missing
    # stronger: in fact every parameter gets a nonzero gradient in each run
    for g in grads:
        assert all(torch.count_nonzero(g[n]) > 0 for n in names)


# ============================================================================ 7. shapes and dtypes

def _pixel_mask(token_mask: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """(B, T) token mask, raster order -> (B, 1, H, W) with each token's p x p block, by loops."""
    (h, w), b = grid, token_mask.shape[0]
    out = torch.zeros(b, 1, h * p, w * p)
    for i in range(b):
        for j in range(h * w):
            r, c = divmod(j, w)
            out[i, 0, r * p:(r + 1) * p, c * p:(c + 1) * p] = token_mask[i, j]
    return out


def test_non_square_input_shapes_and_batch_independence():
    model = _nano(0, input_size=(8, 12)).eval()
    assert model.grid == (4, 6)
    x, t, y = _inputs(model, batch=3)
    with torch.no_grad():
        out = model(x, t, y)["sample"]
        assert out.shape == (3, 4, 8, 12)
        for i in range(3):  # results do not depend on batch size
            one = model(x[i:i + 1], t[i:i + 1], y[i:i + 1])["sample"]
            assert _rel(one[0], out[i]) < 1e-5
        # masked: dropped tokens land on their p x p pixel blocks in raster order (exact zeros: the
        # mask token is zero) and loss_mask is the pixel expansion of 1 - mask
        m = model(x, t, y, mask_ratio=0.5, generator=_gen(2))
    dropped = _pixel_mask(m["mask"], model.grid, 2)
    assert torch.equal(m["loss_mask"], 1 - dropped)
    assert torch.equal(m["sample"] * dropped, torch.zeros_like(x))
    assert bool((m["sample"].abs() * (1 - dropped) > 0).sum() == 4 * (1 - dropped).sum())


def test_caption_and_time_shapes_agree():
    model = _nano(0).eval()
    x, t, y = _inputs(model, batch=3)
    with torch.no_grad():
        a = model(x, t, y)["sample"]
        b = model(x, t, y[:, 0])["sample"]  # B x L x C
        assert torch.equal(a, b)
        tt = torch.full((3,), 0.37)
        ref = model(x, tt, y)["sample"]
        for t_alt in (torch.tensor(0.37), torch.tensor([0.37]), 0.37):
            torch.testing.assert_close(model(x, t_alt, y)["sample"], ref, rtol=1e-6, atol=1e-7)


def test_autocast_bfloat16_forward_backward_is_finite():
    model = _nano(0).train()
    x, t, y = _inputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y, mask_ratio=0.5, generator=_gen(0))["sample"]
        loss = (out.float() ** 2).mean()
    assert out.shape == x.shape and out.dtype in (torch.bfloat16, torch.float32)
    assert torch.isfinite(out).all()
    loss.backward()
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all(), n


def test_model_without_patch_mixer_runs():
    model = _nano(0, use_patch_mixer=False)
    assert not hasattr(model, "patch_mixer")
    x, t, y = _inputs(model)
    out = model(x, t, y, mask_ratio=0.5)
    assert out["sample"].shape == x.shape and torch.isfinite(out["sample"]).all()


# ============================================================================ 8. torch.compile

def test_torch_compile_fullgraph_without_graph_breaks():
    """backend="eager" runs Dynamo's capture only (no inductor codegen); fullgraph=True raises on any
    graph break. Compiled outputs equal eager ones (same ops, same RNG draws)."""
    torch._dynamo.reset()
    try:
        model = _nano(0).train()
        x, t, y = _inputs(model)
        explain = torch._dynamo.explain(model)(x, t, y)
        assert explain.graph_break_count == 0, explain.break_reasons
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        eager = MicroDiT(**model.config).train()
        eager.load_state_dict(model.state_dict())
        graphed = MicroDiT(**model.config).train().compile_graph(backend="eager")  # what train.compile uses
        graphed.load_state_dict(model.state_dict())
        for ratio in (0.0, 0.5):
            torch.manual_seed(7)
            out_c = compiled(x, t, y, mask_ratio=ratio)
            torch.manual_seed(7)
            out_e = eager(x, t, y, mask_ratio=ratio)
            torch.testing.assert_close(out_c["sample"], out_e["sample"], rtol=1e-5, atol=1e-6)
            # the trainer's call: the mask drawn from a generator outside the graph, the rest one graph
            out_g = graphed(x, t, y, mask_ratio=ratio, generator=torch.Generator().manual_seed(3))
            out_r = eager(x, t, y, mask_ratio=ratio, generator=torch.Generator().manual_seed(3))
            torch.testing.assert_close(out_g["sample"], out_r["sample"], rtol=1e-5, atol=1e-6)
            if ratio:
                assert torch.equal(out_c["mask"], out_e["mask"]) and torch.equal(out_g["mask"], out_r["mask"])
            out_c["sample"].square().mean().backward()
            out_g["sample"].square().mean().backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters())
            assert all(torch.isfinite(p.grad).all() for p in graphed.parameters())
            model.zero_grad()
            graphed.zero_grad()
    finally:
        torch._dynamo.reset()


# ============================================================================ 9. gradient checkpointing

def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    model = _nano(0).train()
    ckpt_model = MicroDiT(**{**model.config, "gradient_checkpointing": True}).train()
    ckpt_model.load_state_dict(model.state_dict(), strict=True)
    calls = []
    real = dit_module.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dit_module, "checkpoint", counting)
    x, t, y = _inputs(model)
    target = torch.randn(x.shape, generator=_gen(3))
    grads = []
    for m in (model, ckpt_model):
        out = m(x, t, y, mask_ratio=0.5, generator=_gen(11))["sample"]
        ((out - target) ** 2).mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert len(calls) == len(model.blocks) + len(model.patch_mixer)  # the checkpointed path was taken
    for n, g in grads[0].items():
        assert _rel(grads[1][n], g) < 1e-6, n


# ============================================================================ 10. clear errors

def test_clear_errors():
    model = MicroDiT_Nano_2()
    x, t, y = _inputs(model)
    with pytest.raises(ValueError, match="input_size"):
        model(torch.randn(2, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        model(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="caption"):
        model(x, t, torch.randn(2, 1, 5, 31))
    with pytest.raises(ValueError, match="caption"):
        model(x, t, torch.randn(3, 1, 5, 32))  # batch mismatch
    with pytest.raises(ValueError, match="mask_ratio"):
        model(x, t, y, mask_ratio=1.0)
    with pytest.raises(ValueError, match="keeps no token"):
        model(x, t, y, mask_ratio=0.99)  # int(16 * 0.01) = 0 tokens
    with pytest.raises(ValueError, match=r"MicroDiT preset 'nope'.*MicroDiT_XL_2"):
        microdit("nope")
    with pytest.raises(ValueError, match="multiples of patch_size"):
        MicroDiT_Nano_2(input_size=9)
    with pytest.raises(ValueError, match="t must"):
        model(x, torch.zeros(3), y)  # 3 noise levels for a batch of 2
    with pytest.raises(ValueError, match="y_mask"):
        model(x, t, y, y_mask=torch.ones(2, 4, dtype=torch.bool))  # 4 mask entries for 5 tokens


# ============================================================================ 11. loss on visible patches

class _NoisyWhereDropped(nn.Module):
    """Adds huge noise to the backbone output at dropped pixels; a loss on visible patches ignores it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        hidden = 1 - out["loss_mask"]
        return {**out, "sample": out["sample"] + 1e3 * hidden * torch.randn_like(out["sample"])}


def test_masked_loss_is_the_mean_over_visible_pixels():
    model = _nano(0).train()
    x0, _, y = _inputs(model, batch=2)
    sigma = torch.tensor([0.3, 2.0])
    noise = torch.randn(x0.shape, generator=_gen(5))
    cond = lambda: {"y": y, "mask_ratio": 0.5, "generator": _gen(21)}  # noqa: E731
    res = denoising_loss(Denoiser(model, EDM(0.5)), x0, sigma, noise=noise, weighting=eps_weight, cond=cond())
    out = res.output
    assert out["mask"].shape == (2, 16) and bool((out["mask"].sum(1) == 8).all())
    assert torch.equal(out["loss_mask"], _pixel_mask(1 - out["mask"], model.grid, 2))
    # by hand in float64 from the returned F: EDM scalings (Karras et al. Table 1), weight
    # lambda(sigma) c_out^2 with lambda = 1/sigma^2, mean over visible elements (C x visible pixels)
    sd = 0.5
    s = sigma.double()[:, None, None, None]
    x = x0.double() + s * noise.double()
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    target = (x0.double() - c_skip * x) / c_out
    vis = out["loss_mask"].double()
    err = c_out**2 / s**2 * (out["sample"].double() - target) ** 2 * vis
    manual = err.sum() / (vis.sum() * x0.shape[1])
    assert abs(res.loss.item() - manual.item()) / manual.item() < 1e-5
    # the model outputs the (zero) mask token at dropped pixels...
    assert torch.equal(out["sample"] * (1 - out["loss_mask"]), torch.zeros_like(x0))
    # ...and whatever is there cannot change the loss
    noisy = denoising_loss(Denoiser(_NoisyWhereDropped(model), EDM(0.5)), x0, sigma, noise=noise,
                           weighting=eps_weight, cond=cond())
    assert torch.equal(noisy.loss, res.loss)
    # an extra caller mask multiplies the backbone's own
    extra = torch.zeros(2, 1, 8, 8)
    extra[:, :, :, :4] = 1
    both = denoising_loss(Denoiser(model, EDM(0.5)), x0, sigma, noise=noise, weighting=eps_weight,
                          cond=cond(), mask=extra)
    vis2 = vis * extra.double()
    manual2 = (err * extra.double()).sum() / (vis2.sum() * x0.shape[1])
    assert abs(both.loss.item() - manual2.item()) / manual2.item() < 1e-5


# ============================================================================ 12. caption masks

def test_y_mask_ignores_padding_tokens():
    """Captions of 5 and 3 real tokens padded to 8 with garbage, y_mask False on the padding, equal
    each caption run alone without padding (to 1e-5 relative)."""
    model = _nano(0).eval()
    x, t, _ = _inputs(model, batch=2)
    g = _gen(8)
    real = [torch.randn(1, 5, 32, generator=g), torch.randn(1, 3, 32, generator=g)]
    padded = torch.randn(2, 1, 8, 32, generator=g) * 10
    y_mask = torch.zeros(2, 8, dtype=torch.bool)
    for i, r in enumerate(real):
        padded[i, 0, :r.shape[1]] = r[0]
        y_mask[i, :r.shape[1]] = True
    with torch.no_grad():
        both = model(x, t, padded, y_mask=y_mask)["sample"]
        for i, r in enumerate(real):
            alone = model(x[i:i + 1], t[i:i + 1], r.unsqueeze(1))["sample"]
            assert _rel(both[i], alone[0]) < 1e-5
        # an all-True mask is the default (attend to every token)
        full = torch.ones(2, 8, dtype=torch.bool)
        assert _rel(model(x, t, padded, y_mask=full)["sample"], model(x, t, padded)["sample"]) < 1e-6
        # an all-False mask (empty caption) gives no NaNs
        empty = model(x, t, padded, y_mask=torch.zeros(2, 8, dtype=torch.bool))["sample"]
    assert torch.isfinite(empty).all()


def test_all_false_y_mask_acts_like_no_mask():
    """The attention layers treat a caption with no real token as 'attend to all' (documented in
    layers._attention_mask); the pooled caption must do the same, or the model sees a condition it
    was never trained on (micro_diffusion: zero caption, no mask)."""
    model = _nano(0).eval()
    x, t, y = _inputs(model)
    zeros = torch.zeros_like(y)
    with torch.no_grad():
        a = model(x, t, zeros)["sample"]
        b = model(x, t, zeros, y_mask=torch.zeros(2, y.shape[2], dtype=torch.bool))["sample"]
    assert _rel(b, a) < 1e-6


def test_reference_guided_with_caption_mask(reference):
    """The reference caption has no padding, so y_mask = all True must not change anything, also
    through GuidedDenoiser with micro_diffusion's null condition zeros_like_cond(cond)."""
    model = _reference_model(reference, "gather")
    x_ref, t_ref, y = reference["inputs/x"], reference["inputs/t"], reference["inputs/y"]
    sigma = torch.exp(4 * t_ref.double())
    s = sigma[:, None, None, None]
    c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt(), 1 / (s**2 + 0.25).sqrt()
    x = x_ref.double() / c_in
    cond = {"y": y, "y_mask": torch.ones(y.shape[0], y.shape[2], dtype=torch.bool)}
    with torch.no_grad():
        d = GuidedDenoiser(Denoiser(model, EDM(0.5)), [cond], zeros_like_cond(cond), scale=3.5)(x, sigma)
    assert _rel((d - c_skip * x) / c_out, reference["outputs/cfg_3.5"]) < 1e-5


def test_half_precision_model_accepts_float32_captions():
    model = _nano(0).eval().to(torch.bfloat16)
    x, t, y = _inputs(model)
    with torch.no_grad():
        d = Denoiser(model, EDM(0.5))(x.double(), torch.ones(2), y=y)
    assert d.dtype == torch.float64 and torch.isfinite(d).all()


# ============================================================================ 13. token masks

@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_draw_token_mask(ratio):
    b, T = 4, 23
    a = draw_token_mask(b, T, ratio, generator=_gen(3))
    again = draw_token_mask(b, T, ratio, generator=_gen(3))
    for k in ("keep", "restore", "mask"):
        assert torch.equal(a[k], again[k])
    k = int(T * (1 - ratio))
    assert a["keep"].shape == (b, k) and a["mask"].shape == (b, T)
    assert torch.equal((a["mask"] == 0).sum(1), torch.full((b,), k))
    for i in range(b):
        assert sorted(a["keep"][i].tolist()) == torch.nonzero(a["mask"][i] == 0).flatten().tolist()
        assert sorted(a["restore"][i].tolist()) == list(range(T))  # a permutation
    # gather then restore: x at kept positions, the fill token elsewhere
    x = torch.randn(b, T, 6, generator=_gen(4))
    fill = torch.randn(1, 1, 6, generator=_gen(5))
    back = restore_tokens(gather_tokens(x, a["keep"]), a["restore"], fill)
    for i in range(b):
        for j in range(T):
            want = x[i, j] if a["mask"][i, j] == 0 else fill[0, 0]
            assert torch.equal(back[i, j], want), (i, j)
    # micro_diffusion's recipe, written out: torch.rand(B, T) -> argsort, first k kept
    order = torch.argsort(torch.rand(b, T, generator=_gen(3)), dim=1)
    assert torch.equal(a["keep"], order[:, :k])


# ============================================================================ 14. MoE placement, widths

def test_moe_placement_and_widths(xl_meta, xl_rows):
    model = xl_meta
    moe = [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, ExpertChoiceMoE)]
    assert moe == list(range(1, 27, 2)) and not isinstance(model.blocks[27].mlp, ExpertChoiceMoE)
    mixer = [i for i, b in enumerate(model.patch_mixer) if isinstance(b.mlp, ExpertChoiceMoE)]
    assert mixer == [1, 3, 5]
    keys = {k for k, _, _ in xl_rows}
    assert moe == [i for i in range(28) if f"blocks.{i}.mlp.gate.weight" in keys]
    assert mixer == [i for i in range(6) if f"patch_mixer.{i}.mlp.gate.weight" in keys]
    assert moe_blocks(28, 2, 0, 27) == [i in moe for i in range(28)]
    for depth in (28, 16, 4, 1):
        assert spread([0.5, 1.0], depth) == np.linspace(0.5, 1.0, num=depth, dtype=float).tolist()
        assert spread([0.5, 4.0], depth) == np.linspace(0.5, 4.0, num=depth, dtype=float).tolist()
    assert spread(2.0, 3) == [2.0, 2.0, 2.0]
    ratios = spread([0.5, 1.0], 28)
    for i, block in enumerate(model.blocks):
        width = block.attn.qkv.out_features // 3
        assert width == attention_width(1024, 64, ratios[i])
        if ratios[i] == 1:
            assert width == 1024
        else:
            assert width % 128 == 0 and width >= 1024 * ratios[i] > width - 128
        assert block.attn.heads == width // 64
    assert model.blocks[-1].attn.qkv.out_features == 3 * 1024 and model.blocks[0].attn.qkv.out_features == 3 * 512
