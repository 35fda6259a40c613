"""Feature spaces behind one protocol: tiny random DINOv2 / CLIP folders loaded by path and checked
against the transformers models called directly, the pixel/shapes/inception/user-module specs,
``extract``, the recorded names and the one-line errors. Nothing is downloaded."""

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from microdiff.eval import features as feat
from microdiff.eval.features import ClipFeatures, ClipTextFeatures, Features, extract, load_clip, load_features
from microdiff.eval.frechet import pixel_features
from tiny_models import clip_tokenizer, tiny_clip

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
TEXT = ["a red circle on a white background", "two blue squares", "a small green triangle at the top left",
        "a large yellow star", "the background is black"]


def _images(n, h, w, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _clip_tokenizer():
    return clip_tokenizer(TEXT)


def _image_processor(kind, **kwargs):
    import transformers

    name = {"clip": "CLIPImageProcessor", "bit": "BitImageProcessor"}[kind]
    cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name)  # 5.x: PIL backend, no torchvision
    return cls(**kwargs)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A tiny random DINOv2 (hidden 32) and CLIP (projection 16) saved with their processors."""
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("features")
    torch.manual_seed(0)
    dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                    image_size=32, patch_size=8))
    dino.save_pretrained(root / "dinov2")
    _image_processor("bit", size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                     image_mean=MEAN, image_std=STD).save_pretrained(root / "dinov2")
    tok = _clip_tokenizer()
    clip = tiny_clip(len(tok), image_size=32, layers=2)
    clip.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    _image_processor("clip", size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip")
    return {"dinov2": root / "dinov2", "clip": root / "clip"}


# ----------------------------------------------------------------------------- DINOv2

def test_dinov2_is_the_cls_token_of_the_model_on_resized_normalised_images(hf_dirs):
    from transformers import Dinov2Model

    features = load_features(f"dinov2:{hf_dirs['dinov2']}")
    assert isinstance(features, Features)
    assert features.name == f"dinov2:{hf_dirs['dinov2']}" and features.dim == 32
    images = _images(3, 24, 20)
    out = features(images)
    assert out.shape == (3, 32) and out.dtype == torch.float32
    assert torch.equal(out, features(images))  # deterministic

    # Independent: resize straight to the crop size (EDM2's torch path), ImageNet-style mean/std, CLS token.
    model = Dinov2Model.from_pretrained(hf_dirs["dinov2"]).eval()
    x = F.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state[:, 0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features(images[:1]), out[:1], rtol=1e-5, atol=1e-6)  # batch-independent


# ----------------------------------------------------------------------------- CLIP

def test_clip_image_features_are_get_image_features_of_the_crop(hf_dirs):
    from transformers import CLIPModel

    clip = load_features(f"clip:{hf_dirs['clip']}")
    assert isinstance(clip, ClipFeatures)
    assert clip.name == f"clip:{hf_dirs['clip']}" and clip.dim == 16
    images = _images(2, 40, 48)  # not square: shortest side 40 -> 36, long side int(36 * 48 / 40) = 43
    out = clip(images)
    assert out.shape == (2, 16) and out.dtype == torch.float32
    assert torch.equal(out, clip(images))

    x = F.interpolate(images, size=(36, 43), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    x = x[:, :, 2:34, 5:37]  # centre crop 32 x 32: top (36 - 32) // 2, left (43 - 32) // 2
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(clip.preprocess(images), x)
    model = CLIPModel.from_pretrained(hf_dirs["clip"]).eval()
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=x)
    expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_clip_preprocessing_matches_the_pil_processor_up_to_8_bit_rounding(hf_dirs):
    from PIL import Image
    from transformers import AutoImageProcessor

    # Smooth images (noise makes PIL's 8-bit intermediate clamp matter), exactly representable in 8 bits.
    images = F.interpolate(_images(2, 5, 6, seed=3), size=(40, 48), mode="bilinear", align_corners=False)
    images = (images * 255).round() / 255
    pils = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]
    processor = AutoImageProcessor.from_pretrained(hf_dirs["clip"], **(
        {"backend": "pil"} if feat._major(__import__("transformers").__version__) >= 5 else {}))
    reference = processor(images=pils, return_tensors="pt")["pixel_values"]
    ours = load_clip(str(hf_dirs["clip"])).preprocess(images)
    assert ours.shape == reference.shape == (2, 3, 32, 32)
    diff = (ours - reference).abs() * torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255  # in 8-bit steps
    assert diff.mean() < 0.5 and diff.max() <= 2, (diff.mean(), diff.max())  # a crop 1 px off gives mean > 5


def test_clip_text_and_image_features_come_from_the_same_model(hf_dirs):
    from transformers import AutoTokenizer, CLIPModel

    clip = load_clip(str(hf_dirs["clip"]))
    text = clip.text
    assert isinstance(text, ClipTextFeatures) and text.model is clip.model
    assert text.name == f"clip-text:{hf_dirs['clip']}" and text.dim == clip.dim == 16
    prompts = TEXT[:3]
    t = text(prompts)
    assert t.shape == (3, 16) and t.dtype == torch.float32
    torch.testing.assert_close(clip.encode_text(prompts[1:2]), t[1:2], rtol=1e-5, atol=1e-6)  # padding-independent

    # The model's own CLIP logits: logit_scale * cosine(image, text) of our two feature sets.
    model = CLIPModel.from_pretrained(hf_dirs["clip"]).eval()
    tokens = AutoTokenizer.from_pretrained(hf_dirs["clip"])(prompts, padding=True, return_tensors="pt")
    images = _images(2, 32, 32, seed=1)
    with torch.no_grad():
        logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=clip.preprocess(images)).logits_per_image
    i = clip(images)
    cosine = F.normalize(i, dim=-1) @ F.normalize(t, dim=-1).T
    torch.testing.assert_close(model.logit_scale.exp() * cosine, logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="list of strings"):
        clip.encode_text("one string")


# ----------------------------------------------------------------------------- other spaces

def test_pixels_spec_equals_pixel_features_and_names_round_trip():
    images = _images(5, 16, 16)
    pixels = load_features("pixels:8")
    assert pixels.name == "pixels-8" and pixels.dim == 192
    np.testing.assert_array_equal(extract(pixels, images, batch_size=2), pixel_features(images, 8).numpy())
    torch.testing.assert_close(pixels(images), pixel_features(images, 8).float())
    assert load_features("pixels").name == "pixels-8"
    assert load_features(pixels.name).name == "pixels-8"
    assert load_features("pixels:4").dim == 48


def test_shapes_spec_uses_the_cached_recognition_net(monkeypatch, tmp_path):
    from microdiff.eval import shapes_features
    from microdiff.eval.shapes_features import ShapesFeatureNet

    torch.manual_seed(0)
    net, calls = ShapesFeatureNet(16).eval(), []
    monkeypatch.setattr(shapes_features, "shapes_feature_net",
                        lambda cache_dir, resolution, progress=False: calls.append((cache_dir, resolution)) or net)
    shapes = load_features("shapes:16", cache_dir=tmp_path)
    assert calls == [(tmp_path, 16)] and shapes.name == "shapes-16" and shapes.dim == 128
    images = _images(3, 16, 16)
    np.testing.assert_allclose(extract(shapes, images), shapes_features.shapes_features(images, net), rtol=1e-6)
    load_features("shapes-16")
    assert calls[-1] == ("runs/cache", 16)  # the name loads back; default cache dir
    with pytest.raises(ValueError, match="16 x 16"):
        shapes(_images(1, 32, 32))


def test_inception_spec_passes_the_weights_path(monkeypatch):
    from microdiff.eval import inception

    calls = []

    def fake(path=None, device="cpu"):
        calls.append(path)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2048))

    monkeypatch.setattr(inception, "load_fid_inception", fake)
    default, local = load_features("inception"), load_features("inception:/weights/pt_inception.pth")
    assert calls == [None, "/weights/pt_inception.pth"]
    assert default.name == local.name == "inception-fid" and default.dim == 2048
    assert default(_images(2, 8, 8)).shape == (2, 2048)


def test_a_user_module_spec(tmp_path, monkeypatch):
    (tmp_path / "my_feature_space.py").write_text(
        "import torch\n"
        "def stats(images):\n"
        "    return torch.cat([images.mean((2, 3)), images.std((2, 3))], 1)\n"
        "def make():\n"
        "    return stats\n"
        "class Means:\n"
        "    dim = 3\n"
        "    def __init__(self, device='cpu', scale=1.0):\n"
        "        self.device, self.scale = device, scale\n"
        "    def __call__(self, images):\n"
        "        return (self.scale * images.mean((2, 3))).numpy()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    images = _images(4, 8, 8)
    expected = torch.cat([images.mean((2, 3)), images.std((2, 3))], 1)
    for spec in ("my_feature_space:stats", "my_feature_space:make", "module:my_feature_space:stats"):
        features = load_features(spec)
        assert features.name == f"module:my_feature_space:{spec.split(':')[-1]}"
        torch.testing.assert_close(features(images), expected)
        assert features.dim == 6  # filled in by the first call
    means = load_features("my_feature_space:Means", device="cpu", scale=2.0)
    assert means.dim == 3 and means.fn.scale == 2.0
    np.testing.assert_allclose(extract(means, images), 2 * images.mean((2, 3)).double().numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="has no attribute"):
        load_features("my_feature_space:nothing")
    sys.modules.pop("my_feature_space", None)


# ----------------------------------------------------------------------------- extract

def test_extract_batches_iterables_and_shows_rate_and_eta(hf_dirs, capsys):
    features = load_features(f"dinov2:{hf_dirs['dinov2']}")
    images = _images(7, 32, 32)
    whole = extract(features, images, batch_size=3, progress=True)
    bar = capsys.readouterr().err
    assert "7/7" in bar and "img/s" in bar and "<" in bar  # count, rate, elapsed<remaining
    assert whole.dtype == np.float64 and whole.shape == (7, 32)
    loader = [(images[:4], "labels"), (images[4:], "labels")]  # a DataLoader of (images, labels)
    np.testing.assert_allclose(extract(features, loader, batch_size=2), whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(extract(features, images.numpy()), whole, rtol=1e-5, atol=1e-6)
    assert extract(features, []).shape == (0, 32)
    with pytest.raises(ValueError, match="batch_size"):
        extract(features, images, batch_size=0)


# ----------------------------------------------------------------------------- errors

def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_unknown_specs_and_options_are_one_line_errors(tmp_path):
    for spec in ("vgg", "dinov3-magic/folder:x", "", "no_such_module_xyz:fn"):
        with pytest.raises(ValueError) as excinfo:
            load_features(spec)
        message = _one_line(excinfo)
        assert "inception" in message and "dinov2" in message and "pkg.module:callable" in message
    with pytest.raises(ValueError, match="whole number") as excinfo:
        load_features("pixels:big")
    _one_line(excinfo)
    with pytest.raises(ValueError, match="unknown option.*colour") as excinfo:
        load_features("pixels:8", colour=True)
    _one_line(excinfo)
    from transformers import CLIPConfig

    CLIPConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="use clip:"):
        load_features(f"dinov2:{tmp_path}")


def test_missing_hub_id_offline_says_how_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for kind in ("dinov2", "clip"):
        with pytest.raises(FileNotFoundError) as excinfo:
            load_features(f"{kind}:microdiff-test/not-a-real-model")
        message = _one_line(excinfo)
        assert "huggingface-cli download microdiff-test/not-a-real-model" in message
        assert f"{kind}:/path/to/folder" in message
    with pytest.raises(FileNotFoundError, match="does not exist") as excinfo:
        load_features(f"clip:{tmp_path}/missing/folder")
    _one_line(excinfo)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="save_pretrained") as excinfo:
        load_features(f"dinov2:{tmp_path / 'empty'}")
    _one_line(excinfo)


def test_default_names_are_the_documented_hub_ids():
    assert feat.DEFAULT_DINOV2 == "facebook/dinov2-large"
    assert feat.DEFAULT_CLIP == "openai/clip-vit-large-patch14"
    assert feat._hf_source("dinov2", "", feat.DEFAULT_DINOV2) == ("facebook/dinov2-large", "dinov2:facebook/dinov2-large")
    assert feat._hf_source("clip", "", feat.DEFAULT_CLIP)[1] == "clip:openai/clip-vit-large-patch14"
    json.dumps({"features": load_features("pixels:2").name})  # names are plain strings for stats files
