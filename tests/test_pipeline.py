"""The Pipeline end to end on tiny parts built here: save/load, determinism per image, batch-size
independence, negative prompts, and the errors a new user meets."""

from __future__ import annotations

import pytest
import torch
import yaml

import microdiff
from tiny_models import perturb
from microdiff.diffusion import EDM, Denoiser
from microdiff.encoders.base import IdentityAutoencoder
from microdiff.encoders.text import BuiltinTextEncoder
from microdiff.models import MicroDiT_Nano_2
from microdiff.pipeline import Pipeline, SamplingDefaults

PROMPTS = ["a red circle", "a small blue square at the top", "green triangle", "a purple circle"]


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    text = BuiltinTextEncoder(dim=32, layers=1, heads=2, max_length=32)
    backbone = MicroDiT_Nano_2(in_channels=3, caption_channels=32, input_size=8)
    perturb(backbone)
    defaults = SamplingDefaults(num_inference_steps=6, height=8, width=8, guidance_scale=3.0)
    return Pipeline(text, IdentityAutoencoder(3), Denoiser(backbone.eval(), EDM(0.5)), defaults)


def test_generate_shape_range_and_determinism(pipe):
    images = pipe.generate(PROMPTS[:2], seed=7)
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, pipe.generate(PROMPTS[:2], seed=7))
    assert not torch.allclose(images, pipe.generate(PROMPTS[:2], seed=8))


def test_image_k_depends_on_seed_plus_k_only(pipe):
    """Image k of a call equals image 0 of a call with seed + k, whatever the batch size."""
    all4 = pipe.generate(PROMPTS, seed=3, batch_size=4)
    one_by_one = torch.cat([pipe.generate([p], seed=3 + k) for k, p in enumerate(PROMPTS)])
    by_two = pipe.generate(PROMPTS, seed=3, batch_size=2)
    torch.testing.assert_close(all4, one_by_one, atol=1e-5, rtol=0)
    torch.testing.assert_close(all4, by_two, atol=1e-5, rtol=0)


def test_save_and_from_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    config = yaml.safe_load((tmp_path / "pipe" / "pipeline.yaml").read_text())
    assert config["backbone"]["class"] == "MicroDiT" and config["parameterization"] == {"name": "edm", "sigma_data": 0.5}
    loaded = microdiff.Pipeline.from_pretrained(tmp_path / "pipe")
    torch.testing.assert_close(loaded.generate(PROMPTS[:2], seed=1), pipe.generate(PROMPTS[:2], seed=1),
                               atol=0, rtol=0)


def test_guidance_and_negative_prompt_change_the_output(pipe):
    base = pipe.generate(PROMPTS[:1], seed=0, guidance_scale=1.0)
    guided = pipe.generate(PROMPTS[:1], seed=0, guidance_scale=4.0)
    negative = pipe.generate(PROMPTS[:1], seed=0, guidance_scale=4.0, negative_prompt="a blue square")
    assert (guided - base).abs().max() > 1e-3
    assert (negative - guided).abs().max() > 1e-3


def test_stochastic_sampler_is_reproducible(pipe):
    a = pipe.generate(PROMPTS[:2], seed=5, sampler="ddim", eta=1.0)
    b = pipe.generate(PROMPTS[:2], seed=5, sampler="ddim", eta=1.0)
    assert torch.equal(a, b)
    assert not torch.equal(a, pipe.generate(PROMPTS[:2], seed=5, sampler="ddim", eta=0.0))


def test_to_pil(pipe):
    pil = Pipeline.to_pil(pipe.generate(PROMPTS[:1], seed=0))
    assert pil[0].size == (8, 8) and pil[0].mode == "RGB"


def test_clear_errors(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="no pipeline.yaml"):
        Pipeline.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such pipeline folder"):
        Pipeline.from_pretrained(tmp_path / "missing" / "dir")
    with pytest.raises(OSError, match="not in the local cache.*local pipeline folder"):
        Pipeline.from_pretrained("microdiff-tests/no-such-pipeline")
    with pytest.raises(ValueError, match="one string or one per prompt"):
        pipe.generate(PROMPTS[:2], negative_prompt=["x", "y", "z"])
    with pytest.raises(ValueError, match="multiples of the autoencoder's downsampling"):
        Pipeline(pipe.text_encoder, type("AE", (), {"downsample": 8, "latent_channels": 4})(),
                 pipe.denoiser).latent_shape(60, 64)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pipeline.yaml").write_text("format: something-else\n")
    with pytest.raises(ValueError, match="not a microdiff pipeline config"):
        Pipeline.from_pretrained(tmp_path / "bad")


def test_pipeline_with_our_own_autoencoder_travels_as_one_folder(pipe, tmp_path):
    """A microdiff-vae autoencoder is copied into the pipeline folder, so moving the folder keeps it working."""
    from microdiff.encoders.autoencoder_io import load_trained_autoencoder, save_autoencoder
    from microdiff.encoders.vae import KLAutoencoder

    torch.manual_seed(1)
    save_autoencoder(KLAutoencoder(channels=8, channel_mult=(1, 2), latent_channels=4, norm_groups=4).eval(),
                     tmp_path / "vae")
    vae = load_trained_autoencoder(tmp_path / "vae")
    backbone = MicroDiT_Nano_2(in_channels=4, caption_channels=32, input_size=8)
    perturb(backbone, seed=2)
    latent_pipe = Pipeline(pipe.text_encoder, vae, Denoiser(backbone.eval(), EDM(0.5)),
                           SamplingDefaults(num_inference_steps=4, height=16, width=16))
    images = latent_pipe.generate(PROMPTS[:2], seed=0)
    assert images.shape == (2, 3, 16, 16)
    latent_pipe.save_pretrained(tmp_path / "pipe")
    (tmp_path / "pipe").rename(tmp_path / "moved")
    import shutil

    shutil.rmtree(tmp_path / "vae")
    loaded = Pipeline.from_pretrained(tmp_path / "moved")
    torch.testing.assert_close(loaded.generate(PROMPTS[:2], seed=0), images, atol=0, rtol=0)
    loaded.decode_batch_size = 1  # chunked decode: one latent per decoder call, the same images
    torch.testing.assert_close(loaded.generate(PROMPTS[:2], seed=0), images, atol=1e-6, rtol=0)


def test_weighted_prompts(pipe):
    """One prompt of weight 1 is plain CFG (same images); adding a second, negatively weighted
    prompt changes them (the combination itself is tested in test_guidance.py)."""
    plain = pipe.generate([PROMPTS[0]] * 2, seed=4, guidance_scale=3.0)
    weighted = pipe.generate_weighted([(PROMPTS[0], 1.0)], num_images=2, seed=4, guidance_scale=3.0)
    torch.testing.assert_close(weighted, plain, atol=1e-6, rtol=0)
    mixed = pipe.generate_weighted([(PROMPTS[0], 1.0), (PROMPTS[1], -0.5)], num_images=2, seed=4, guidance_scale=3.0)
    assert (mixed - plain).abs().max() > 1e-3


def test_bfloat16_backbone_generates_close_images(pipe, tmp_path):
    """Weights in bf16 (what `sample --dtype auto` picks on a GPU): same images to bf16 precision."""
    pipe.save_pretrained(tmp_path / "pipe")
    half = Pipeline.from_pretrained(tmp_path / "pipe", dtype=torch.bfloat16)
    assert next(half.denoiser.backbone.parameters()).dtype == torch.bfloat16
    a, b = pipe.generate(PROMPTS[:2], seed=0), half.generate(PROMPTS[:2], seed=0)
    assert (a - b).abs().mean() < 0.05


class ColourOracle(torch.nn.Module):
    """An exact EDM backbone for a checkable text-to-image world: images are N(mu_c, s^2 I) for
    caption c (all-red or all-blue 4x4 images); the zero caption means the 50/50 mixture. It returns
    F = (D - c_skip x) / c_out with D the exact posterior mean, so guidance acts on true scores."""

    def __init__(self, prototypes: torch.Tensor, sigma_data: float = 0.5, s: float = 0.1):
        super().__init__()
        self.register_buffer("prototypes", prototypes)  # (2, D) mean caption state of "red" / "blue"
        means = torch.full((2, 3, 4, 4), -0.8)
        means[0, 0], means[1, 2] = 0.8, 0.8
        self.register_buffer("means", means)
        self.sd, self.s = sigma_data, s
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # gives the module a dtype
        self.config = {}

    def forward(self, x_in, c_noise, y):
        sigma = torch.exp(4 * c_noise.double()).view(-1, 1, 1, 1)
        x = x_in.double() * (sigma**2 + self.sd**2).sqrt()
        pooled = y.double().squeeze(1).mean(1)
        means = self.means.double()
        # log-likelihood of x under each component at this noise level -> responsibilities
        var = self.s**2 + sigma**2
        logp = torch.stack([-((x - m) ** 2).sum((1, 2, 3)) / (2 * var.view(-1)) for m in means], 1)
        uncond = pooled.abs().sum(1) == 0
        cls = torch.cosine_similarity(pooled[:, None], self.prototypes.double()[None], dim=-1).argmax(1)
        weights = torch.where(uncond[:, None], torch.softmax(logp, 1), torch.nn.functional.one_hot(cls, 2).double())
        post = [m + self.s**2 / var * (x - m) for m in means]
        d = weights[:, 0].view(-1, 1, 1, 1) * post[0] + weights[:, 1].view(-1, 1, 1, 1) * post[1]
        c_skip = self.sd**2 / (sigma**2 + self.sd**2)
        c_out = sigma * self.sd / (sigma**2 + self.sd**2).sqrt()
        return ((d - c_skip * x) / c_out).float()


def test_prompt_weights_move_images_in_the_expected_direction():
    """On an exact conditional model, 'red' makes red images, a negative 'blue' weight makes them
    redder still (CFG extrapolates away from blue), and a negative prompt 'red' pushes 'blue' images
    further from red than the empty-caption baseline does."""
    text = BuiltinTextEncoder(dim=32, layers=1, heads=2, max_length=16)
    with torch.no_grad():
        prototypes = torch.stack([text.encode([c]).states.mean(1)[0] for c in ("red", "blue")])
    oracle = ColourOracle(prototypes)
    pipe = Pipeline(text, IdentityAutoencoder(3), Denoiser(oracle, EDM(0.5)),
                    SamplingDefaults(num_inference_steps=12, height=4, width=4, guidance_scale=2.0))

    def redness(images):  # mean R - B over the batch, images in [0, 1]
        return (images[:, 0] - images[:, 2]).mean().item()

    red = pipe.generate(["red"] * 8, seed=0)
    blue = pipe.generate(["blue"] * 8, seed=0)
    assert redness(red) > 0.5 and redness(blue) < -0.5
    away_from_blue = pipe.generate_weighted([("red", 1.0), ("blue", -1.0)], num_images=8, seed=0)
    assert redness(away_from_blue) > redness(red) + 0.05
    # weak guidance leaves room to see the push of a negative prompt
    blue_plain = pipe.generate(["blue"] * 8, seed=0, guidance_scale=1.2)
    blue_negative = pipe.generate(["blue"] * 8, seed=0, guidance_scale=1.2, negative_prompt="red")
    assert redness(blue_negative) < redness(blue_plain) - 0.05
