"""Pretrained autoencoder wrappers and the identifier registry, on tiny diffusers models with random
weights saved to disk the way real ones are (save_pretrained, pipeline layout with vae/).

References are computed by calling the diffusers model directly and applying the scaling read from
the saved config.json: latents = (posterior mean - shift_factor) * scaling_factor, and the inverse
formula diffusers' SDXL pipeline uses for per-channel latents_mean/latents_std.
"""

import json

import pytest
import torch

from microdiff.encoders.base import Autoencoder, IdentityAutoencoder
from microdiff.encoders.image import (DiffusersAutoencoderKL, DiffusersAutoencoderTiny, load_autoencoder,
                                      resolve_dtype)

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-5  # float32 CPU, same model run twice (batched convolutions may round differently)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _images(n, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=_gen(seed)) * 2 - 1


def _kl(seed, **kwargs):
    torch.manual_seed(seed)
    blocks = kwargs.pop("block_out_channels", (8, 16))
    return diffusers.AutoencoderKL(block_out_channels=blocks, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                                   up_block_types=("UpDecoderBlock2D",) * len(blocks), layers_per_block=1,
                                   norm_num_groups=8, sample_size=32, **kwargs)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders: kl4 (SD-like, 4 ch, f=2), pipe/vae (FLUX-like 16 ch with shift, f=4, pipeline layout),
    stats (per-channel latents_mean/std), tiny (TAESD-like, f=4)."""
    root = tmp_path_factory.mktemp("autoencoders")
    _kl(0, latent_channels=4).save_pretrained(root / "kl4")
    _kl(1, block_out_channels=(8, 8, 16), latent_channels=16, scaling_factor=0.3611,
        shift_factor=0.1159).save_pretrained(root / "pipe" / "vae")
    (root / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "SomePipeline",
                                                               "vae": ["diffusers", "AutoencoderKL"]}))
    _kl(2, latent_channels=4, scaling_factor=0.5, latents_mean=(0.1, -0.2, 0.3, 0.0),
        latents_std=(1.5, 0.5, 2.0, 1.0)).save_pretrained(root / "stats")
    torch.manual_seed(3)
    diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                              num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1),
                              latent_channels=4).save_pretrained(root / "tiny")
    return root


def _config(folder):
    return json.loads((folder / "config.json").read_text())


# --- AutoencoderKL --------------------------------------------------------------------------------
def test_kl_shapes_protocol_and_range(saved):
    ae = load_autoencoder(f"diffusers-kl:{saved / 'kl4'}")
    assert isinstance(ae, DiffusersAutoencoderKL) and isinstance(ae, Autoencoder)
    assert (ae.latent_channels, ae.downsample) == (4, 2)
    z = ae.encode(_images(3))
    assert z.shape == (3, 4, 16, 16) and z.dtype == torch.float32
    x = ae.decode(z)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    raw = ae.model.decode(z / 0.18215).sample
    assert raw.abs().max() > 1, "pick a model whose raw output leaves [-1, 1] so the clamp is tested"
    unclamped = load_autoencoder(f"diffusers-kl:{saved / 'kl4'}", clamp=False).decode(z)
    torch.testing.assert_close(unclamped, raw, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name, subfolder", [("kl4", None), ("pipe", "vae")])
def test_kl_scale_and_shift_match_direct_diffusers(saved, name, subfolder):
    folder = saved / name / (subfolder or "")
    cfg = _config(folder)
    scale, shift = cfg["scaling_factor"], cfg["shift_factor"] or 0.0
    assert (name == "kl4") == (shift == 0.0) and scale in (0.18215, 0.3611)
    ref = diffusers.AutoencoderKL.from_pretrained(folder).eval()
    ae = load_autoencoder(f"diffusers-kl:{saved / name}" + (f"?subfolder={subfolder}" if subfolder else ""))
    assert ae.latent_channels == cfg["latent_channels"]
    assert ae.downsample == 2 ** (len(cfg["block_out_channels"]) - 1)

    x = _images(2)
    with torch.no_grad():
        mean = ref.encode(x).latent_dist.mean.double()
    expected = (mean - shift) * scale
    got = ae.encode(x)
    torch.testing.assert_close(got.double(), expected, atol=ATOL, rtol=0)

    with torch.no_grad():
        expected_x = ref.decode((got.double() / scale + shift).float()).sample.clamp(-1, 1)
    torch.testing.assert_close(ae.decode(got), expected_x, atol=ATOL, rtol=0)


def test_kl_per_channel_latent_statistics(saved):
    """latents_mean/std in the config: decoding the way diffusers' SDXL pipeline does
    (latents * std / scaling_factor + mean) gives back the posterior mean."""
    cfg = _config(saved / "stats")
    ae = load_autoencoder(f"diffusers-kl:{saved / 'stats'}")
    x = _images(2)
    z = ae.encode(x)
    mean_c = torch.tensor(cfg["latents_mean"]).view(1, 4, 1, 1)
    std_c = torch.tensor(cfg["latents_std"]).view(1, 4, 1, 1)
    with torch.no_grad():
        posterior_mean = ae.model.encode(x).latent_dist.mean
    torch.testing.assert_close(z * std_c / cfg["scaling_factor"] + mean_c, posterior_mean, atol=ATOL, rtol=0)


def test_kl_overrides_and_identifier(saved):
    ident = f"diffusers-kl:{saved / 'kl4'}?scale=0.5&shift=0.25"
    ae = load_autoencoder(ident)
    assert ae.identifier == f"diffusers-kl:{(saved / 'kl4').as_posix()}?scale=0.5&shift=0.25"
    x = _images(2)
    with torch.no_grad():
        mean = ae.model.encode(x).latent_dist.mean
    torch.testing.assert_close(ae.encode(x), (mean - 0.25) * 0.5, atol=ATOL, rtol=0)
    per_channel = load_autoencoder(f"diffusers-kl:{saved / 'kl4'}?scale=1,2,3,4")
    torch.testing.assert_close(per_channel.encode(x), mean * torch.tensor([1.0, 2, 3, 4]).view(1, 4, 1, 1),
                               atol=ATOL, rtol=0)
    assert per_channel.identifier.endswith("?scale=1.0,2.0,3.0,4.0")
    with pytest.raises(ValueError, match="scale needs 1 or 4 values"):
        load_autoencoder(f"diffusers-kl:{saved / 'kl4'}?scale=1,2")
    with pytest.raises(ValueError, match="non-zero"):
        load_autoencoder(f"diffusers-kl:{saved / 'kl4'}?scale=0")
    with pytest.raises(ValueError, match="not a number"):
        load_autoencoder(f"diffusers-kl:{saved / 'kl4'}?shift=abc")
    with pytest.raises(ValueError, match="unknown option 'scal'"):
        load_autoencoder(f"diffusers-kl:{saved / 'kl4'}?scal=0.5")


def test_kl_sampling_vs_mean(saved):
    folder = saved / "kl4"
    ae_mean = load_autoencoder(f"diffusers-kl:{folder}")
    ae_sample = load_autoencoder(f"diffusers-kl:{folder}", sample=True)
    x = _images(3)
    with torch.no_grad():
        dist = ae_mean.model.encode(x).latent_dist
        ref_sample = ae_mean.model.encode(x).latent_dist.sample(generator=_gen(7))
    torch.testing.assert_close(ae_mean.encode(x), dist.mode() * 0.18215, atol=ATOL, rtol=0)

    a, b = ae_sample.encode(x, generator=_gen(7)), ae_sample.encode(x, generator=_gen(7))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, ref_sample * 0.18215, atol=ATOL, rtol=0)
    # the noise has the posterior's std: (a - mean) / (scale * std) is standard normal
    n = (a - ae_mean.encode(x)) / (0.18215 * dist.std)
    assert (a - ae_mean.encode(x)).abs().max() > 1e-3
    # 3072 values: 0.1 is 5.5 standard errors of the mean, 7.8 of the std (generator seeds 0-19: <= 0.034, <= 0.028)
    assert abs(n.mean().item()) < 0.1 and abs(n.std().item() - 1) < 0.1
    assert not torch.equal(a, ae_sample.encode(x, generator=_gen(8)))


def test_chunked_batches_equal_one_batch(saved):
    folder = saved / "kl4"
    x = _images(5)
    big = load_autoencoder(f"diffusers-kl:{folder}", max_batch=16, sample=True)
    small = load_autoencoder(f"diffusers-kl:{folder}", max_batch=2, sample=True)
    torch.testing.assert_close(small.encode(x, generator=_gen(3)), big.encode(x, generator=_gen(3)),
                               atol=ATOL, rtol=0)
    big.sample = small.sample = False
    z = big.encode(x)
    torch.testing.assert_close(small.encode(x), z, atol=ATOL, rtol=0)
    torch.testing.assert_close(small.decode(z), big.decode(z), atol=ATOL, rtol=0)


def test_per_sample_generators_make_sampling_batch_independent(saved):
    ae = load_autoencoder(f"diffusers-kl:{saved / 'kl4'}", sample=True)
    x = _images(3)
    batch = ae.encode(x, generator=[_gen(10 + k) for k in range(3)])
    for k in range(3):
        torch.testing.assert_close(batch[k:k + 1], ae.encode(x[k:k + 1], generator=[_gen(10 + k)]),
                                   atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="per-sample generators"):
        ae.encode(x, generator=[_gen(0)])


def test_dtype_and_device(saved):
    ident = f"diffusers-kl:{saved / 'kl4'}"
    ref = load_autoencoder(ident)
    ae = load_autoencoder(ident, dtype="bf16")
    assert ae.dtype == torch.bfloat16 and ae.device == torch.device("cpu")
    x = _images(2)
    z = ae.encode(x)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, ref.encode(x), atol=0.05, rtol=0.05)  # bfloat16: ~3 significant digits
    assert ae.decode(z).dtype == torch.float32
    assert resolve_dtype(None) == torch.float32 and resolve_dtype("fp16") == torch.float16
    assert resolve_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown autoencoder dtype 'int8'"):
        resolve_dtype("int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_half_precision_on_cuda(saved):
    ident = f"diffusers-kl:{saved / 'kl4'}"
    ae = load_autoencoder(ident, device="cuda", dtype=torch.float16)
    x = _images(2)  # on the CPU: encode moves it
    z = ae.encode(x)
    assert z.device.type == "cuda" and z.dtype == torch.float32
    torch.testing.assert_close(z.cpu(), load_autoencoder(ident).encode(x), atol=0.02, rtol=0.02)
    assert ae.decode(z.cpu()).device.type == "cuda"


def test_tiling_and_slicing_passthrough(saved):
    ae = load_autoencoder(f"diffusers-kl:{saved / 'kl4'}", enable_tiling=True, enable_slicing=True)
    assert ae.model.use_tiling and ae.model.use_slicing
    x = _images(2, size=64)  # larger than the config's sample_size (32): goes through tiles
    z = ae.encode(x)
    assert z.shape == (2, 4, 32, 32) and torch.isfinite(z).all()
    assert ae.decode(z).shape == (2, 3, 64, 64)


def test_progress_bar_over_chunks(saved, capsys):
    ae = load_autoencoder(f"diffusers-kl:{saved / 'kl4'}", max_batch=1, progress=True)
    ae.encode(_images(2))
    assert "diffusers-kl encode" in capsys.readouterr().err
    quiet = load_autoencoder(f"diffusers-kl:{saved / 'kl4'}", max_batch=1)
    quiet.encode(_images(2))
    assert "encode" not in capsys.readouterr().err


def test_bad_inputs(saved):
    ae = load_autoencoder(f"diffusers-kl:{saved / 'kl4'}")
    with pytest.raises(ValueError, match="in \\[-1, 1\\].*x \\* 2 - 1"):
        ae.encode(_images(1) * 100)
    with pytest.raises(ValueError, match="not a multiple of the autoencoder's downsample factor 2"):
        ae.encode(torch.zeros(1, 3, 31, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ae.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"latents \(B, 4, h, w\)"):
        ae.decode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="max_batch"):
        load_autoencoder(f"diffusers-kl:{saved / 'kl4'}", max_batch=0)


# --- AutoencoderTiny ------------------------------------------------------------------------------
def test_tiny_latents_are_encoder_output(saved):
    cfg = _config(saved / "tiny")
    assert (cfg["scaling_factor"], cfg["shift_factor"]) == (1.0, 0.0)
    ae = load_autoencoder(f"diffusers-tiny:{saved / 'tiny'}")
    assert isinstance(ae, DiffusersAutoencoderTiny) and isinstance(ae, Autoencoder)
    assert (ae.latent_channels, ae.downsample) == (4, 4)
    ref = diffusers.AutoencoderTiny.from_pretrained(saved / "tiny").eval()
    x = _images(3)
    z = ae.encode(x)
    assert z.shape == (3, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(z, ref.encode(x).latents, atol=ATOL, rtol=0)
        torch.testing.assert_close(ae.decode(z), ref.decode(z).sample.clamp(-1, 1), atol=ATOL, rtol=0)
    assert ae.decode(z).shape == (3, 3, 32, 32)
    scaled = load_autoencoder(f"diffusers-tiny:{saved / 'tiny'}?scale=2&shift=0.5", max_batch=2)
    torch.testing.assert_close(scaled.encode(x), (z - 0.5) * 2, atol=ATOL, rtol=0)


def test_tiny_has_no_posterior(saved):
    with pytest.raises(ValueError, match="deterministic encoder.*sample=False"):
        load_autoencoder(f"diffusers-tiny:{saved / 'tiny'}", sample=True)


# --- identifiers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ident", ["diffusers-kl:{root}/kl4", "diffusers-kl:{root}/pipe?subfolder=vae",
                                   "diffusers-kl:{root}/kl4?scale=0.2", "diffusers-tiny:{root}/tiny"])
def test_identifier_round_trip(saved, ident):
    ident = ident.format(root=saved.as_posix())
    ae = load_autoencoder(ident)
    assert ae.identifier == ident
    again = load_autoencoder(ae.identifier)
    assert again.identifier == ident
    x = _images(2)
    torch.testing.assert_close(again.encode(x), ae.encode(x), atol=0, rtol=0)


def test_relative_folder_becomes_absolute(saved, monkeypatch):
    monkeypatch.chdir(saved)
    ae = load_autoencoder("diffusers-kl:pipe?subfolder=vae")
    assert ae.identifier == f"diffusers-kl:{(saved / 'pipe').as_posix()}?subfolder=vae"
    assert ae.latent_channels == 16 and ae.downsample == 4


def test_identity():
    ae = load_autoencoder("identity")
    assert isinstance(ae, IdentityAutoencoder) and ae.identifier == "identity" and ae.latent_channels == 3
    four = load_autoencoder("identity:4")
    assert four.latent_channels == 4 and four.identifier == "identity:4"
    assert load_autoencoder(four.identifier).latent_channels == 4
    x = torch.randn(2, 4, 8, 8, generator=_gen(0))
    assert torch.equal(four.decode(four.encode(x)), x)
    for bad in ["identity:x", "identity:0"]:
        with pytest.raises(ValueError, match="identity:<channels>"):
            load_autoencoder(bad)


def test_unknown_scheme_lists_schemes():
    with pytest.raises(ValueError, match="unknown autoencoder scheme 'sd-vae'.*identity, diffusers-kl, "
                                         "diffusers-tiny, microdiff-vae, microdiff-vqgan"):
        load_autoencoder("sd-vae:stabilityai/sd-vae-ft-ema")
    with pytest.raises(ValueError, match="non-empty string"):
        load_autoencoder("")
    with pytest.raises(ValueError, match="names no model"):
        load_autoencoder("diffusers-kl:")


def test_folder_errors(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_autoencoder(f"diffusers-kl:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config.json not found.*save_pretrained"):
        load_autoencoder(f"diffusers-kl:{tmp_path / 'empty'}")
    with pytest.raises(FileNotFoundError, match=r"pipeline folder: add \?subfolder=vae"):
        load_autoencoder(f"diffusers-kl:{saved / 'pipe'}")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_autoencoder(f"diffusers-kl:{saved / 'pipe'}?subfolder=unet")
    with pytest.raises(ValueError, match="is for AutoencoderTiny, not AutoencoderKL; use diffusers-tiny:"):
        load_autoencoder(f"diffusers-kl:{saved / 'tiny'}")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((saved / "kl4" / "config.json").read_text())
    with pytest.raises(ValueError, match="weightless: cannot load a diffusers AutoencoderKL"):
        load_autoencoder(f"diffusers-kl:{weightless}")


def test_hub_id_not_cached_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE.*local folder"):
        load_autoencoder("diffusers-kl:microdiff-tests/no-such-vae")


def test_trained_autoencoder_schemes(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_autoencoder(f"microdiff-vae:{tmp_path / 'nope'}")
    # a model we train ourselves, saved as train-autoencoder does, comes back through its identifier
    from microdiff.encoders.autoencoder_io import save_autoencoder
    from microdiff.encoders.vae import KLAutoencoder

    torch.manual_seed(0)
    model = KLAutoencoder(channels=8, channel_mult=(1, 2), latent_channels=4, norm_groups=4, scale=0.5).eval()
    save_autoencoder(model, tmp_path / "vae")
    loaded = load_autoencoder(f"microdiff-vae:{tmp_path / 'vae'}")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(images), model.encode(images))
    assert load_autoencoder(loaded.identifier).identifier == loaded.identifier
