"""Corruption operators against independent references.

blur: scipy.ndimage.gaussian_filter (mode "reflect") in float64; noise: residual statistics
(mean, std per sample, a KS test for normality) and no clipping; JPEG: Pillow's own encode/decode of
the same 8-bit image; masks: keep rate against the binomial spread, block structure, zeros where
dropped; the registry and the CLI short form; one-line errors for bad input.
"""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage, stats

from microdiff.ambient import CORRUPTIONS, apply_corruption, parse_corruption
from microdiff.ambient.corruptions import additive_noise, gaussian_blur, jpeg, pixel_mask


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _images(shape=(2, 3, 13, 17), seed=0, dtype=torch.float64):
    return torch.rand(shape, generator=_gen(seed), dtype=dtype) * 2 - 1


# ----------------------------------------------------------------------------- blur
@pytest.mark.parametrize("sigma", [0.4, 1.5, 3.0, 5.0])
def test_blur_matches_scipy_gaussian_filter(sigma):
    """sigma 5 has a radius (20) beyond the 13 x 17 image: reflection must repeat like scipy's."""
    x = _images()
    got, meta = gaussian_blur(x, sigma)
    want = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="reflect", truncate=4.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)  # float64, sums of <= 41 taps
    assert meta == [{"corruption": "blur", "sigma_px": sigma}] * 2


def test_blur_float32_and_identity_and_constant():
    x = _images(dtype=torch.float32)
    got, _ = gaussian_blur(x, 1.0)
    want = ndimage.gaussian_filter(x.double().numpy(), sigma=(0, 0, 1, 1), mode="reflect")
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)  # float32 round-off
    same, _ = gaussian_blur(x, 0)
    assert torch.equal(same, x)
    flat = torch.full((1, 3, 5, 5), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, 2.0)[0], flat)  # normalised kernel, symmetric borders


# ----------------------------------------------------------------------------- noise
def test_noise_residual_is_gaussian_with_sigma_and_not_clipped():
    x = torch.full((4, 3, 32, 32), 0.9, dtype=torch.float64)  # near the top: clipping would show
    y, meta = additive_noise(x, 0.2, _gen(1))
    r = (y - x).numpy().reshape(4, -1)
    n = r.shape[1]
    # std of a sample std is sigma / sqrt(2n) = 0.2 / 78 ~ 0.0026: 4 of those
    np.testing.assert_allclose(r.std(axis=1), 0.2, atol=4 * 0.2 / np.sqrt(2 * n))
    np.testing.assert_allclose(r.mean(axis=1), 0.0, atol=4 * 0.2 / np.sqrt(n))
    assert stats.kstest(r.ravel() / 0.2, "norm").pvalue > 1e-3
    assert (y > 1).float().mean() > 0.25  # P(n > 0.5) = 0.31: values above 1 are kept
    assert meta == [{"corruption": "noise", "sigma": 0.2}] * 4
    assert json.loads(json.dumps(meta)) == meta


def test_noise_per_sample_sigma_and_generator_determinism():
    x = torch.zeros(3, 1, 40, 40)
    y, meta = additive_noise(x, [0.0, 0.1, 0.5], _gen(2))
    assert torch.equal(y[0], x[0])
    np.testing.assert_allclose(y[1:].flatten(1).std(dim=1).numpy(), [0.1, 0.5], rtol=0.06)
    assert [m["sigma"] for m in meta] == [0.0, 0.1, 0.5]
    assert torch.equal(additive_noise(x, 0.3, _gen(5))[0], additive_noise(x, 0.3, _gen(5))[0])
    assert not torch.equal(additive_noise(x, 0.3, _gen(5))[0], additive_noise(x, 0.3, _gen(6))[0])


# ----------------------------------------------------------------------------- jpeg
def _reference_jpeg(x: torch.Tensor, quality: int) -> np.ndarray:
    """Quantise with numpy, then a plain Pillow round trip per image."""
    u8 = np.clip(np.round((x.numpy().astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)
    out = []
    for img in u8.transpose(0, 2, 3, 1):
        buf = io.BytesIO()
        Image.fromarray(img, "RGB").save(buf, "JPEG", quality=quality)
        out.append(np.asarray(Image.open(buf)))
    return np.stack(out).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("quality", [5, 50, 95])
def test_jpeg_equals_pillow_round_trip(quality):
    x = gaussian_blur(_images((2, 3, 24, 20), seed=3, dtype=torch.float32), 1.0)[0]
    got, meta = jpeg(x, quality)
    assert got.dtype == torch.float32 and got.shape == x.shape
    levels = ((got.double() + 1) * 127.5).numpy()
    np.testing.assert_allclose(levels, _reference_jpeg(x, quality), atol=1e-4)  # the same uint8 levels
    assert meta == [{"corruption": "jpeg", "quality": quality}] * 2


def test_jpeg_error_decreases_with_quality_and_grayscale_works():
    x = gaussian_blur(_images((1, 3, 32, 32), seed=4, dtype=torch.float32), 1.5)[0]
    errors = [float((jpeg(x, q)[0] - x).abs().mean()) for q in (5, 30, 90)]
    assert errors[0] > errors[1] > errors[2]
    gray, _ = jpeg(x[:, :1], 50)
    assert gray.shape == (1, 1, 32, 32) and float((gray - x[:, :1]).abs().mean()) < 0.1


# ----------------------------------------------------------------------------- masks
def test_pixel_mask_keep_rate_zeros_and_kept_values():
    x = _images((4, 3, 50, 50), seed=5, dtype=torch.float32)
    y, mask, meta = pixel_mask(x, 0.3, _gen(7))
    assert mask.shape == (4, 1, 50, 50) and set(mask.unique().tolist()) <= {0.0, 1.0}
    n = mask.numel()
    assert abs(float(mask.mean()) - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)
    assert torch.equal(y, x * mask)
    assert bool((y.expand_as(x)[(mask == 0).expand_as(x)] == 0).all())
    assert [m["observed_fraction"] for m in meta] == pytest.approx(mask.flatten(1).mean(1).tolist())
    assert meta[0]["corruption"] == "mask" and meta[0]["keep_prob"] == 0.3 and meta[0]["block"] == 1


def test_pixel_mask_blocks_are_whole_and_cropped_at_odd_sizes():
    x = torch.ones(8, 3, 21, 30)
    _, mask, _ = pixel_mask(x, 0.5, _gen(8), block=4)
    assert mask.shape == (8, 1, 21, 30)
    padded = torch.nn.functional.pad(mask, (0, 2, 0, 3), value=-1)  # 24 x 32: whole 4 x 4 blocks
    blocks = padded.unfold(2, 4, 4).unfold(3, 4, 4).reshape(8, 6, 8, 16)
    values = blocks.max(dim=-1).values
    assert bool(((blocks == values[..., None]) | (blocks == -1)).all())  # each block is constant
    keep = values.flatten()
    assert abs(float(keep.mean()) - 0.5) < 4 * np.sqrt(0.25 / keep.numel())
    assert torch.equal(pixel_mask(x, 0.5, _gen(8), block=4)[1], mask)
    assert float(pixel_mask(x, 1.0, _gen(8))[1].min()) == 1.0


# ----------------------------------------------------------------------------- registry and errors
def test_apply_corruption_dispatches_to_the_operators():
    x = _images((2, 3, 16, 16), seed=9, dtype=torch.float32)
    assert torch.equal(apply_corruption(x, {"name": "blur", "sigma_px": 1.2}).images, gaussian_blur(x, 1.2)[0])
    assert torch.equal(apply_corruption(x, {"name": "noise", "sigma": 0.1}, _gen(1)).images,
                       additive_noise(x, 0.1, _gen(1))[0])
    assert torch.equal(apply_corruption(x, {"name": "jpeg", "quality": 20}).images, jpeg(x, 20)[0])
    result = apply_corruption(x, {"name": "mask", "keep_prob": 0.5, "block": 2}, _gen(3))
    images, mask, meta = pixel_mask(x, 0.5, _gen(3), block=2)
    assert torch.equal(result.images, images) and torch.equal(result.mask, mask) and result.meta == meta
    assert apply_corruption(x, {"name": "noise", "sigma": 0.1}, _gen(1)).mask is None
    assert set(CORRUPTIONS) == {"blur", "noise", "jpeg", "mask", "dust", "box", "fixed_box", "keep_patch", "downup",
                                "colour_shift"}  # the new ones are tested in test_ambient_corruptions.py


def test_parse_corruption_short_forms():
    assert parse_corruption("noise:0.2") == {"name": "noise", "sigma": 0.2}
    assert parse_corruption("blur:1.5") == {"name": "blur", "sigma_px": 1.5}
    assert parse_corruption("jpeg:20") == {"name": "jpeg", "quality": 20}
    assert parse_corruption("mask:0.5") == {"name": "mask", "keep_prob": 0.5}
    assert parse_corruption("mask:0.5:4") == {"name": "mask", "keep_prob": 0.5, "block": 4}


@pytest.mark.parametrize("call, message", [
    (lambda x: apply_corruption(x, {"name": "rain", "drops": 3}),
     "unknown corruption 'rain'; choose one of blur, noise"),
    (lambda x: apply_corruption(x, {"sigma": 0.1}), "'name'"),
    (lambda x: apply_corruption(x, {"name": "noise"}), "missing ['sigma']"),
    (lambda x: apply_corruption(x, {"name": "noise", "sigma": 0.1, "sigma_px": 1}), "unknown ['sigma_px']"),
    (lambda x: parse_corruption("fog:1"), "unknown corruption 'fog'"),
    (lambda x: parse_corruption("noise"), "noise:<sigma>"),
    (lambda x: parse_corruption("jpeg:high"), "quality must be a number"),
    (lambda x: gaussian_blur(x, -1), "sigma_px must be >= 0"),
    (lambda x: gaussian_blur(x[0], 1), "(B, C, H, W)"),
    (lambda x: additive_noise(x, -0.1), "sigma must be >= 0"),
    (lambda x: additive_noise(x, [0.1, 0.2, 0.3]), "one per image"),
    (lambda x: jpeg(x, 0), "quality must be an integer in 1..95"),
    (lambda x: jpeg(x, 96), "1..95"),
    (lambda x: jpeg(x, 50.5), "1..95"),
    (lambda x: jpeg(torch.zeros(1, 2, 8, 8), 50), "1 or 3 channels"),
    (lambda x: pixel_mask(x, 0.0), "keep_prob must be in (0, 1]"),
    (lambda x: pixel_mask(x, 0.5, block=0), "block must be an integer >= 1"),
])
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError) as error:
        call(torch.zeros(2, 3, 8, 8))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_generator_gives_the_same_corruption_on_cuda():
    x = _images((2, 3, 16, 16), seed=10, dtype=torch.float32)
    for spec in ({"name": "noise", "sigma": 0.3}, {"name": "mask", "keep_prob": 0.5, "block": 2},
                 {"name": "blur", "sigma_px": 1.0}, {"name": "jpeg", "quality": 30},
                 {"name": "dust", "p": 0.3, "per_element": True}, {"name": "box", "size": 0.25},
                 {"name": "fixed_box", "size": 5}, {"name": "keep_patch", "size": 8},
                 {"name": "downup", "factor": 2.5, "down": "bilinear", "up": "bicubic"},
                 {"name": "colour_shift", "gain": 0.2}):
        cpu = apply_corruption(x, spec, _gen(4))
        gpu = apply_corruption(x.cuda(), spec, _gen(4))
        assert gpu.images.device.type == "cuda" and gpu.meta == cpu.meta
        torch.testing.assert_close(gpu.images.cpu(), cpu.images, atol=1e-6, rtol=1e-6)
