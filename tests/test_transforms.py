"""ImageTransform and the image loading behind it, against independent references.

The resize is checked against an antialiased bicubic resampler written here in numpy (Keys cubic,
a = -0.5, kernel widened by the shrink factor, one separable pass per axis, each rounded to 8 bits
as an 8-bit image pipeline does); crops and flips exactly against numpy slicing; every Pillow mode
against its colour formula (alpha compositing on white, CMYK, YCbCr (JPEG/BT.601), HSV via colorsys,
LAB greys via scikit-image, 16-bit scaling); decoding failures by their reasons.
"""

import colorsys
import io

import numpy as np
import pytest
import torch
from PIL import Image

from microdiff.data.transforms import (ImageDecodeError, ImageTooSmall, ImageTransform, open_image,
                                       to_rgb)

LSB = 2.0 / 255.0  # one 8-bit step in [-1, 1] units


def _photo(h=40, w=56, seed=0):
    """A smooth-plus-noise RGB test image (uint8)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 200
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def _to_unit(arr_uint8):
    """(H, W, 3) uint8 -> (3, H, W) float64 in [-1, 1]."""
    return torch.from_numpy(arr_uint8.astype(np.float64).transpose(2, 0, 1) / 127.5 - 1.0)


# --- an independent antialiased bicubic ---------------------------------------------------------
def _keys_cubic(x, a=-0.5):
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, a * (x**3 - 5 * x**2 + 8 * x - 4), 0.0))


def _resize_matrix(n_in, n_out):
    """(n_out, n_in) weights: output pixel centres mapped into the input, kernel widened when shrinking."""
    scale = n_in / n_out
    width = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    w = _keys_cubic(((np.arange(n_in) + 0.5)[None, :] - centres[:, None]) / width)
    return w / w.sum(1, keepdims=True)


def _np_resize(arr, out_w, out_h):
    """uint8 (H, W, C) -> uint8 (out_h, out_w, C); horizontal pass then vertical, 8-bit in between."""
    x = arr.astype(np.float64)
    if out_w != arr.shape[1]:
        x = np.clip(np.floor(np.einsum("ow,hwc->hoc", _resize_matrix(arr.shape[1], out_w), x) + 0.5), 0, 255)
    if out_h != arr.shape[0]:
        x = np.clip(np.floor(np.einsum("oh,hwc->owc", _resize_matrix(arr.shape[0], out_h), x) + 0.5), 0, 255)
    return x.astype(np.uint8)


def _short_side_size(w, h, r):
    return (r, round(h * r / w)) if w <= h else (round(w * r / h), r)


@pytest.mark.parametrize("h,w,res", [(40, 56, 16), (56, 40, 16), (33, 17, 8), (17, 33, 7), (9, 9, 9),
                                     (5, 7, 12), (3, 50, 3), (101, 64, 32)])
def test_resize_and_center_crop_match_numpy_bicubic(h, w, res):
    arr = _photo(h, w, seed=h * w)
    out = ImageTransform(res)(Image.fromarray(arr))
    assert out.dtype == torch.float32 and out.shape == (3, res, res)
    assert out.min() >= -1 and out.max() <= 1
    new_w, new_h = _short_side_size(w, h, res)
    ref = _np_resize(arr, new_w, new_h)
    top, left = (new_h - res) // 2, (new_w - res) // 2
    want = _to_unit(ref[top:top + res, left:left + res])
    # Pillow uses 22-bit fixed-point weights: at most one 8-bit step from the float64 reference.
    diff = (out.double() - want).abs()
    assert diff.max() <= LSB + 1e-6, diff.max()
    assert (diff > 1e-6).float().mean() < 0.05  # and almost everywhere exactly equal


def test_no_resize_when_short_side_equals_resolution_is_exact():
    arr = _photo(12, 31)
    out = ImageTransform(12)(Image.fromarray(arr))
    left = (31 - 12) // 2
    torch.testing.assert_close(out, _to_unit(arr[:, left:left + 12]).float(), rtol=0, atol=1e-6)


def test_black_and_white_map_to_minus_one_and_one():
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[:, 4:] = 255
    out = ImageTransform(8)(Image.fromarray(arr))
    assert out[:, :, :4].eq(-1).all() and out[:, :, 4:].eq(1).all()


def test_random_crop_is_uniform_reproducible_and_exact():
    arr = _photo(10, 18, seed=3)  # short side == resolution: the crop is a pure window
    t = ImageTransform(10, crop="random", flip=True)
    lefts, flips = set(), 0
    for seed in range(200):
        out, p = t(Image.fromarray(arr), rng=np.random.default_rng(seed), return_params=True)
        window = arr[p.top:p.top + 10, p.left:p.left + 10]
        want = _to_unit(window[:, ::-1] if p.flip else window).float()
        torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
        again = t(Image.fromarray(arr), rng=np.random.default_rng(seed))
        assert torch.equal(out, again)
        lefts.add(p.left)
        flips += p.flip
        assert p.top == 0
    assert lefts == set(range(0, 18 - 10 + 1))  # every offset is reachable
    assert 70 < flips < 130  # Binomial(200, 1/2): outside this range has probability < 1e-4


def test_center_crop_never_flips_without_flip():
    t = ImageTransform(8)
    params = {t.sample_params(20, 11, np.random.default_rng(s)) for s in range(20)}
    assert len(params) == 1 and not next(iter(params)).flip


def test_min_size_raises_image_too_small_at_the_boundary():
    t = ImageTransform(8, min_size=10)
    assert t(Image.new("RGB", (10, 30))).shape == (3, 8, 8)
    with pytest.raises(ImageTooSmall, match="short side 9 px.*min_size=10"):
        t(Image.new("RGB", (30, 9)))
    assert ImageTooSmall.reason == "image too small"


@pytest.mark.parametrize("kwargs,match", [({"resolution": 0}, "resolution"), ({"resolution": 8, "crop": "top"}, "crop"),
                                          ({"resolution": 8, "min_size": 0}, "min_size")])
def test_bad_arguments_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageTransform(**kwargs)


# --- every Pillow mode ---------------------------------------------------------------------------
def _composite_on_white(rgb, alpha):
    a = alpha.astype(np.float64)[..., None] / 255.0
    return rgb.astype(np.float64) * a + 255.0 * (1 - a)


def _modes():
    """(name, image, expected RGB as float64 (H, W, 3), tolerance in 8-bit steps)."""
    rng = np.random.default_rng(7)
    rgb = _photo(6, 9, seed=7)
    im = Image.fromarray(rgb)
    alpha = rng.integers(0, 256, (6, 9)).astype(np.uint8)
    gray = np.asarray(im.convert("L"))
    cases = [("RGB", im, rgb, 0), ("RGBX", im.convert("RGBX"), rgb, 0)]
    cases.append(("L", im.convert("L"), np.repeat(gray[..., None], 3, -1), 0))
    one = im.convert("1")
    cases.append(("1", one, np.repeat(np.asarray(one, dtype=np.float64)[..., None] * 255, 3, -1), 0))
    pal = im.convert("P", palette=Image.ADAPTIVE, colors=16)
    lut = np.asarray(pal.getpalette(), dtype=np.float64).reshape(-1, 3)
    idx = np.asarray(pal)
    cases.append(("P", pal, lut[idx], 0))
    trans = pal.copy()
    trans.info["transparency"] = int(idx[0, 0])
    cases.append(("P+transparency", trans, np.where((idx == idx[0, 0])[..., None], 255.0, lut[idx]), 0))
    pa = pal.convert("PA")
    pa.putalpha(Image.fromarray(alpha))
    cases.append(("PA", pa, _composite_on_white(lut[idx], alpha), 1))
    rgba = Image.fromarray(np.dstack([rgb, alpha]))
    cases.append(("RGBA", rgba, _composite_on_white(rgb, alpha), 1))
    la = Image.fromarray(np.dstack([gray, alpha]))
    cases.append(("LA", la, np.repeat(_composite_on_white(gray[..., None], alpha), 3, -1), 1))
    # premultiplied: composite over white is C_pre + 255 - a
    pre = np.floor(rgb.astype(np.float64) * alpha[..., None] / 255 + 0.5)
    rgba_pre = Image.frombytes("RGBa", (9, 6), np.dstack([pre.astype(np.uint8), alpha]).tobytes())
    cases.append(("RGBa", rgba_pre, pre + 255.0 - alpha[..., None], 2))
    pre_l = np.floor(gray.astype(np.float64) * alpha / 255 + 0.5)
    la_pre = Image.frombytes("La", (9, 6), np.dstack([pre_l.astype(np.uint8), alpha]).tobytes())
    cases.append(("La", la_pre, np.repeat((pre_l + 255.0 - alpha)[..., None], 3, -1), 2))
    gray_t = Image.fromarray(gray)
    gray_t.info["transparency"] = int(gray[0, 0])
    cases.append(("L+transparency", gray_t,
                  np.repeat(np.where(gray == gray[0, 0], 255.0, gray)[..., None], 3, -1), 0))
    cmyk = rng.integers(0, 256, (6, 9, 4)).astype(np.uint8)
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    cases.append(("CMYK", Image.frombytes("CMYK", (9, 6), cmyk.tobytes()), (255 - c) * (255 - k) / 255, 1))
    ycc = rng.integers(16, 240, (6, 9, 3)).astype(np.uint8)
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    jpeg = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                     y + 1.772 * (cb - 128)], -1)
    cases.append(("YCbCr", Image.frombytes("YCbCr", (9, 6), ycc.tobytes()), np.clip(jpeg, 0, 255), 1))
    hsv = rng.integers(0, 256, (6, 9, 3)).astype(np.uint8)
    ref = np.array([[colorsys.hsv_to_rgb(*(px / 255.0)) for px in row] for row in hsv]) * 255
    cases.append(("HSV", Image.frombytes("HSV", (9, 6), hsv.tobytes()), ref, 1))
    deep = rng.integers(0, 65536, (6, 9)).astype(np.uint16)
    want16 = np.repeat(np.round(deep / 257.0)[..., None], 3, -1)
    cases.append(("I;16", Image.fromarray(deep), want16, 0))
    cases.append(("I;16B", Image.frombytes("I;16B", (9, 6), deep.astype(">u2").tobytes()), want16, 0))
    cases.append(("I", Image.fromarray(deep.astype(np.int32)), want16, 0))
    unit = rng.random((6, 9)).astype(np.float32)
    cases.append(("F", Image.fromarray(unit), np.repeat(np.round(unit * 255.0)[..., None], 3, -1), 0))
    return cases


@pytest.mark.parametrize("case", _modes(), ids=lambda c: c[0])
def test_every_pillow_mode_becomes_the_right_rgb(case):
    name, image, want, tol = case
    got = to_rgb(image)
    assert got.mode == "RGB" and got.size == image.size
    diff = np.abs(np.asarray(got, dtype=np.float64) - want)
    assert diff.max() <= tol + 0.5 + 1e-9, (name, diff.max())  # exact formulae rounded to 8 bits
    out = ImageTransform(6)(image)  # and the transform accepts the mode end to end
    assert out.shape == (3, 6, 6) and out.min() >= -1 and out.max() <= 1


def test_lab_greys_match_scikit_image():
    from skimage.color import lab2rgb

    L = np.linspace(0, 255, 16).astype(np.uint8)[None, :]
    lab = np.dstack([L, np.zeros_like(L), np.zeros_like(L)])  # a* = b* = 0: neutral greys
    got = np.asarray(to_rgb(Image.frombytes("LAB", (16, 1), lab.tobytes())), dtype=np.float64)
    want = lab2rgb(np.dstack([L * 100.0 / 255, np.zeros(L.shape), np.zeros(L.shape)])) * 255
    assert np.abs(got - want).max() <= 3  # 8-bit LAB and two colour engines: a few steps


# --- decoding ------------------------------------------------------------------------------------
def _encoded(arr, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_open_image_reasons(tmp_path):
    jpeg = _encoded(_photo(64, 64), "JPEG", quality=90)
    cases = {"truncated.jpg": (jpeg[: len(jpeg) // 2], "corrupt image"), "empty.png": (b"", "empty file"),
             "text.png": (b"not an image at all\n", "not an image")}
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageDecodeError, match=name) as err:
            open_image(tmp_path / name)
        assert err.value.reason == reason
    with pytest.raises(ImageDecodeError) as err:
        open_image(tmp_path / "absent.png")
    assert err.value.reason == "missing file"
    with pytest.raises(ImageDecodeError) as err:
        open_image(b"")
    assert err.value.reason == "empty file"


def test_open_image_applies_exif_orientation_and_reads_first_frame():
    arr = _photo(6, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated = open_image(_encoded(arr, "PNG", exif=exif))
    np.testing.assert_array_equal(np.asarray(rotated), np.rot90(arr, k=-1))
    frames = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    first = open_image(buf.getvalue())
    assert np.asarray(to_rgb(first))[0, 0, 0] == 10
