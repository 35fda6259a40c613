"""Our KL and VQ autoencoders: shapes for several configs, the latent scale/shift convention,
posterior sampling, the EMA codebook against a hand computation, straight-through gradients, and
save/load round trips with their errors."""

import json

import numpy as np
import pytest
import torch

from microdiff.encoders.autoencoder_io import build_autoencoder, load_trained_autoencoder, save_autoencoder
from microdiff.encoders.base import Autoencoder
from microdiff.encoders.vae import AutoencoderConfig, DiagonalGaussian, KLAutoencoder
from microdiff.encoders.vqgan import VectorQuantizer, VQAutoencoder, VQConfig, perplexity

TINY = {"channels": 8, "channel_mult": [1, 2], "norm_groups": 4, "latent_channels": 3}


def _images(b=2, size=16, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _model(kind, **overrides):
    torch.manual_seed(0)
    cfg = {**TINY, **overrides}
    if kind == "vqgan":
        cfg.setdefault("codebook_size", 16)
    return build_autoencoder(kind, cfg)


# --- shapes and protocol ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vae", "vqgan"])
@pytest.mark.parametrize("mult,latent,blocks,attention,size", [
    ([1], 4, 1, True, 8),         # no downsampling
    ([1, 2], 3, 0, False, 12),    # f = 2, no res blocks, odd-ish size (multiple of 2 only)
    ([1, 1, 2], 8, 2, True, 16),  # f = 4
    ([1, 2, 2, 2], 2, 1, False, 32),  # f = 8
])
def test_shapes_and_downsample(kind, mult, latent, blocks, attention, size):
    model = _model(kind, channel_mult=mult, latent_channels=latent, num_res_blocks=blocks, attention=attention).eval()
    f = 2 ** (len(mult) - 1)
    assert model.downsample == f and model.latent_channels == latent
    assert isinstance(model, Autoencoder)
    x = _images(3, size)
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (3, latent, size // f, size // f)
        assert model.decode(z).shape == x.shape
        assert model(x).recon.shape == x.shape
    assert model.identifier.startswith(f"microdiff-{kind}:")


@pytest.mark.parametrize("kind", ["vae", "vqgan"])
def test_sizes_not_divisible_by_the_factor_are_refused(kind):
    model = _model(kind, channel_mult=[1, 2, 2])
    with pytest.raises(ValueError, match="multiple of the autoencoder's downsampling factor 4"):
        model.encode(_images(1, 18))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 1, 16, 16))


def test_config_rejects_unknown_fields_and_bad_values():
    with pytest.raises(ValueError, match="unknown AutoencoderConfig field"):
        AutoencoderConfig.from_dict({"chanels": 8})
    with pytest.raises(ValueError, match="channel_mult"):
        AutoencoderConfig(channel_mult=())
    with pytest.raises(ValueError, match="unknown autoencoder kind 'vq'"):
        build_autoencoder("vq")
    with pytest.raises(ValueError, match="unknown AutoencoderConfig field"):  # VQ fields on a KL model
        build_autoencoder("vae", VQConfig())


# --- KL autoencoder: latent convention, posterior -----------------------------------------------------
def test_encode_is_shifted_scaled_posterior_mean_and_decode_inverts_it():
    model = _model("vae").eval()
    model.config.scale, model.config.shift = 0.37, -0.2
    x = _images(2)
    with torch.no_grad():
        moments = model.encoder(x)
        mean = moments[:, :3]  # first half of the channels is the mean
        torch.testing.assert_close(model.encode(x), (mean + 0.2) * 0.37)
        torch.testing.assert_close(model.decode(model.encode(x)), model.decoder(mean), rtol=1e-5, atol=1e-6)


def test_posterior_sampling_uses_the_explicit_generator():
    model = _model("vae").eval()
    x = _images(2)
    with torch.no_grad():
        post = model.posterior(x)
        a = model.encode_raw(x, sample=True, generator=torch.Generator().manual_seed(5))
        b = model.encode_raw(x, sample=True, generator=torch.Generator().manual_seed(5))
        c = model.encode_raw(x, sample=True, generator=torch.Generator().manual_seed(6))
    noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, post.mean + torch.exp(0.5 * post.logvar) * noise)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # per-sample generators: sample 1 does not depend on what is in the batch with it
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    with torch.no_grad():
        both = model.encode_raw(x, sample=True, generator=gens)
        alone = model.encode_raw(x[1:], sample=True, generator=[torch.Generator().manual_seed(2)])
    torch.testing.assert_close(both[1:], alone)


def test_fit_scale_gives_unit_variance_latents():
    model = _model("vae").eval()
    x = _images(8, seed=3)
    with torch.no_grad():
        raw = model.encode_raw(x)
        fitted = model.fit_scale(raw)
        z = model.encode(x).numpy().astype(np.float64)
    assert fitted["scale"] == pytest.approx(1 / np.std(raw.numpy().astype(np.float64), ddof=1), rel=1e-6)
    assert fitted["shift"] == 0.0 and z.std(ddof=1) == pytest.approx(1.0, rel=1e-5)
    with torch.no_grad():
        model.fit_scale(raw, center=True)
        z = model.encode(x).numpy().astype(np.float64)
    assert abs(z.mean()) < 1e-5 and z.std(ddof=1) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="constant or non-finite"):
        model.fit_scale(torch.ones(4, 3, 2, 2))


def test_logvar_is_clamped_so_the_std_stays_finite():
    post = DiagonalGaussian(torch.zeros(1, 2), torch.tensor([[-100.0, 100.0]]))
    assert torch.equal(post.logvar, torch.tensor([[-30.0, 20.0]])) and torch.isfinite(post.std).all()


# --- VQ autoencoder -------------------------------------------------------------------------------------
def test_vq_indices_in_range_and_latents_are_codebook_vectors():
    model = _model("vqgan", codebook_size=16)
    model.train()
    with torch.no_grad():
        model(_images(4, seed=1), generator=torch.Generator().manual_seed(0))  # initialises the codebook
    model.eval()
    with torch.no_grad():
        z, idx = model.encode_with_indices(_images(4, seed=2))
    assert idx.dtype == torch.long and idx.shape == (4, 8, 8)
    assert int(idx.min()) >= 0 and int(idx.max()) < 16
    torch.testing.assert_close(z, model.quantizer.lookup(idx))  # scale 1, shift 0
    # decode snaps off-codebook latents back to the codes; quantize=False does not
    with torch.no_grad():
        off = z + 1e-3 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
        assert torch.equal(model.decode(off), model.decode_indices(idx))
        assert not torch.equal(model.decode(off, quantize=False), model.decode_indices(idx))


@pytest.mark.parametrize("l2", [False, True])
def test_straight_through_gradients_reach_the_encoder(l2):
    model = _model("vqgan", l2_normalize=l2).train()
    x = _images(2)
    out = model(x, generator=torch.Generator().manual_seed(0))
    (out.recon - x).abs().mean().backward()  # reconstruction only: the path through the lookup
    grad = model.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    if l2:
        torch.testing.assert_close(model.quantizer.embedding.norm(dim=1), torch.ones(16))


def test_ema_codebook_update_matches_a_hand_computation():
    """Two codes, four 1-D points; decay 0.5, no Laplace smoothing effect to speak of, no restarts."""
    vq = VectorQuantizer(dim=1, codebook_size=2, beta=0.25, decay=0.5, dead_code_threshold=0.0, eps=1e-12)
    vq.embedding.copy_(torch.tensor([[0.0], [10.0]]))
    vq.embed_sum.copy_(torch.tensor([[0.0], [10.0]]))
    vq.cluster_size.fill_(1.0)
    vq.initialized.fill_(True)
    z = torch.tensor([1.0, 2.0, 3.0, 9.0]).view(4, 1, 1, 1).requires_grad_(True)  # (B, D, h, w)
    q = vq.train()(z)
    assert q.indices.flatten().tolist() == [0, 0, 0, 1]
    # commitment: beta * mean((z - code)^2) with the old codes 0 and 10
    assert float(q.loss.detach()) == pytest.approx(0.25 * (1 + 4 + 9 + 1) / 4)
    # cluster sizes 0.5*1 + 0.5*[3, 1] = [2, 1]; sums 0.5*[0, 10] + 0.5*[6, 9] = [3, 9.5]
    torch.testing.assert_close(vq.cluster_size, torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(vq.embedding, torch.tensor([[1.5], [9.5]]))
    # straight-through: the forward value is the old code, the gradient is the identity
    assert q.latents.flatten().tolist() == [0.0, 0.0, 0.0, 10.0]
    q.latents.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_dead_codes_are_restarted_from_the_batch():
    vq = VectorQuantizer(dim=2, codebook_size=4, decay=0.9, dead_code_threshold=1.0).train()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 2, 3, 3, generator=g)
    vq(z, generator=g)  # first call initialises the codes from the batch
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    assert all(any(torch.equal(e, r) for r in flat) for e in vq.embedding)
    vq.embedding[3] = 1e6  # a code no vector will ever pick
    vq.embed_sum[3] = 1e6
    vq(z, generator=g)
    assert vq.embedding[3].abs().max() < 1e3  # replaced by one of the batch vectors
    assert any(torch.equal(vq.embedding[3], r) for r in flat)


def test_perplexity_and_usage():
    assert float(perplexity(torch.arange(8), 8)) == pytest.approx(8.0)
    assert float(perplexity(torch.zeros(10, dtype=torch.long), 8)) == pytest.approx(1.0)
    p = np.array([0.5, 0.25, 0.25])
    assert float(perplexity(torch.tensor([0, 0, 1, 2]), 8)) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)


# --- save / load ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vae", "vqgan"])
def test_save_load_round_trip_gives_identical_outputs(kind, tmp_path):
    model = _model(kind)
    if kind == "vqgan":
        with torch.no_grad():
            model.train()(_images(4, seed=1), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        model.fit_scale(model.encode_raw(_images(4, seed=2)), center=True)
    folder = save_autoencoder(model, tmp_path / "ae")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["kind"] == kind and saved["scale"] == model.config.scale and saved["shift"] == model.config.shift
    loaded = load_trained_autoencoder(folder)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.identifier == f"microdiff-{kind}:{folder.resolve()}"
    assert loaded.config == model.config
    x = _images(2, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))
        z = model.encode(x)
        assert torch.equal(loaded.decode(z), model.decode(z))


def test_load_options_sample_and_clamp(tmp_path):
    folder = save_autoencoder(_model("vae"), tmp_path / "ae")
    ae = load_trained_autoencoder(folder, sample=True, clamp=True)
    x = _images(2)
    with torch.no_grad():
        a = ae.encode(x, generator=torch.Generator().manual_seed(0))
        assert not torch.equal(a, ae.encode(x, sample=False))
        assert ae.decode(10 * a).abs().max() <= 1.0
    with pytest.raises(ValueError, match="sample=True needs a KL autoencoder"):
        load_trained_autoencoder(save_autoencoder(_model("vqgan"), tmp_path / "vq"), sample=True)


def test_load_errors_name_the_missing_piece(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such autoencoder folder"):
        load_trained_autoencoder(tmp_path / "nope")
    folder = save_autoencoder(_model("vae"), tmp_path / "ae")
    (folder / "model.safetensors").rename(tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors: missing"):
        load_trained_autoencoder(folder)
    (tmp_path / "w.safetensors").rename(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "kind": "gan"}))
    with pytest.raises(ValueError, match="field 'kind' must be one of"):
        load_trained_autoencoder(folder)
    (folder / "config.json").write_text(json.dumps({**config, "config": {**config["config"], "channels": 16}}))
    with pytest.raises(ValueError, match="weights do not match config.json"):
        load_trained_autoencoder(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        load_trained_autoencoder(folder)


def test_kl_model_from_kwargs():
    model = KLAutoencoder(**TINY)
    assert model.config.latent_channels == 3 and VQAutoencoder(**TINY, codebook_size=4).quantizer.codebook_size == 4


def test_vq_encode_never_changes_the_codebook_even_in_training_mode():
    model = _model("vqgan").train()
    before = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    with torch.no_grad():
        model.encode(_images(2))
        model.encode_indices(_images(2))
    assert all(torch.equal(before[k], v) for k, v in model.quantizer.state_dict().items())
    with torch.no_grad():
        model(_images(2), generator=torch.Generator().manual_seed(0))  # the training forward does
    assert bool(model.quantizer.initialized)
