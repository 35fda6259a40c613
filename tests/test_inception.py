"""FID Inception-v3 without torchvision: key layout of pytorch-fid's weights file, loading, resizing, errors.

The published file cannot be downloaded here, so its layout is written out below independently of
the module: torchvision's Inception3 names (aux_logits=False, 1008 classes), every conv a
``conv.weight`` (no bias) plus a BatchNorm with weight/bias/running_mean/running_var/num_batches_tracked
(the file has the last one: pytorch-fid issue #34 shows torch 0.4.0 rejecting exactly those keys).
"""

import socket
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from microdiff.eval import inception as inc
from microdiff.eval.inception import FID_WEIGHTS_URL, FIDInceptionV3, inception_features, load_fid_inception


# ----------------------------------------------------------------------------- the published layout

def _a(cin, pool):
    return {"branch1x1": (64, cin, 1, 1), "branch5x5_1": (48, cin, 1, 1), "branch5x5_2": (64, 48, 5, 5),
            "branch3x3dbl_1": (64, cin, 1, 1), "branch3x3dbl_2": (96, 64, 3, 3), "branch3x3dbl_3": (96, 96, 3, 3),
            "branch_pool": (pool, cin, 1, 1)}


def _c(c7):
    return {"branch1x1": (192, 768, 1, 1),
            "branch7x7_1": (c7, 768, 1, 1), "branch7x7_2": (c7, c7, 1, 7), "branch7x7_3": (192, c7, 7, 1),
            "branch7x7dbl_1": (c7, 768, 1, 1), "branch7x7dbl_2": (c7, c7, 7, 1), "branch7x7dbl_3": (c7, c7, 1, 7),
            "branch7x7dbl_4": (c7, c7, 7, 1), "branch7x7dbl_5": (192, c7, 1, 7), "branch_pool": (192, 768, 1, 1)}


def _e(cin):
    return {"branch1x1": (320, cin, 1, 1), "branch3x3_1": (384, cin, 1, 1),
            "branch3x3_2a": (384, 384, 1, 3), "branch3x3_2b": (384, 384, 3, 1),
            "branch3x3dbl_1": (448, cin, 1, 1), "branch3x3dbl_2": (384, 448, 3, 3),
            "branch3x3dbl_3a": (384, 384, 1, 3), "branch3x3dbl_3b": (384, 384, 3, 1), "branch_pool": (192, cin, 1, 1)}


# conv weight shapes (out, in, kh, kw) by block; block inputs chain: 192 -> 256 -> 288 -> 288 -> 768 -> 1280 -> 2048
CONVS = {
    "Conv2d_1a_3x3": {"": (32, 3, 3, 3)}, "Conv2d_2a_3x3": {"": (32, 32, 3, 3)},
    "Conv2d_2b_3x3": {"": (64, 32, 3, 3)}, "Conv2d_3b_1x1": {"": (80, 64, 1, 1)},
    "Conv2d_4a_3x3": {"": (192, 80, 3, 3)},
    "Mixed_5b": _a(192, 32), "Mixed_5c": _a(256, 64), "Mixed_5d": _a(288, 64),
    "Mixed_6a": {"branch3x3": (384, 288, 3, 3), "branch3x3dbl_1": (64, 288, 1, 1),
                 "branch3x3dbl_2": (96, 64, 3, 3), "branch3x3dbl_3": (96, 96, 3, 3)},
    "Mixed_6b": _c(128), "Mixed_6c": _c(160), "Mixed_6d": _c(160), "Mixed_6e": _c(192),
    "Mixed_7a": {"branch3x3_1": (192, 768, 1, 1), "branch3x3_2": (320, 192, 3, 3),
                 "branch7x7x3_1": (192, 768, 1, 1), "branch7x7x3_2": (192, 192, 1, 7),
                 "branch7x7x3_3": (192, 192, 7, 1), "branch7x7x3_4": (192, 192, 3, 3)},
    "Mixed_7b": _e(1280), "Mixed_7c": _e(2048),
}


def expected_layout() -> dict[str, tuple]:
    shapes = {}
    for block, convs in CONVS.items():
        for name, shape in convs.items():
            prefix = f"{block}.{name}." if name else f"{block}."
            shapes[prefix + "conv.weight"] = shape
            for stat in ("weight", "bias", "running_mean", "running_var"):
                shapes[prefix + f"bn.{stat}"] = (shape[0],)
            shapes[prefix + "bn.num_batches_tracked"] = ()
    shapes["fc.weight"], shapes["fc.bias"] = (1008, 2048), (1008,)
    return shapes


def test_block_outputs_chain_into_the_next_block():  # the table is self-consistent
    def out(block):
        c = {k: v[0] for k, v in CONVS[block].items()}
        if block.startswith("Mixed_5"):
            return c["branch1x1"] + c["branch5x5_2"] + c["branch3x3dbl_3"] + c["branch_pool"]
        if block.startswith("Mixed_6") and block != "Mixed_6a":
            return c["branch1x1"] + c["branch7x7_3"] + c["branch7x7dbl_5"] + c["branch_pool"]
        if block.startswith("Mixed_7") and block != "Mixed_7a":
            return c["branch1x1"] + c["branch3x3_2a"] + c["branch3x3_2b"] + c["branch3x3dbl_3a"] \
                + c["branch3x3dbl_3b"] + c["branch_pool"]
    ins = {b: next(iter(CONVS[b].values()))[1] for b in CONVS}
    assert [out("Mixed_5b"), out("Mixed_5c")] == [ins["Mixed_5c"], ins["Mixed_5d"]] == [256, 288]
    assert 384 + 96 + 288 == ins["Mixed_6b"] == out("Mixed_6b") == out("Mixed_6e") == 768  # Mixed_6a: + maxpool
    assert 320 + 192 + 768 == ins["Mixed_7b"] == 1280 and out("Mixed_7b") == ins["Mixed_7c"] == out("Mixed_7c") == 2048


def test_state_dict_matches_published_file_layout(model):
    expected = expected_layout()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    assert got == expected
    assert len(got) == 94 * 6 + 2 == 566  # 94 conv+BN units, fc weight and bias
    per_block = {b: sum(k.startswith(b + ".") for k in got) // 6 for b in CONVS}
    assert per_block == {**dict.fromkeys(["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1",
                                          "Conv2d_4a_3x3"], 1),
                         "Mixed_5b": 7, "Mixed_5c": 7, "Mixed_5d": 7, "Mixed_6a": 4, "Mixed_6b": 10, "Mixed_6c": 10,
                         "Mixed_6d": 10, "Mixed_6e": 10, "Mixed_7a": 6, "Mixed_7b": 9, "Mixed_7c": 9}
    assert got["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert got["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert got["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert got["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert got["Mixed_7c.branch3x3dbl_2.bn.running_var"] == (384,)
    assert got["fc.weight"] == (1008, 2048)
    assert not any("AuxLogits" in k or k.endswith("conv.bias") for k in got)
    assert all(m.eps == 0.001 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_parameter_count(model):
    n_params = sum(p.numel() for p in model.parameters())
    n_float = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    assert n_params == sum(int(np.prod(s)) for k, s in expected_layout().items()
                           if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert n_params == 23_850_960
    assert n_float == 23_885_392  # + BN running mean/var: the floats stored in the published file
    # Cross-check with torchvision's documented inception_v3 size (1000 classes + AuxLogits): 27,161,264.
    aux = (128 * 768 + 2 * 128) + (768 * 128 * 25 + 2 * 768) + (768 * 1000 + 1000)
    assert n_params - 8 * 2048 - 8 + aux == 27_161_264


def test_fid_patches():
    ones = torch.ones(1, 2, 5, 5)
    assert torch.equal(inc._pool3x3(ones, "avg"), ones)  # padding not counted (TensorFlow average pool)
    x = torch.randn(1, 2, 5, 5)
    assert torch.equal(inc._pool3x3(x, "max"), F.max_pool2d(x, 3, 1, 1))
    m = FIDInceptionV3()
    assert (m.Mixed_7b.pool, m.Mixed_7c.pool) == ("avg", "max")


# ----------------------------------------------------------------------------- loading and forward

def _randomised(seed: int) -> FIDInceptionV3:
    """Random weights, BN statistics included, scaled so that pool3 features stay O(0.1-1)."""
    torch.manual_seed(seed)
    m = FIDInceptionV3()
    with torch.no_grad():
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            bn.weight.uniform_(2.0, 3.0)
            bn.bias.normal_(0, 0.1)
            bn.running_mean.normal_(0, 0.01)
            bn.running_var.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def model():
    return _randomised(0)


@pytest.fixture(scope="module")
def weights_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(model.state_dict(), path)
    return path


@torch.no_grad()
def test_load_from_file_gives_identical_outputs(model, weights_file, monkeypatch):
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    images = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(1))
    loaded = load_fid_inception(weights_file)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    ref, out = model(images), loaded(images)
    assert ref.shape == (2, 2048) and 0.01 < ref.abs().mean() < 10
    assert torch.equal(ref, out)
    assert not torch.allclose(_randomised(1)(images), ref)  # the weights matter
    loaded.train()
    assert not loaded.training  # stays in eval: BN uses the stored statistics
    feats = inception_features(images, loaded, batch_size=1)
    assert feats.dtype == np.float64 and feats.shape == (2, 2048)
    np.testing.assert_allclose(feats, ref.double().numpy(), rtol=1e-5, atol=1e-6)  # batch of 1 vs 2


def test_env_var_and_file_without_num_batches_tracked(model, weights_file, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "converted.pth")  # torch-fidelity's converter writes no num_batches_tracked
    monkeypatch.setenv(inc.WEIGHTS_ENV, str(tmp_path / "converted.pth"))
    loaded = load_fid_inception()
    for k, v in state.items():
        assert torch.equal(loaded.state_dict()[k], v), k


@torch.no_grad()
def test_small_and_odd_sized_inputs_are_resized(model):
    small = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    out = model(small)
    assert out.shape == (2, 2048) and out.dtype == torch.float32
    upsampled = F.interpolate(small, size=(299, 299), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, model(upsampled), rtol=1e-5, atol=1e-6)
    assert inception_features(torch.rand(1, 3, 40, 24).numpy(), model).shape == (1, 2048)


def test_bad_images_are_rejected(model):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="divide uint8 images by 255"):
        inception_features(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), model)


# ----------------------------------------------------------------------------- errors

def _no_download(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def _assert_one_line(err):
    assert "\n" not in str(err)


def test_wrong_key_gives_one_line_error(model, tmp_path):
    state = model.state_dict()
    state["Mixed_7c.branch_pool.conv.kernel"] = state.pop("Mixed_7c.branch_pool.conv.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_fid_inception(path)
    msg = str(info.value)
    _assert_one_line(info.value)
    assert str(path) in msg
    assert "missing Mixed_7c.branch_pool.conv.weight" in msg and "unexpected Mixed_7c.branch_pool.conv.kernel" in msg

    state = {k: v for k, v in model.state_dict().items() if k != "fc.bias"}
    state["fc.weight"] = torch.zeros(1000, 2048)  # the ImageNet-1000 head of torchvision's own Inception
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing fc.bias; wrong shape fc.weight \(1000, 2048\)!=\(1008, 2048\)") \
            as info:
        load_fid_inception(path)
    _assert_one_line(info.value)


def test_missing_file_gives_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="download https://") as info:
        load_fid_inception(tmp_path / "nope.pth")
    _assert_one_line(info.value)


def test_no_weights_offline_gives_one_line_error_quickly(monkeypatch):
    monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
    calls = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda url, **kw: calls.append(url) or _no_download())
    before = socket.getdefaulttimeout()
    with pytest.raises(RuntimeError) as info:
        load_fid_inception()
    msg = str(info.value)
    _assert_one_line(info.value)
    assert calls == [FID_WEIGHTS_URL]
    assert FID_WEIGHTS_URL in msg and "pass its path" in msg and "name resolution" in msg
    assert socket.getdefaulttimeout() == before
