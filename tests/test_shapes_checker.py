"""The pixel-reading shapes checker, against the dataset's own metadata and captions.

Ground truth is what ShapesDataset drew (meta), never the checker's own output. Measured on 1000
images per setting (seed 123; degradations: Gaussian noise sigma 0.05, Gaussian blur 0.5 px, a
per-channel shift of +-10/255, and all three at once), colour AND shape right:

    32 px 'large' (the demo)   clean / noise / blur / shift / all: 100.0% each
    64 px all sizes, 'small'   clean / noise / blur / shift / all: 100.0% each
    128 px all sizes, 'small'  clean / noise / blur / shift / all: 100.0% each
    32 px 'small' (radius ~2 px) clean 100.0%, noise 99.9%, blur 99.4%, shift 100.0%, all 94.8%
    no wrong answer in any of these 30,000: every miss was None.

The tests below use a few hundred images per setting to stay fast and require >= 99% clean,
>= 95% degraded. Also: None on blank and on shape- or colour-ambiguous images, mismatches, input types,
the prompt parser on thousands of generated captions, and one-line errors.
"""

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from microdiff.ambient.corruptions import gaussian_blur
from microdiff.data.shapes import (BACKGROUNDS, COLOURS, SHAPES, ShapesDataset, caption_for, coverage, render_shapes,
                                   sample_attributes)
from microdiff.eval.shapes_checker import _largest_component, judge_image, judge_prompt, prompt_alignment


def _dataset(n, resolution, seed, **vocabulary):
    """Images in [0, 1] (B, 3, H, W), captions and metadata of the first n dataset items."""
    data = ShapesDataset(n, resolution=resolution, seed=seed, **vocabulary)
    items = [data[i] for i in range(n)]
    return (torch.stack([(item["image"] + 1) / 2 for item in items]), [item["caption"] for item in items],
            [item["meta"] for item in items])


def _object_image(shape="circle", colour="red", background="black", resolution=64, radius=0.2, centre=(0.5, 0.5)):
    attributes = {"background": background, "objects": [{"shape": shape, "colour": colour, "radius": radius,
                                                         "centre": list(centre)}]}
    return render_shapes(attributes, resolution)


def _from_alpha(alpha, rgb, background=(0, 0, 0)):
    """uint8 (H, W, 3) image: ``rgb`` painted with coverage ``alpha`` over ``background``."""
    a = alpha[..., None]
    return np.clip(np.rint(np.asarray(background) * (1 - a) + np.asarray(rgb) * a), 0, 255).astype(np.uint8)


def _accuracy(images, metas, key=("colour", "shape")):
    judged = [judge_image(image) for image in images]
    return np.mean([all(j[k] == m[k] for k in key) for j, m in zip(judged, metas)]), judged


# --- real dataset images ---------------------------------------------------------------------------
def test_demo_setting_32px_large_scores_with_the_captions_as_prompts():
    """The demo's setting, end to end through prompt_alignment. Measured: 100.0% on 1000 images."""
    images, captions, metas = _dataset(500, 32, seed=11, sizes=["large"])
    result = prompt_alignment(images, captions)
    assert result["n"] == 500
    assert result["alignment"] >= 0.99 and result["colour_accuracy"] >= 0.99 and result["shape_accuracy"] >= 0.99
    for row, meta in zip(result["items"], metas):  # the wanted values come from the caption: the meta's
        assert row["wanted"] == {"colour": meta["colour"], "shape": meta["shape"]}
    assert np.mean([row["judged"]["background"] == m["background"] for row, m in zip(result["items"], metas)]) >= 0.99
    json.dumps(result)


@pytest.mark.parametrize("resolution, n, sizes", [(64, 400, None), (64, 200, ["small"]), (128, 100, None)])
def test_larger_images_and_all_sizes(resolution, n, sizes):
    """Measured on 1000 images each: 100.0% (64 px all sizes, 64 px small, 128 px all sizes)."""
    vocabulary = {"sizes": sizes} if sizes else {}
    images, _, metas = _dataset(n, resolution, seed=12, **vocabulary)
    accuracy, judged = _accuracy(images, metas, ("colour", "shape", "background"))
    assert accuracy >= 0.99
    assert all(j["shape_scores"][m["shape"]] > 0.9 for j, m in zip(judged, metas))


def _noise(images):
    return (images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)


def _blur(images):
    return gaussian_blur(images, 0.5)[0].clamp(0, 1)


def _shift(images):
    signs = torch.where(torch.arange(len(images)) % 2 == 0, 1.0, -1.0)
    return (images + signs[:, None, None, None] * torch.tensor([10.0, -10.0, 10.0])[:, None, None] / 255).clamp(0, 1)


@pytest.mark.parametrize("degrade", [_noise, _blur, _shift, lambda x: _noise(_shift(_blur(x)))],
                         ids=["noise0.05", "blur0.5px", "shift10", "all"])
def test_robust_to_mild_degradation(degrade):
    """Measured on 1000 images at 32 px 'large': 100.0% for each."""
    images, _, metas = _dataset(300, 32, seed=13, sizes=["large"])
    accuracy, _ = _accuracy(degrade(images), metas)
    assert accuracy >= 0.95


def test_degraded_answers_are_right_or_none_never_wrong():
    """Under heavy degradation (noise 0.1, blur 1 px, shift 25/255) the checker may abstain but
    should not name a wrong colour or shape (measured on 100 images: 97% right, 3% None, 0 wrong)."""
    images, _, metas = _dataset(100, 32, seed=14, sizes=["large"])
    degraded = gaussian_blur(images, 1.0)[0] + torch.tensor([25.0, -25.0, 25.0])[:, None, None] / 255
    degraded = (degraded + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    judged = [judge_image(image) for image in degraded]
    for key in ("colour", "shape"):
        assert all(j[key] in (None, m[key]) for j, m in zip(judged, metas))


# --- abstaining ------------------------------------------------------------------------------------
@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_blank_image_has_no_object(background):
    blank = torch.tensor(BACKGROUNDS[background], dtype=torch.float32)[:, None, None].expand(3, 32, 32) / 255
    for image in (blank, _noise(blank[None])[0]):
        judged = judge_image(image)
        assert judged["colour"] is None and judged["shape"] is None and judged["object_pixels"] == 0
        assert judged["background"] == background


def test_a_speck_is_not_an_object():
    alpha = np.zeros((32, 32))
    alpha[10, 10:12] = 1.0
    judged = judge_image(_from_alpha(alpha, COLOURS["red"]))
    assert judged["colour"] is None and judged["shape"] is None


def test_shapes_that_are_none_of_the_three_are_none():
    alpha = np.zeros((64, 64))
    alpha[27:37, 17:47] = 1.0  # a 3:1 bar: best IoU 0.45
    assert judge_image(_from_alpha(alpha, COLOURS["red"]))["shape"] is None
    # half circle, half square (coverage averaged): IoU 0.92 vs 0.91, too close to call
    blend = 0.5 * (coverage("circle", (32, 32), 12, 64) + coverage("square", (32, 32), 12, 64))
    judged = judge_image(_from_alpha(blend, COLOURS["red"]))
    assert judged["shape"] is None and judged["colour"] == "red"


def test_colours_between_or_off_the_palette_are_none():
    disc = coverage("circle", (32, 32), 12, 64)
    between = (np.asarray(COLOURS["orange"]) + np.asarray(COLOURS["yellow"])) / 2
    white = judge_image(_from_alpha(disc, (255, 255, 255)))
    assert judge_image(_from_alpha(disc, between))["colour"] is None
    assert white["colour"] is None and white["shape"] == "circle" and white["background"] == "black"


# --- behaviour -------------------------------------------------------------------------------------
def test_mismatched_prompts_score_zero():
    image = _object_image("circle", "red", resolution=32)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    assert prompt_alignment([tensor], ["a blue square"])["alignment"] == 0.0
    wrong_shape = prompt_alignment([tensor], "a red square on a black background")
    wrong_colour = prompt_alignment([tensor], "a big blue circle")
    assert (wrong_shape["alignment"], wrong_shape["colour_accuracy"], wrong_shape["shape_accuracy"]) == (0, 1, 0)
    assert (wrong_colour["alignment"], wrong_colour["colour_accuracy"], wrong_colour["shape_accuracy"]) == (0, 0, 1)
    assert prompt_alignment([tensor], "a red circle")["alignment"] == 1.0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("colour", list(COLOURS))
def test_every_colour_and_shape_on_every_background(shape, colour):
    for background in BACKGROUNDS:
        judged = judge_image(_object_image(shape, colour, background, resolution=32, radius=0.17, centre=(0.4, 0.6)))
        assert (judged["colour"], judged["shape"], judged["background"]) == (colour, shape, background)


def test_input_types_agree():
    pil = _object_image("triangle", "purple", "gray", resolution=48)
    array = np.array(pil)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    verdicts = [judge_image(x) for x in (pil, array, tensor, torch.from_numpy(array).permute(2, 0, 1),
                                         array.astype(np.float32) / 255)]
    assert all(v == verdicts[0] for v in verdicts)
    assert (verdicts[0]["colour"], verdicts[0]["shape"]) == ("purple", "triangle")
    batch = torch.stack([tensor, tensor])
    assert prompt_alignment(batch, ["a purple triangle"] * 2) == prompt_alignment([pil, array], "a purple triangle")


def test_with_two_objects_the_larger_is_judged():
    attributes = {"background": "white", "objects": [
        {"shape": "square", "colour": "blue", "radius": 0.08, "centre": [0.2, 0.2]},
        {"shape": "triangle", "colour": "green", "radius": 0.2, "centre": [0.65, 0.65]}]}
    judged = judge_image(render_shapes(attributes, 64))
    assert (judged["colour"], judged["shape"]) == ("green", "triangle")


def test_largest_component_matches_scipy_label():
    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.6):
        mask = rng.random((40, 50)) < density
        labels, count = ndimage.label(mask)  # 4-connectivity, an independent implementation
        sizes = np.bincount(labels.ravel())[1:]
        got = _largest_component(mask)
        assert got.sum() == sizes.max()
        assert len(np.unique(labels[got])) == 1 and labels[got][0] > 0
    assert not _largest_component(np.zeros((5, 5), bool)).any()


# --- prompts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("objects", [1, 2])
def test_prompt_parser_reads_every_generated_caption(objects):
    for i in range(1500):
        attributes = sample_attributes(np.random.default_rng([i, objects]), objects)
        caption = caption_for(attributes, np.random.default_rng([i, objects, 1]))
        parsed = judge_prompt(caption)
        wanted = [[o["colour"], o["shape"]] for o in attributes["objects"]]
        assert parsed["objects"] == wanted, caption
        assert (parsed["colour"], parsed["shape"]) == tuple(wanted[0]), caption
        assert parsed["background"] in (None, attributes["background"]), caption
        assert (attributes["background"] in caption) == (parsed["background"] is not None), caption
        if objects == 1:
            assert parsed["size"] in (None, attributes["objects"][0]["size"]), caption


@pytest.mark.parametrize("prompt, colour, shape, size, background", [
    ("a large red circle", "red", "circle", "large", None),
    ("a red circle on a black background", "red", "circle", None, "black"),
    ("Grey background, a little Orange Triangle at the top", "orange", "triangle", "small", "gray"),
    ("an image of a big yellow square against a white background", "yellow", "square", "large", "white"),
    ("two purple circles", "purple", "circle", None, None),
    ("a dog", None, None, None, None),
])
def test_prompt_parser_phrasings(prompt, colour, shape, size, background):
    parsed = judge_prompt(prompt)
    got = (parsed["colour"], parsed["shape"], parsed["size"], parsed["background"])
    assert got == (colour, shape, size, background)


# --- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, match", [
    (lambda: prompt_alignment(torch.zeros(2, 3, 32, 32), ["a red circle"]), "got 1 prompts for 2 images"),
    (lambda: prompt_alignment(torch.zeros(1, 3, 32, 32), ["a circle"]), r"prompts\[0\] = 'a circle' names no colour"),
    (lambda: prompt_alignment(torch.zeros(1, 3, 32, 32), ["a red dog"]), r"prompts\[0\] = 'a red dog' names no shape"),
    (lambda: prompt_alignment([], []), "images is empty"),
    (lambda: prompt_alignment(torch.zeros(3, 32, 32), "a red circle"), r"images must be a \(B, 3, H, W\)"),
    (lambda: judge_image(torch.zeros(1, 32, 32)), r"a tensor must be \(3, H, W\)"),
    (lambda: judge_image(np.zeros((32, 32), np.uint8)), r"an array must be \(H, W, 3\)"),
    (lambda: judge_image("image.png"), "image must be a"),
    (lambda: judge_image(torch.full((3, 32, 32), -1.0)), r"values down to -1.00 but must be in \[0, 1\]"),
    (lambda: judge_image(np.zeros((4, 4, 3), np.uint8)), "4 x 4 pixels is too small to judge; give at least 8 x 8"),
    (lambda: judge_prompt(3), "prompt must be a string"),
])
def test_bad_input_is_a_one_line_value_error(call, match):
    with pytest.raises(ValueError, match=match) as error:
        call()
    assert "\n" not in str(error.value)
