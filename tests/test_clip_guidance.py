"""CLIP guidance against independent references, on a tiny random CLIP model built and saved here.

- spherical_distance against the closed form theta^2 / 2 (theta = arccos of the cosine between the
  vectors; |a - b| = 2 sin(theta/2) for unit vectors, so 2 arcsin(|a - b|/2)^2 = 2 (theta/2)^2), in
  float64 numpy: 1e-10 (arccos round-off near |cos| = 1 is the headroom);
- cutouts against explicit slicing + area pooling of the drawn boxes, block means, determinism;
- embeddings against CLIPModel's own forward (text_embeds / image_embeds), and our resize+normalise
  against the model's image processor (PIL bicubic on uint8 images: 0.03 in normalised units);
- the guided denoiser's correction against -scale * sigma^2 * grad computed here with
  torch.autograd through HF's forward, explicit crops and the arccos distance, float64: 1e-9;
- direction: a few guided Euler steps end closer (in CLIP) to the text target than the same steps
  without guidance from the same noise;
- torch.inference_mode callers, differentiable decoders, image prompts, the error paths.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import clip_tokenizer
from torch import nn

from microdiff.clip_guidance import (ClipGuidedDenoiser, MakeCutouts, add_arguments, check_arguments,
                                     differentiable_decode, image_targets, load_clip, parse_weighted,
                                     spherical_distance, text_targets)
from microdiff.diffusion.denoiser import EDM, Denoiser
from microdiff.diffusion.guidance import GuidedDenoiser
from microdiff.diffusion.rng import per_sample_generators
from microdiff.diffusion.samplers import sample_euler
from microdiff.diffusion.schedules import karras

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not OpenAI's: shows they are read from the folder
TEXTS = ["a red cat on a mat", "a blue dog in the park", "two birds flying over the sea",
         "an old house at dawn", "oil painting of a ship", "a photo of a green apple"] * 4


def _tokenizer():
    return clip_tokenizer(TEXTS, max_length=20, vocab_size=150)


def _processor():
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=list(MEAN),
               image_std=list(STD))


def build_tiny_clip(folder):
    """A random two-tower CLIP with its tokenizer and image processor, saved to ``folder`` (offline)."""
    from transformers import CLIPConfig, CLIPModel

    tok = _tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=len(tok), max_position_embeddings=20, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    _processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def clip(clip_dir):
    return load_clip(clip_dir)


@pytest.fixture(scope="module")
def clip64(clip_dir):
    return load_clip(clip_dir, dtype=torch.float64)


def _images(b, h=32, w=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g, dtype=dtype)


class ConvBackbone(nn.Module):
    """F(x, c_noise, y=None): two convs, modulated by the noise level and by an optional (B, 3)
    condition through a linear layer (which, like a real model's caption projection, saves y for
    backward)."""

    def __init__(self, channels=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, channels, 3, padding=1)
        self.cond = nn.Linear(3, 8)

    def forward(self, x, c_noise, y=None):
        h = self.conv1(x) * (1 + c_noise[:, None, None, None])
        if y is not None:
            h = h * (1 + self.cond(y.to(h.dtype))[:, :, None, None])
        return self.conv2(torch.tanh(h))


class Upsampler(nn.Module):
    """A differentiable 'decoder': 4 latent channels at 16x16 -> 3 channels at 32x32 in about [-1, 1]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.ConvTranspose2d(4, 3, 2, stride=2)

    def forward(self, z):
        return torch.tanh(self.conv(z))


# ----------------------------------------------------------------------------- math

def test_spherical_distance_is_half_the_squared_angle():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 16, generator=g, dtype=torch.float64) * 3
    b = torch.randn(6, 16, generator=g, dtype=torch.float64) * 0.2
    an, bn = a.numpy(), b.numpy()
    cos = (an * bn).sum(1) / np.linalg.norm(an, axis=1) / np.linalg.norm(bn, axis=1)
    theta = np.arccos(np.clip(cos, -1, 1))
    np.testing.assert_allclose(spherical_distance(a, b).numpy(), theta**2 / 2, rtol=1e-10, atol=1e-12)
    # broadcasting: every row of a against one b
    np.testing.assert_allclose(spherical_distance(a, b[0]).numpy(),
                               [spherical_distance(a[i], b[0]).item() for i in range(6)], rtol=1e-12)
    assert spherical_distance(a[0], 5 * a[0]).item() == pytest.approx(0, abs=1e-7)
    antipodal = spherical_distance(a[0], -a[0])  # |a - b| / 2 = 1 (+ round-off): no NaN
    assert antipodal.item() == pytest.approx(math.pi**2 / 2, rel=1e-12)


# ----------------------------------------------------------------------------- cutouts

def test_cutouts_are_pooled_crops_of_the_drawn_boxes():
    images = _images(2, 24, 40)
    cuts = MakeCutouts(cut_size=8, cutn=5, cut_pow=1.0)
    out = cuts(images, torch.Generator().manual_seed(3))
    assert out.shape == (10, 3, 8, 8)
    boxes = cuts.boxes(24, 40, torch.Generator().manual_seed(3))
    for c, (top, left, size) in enumerate(boxes):
        assert 8 <= size <= 24 and 0 <= top <= 24 - size and 0 <= left <= 40 - size
        crop = images[:, :, top:top + size, left:left + size]
        torch.testing.assert_close(out[2 * c:2 * c + 2], F.adaptive_avg_pool2d(crop, 8), atol=0, rtol=0)
    assert len({s for _, _, s in boxes}) > 1  # sizes vary
    # determinism: same seed, same cutouts; another seed, other cutouts
    torch.testing.assert_close(cuts(images, torch.Generator().manual_seed(3)), out, atol=0, rtol=0)
    assert not torch.equal(cuts(images, torch.Generator().manual_seed(4)), out)


def test_cutout_resizing_and_size_distribution():
    cuts = MakeCutouts(cut_size=8, cutn=1)
    crop = _images(1, 16, 16)
    blocks = crop.reshape(1, 3, 8, 2, 8, 2).mean((3, 5))  # 2x2 block means: the area filter
    torch.testing.assert_close(cuts.resize(crop), blocks, atol=1e-7, rtol=0)
    assert cuts.resize(_images(1, 4, 4)).shape == (1, 3, 8, 8)  # images smaller than CLIP's input grow
    full = MakeCutouts(cut_size=16, cutn=3)(crop, torch.Generator().manual_seed(0))  # min = max = 16
    torch.testing.assert_close(full, crop.expand(3, -1, -1, -1), atol=0, rtol=0)
    g = torch.Generator().manual_seed(0)
    small = [s for _, _, s in MakeCutouts(8, 200, cut_pow=4.0).boxes(64, 64, g)]
    g = torch.Generator().manual_seed(0)
    plain = [s for _, _, s in MakeCutouts(8, 200, cut_pow=1.0).boxes(64, 64, g)]
    assert np.mean(small) < np.mean(plain) - 10  # E[u^4] = 1/5 vs 1/2 of the range of 56
    with pytest.raises(ValueError, match="cut_pow must be positive"):
        MakeCutouts(8, 4, cut_pow=0)


def test_per_image_generators_make_cutouts_independent_of_the_batch():
    images = _images(3, 20, 20)
    cuts = MakeCutouts(cut_size=8, cutn=4)
    batch = cuts(images, per_sample_generators(10, 3)).view(4, 3, 3, 8, 8)
    for b in range(3):
        alone = cuts(images[b:b + 1], per_sample_generators(10 + b, 1))
        torch.testing.assert_close(batch[:, b], alone, atol=0, rtol=0)
    assert not torch.equal(batch[:, 0], batch[:, 1])
    with pytest.raises(ValueError, match="one generator per image"):
        cuts(images, per_sample_generators(0, 2))


# ----------------------------------------------------------------------------- loading and embeddings

def test_load_clip_embeddings_equal_the_models_own(clip_dir, clip):
    from transformers import AutoTokenizer, CLIPModel

    model, tok = CLIPModel.from_pretrained(clip_dir).eval(), AutoTokenizer.from_pretrained(clip_dir)
    assert clip.image_size == 32 and clip.dim == 16 and clip.dtype == torch.float32
    torch.testing.assert_close(clip.mean, torch.tensor(MEAN, dtype=torch.float64))
    texts = ["a red cat", "an old ship at dawn on the sea", ""]
    images = _images(2)
    ids = tok(texts, padding="max_length", max_length=20, return_tensors="pt")
    pixels = (images - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        ref = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=pixels)
    torch.testing.assert_close(clip.embed_text(texts), ref.text_embeds, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(clip.embed_images(images), ref.image_embeds, atol=1e-6, rtol=0)
    assert torch.allclose(clip.embed_text(texts).norm(dim=1), torch.ones(3))
    long = " ".join(["a red cat on a mat"] * 6)  # > 20 tokens: truncated, keeping the end-of-text token
    with pytest.warns(UserWarning, match="longer than 20 tokens are truncated"):
        got = clip.embed_text([long])
    ids = tok([long], truncation=True, max_length=20, return_tensors="pt")
    assert ids["input_ids"][0, -1].item() == 3
    with torch.no_grad():
        want = model.get_text_features(**ids)
    want = getattr(want, "pooler_output", want)
    torch.testing.assert_close(got, F.normalize(want, dim=-1), atol=1e-6, rtol=0)


def test_resize_and_normalise_match_the_image_processor(clip):
    # smooth images (resampling filters differ most on pixel noise and at borders); the processor:
    # shortest edge -> 32 (32x48), centre crop 32; ours: centre square 64x64 -> 32
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 96), indexing="ij")
    images = torch.stack([torch.stack([0.5 + 0.4 * torch.sin(f * (xx + c * yy) + c) for c in (0.3, 1.0, 2.0)])
                          for f in (3.0, 7.0)])
    uint8 = (images * 255).round().to(torch.uint8)
    pil = [np.ascontiguousarray(u.permute(1, 2, 0).numpy()) for u in uint8]
    ref = torch.as_tensor(np.asarray(_processor()(images=pil, return_tensors="np")["pixel_values"]))
    ours = clip.preprocess(uint8.float() / 255)
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    print((ours - ref).abs().mean(), (ours - ref).abs().max())
    assert (ours - ref).abs().mean() < 0.01 and (ours - ref).abs().max() < 0.05


def test_embed_images_is_differentiable(clip):
    images = _images(2).requires_grad_(True)
    target = clip.embed_text(["a red cat"])[0]
    spherical_distance(clip.embed_images(images), target).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_load_clip_errors(tmp_path, monkeypatch, clip_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError) as err:
        load_clip("microdiff-tests/no-such-clip")
    msg = str(err.value)
    assert "\n" not in msg and "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE is set" in msg
    assert "local folder" in msg and "microdiff-tests/no-such-clip" in msg
    with pytest.raises(FileNotFoundError, match="no such CLIP model folder"):
        load_clip(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json in this folder"):
        load_clip(tmp_path / "empty")
    from transformers import CLIPModel, CLIPTextModel

    CLIPTextModel(CLIPModel.from_pretrained(clip_dir).config.text_config).save_pretrained(tmp_path / "text-only")
    with pytest.raises(ValueError, match="not a CLIP model with text and vision towers"):
        load_clip(tmp_path / "text-only")


# ----------------------------------------------------------------------------- targets

def test_text_and_image_targets(clip, tmp_path):
    from PIL import Image

    targets = text_targets(clip, [("a red cat", 1.0), ("blurry", -0.5)])
    assert [w for _, w in targets] == [1.0, -0.5]
    torch.testing.assert_close(targets[1][0], clip.embed_text(["blurry"])[0])
    array = (_images(1, 40, 40, seed=2)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(tmp_path / "prompt.png")
    images = image_targets(clip, [(tmp_path / "prompt.png", 0.5), (Image.fromarray(array).convert("L"), 2.0)])
    assert [w for _, w in images] == [0.5, 2.0] and images[0][0].shape == (16,)
    with torch.no_grad():
        want = clip.embed_images(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255)[0]
    torch.testing.assert_close(images[0][0], want, atol=1e-6, rtol=0)
    assert not torch.allclose(images[1][0], want, atol=1e-3)  # the grey version is another image
    with pytest.raises(FileNotFoundError, match="no-such.png"):
        image_targets(clip, [(tmp_path / "no-such.png", 1.0)])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png: cannot read"):
        image_targets(clip, [(tmp_path / "broken.png", 1.0)])


def test_parse_weighted_and_cli_options():
    assert parse_weighted("fox.png:0.5") == ("fox.png", 0.5)
    assert parse_weighted("dir:with/colon.png") == ("dir:with/colon.png", 1.0)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--clip-model", "openai/clip-vit-base-patch16", "--clip-guidance-scale", "300",
                              "--cutn", "8", "--images", "a.png:0.5", "b.png"])
    check_arguments(args)  # fills in the defaults of the options not given
    assert (args.clip_model, args.clip_guidance_scale, args.cutn, args.cut_pow) == \
        ("openai/clip-vit-base-patch16", 300.0, 8, 1.0)
    assert [parse_weighted(p) for p in args.images] == [("a.png", 0.5), ("b.png", 1.0)]


# ----------------------------------------------------------------------------- the guided denoiser

def _reference_guided(denoiser, decode, model, x, sigma, targets, scale, cutn, seed):
    """-scale * sigma^2 * grad by hand: HF's forward, explicit crops, the arccos distance."""
    x = x.detach().clone().requires_grad_(True)
    denoised = denoiser(x, sigma)
    images = (decode(denoised) + 1) / 2
    boxes = MakeCutouts(32, cutn).boxes(images.shape[2], images.shape[3], torch.Generator().manual_seed(seed))
    mean, std = (torch.tensor(v, dtype=x.dtype)[:, None, None] for v in (MEAN, STD))
    loss = x.new_zeros(())
    for top, left, size in boxes:
        crop = F.adaptive_avg_pool2d(images[:, :, top:top + size, left:left + size], 32)
        emb = model.get_image_features(pixel_values=(crop - mean) / std)
        emb = getattr(emb, "pooler_output", emb)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        for target, weight in targets:
            t = target / target.norm(dim=-1, keepdim=True)
            theta = torch.arccos((emb * t).sum(-1).clamp(-1, 1))
            loss = loss + weight * (theta**2 / 2).sum() / cutn
    (grad,) = torch.autograd.grad(loss, x)
    return denoised.detach(), -scale * sigma[:, None, None, None] ** 2 * grad


def test_guided_correction_equals_minus_scale_sigma2_grad(clip_dir, clip64):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_dir, dtype=torch.float64).eval()
    denoiser = Denoiser(ConvBackbone(channels=4).double(), EDM(0.5))
    decode = Upsampler().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64) * 1.5
    sigma = torch.tensor([1.5, 0.7], dtype=torch.float64)
    text = text_targets(clip64, [("a red cat", 1.0), ("blurry", -0.3)])
    per_image = (clip64.embed_text(["a blue dog", "an old house"]), 0.7)  # (B, D): one per image
    targets = [*text, per_image]
    scale = 40.0
    guided = ClipGuidedDenoiser(denoiser, decode, clip64, targets, scale=scale, cutn=3,
                                generator=torch.Generator().manual_seed(7))
    out = guided(x, sigma)
    plain, correction = _reference_guided(denoiser, decode, model, x, sigma, targets, scale, 3, seed=7)
    assert out.dtype == torch.float64 and not out.requires_grad
    torch.testing.assert_close(out - plain, correction, rtol=1e-9, atol=1e-12)
    assert correction.abs().max() > 1e-3 * plain.abs().max()  # the check is not on a vanishing correction
    assert guided.last_loss.shape == (2,)
    # scale 0 is the plain denoiser; the gradient clip bounds each image's gradient norm
    zero = ClipGuidedDenoiser(denoiser, decode, clip64, targets, scale=0.0)
    torch.testing.assert_close(zero(x, sigma), plain, atol=0, rtol=0)
    clipped = ClipGuidedDenoiser(denoiser, decode, clip64, targets, scale=scale, cutn=3, grad_clip=1e-3,
                                 generator=torch.Generator().manual_seed(7))
    grad_norms = ((clipped(x, sigma) - plain) / (-scale * sigma[:, None, None, None] ** 2)).flatten(1).norm(dim=1)
    torch.testing.assert_close(grad_norms, torch.full((2,), 1e-3, dtype=torch.float64), rtol=1e-9, atol=0)


def test_guidance_does_not_depend_on_the_batch(clip):
    denoiser = Denoiser(ConvBackbone(), EDM(0.5))
    targets = text_targets(clip, [("a red cat", 1.0)])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    sigma = torch.full((3,), 0.8)

    def run(rows, seed):
        guided = ClipGuidedDenoiser(denoiser, None, clip, targets, scale=20.0, cutn=2,
                                    generator=per_sample_generators(seed, len(rows)))
        return guided(x[rows], sigma[rows])

    whole = run([0, 1, 2], 100)
    for k in range(3):
        torch.testing.assert_close(run([k], 100 + k), whole[k:k + 1], atol=1e-5, rtol=1e-5)


def _sample(clip, guided_scale, inference=False, targets=None, extra=None):
    denoiser = Denoiser(ConvBackbone(seed=3), EDM(0.5))
    targets = targets or text_targets(clip, [("a photo of a green apple", 1.0)])
    guided = ClipGuidedDenoiser(denoiser, None, clip, targets, scale=guided_scale, cutn=4,
                                generator=torch.Generator().manual_seed(0))
    sigmas = karras(6, 0.05, 2.0, dtype=torch.float64)
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx:
        extra_args = None if extra is None else {"y": extra()}
        return sample_euler(guided, noise * sigmas[0], sigmas, extra_args=extra_args, disable=True)


def test_guided_euler_moves_towards_the_text_target(clip):
    target = clip.embed_text(["a photo of a green apple"])[0]

    def distance(x):
        with torch.no_grad():
            return spherical_distance(clip.embed_images(((x.float() + 1) / 2)), target)

    plain, guided = distance(_sample(clip, 0.0)), distance(_sample(clip, 30.0))
    # Measured over seeds 0-4 (CLIP init, backbone, noise, cutouts; the same on torch 2.13.0 and 2.14.1):
    # each image's distance drops by 3.6-23% with guidance, the mean by 4.4-28%; pushing away raises each
    # by 3.6-29%.
    assert (guided < plain).all(), (plain, guided)
    assert (plain - guided).mean() > 0.02 * plain.mean()
    away = distance(_sample(clip, 30.0, targets=[(target, -1.0)]))  # a negative weight pushes away
    assert (away > plain).all(), (plain, away)


def test_works_inside_inference_mode(clip):
    make_y = lambda: torch.full((4, 3), 0.1)  # noqa: E731 - made inside the mode, the model dtype
    want = _sample(clip, 30.0, extra=make_y)
    got = _sample(clip, 30.0, inference=True, extra=make_y)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_pipeline_style_cfg_inside_inference_mode(clip):
    """Pipeline.generate's situation: prompt states and the CFG wrapper made under inference_mode.
    GuidedDenoiser concatenates its branches' conditions (a new, normal tensor), so this works and
    gives what the same calls give under no_grad."""
    denoiser = Denoiser(ConvBackbone(), EDM(0.5))
    targets = text_targets(clip, [("a red cat", 1.0)])
    x, sigma = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.ones(2)
    outs = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            cond, uncond = {"y": torch.ones(2, 3)}, {"y": torch.zeros(2, 3)}
            cfg = GuidedDenoiser(denoiser, [cond], uncond, scale=3.0)
            guided = ClipGuidedDenoiser(cfg, None, clip, text_targets(clip, [("a red cat", 1.0)]), scale=10.0,
                                        cutn=2, generator=torch.Generator().manual_seed(1))
            outs.append(guided(x, sigma))
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)
    assert not torch.allclose(outs[0], cfg(x, sigma), atol=1e-4)  # and it is guided
    # a tensor held by the denoiser and used as it is (no copy) cannot enter autograd: a clear error
    with torch.inference_mode():
        held = torch.ones(2, 3)
        closure = ClipGuidedDenoiser(lambda x, s: denoiser(x, s, y=held), None, clip, targets, scale=10.0, cutn=2)
        with pytest.raises(RuntimeError, match="made under torch.inference_mode.*torch.no_grad") as err:
            closure(x, sigma)
    assert "\n" not in str(err.value)


def test_differentiable_decode_of_microdiff_autoencoders():
    from microdiff.encoders.base import IdentityAutoencoder
    from microdiff.encoders.vae import KLAutoencoder

    z = torch.randn(1, 4, 4, 4)
    assert differentiable_decode(IdentityAutoencoder())(z) is z
    torch.manual_seed(0)
    ae = KLAutoencoder(channels=8, channel_mult=(1, 2), latent_channels=4, norm_groups=4, attention=False,
                       scale=0.5, shift=0.1).eval()
    decode = differentiable_decode(ae)
    zg = z.clone().requires_grad_(True)
    images = decode(zg)
    with torch.no_grad():
        torch.testing.assert_close(images, ae.decode(z), atol=0, rtol=0)
    images.sum().backward()
    assert zg.grad is not None and zg.grad.abs().sum() > 0


def test_differentiable_decode_of_a_diffusers_autoencoder():
    import diffusers

    from microdiff.encoders.image import DiffusersAutoencoderKL

    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                                    latent_channels=4, scaling_factor=0.5, shift_factor=0.1, sample_size=16)
    ae = DiffusersAutoencoderKL(model, source="tiny-kl", clamp=False)
    z = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)  # float64 like a sampler's state
    images = differentiable_decode(ae)(z)
    torch.testing.assert_close(images.detach(), ae.decode(z.detach()), atol=1e-6, rtol=0)  # the protocol's decode
    assert ae.decode(z).requires_grad is False  # ... which gives no gradient, hence this helper
    images.square().sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_bad_inputs_get_clear_errors(clip):
    denoiser = Denoiser(ConvBackbone(), EDM(0.5))
    targets = text_targets(clip, [("a red cat", 1.0)])
    x, sigma = torch.randn(2, 3, 32, 32), torch.ones(2)
    frozen = ClipGuidedDenoiser(denoiser, lambda z: z.detach(), clip, targets, scale=1.0, cutn=1)
    with pytest.raises(ValueError, match="without a gradient.*differentiable_decode"):
        frozen(x, sigma)
    with pytest.raises(ValueError, match="expected an embedding of shape"):
        ClipGuidedDenoiser(denoiser, None, clip, [(torch.ones(5), 1.0)], scale=1.0)
    with pytest.raises(ValueError, match="at least one"):
        ClipGuidedDenoiser(denoiser, None, clip, [], scale=1.0)
    per_image = ClipGuidedDenoiser(denoiser, None, clip, [(torch.ones(3, 16), 1.0)], scale=1.0, cutn=1)
    with pytest.raises(ValueError, match="3 embeddings for a batch of 2"):
        per_image(x, sigma)
    gray = ClipGuidedDenoiser(denoiser, lambda z: z[:, :1], clip, targets, scale=1.0, cutn=1)
    with pytest.raises(ValueError, match=r"decode must return images \(B, 3, H, W\)"):
        gray(x, sigma)
