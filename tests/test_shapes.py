"""The procedural shapes dataset, checked from the pixels it renders.

Colour, position, size and shape are measured from each image (background from a corner, object
pixels by distance to it, mean colour of the eroded interior, centroid, area, fill ratio of the
bounding box) and compared with the caption's words; metadata is checked against those
measurements, not the other way round. Also: determinism in (seed, index) alone, coverage of every
attribute value, caption variety, non-overlap of two objects, odd resolutions, corrupted variants,
the folder writer, the CLI and errors.
"""

import json
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from microdiff.data.shapes import (BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, ShapesDataset, caption_for,
                                   collate_shapes, render_shapes, sample_attributes, shapes_grid,
                                   write_shapes_folder)

NOMINAL = {"red": (225, 30, 35), "green": (35, 175, 55), "blue": (30, 75, 230), "yellow": (245, 215, 20),
           "purple": (140, 45, 200), "orange": (250, 130, 10)}  # written out again: the spec, not the code


def _pixels(item) -> np.ndarray:
    return np.rint((item["image"].permute(1, 2, 0).double().numpy() + 1) * 127.5)


def _measure(img: np.ndarray) -> dict:
    """Object statistics from an (H, W, 3) 0..255 image with one object on a plain background."""
    bg = img[0, 0]
    distance = np.abs(img - bg).max(axis=-1)
    obj = distance > 40
    interior = ndimage.binary_erosion(obj, iterations=1)
    ys, xs = np.nonzero(obj)
    res = img.shape[0]
    colour = img[interior].mean(axis=0) if interior.any() else img[obj].mean(axis=0)
    direction = colour - bg  # coverage of each pixel: its position between background and colour
    alpha = np.clip((img - bg) @ direction / (direction @ direction), 0, 1)
    return {"background": bg, "colour": colour, "area": obj.sum() / res**2,
            "coverage_area": alpha.sum(),  # and the fraction of its (coverage) bounding box it fills:
            "fill": alpha.sum() / (alpha.max(axis=0).sum() * alpha.max(axis=1).sum()),
            "centroid": (xs.mean() + 0.5) / res, "centroid_y": (ys.mean() + 0.5) / res,
            "nearest": min(NOMINAL, key=lambda c: np.abs(np.array(NOMINAL[c]) - colour).max())}


# ----------------------------------------------------------------------------- determinism
def test_items_depend_on_seed_and_index_only():
    a, b = ShapesDataset(20, resolution=24, seed=3), ShapesDataset(1000, resolution=24, seed=3)
    forward = [a[i] for i in range(20)]
    backward = [b[i] for i in reversed(range(20))][::-1]
    for x, y in zip(forward, backward):
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"]
        assert x["key"] == y["key"] and x["meta"] == y["meta"]
    assert torch.equal(a[-1]["image"], forward[19]["image"])
    images = {f["image"].numpy().tobytes() for f in forward}
    assert len(images) == 20  # different index -> different image
    assert not torch.equal(ShapesDataset(20, 24, seed=4)[0]["image"], forward[0]["image"])


def test_no_two_images_identical_and_values_in_range():
    data = ShapesDataset(300, resolution=16, seed=0)
    images = [data[i]["image"] for i in range(300)]
    assert len({im.numpy().tobytes() for im in images}) == 300
    stack = torch.stack(images)
    assert stack.dtype == torch.float32 and stack.shape == (300, 3, 16, 16)
    assert float(stack.min()) >= -1 and float(stack.max()) <= 1


# ----------------------------------------------------------------------------- attributes
def test_attribute_statistics_cover_every_value():
    data = ShapesDataset(600, resolution=8, seed=1)
    metas = [data[i]["meta"] for i in range(600)]
    for field, values in [("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS),
                          ("background", BACKGROUNDS)]:
        counts = Counter(m[field] for m in metas)
        assert set(counts) == set(values), field
        expected = 600 / len(values)  # uniform choice: every count within ~4.5 binomial std
        assert all(abs(c - expected) < 4.5 * math.sqrt(expected) for c in counts.values()), (field, counts)
    assert all(m["source"] == "shapes" and m["quality"] == 1.0 and m["corruption"] == "none" for m in metas)
    json.dumps(metas)


def test_rendered_pixels_match_colour_position_size_shape_and_background():
    data = ShapesDataset(90, resolution=64, seed=2)
    areas = {"small": [], "large": []}
    fills = {s: [] for s in SHAPES}
    for i in range(90):
        item = data[i]
        meta, m = item["meta"], _measure(_pixels(item))
        assert np.abs(m["colour"] - NOMINAL[meta["colour"]]).max() <= 14, (i, meta["colour"], m["colour"])
        assert m["nearest"] == meta["colour"]
        assert np.abs(m["background"] - BACKGROUNDS[meta["background"]]).max() <= 8
        x, y = m["centroid"], m["centroid_y"]
        inside = {"center": abs(x - 0.5) < 0.07 and abs(y - 0.5) < 0.07,
                  "left": x < 0.4 and abs(y - 0.5) < 0.09, "right": x > 0.6 and abs(y - 0.5) < 0.09,
                  "top": y < 0.4 and abs(x - 0.5) < 0.09, "bottom": y > 0.6 and abs(x - 0.5) < 0.09}
        assert inside[meta["position"]], (i, meta["position"], x, y)
        # the metadata's exact geometry agrees with the pixels
        assert np.hypot(x * 64 - meta["centre_px"][0], y * 64 - meta["centre_px"][1]) < 0.6
        assert m["coverage_area"] == pytest.approx(math.pi * meta["radius_px"] ** 2, rel=0.03)
        areas[meta["size"]].append(m["area"])
        fills[meta["shape"]].append(m["fill"])
    assert max(areas["small"]) < min(areas["large"])
    # area over the bounding box (both from coverage): circle pi/4, square 1, triangle 1/2
    assert 0.74 < min(fills["circle"]) and max(fills["circle"]) < 0.84
    assert min(fills["square"]) > 0.97
    assert 0.45 < min(fills["triangle"]) and max(fills["triangle"]) < 0.65


def test_edges_are_anti_aliased():
    attributes = {"background": "black", "objects": [
        {"shape": "circle", "colour": "red", "size": "large", "position": "center", "centre": [0.5, 0.5],
         "radius": 0.2}]}
    red = np.asarray(render_shapes(attributes, 32))[..., 0].astype(int)
    partial = (red > 10) & (red < 215)
    assert partial.sum() >= 20  # a rim of intermediate values, not a hard stair-step
    attributes["objects"][0]["rgb"] = [200, 0, 0]
    assert np.asarray(render_shapes(attributes, 32))[16, 16, 0] == 200  # explicit rgb is honoured


@pytest.mark.parametrize("resolution", [8, 16, 37, 512])
def test_any_resolution(resolution):
    item = ShapesDataset(1, resolution=resolution, seed=5)[0]
    assert item["image"].shape == (3, resolution, resolution)
    m = _measure(_pixels(item))
    assert 0.002 < m["area"] < 0.5
    assert m["nearest"] == item["meta"]["colour"] or resolution < 16  # tiny objects have no interior


# ----------------------------------------------------------------------------- captions
_SIZE_WORDS = {"small": {"small", "little"}, "large": {"large", "big"}}
_POSITION_WORDS = {"center": ("center", "middle"), "left": ("left",), "right": ("right",), "top": ("top",),
                   "bottom": ("bottom",)}


def test_captions_name_colour_and_shape_and_state_only_true_facts():
    data = ShapesDataset(300, resolution=8, seed=6)
    templates, has = Counter(), Counter()
    for i in range(300):
        item = data[i]
        caption, meta = item["caption"], item["meta"]
        words = re.findall(r"[a-z]+", caption)
        assert meta["colour"] in words and meta["shape"] in words, caption
        assert set(words) & set(COLOURS) == {meta["colour"]} and set(words) & set(SHAPES) == {meta["shape"]}
        size_words = set(words) & (_SIZE_WORDS["small"] | _SIZE_WORDS["large"])
        assert size_words <= _SIZE_WORDS[meta["size"]], caption
        position_words = set(words) & {w for ws in _POSITION_WORDS.values() for w in ws}
        assert position_words <= set(_POSITION_WORDS[meta["position"]]), caption
        assert set(words) & set(BACKGROUNDS) <= {meta["background"]}, caption
        has["size"] += bool(size_words)
        has["position"] += bool(position_words)
        has["background"] += meta["background"] in words
        template = caption
        for word in [meta["colour"], meta["shape"], meta["background"], *size_words, *position_words]:
            template = re.sub(rf"\b{word}\b", "_", template)
        templates[template] += 1
        assert not re.search(r"\ba [aeiou]", caption) and not re.search(r"\ban [^aeiou ]", caption), caption
    assert all(60 < has[k] < 290 for k in ("size", "position", "background")), has  # sometimes, not always
    assert len(templates) >= 25, templates.most_common(5)


def test_caption_for_is_a_function_of_its_rng():
    attributes = sample_attributes(np.random.default_rng(0))
    a = [caption_for(attributes, np.random.default_rng(s)) for s in range(30)]
    assert a == [caption_for(attributes, np.random.default_rng(s)) for s in range(30)]
    assert len(set(a)) > 10


# ----------------------------------------------------------------------------- two objects
def test_two_objects_do_not_overlap_and_are_both_captioned():
    for i in range(80):
        attributes = sample_attributes(np.random.default_rng([7, i]), objects=2)
        first, second = attributes["objects"]
        assert first["position"] != second["position"]
        masks = []
        for obj in (first, second):
            alone = render_shapes({**attributes, "objects": [obj]}, 48)
            masks.append(np.abs(np.asarray(alone, int) - np.asarray(attributes["background_rgb"])).max(-1) > 0)
        assert masks[0].any() and masks[1].any()
        assert not (ndimage.binary_dilation(masks[0]) & masks[1]).any(), i  # at least one clear pixel apart
        caption = caption_for(attributes, np.random.default_rng(i))
        for obj in (first, second):
            assert obj["colour"] in caption and obj["shape"] in caption
        assert " and " in caption
    item = ShapesDataset(3, resolution=32, seed=1, objects=2)[2]
    assert len(item["meta"]["objects"]) == 2 and item["meta"]["shape"] == item["meta"]["objects"][0]["shape"]


# ----------------------------------------------------------------------------- corrupted variants
def test_noise_variant_metadata_and_residual():
    clean = ShapesDataset(6, resolution=32, seed=8)
    noisy = ShapesDataset(6, resolution=32, seed=8, corruption={"name": "noise", "sigma": 0.2})
    residual = []
    for i in range(6):
        item = noisy[i]
        assert item["meta"]["corruption"] == "noise" and item["meta"]["sigma_tn"] == 0.2
        assert item["meta"]["quality"] == 0.0 and item["meta"]["corruption_params"] == {"sigma": 0.2}
        assert item["caption"] == clean[i]["caption"]
        residual.append(item["image"] - clean[i]["image"])
    r = torch.stack(residual)
    assert abs(float(r.std()) - 0.2) < 4 * 0.2 / math.sqrt(2 * r.numel())
    assert float(torch.stack([noisy[i]["image"] for i in range(6)]).abs().max()) > 1  # not clipped
    assert torch.equal(noisy[3]["image"], noisy[3]["image"])


def test_mixture_of_clean_and_corrupted_with_masks():
    mixture = [(0.25, "mask:0.5:2"), (0.25, {"name": "blur", "sigma_px": 1.0}), (0.25, "jpeg:10")]
    data = ShapesDataset(400, resolution=8, seed=9, corruption=mixture)
    clean = ShapesDataset(400, resolution=8, seed=9)
    counts = Counter()
    for i in range(400):
        item, reference = data[i], clean[i]
        kind = item["meta"]["corruption"]
        counts[kind] += 1
        assert item["mask"].shape == (1, 8, 8)
        if kind == "none":
            assert torch.equal(item["image"], reference["image"]) and float(item["mask"].min()) == 1
            assert item["meta"]["quality"] == 1.0
        elif kind == "mask":
            observed = item["mask"].bool().expand(3, -1, -1)
            assert torch.equal(item["image"][observed], reference["image"][observed])
            assert bool((item["image"][~observed] == 0).all())
            assert item["meta"]["corruption_params"]["observed_fraction"] == float(item["mask"].mean())
    assert set(counts) == {"none", "mask", "blur", "jpeg"}
    assert all(abs(c - 100) < 4.5 * math.sqrt(400 * 0.25 * 0.75) for c in counts.values()), counts
    batch = collate_shapes([data[i] for i in range(5)])
    assert batch["image"].shape == (5, 3, 8, 8) and batch["mask"].shape == (5, 1, 8, 8)
    assert len(batch["caption"]) == 5 and len(batch["meta"]) == 5


def test_dataloader_batches():
    loader = torch.utils.data.DataLoader(ShapesDataset(6, resolution=16), batch_size=4, collate_fn=collate_shapes)
    batches = list(loader)
    assert [b["image"].shape[0] for b in batches] == [4, 2] and "mask" not in batches[0]


# ----------------------------------------------------------------------------- files and CLI
def test_write_shapes_folder_triples_read_back(tmp_path):
    paths = write_shapes_folder(tmp_path / "clean", 4, resolution=16, seed=2, progress=False)
    data = ShapesDataset(4, resolution=16, seed=2)
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    for i, png in enumerate(paths):
        pixels = np.asarray(Image.open(png))
        assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
        assert np.array_equal(pixels, _pixels(data[i]).astype(np.uint8))  # lossless
        assert png.with_suffix(".txt").read_text().strip() == data[i]["caption"]
        meta = json.loads(png.with_suffix(".json").read_text())
        assert meta == {**data[i]["meta"], "key": data[i]["key"]}


def test_write_shapes_folder_noise_keeps_exact_values_and_masks(tmp_path):
    noisy = ShapesDataset(2, resolution=16, seed=3, corruption="noise:0.3")
    paths = write_shapes_folder(tmp_path, 2, resolution=16, seed=3, corruption="noise:0.3", progress=False)
    meta = json.loads(paths[0].with_suffix(".json").read_text())
    exact = np.load(tmp_path / meta["exact"])
    assert np.array_equal(exact, noisy[0]["image"].numpy())
    assert meta["sigma_tn"] == 0.3 and 0 < meta["clipped_fraction"] < 1
    png = np.asarray(Image.open(paths[0])).astype(float) / 127.5 - 1
    np.testing.assert_allclose(png, np.clip(exact, -1, 1).transpose(1, 2, 0), atol=0.5 / 127.5 + 1e-6)
    masked = write_shapes_folder(tmp_path / "m", 1, resolution=16, corruption="mask:0.5", progress=False)
    meta = json.loads(masked[0].with_suffix(".json").read_text())
    mask = np.load(tmp_path / "m" / meta["mask_file"])
    assert mask.shape == (16, 16) and set(np.unique(mask)) <= {0, 1}
    assert (np.asarray(Image.open(masked[0]))[mask == 0] == 128).all()  # 0.0 in [-1, 1] -> level 128


def _cli(argv):
    """The command as the lead wires it (``microdiff data shapes``): our add_arguments + run."""
    import argparse

    from microdiff.data import shapes

    parser = argparse.ArgumentParser(prog="microdiff data shapes")
    shapes.add_arguments(parser)
    return shapes.run(parser.parse_args(argv))


def test_cli_writes_folder_and_grid(tmp_path, capsys):
    out, grid = tmp_path / "shapes", tmp_path / "grid.png"
    assert _cli(["--out", str(out), "--n", "3", "--resolution", "12", "--seed", "1", "--objects", "2",
                 "--corruption", "blur:1.5", "--corrupt-fraction", "0.5", "--grid", str(grid), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        f"0000{i}.{e}" for i in range(3) for e in ("json", "png", "txt")]
    assert Image.open(grid).size[0] > 12 and "wrote 3 shapes images" in capsys.readouterr().out
    metas = [json.loads((out / f"0000{i}.json").read_text()) for i in range(3)]
    assert metas == [{**ShapesDataset(3, 12, 1, 2, [(0.5, "blur:1.5")])[i]["meta"],
                      "key": f"shapes-1-{i:06d}"} for i in range(3)]
    for bad in (["--corruption", "rain:1"], ["--resolution", "4"], ["--objects", "3"], ["--corrupt-fraction", "2"],
                ["--n", "-3"]):
        with pytest.raises(SystemExit):
            _cli(["--out", str(out), *bad])
    err = capsys.readouterr().err
    assert "unknown corruption 'rain'" in err and "resolution must be an integer >= 8" in err


def test_shapes_grid_is_an_image_with_one_tile_per_sample():
    grid = shapes_grid(6, resolution=16, seed=0, columns=3)
    assert grid.mode == "RGB" and grid.size[0] == 3 * (16 * 10 + 4) + 4
    plain = shapes_grid(4, resolution=16, captions=False, cell=16)
    assert plain.size == (2 * 20 + 4, 2 * 20 + 4)
    tile = np.asarray(plain)[4:20, 4:20]
    assert np.array_equal(tile, _pixels(ShapesDataset(1, 16)[0]).astype(np.uint8))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, message", [
    ({"resolution": 7}, "resolution must be an integer >= 8"),
    ({"resolution": 32.0}, "resolution must be an integer >= 8"),
    ({"n": -1}, "n (number of samples)"),
    ({"seed": -2}, "seed must be an integer >= 0"),
    ({"objects": 3}, "objects must be 1 or 2"),
    ({"colours": ["red", "pink"]}, "unknown colour 'pink'; choose from red, green"),
    ({"shapes": ["hexagon"]}, "unknown shape 'hexagon'"),
    ({"positions": []}, "position list is empty"),
    ({"objects": 2, "positions": ["left"]}, "at least two positions"),
    ({"objects": 2, "shapes": ["circle"], "colours": ["red"]}, "two different (shape, colour) pairs"),
    ({"palette": ["red"]}, "unknown ShapesDataset options ['palette']"),
    ({"corruption": {"name": "rain"}}, "unknown corruption 'rain'; choose one of blur, noise, jpeg, mask"),
    ({"corruption": "noise"}, "noise:<sigma>"),
    ({"corruption": "noise:-0.1"}, "sigma must be >= 0"),
    ({"corruption": {"name": "jpeg", "quality": 100}}, "quality must be an integer in 1..95"),
    ({"corruption": [(0.7, "noise:0.1"), (0.6, "blur:1")]}, "sum to 1.3 > 1"),
    ({"corruption": [0.5]}, "list of (probability, spec) pairs"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    kwargs = {"n": 4, **kwargs}
    with pytest.raises(ValueError) as error:
        ShapesDataset(**kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_render_and_index_errors():
    attributes = sample_attributes(np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        render_shapes({**attributes, "objects": [{**attributes["objects"][0], "colour": "pink"}]}, 16)
    with pytest.raises(ValueError, match="unknown background 'blue'"):
        render_shapes({**attributes, "background": "blue"}, 16)
    with pytest.raises(ValueError, match="unknown shape 'star'"):
        render_shapes({**attributes, "objects": [{**attributes["objects"][0], "shape": "star"}]}, 16)
    with pytest.raises(IndexError, match="out of range"):
        ShapesDataset(3)[3]
