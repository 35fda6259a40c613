"""Ambient Diffusion's masks, further corruption, downup, colour shift, per-sample determinism and
mask/augmentation coherence, against closed forms and independent references.

Masks: drop fractions against the binomial spread, exact box and patch areas, shapes; further
corruption: survival (1 - p)(1 - delta) and Ã <= A; downup: constants stay constant and integer
factors equal a numpy block mean followed by a numpy half-pixel bilinear; colour shift: its meta
reproduces the output; determinism: the same key gives the same corruption in any instance, order,
epoch or process; coherence: masks follow crops and flips (checked against Pillow's NEAREST resize
and against pixels whose value marks them hidden), and shapes folders load back with their masks.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from microdiff.ambient.corruptions import (CORRUPTIONS, MASK_CORRUPTIONS, apply_corruption, box, colour_shift,
                                           downup, dust, fixed_box, further_mask, keep_patch, parse_corruption,
                                           sample_generator)
from microdiff.ambient.dataset import CorruptedDataset, corrupt_record, pick_corruption
from microdiff.data.captioned import ImageFolderDataset, collate_records
from microdiff.data.report import DataError
from microdiff.data.shapes import ShapesDataset, collate_shapes, write_shapes_folder
from microdiff.data.transforms import CropParams, ImageTransform, resized_size, transform_mask


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _images(shape, seed=0, dtype=torch.float32):
    return torch.rand(shape, generator=_gen(seed), dtype=dtype) * 2 - 1


def _within_binomial(fraction, p, n, k=4.5):
    return abs(fraction - p) < k * np.sqrt(p * (1 - p) / n)


# ----------------------------------------------------------------------------- masks
def test_dust_drop_fraction_shapes_and_zeros():
    x = _images((4, 3, 48, 48), seed=1)
    y, mask, meta = dust(x, 0.3, _gen(2))
    assert mask.shape == (4, 1, 48, 48) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert _within_binomial(float(mask.mean()), 0.7, mask.numel())
    assert torch.equal(y, x * mask) and meta[0] == {"corruption": "dust", "p": 0.3, "per_element": False,
                                                     "observed_fraction": float(mask[0].mean())}
    y, mask, meta = dust(x, 0.3, _gen(2), per_element=True)
    assert mask.shape == (4, 3, 48, 48) and torch.equal(y, x * mask) and meta[0]["per_element"] is True
    assert _within_binomial(float(mask.mean()), 0.7, mask.numel())
    both = float((mask[:, 0] * mask[:, 1]).mean())  # channels independent: P(both observed) = 0.49
    assert _within_binomial(both, 0.49, mask[:, 0].numel())
    assert float(dust(x, 0.0, _gen(2))[1].min()) == 1.0


def _hidden_square(mask2d, inside):
    """(top, left, side) of the one square where mask2d == inside, checking it is a full square."""
    rows, cols = torch.nonzero(mask2d == inside, as_tuple=True)
    top, left = int(rows.min()), int(cols.min())
    side = int(rows.max()) - top + 1
    assert int(cols.max()) - left + 1 == side and len(rows) == side * side
    return top, left, side


@pytest.mark.parametrize("size, side", [(0.25, 5), (7, 7), (0.01, 1)])
def test_box_hides_one_square_of_exact_area_at_random_places(size, side):
    x = _images((300, 1, 20, 32), seed=3)
    y, mask, meta = box(x, size, _gen(4))
    assert mask.shape == (300, 1, 20, 32) and torch.equal(y, x * mask)
    corners = []
    for m, info in zip(mask, meta):
        assert int((m == 0).sum()) == side * side
        corners.append(_hidden_square(m[0], 0.0))
        assert corners[-1] == (info["top"], info["left"], side) and info["size_px"] == side
    tops, lefts = zip(*[(t, l) for t, l, _ in corners])
    assert min(tops) == 0 and max(tops) == 20 - side and min(lefts) == 0 and max(lefts) == 32 - side


def test_fixed_box_same_square_in_every_image():
    x = _images((5, 3, 16, 24), seed=5)
    _, mask, meta = fixed_box(x, 0.25)  # 4 px, centred by default
    assert all(torch.equal(m, mask[0]) for m in mask)
    assert _hidden_square(mask[0, 0], 0.0) == ((16 - 4) // 2, (24 - 4) // 2, 4)
    assert _hidden_square(fixed_box(x, 6, top=0, left=1.0)[1][3, 0], 0.0) == (0, 24 - 6, 6)
    assert _hidden_square(fixed_box(x, 6, top=3, left=0.0)[1][0, 0], 0.0) == (3, 0, 6)
    assert meta[0]["top"] == 6 and meta[0]["observed_fraction"] == pytest.approx(1 - 16 / (16 * 24))


def test_keep_patch_observes_exactly_one_square():
    x = _images((50, 3, 16, 16), seed=6)
    y, mask, meta = keep_patch(x, 8, _gen(7))
    for m, info in zip(mask, meta):
        assert int(m.sum()) == 64 and _hidden_square(m[0], 1.0) == (info["top"], info["left"], 8)
    assert torch.equal(y, x * mask) and len({(m["top"], m["left"]) for m in meta}) > 10
    assert float(keep_patch(x, 1.0, _gen(7))[1].min()) == 1.0  # the whole image kept: nothing hidden


def test_further_mask_survival_subset_purity_and_blocks():
    a = dust(torch.zeros(8, 1, 64, 64), 0.4, _gen(8))[1]
    before = a.clone()
    tilde = further_mask(a, 0.25, _gen(9))
    assert torch.equal(a, before) and tilde.shape == a.shape
    assert bool((tilde <= a).all())
    assert _within_binomial(float(tilde.mean()), 0.6 * 0.75, a.numel())
    survived = float(tilde[a == 1].mean())  # of the observed elements, 1 - delta survive
    assert _within_binomial(survived, 0.75, int(a.sum()))
    assert torch.equal(further_mask(a, 0.25, _gen(9)), tilde) and torch.equal(further_mask(a, 0.0, _gen(1)), a)
    per_element = further_mask(torch.ones(2, 3, 32, 32), 0.5, _gen(10))
    assert not torch.equal(per_element[:, 0], per_element[:, 1])  # B drawn per element of A's shape
    blocks = further_mask(torch.ones(4, 1, 32, 32), 0.5, _gen(11), block=8)
    tiles = blocks.unfold(2, 8, 8).unfold(3, 8, 8).reshape(4, 16, 64)
    assert bool((tiles == tiles[..., :1]).all()) and 0 < float(blocks.mean()) < 1
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"delta .* must be in \[0, 1\)"):
            further_mask(a, bad)


# ----------------------------------------------------------------------------- downup and colour
@pytest.mark.parametrize("down", ["area", "bilinear"])
@pytest.mark.parametrize("up", ["bilinear", "bicubic"])
@pytest.mark.parametrize("factor", [2, 3, 2.5])
def test_downup_keeps_constants(down, up, factor):
    x = torch.full((2, 3, 17, 24), -0.37, dtype=torch.float64)
    y, meta = downup(x, factor, down, up)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-12)
    assert meta[0] == {"corruption": "downup", "factor": float(factor), "down": down, "up": up,
                       "low_res": [round(17 / factor), round(24 / factor)]}


def _bilinear_matrix(n_in, n_out):
    """(n_out, n_in) half-pixel bilinear weights: source = (i + 0.5) n_in / n_out - 0.5, clamped at 0."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1, frac = min(i0 + 1, n_in - 1), src - np.floor(src)
        m[i, i0] += 1 - frac
        m[i, i1] += frac
    return m


def test_downup_area_integer_factor_matches_block_mean_then_bilinear():
    x = _images((2, 3, 12, 20), seed=12, dtype=torch.float64)
    got, _ = downup(x, 4)
    low = x.numpy().reshape(2, 3, 3, 4, 5, 4).mean(axis=(3, 5))
    want = np.einsum("oh,bchw,pw->bcop", _bilinear_matrix(3, 12), low, _bilinear_matrix(5, 20))
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(downup(x, 1)[0], x, rtol=0, atol=1e-12)


def test_colour_shift_meta_reproduces_the_output():
    x = _images((4, 3, 8, 8), seed=13, dtype=torch.float64)
    y, meta = colour_shift(x, 0.2, 0.1, _gen(14))
    for image, out, info in zip(x, y, meta):
        g, o = np.asarray(info["gains"]), np.asarray(info["offsets"])
        assert info["mode"] == "random" and np.all(np.abs(g - 1) <= 0.2) and np.all(np.abs(o) <= 0.1)
        want = np.clip(g[:, None, None] * image.numpy() + o[:, None, None], -1, 1)
        np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=1e-15)
        again, _ = colour_shift(image[None], gains=info["gains"], offsets=info["offsets"])
        assert torch.equal(again[0], out)
    assert meta[0]["gains"] != meta[1]["gains"]  # per image
    assert torch.equal(colour_shift(x, 0.2, 0.1, _gen(14))[0], y)  # deterministic from the generator
    fixed, fixed_meta = colour_shift(x, offsets=[0.5, 0.0, -0.5])
    assert torch.equal(fixed, (x + torch.tensor([0.5, 0.0, -0.5], dtype=x.dtype).view(1, 3, 1, 1)).clamp(-1, 1))
    assert fixed_meta[0] == {"corruption": "colour_shift", "mode": "fixed", "gains": [1.0] * 3,
                             "offsets": [0.5, 0.0, -0.5]}


# ----------------------------------------------------------------------------- registry
def test_registry_short_forms_and_dispatch():
    assert MASK_CORRUPTIONS <= set(CORRUPTIONS)
    assert parse_corruption("dust:0.3") == {"name": "dust", "p": 0.3}
    assert parse_corruption("dust:0.3:true") == {"name": "dust", "p": 0.3, "per_element": True}
    assert parse_corruption("box:0.25") == {"name": "box", "size": 0.25}
    assert parse_corruption("box:16") == {"name": "box", "size": 16}
    assert parse_corruption("fixed_box:8:0:0.5") == {"name": "fixed_box", "size": 8, "top": 0, "left": 0.5}
    assert parse_corruption("keep_patch:0.5") == {"name": "keep_patch", "size": 0.5}
    assert parse_corruption("downup:4:bilinear:bicubic") == {"name": "downup", "factor": 4.0, "down": "bilinear",
                                                             "up": "bicubic"}
    assert parse_corruption("colour_shift") == {"name": "colour_shift"}
    assert parse_corruption("colour_shift:0.2:0.05") == {"name": "colour_shift", "gain": 0.2, "offset": 0.05}
    x = _images((2, 3, 16, 16), seed=15)
    for spec, direct in [({"name": "dust", "p": 0.5, "per_element": True}, lambda: dust(x, 0.5, _gen(1), True)),
                         ({"name": "box", "size": 4}, lambda: box(x, 4, _gen(1))),
                         ({"name": "fixed_box", "size": 4, "top": 2}, lambda: fixed_box(x, 4, 2)),
                         ({"name": "keep_patch", "size": 0.5}, lambda: keep_patch(x, 0.5, _gen(1)))]:
        result, (images, mask, meta) = apply_corruption(x, spec, _gen(1)), direct()
        assert torch.equal(result.images, images) and torch.equal(result.mask, mask) and result.meta == meta
    assert apply_corruption(x, {"name": "downup", "factor": 2}).mask is None


@pytest.mark.parametrize("call, message", [
    (lambda x: dust(x, 1.0), "p (the probability of hiding a pixel) must be in [0, 1)"),
    (lambda x: dust(x, 0.5, per_element=1), "per_element must be true or false"),
    (lambda x: box(x, 9), "9 pixels must be in 1..8"),
    (lambda x: box(x, 1.0), "hides the whole 8x8 image"),
    (lambda x: box(x, 4.0), "a float is a fraction of the short side"),
    (lambda x: fixed_box(x, 4, top=5), "puts the box outside the image; use 0..4"),
    (lambda x: keep_patch(x, "big"), "must be an int (pixels) or a float"),
    (lambda x: downup(x, 0.5), "factor must be a number >= 1"),
    (lambda x: downup(x, 2, up="nearest"), "up must be one of bilinear, bicubic"),
    (lambda x: colour_shift(x, gain=0.1, gains=[1, 1, 1]), "not both"),
    (lambda x: colour_shift(x, offsets=[0.1, 0.2]), "3 numbers (one per channel)"),
    (lambda x: colour_shift(x, gain=1.5), "gain (the largest relative gain change) must be in [0, 1)"),
    (lambda x: apply_corruption(x, {"name": "box"}), "missing ['size']"),
    (lambda x: parse_corruption("dust:0.3:maybe"), "per_element must be true or false"),
    (lambda x: parse_corruption("box"), "box:<size>"),
    (lambda x: sample_generator(3), "key must be a string"),
])
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError) as error:
        call(torch.zeros(2, 3, 8, 8))
    assert message in str(error.value) and "\n" not in str(error.value)


# ----------------------------------------------------------------------------- determinism
def test_sample_generator_depends_on_seed_and_key_only_in_any_process():
    draws = {(k, s): torch.rand(4, generator=sample_generator(k, s)).tolist() for k in ("a", "b") for s in (0, 1)}
    assert len({tuple(v) for v in draws.values()}) == 4
    assert torch.rand(4, generator=sample_generator("a", 0)).tolist() == draws[("a", 0)]
    code = ("import torch; from microdiff.ambient.corruptions import sample_generator; "
            "print(torch.rand(4, generator=sample_generator('a', 1)).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert json.loads(out.stdout) == draws[("a", 1)]  # not Python's salted hash()


class _Records(torch.utils.data.Dataset):
    """A list of records as a map-style dataset."""

    def __init__(self, records, resolution):
        self.records, self.resolution = records, resolution

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]


MIXTURE = [(0.3, "dust:0.5"), (0.3, "noise:0.2"), (0.3, {"name": "box", "size": 0.25})]


def test_corrupted_dataset_is_a_function_of_key_and_seed():
    shapes = ShapesDataset(12, resolution=16, seed=1)
    a, b = CorruptedDataset(shapes, MIXTURE, seed=3), CorruptedDataset(shapes, MIXTURE, seed=3)
    first = [a[i] for i in range(12)]
    again = [b[i] for i in reversed(range(12))][::-1]
    b.set_epoch(5)
    third = [b[i] for i in range(12)]
    for x, y, z in zip(first, again, third):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"]) and x["meta"] == y["meta"]
        assert torch.equal(x["image"], z["image"]) and torch.equal(x["mask"], z["mask"])
    kinds = [r["meta"]["corruption"] for r in first]
    assert {"dust", "noise", "box"} <= set(kinds)
    other = [CorruptedDataset(shapes, MIXTURE, seed=4)[i] for i in range(12)]
    assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(first, other))
    noisy = next(r for r in first if r["meta"]["corruption"] == "noise")
    assert noisy["meta"]["sigma_tn"] == 0.2 and noisy["meta"]["quality"] == 0.0
    boxed = next(r for r in first if r["meta"]["corruption"] == "box")
    assert int((boxed["mask"] == 0).sum()) == 16 and boxed["meta"]["corruption_params"]["size_px"] == 4
    batch = collate_shapes(first)
    assert batch["mask"].shape == (12, 1, 16, 16)


def test_same_key_same_corruption_different_keys_differ():
    image = _images((3, 16, 16), seed=16)
    records = [{"image": image, "caption": "", "key": k, "meta": {}} for k in ("cat", "dog", "cat")]
    out = [CorruptedDataset(_Records(records, 16), "dust:0.5", seed=0)[i] for i in range(3)]
    assert torch.equal(out[0]["mask"], out[2]["mask"]) and not torch.equal(out[0]["mask"], out[1]["mask"])
    # without augmentation the dataset draws exactly what the operator draws after the mixture's uniform
    for spec in ({"name": "dust", "p": 0.5}, {"name": "noise", "sigma": 0.3}, {"name": "keep_patch", "size": 5}):
        generator = sample_generator("dog", 7)
        torch.rand((), generator=generator, dtype=torch.float64)
        want = apply_corruption(image[None], spec, generator)
        got = corrupt_record(records[1], [(1.0, spec)], seed=7)
        assert torch.equal(got["image"], want.images[0]) and got["meta"]["corruption_params"] == {
            k: v for k, v in want.meta[0].items() if k != "corruption"}
    assert pick_corruption([(0.2, "a"), (0.3, "b")], 0.45) == "b" and pick_corruption([(0.2, "a")], 0.2) is None


# ----------------------------------------------------------------------------- coherence
def test_transform_mask_matches_pillow_nearest_crop_and_flip():
    rng = np.random.default_rng(0)
    mask = (rng.random((23, 37)) < 0.5).astype(np.uint8)
    for resolution, crop in [(16, "random"), (9, "center"), (30, "random")]:
        transform = ImageTransform(resolution, crop=crop, flip=True)
        for seed in range(4):
            params = transform.sample_params(37, 23, np.random.default_rng(seed))
            w, h = resized_size(37, 23, resolution)
            ref = Image.fromarray(mask * 255).resize((w, h), Image.NEAREST)
            ref = ref.crop((params.left, params.top, params.left + params.size, params.top + params.size))
            ref = np.asarray(ref.transpose(Image.FLIP_LEFT_RIGHT) if params.flip else ref) // 255
            assert np.array_equal(transform_mask(mask, params), ref)
            stacked = torch.from_numpy(np.stack([mask, 1 - mask])).float()
            got = transform_mask(stacked, params)
            assert got.dtype == torch.float32 and np.array_equal(got[0].numpy(), ref)
            assert np.array_equal(got[1].numpy(), 1 - ref)
    with pytest.raises(ValueError, match="does not fit a 37x23 mask"):
        transform_mask(mask, CropParams(0, 30, 16, False))


def _marked_folder(path, height, width, seed=0):
    """An image whose hidden pixels (and only those) are pure red, with its mask sidecar."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 200, (height, width, 3), dtype=np.uint8)
    mask = (rng.random((height, width)) < 0.6).astype(np.uint8)
    pixels[mask == 0] = (255, 0, 0)
    path.mkdir()
    Image.fromarray(pixels).save(path / "a.png")
    np.save(path / "a.mask.npy", mask)
    (path / "a.json").write_text(json.dumps({"caption": "marked", "mask_file": "a.mask.npy"}))
    return mask


def test_mask_sidecar_follows_random_crops_and_flips(tmp_path):
    _marked_folder(tmp_path / "f", 16, 24)
    ds = ImageFolderDataset(tmp_path / "f", ImageTransform(16, crop="random", flip=True), progress=False)
    seen = set()
    for epoch in range(10):
        ds.set_epoch(epoch)
        rec = ds[0]
        red = (rec["image"][0] == 1) & (rec["image"][1] == -1) & (rec["image"][2] == -1)
        assert rec["mask"].shape == (1, 16, 16) and torch.equal(rec["mask"][0] == 0, red)
        crop = rec["meta"]["crop"]
        assert crop["frame"] == [16, 24] and crop["size"] == 16 and crop["top"] == 0
        seen.add((crop["left"], crop["flip"]))
    assert len({flip for _, flip in seen}) == 2 and len({left for left, _ in seen}) > 2


def test_corrupted_dataset_masks_and_noise_follow_flips_and_random_crops(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "f").mkdir()
    Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(tmp_path / "f" / "a.png")
    (tmp_path / "f" / "a.txt").write_text("noise")
    source = ImageFolderDataset(tmp_path / "f", ImageTransform(16, crop="random", flip=True), progress=False)
    frames = {"dust": np.full((16, 24), np.nan), "noise": np.full((3, 16, 24), np.nan)}
    flips = set()
    for epoch in range(12):
        source.set_epoch(epoch)
        clean = source[0]
        crop = clean["meta"]["crop"]
        flips.add(crop["flip"])
        window = np.s_[..., crop["top"]:crop["top"] + 16, crop["left"]:crop["left"] + 16]
        for name, spec in (("dust", "dust:0.5:false"), ("noise", "noise:0.3")):
            data = CorruptedDataset(source, spec, seed=2)
            rec = data[0]
            field = rec["mask"][0] if name == "dust" else rec["image"] - clean["image"]
            field = (field.flip(-1) if crop["flip"] else field).double().numpy()  # back to the frame
            known = frames[name][window]
            agree = np.isnan(known) | (np.abs(known - field) < 1e-6)
            assert agree.all(), (name, epoch)
            frames[name][window] = field
            if name == "dust":  # hidden pixels are zero, observed ones untouched
                hidden = (rec["mask"] == 0).expand(3, -1, -1)
                assert bool((rec["image"][hidden] == 0).all())
                assert torch.equal(rec["image"][~hidden], clean["image"][~hidden])
    assert flips == {True, False} and not np.isnan(frames["dust"]).all()


def test_shapes_folder_with_masks_loads_back(tmp_path):
    for spec in ("box:0.25", "dust:0.3", "keep_patch:8", "fixed_box:5", "mask:0.5:2", "dust:0.3:true"):
        out = tmp_path / spec.replace(":", "_")
        paths = write_shapes_folder(out, 3, resolution=16, seed=4, corruption=spec, progress=False)
        shapes = ShapesDataset(3, resolution=16, seed=4, corruption=spec)
        loaded = {r["key"]: r for r in ImageFolderDataset(out, ImageTransform(16), progress=False)}
        flipped = ImageFolderDataset(out, ImageTransform(16, flip=True), progress=False, seed=1)
        for i, png in enumerate(paths):
            meta = json.loads(png.with_suffix(".json").read_text())
            original = np.load(out / meta["mask_file"])
            rec, item = loaded[png.stem], shapes[i]
            assert np.array_equal(rec["mask"].numpy().reshape(original.shape), original)
            assert torch.equal(rec["mask"], item["mask"]) and rec["meta"]["corruption"] == spec.split(":")[0]
            rec = flipped[i]
            want = item["mask"].flip(-1) if rec["meta"]["crop"]["flip"] else item["mask"]
            assert torch.equal(rec["mask"], want)
        batch = collate_records([loaded[p.stem] for p in paths])
        assert batch["mask"].shape == (3, 3 if spec.endswith("true") else 1, 16, 16)


def test_bad_mask_sidecars_are_reported_with_the_file(tmp_path):
    _marked_folder(tmp_path / "f", 16, 16)
    np.save(tmp_path / "f" / "a.mask.npy", np.ones((8, 8), np.uint8))
    with pytest.raises(DataError) as error:
        ImageFolderDataset(tmp_path / "f", ImageTransform(16), on_error="raise", progress=False)[0]
    message = str(error.value)
    assert "a.mask.npy: it is 8x8 (W x H) but the image is 16x16" in message and "\n" not in message
    np.save(tmp_path / "f" / "a.mask.npy", np.full((16, 16), 2, np.uint8))
    ds = ImageFolderDataset(tmp_path / "f", ImageTransform(16), progress=False)
    assert ds[0] is None and ds.report.counts == {"bad mask": 1}
    with pytest.raises(ValueError, match="can only follow the image through an ImageTransform"):
        ImageFolderDataset(tmp_path / "f", lambda image, rng=None: torch.zeros(3, 16, 16), progress=False)[0]


def test_shapes_dataset_covers_every_mask_kind():
    data = ShapesDataset(6, resolution=16, seed=0, corruption=[(0.5, "keep_patch:8")])
    assert data.has_mask and all(data[i]["mask"].shape == (1, 16, 16) for i in range(6))
    mixed = ShapesDataset(6, resolution=16, seed=0, corruption=[(0.5, "dust:0.3:true"), (0.5, "box:4")])
    assert {tuple(mixed[i]["mask"].shape) for i in range(6)} == {(3, 16, 16)}
    with pytest.raises(ValueError, match="20 pixels must be in 1..16"):
        ShapesDataset(2, resolution=16, corruption="box:20")
    assert ShapesDataset(1, resolution=32, corruption="box:20")[0]["meta"]["corruption_params"]["size_px"] == 20
    with pytest.raises(ValueError, match="pass resolution="):
        CorruptedDataset([{"image": torch.zeros(3, 8, 8)}], "dust:0.1")
