"""Captioned datasets on real photos (scikit-image) and digits (scikit-learn) written to disk, plus
every kind of bad file: each either loads as the transform of its pixels or is skipped, reported
with its reason and counted. Hugging Face datasets are built locally (save_to_disk, imagefolder).
"""

import argparse
import csv
import io
import json
import logging
import multiprocessing
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from microdiff.data.captioned import (HFImageDataset, ImageFolderDataset, ManifestDataset, check_dataset,
                                      collate_records, make_dataset)
from microdiff.data.check import add_arguments, run
from microdiff.data.report import DataError, OnError, Skip, SkipReport
from microdiff.data.transforms import ImageTransform

RES, MIN = 16, 12


def _source_meta(meta):
    """A record's meta without the "crop" the dataset adds (checked in test_crop_meta_and_mask_sidecars)."""
    assert set(meta["crop"]) == {"top", "left", "size", "flip", "frame"}
    return {k: v for k, v in meta.items() if k != "crop"}


def _photos():
    from skimage import data

    return {"astronaut": data.astronaut()[::4, ::4], "chelsea": data.chelsea()[::3, ::3],
            "coffee": data.coffee()[::4, ::4]}


def _face():
    from skimage import data

    return (data.lfw_subset()[0] * 255).round().astype(np.uint8)  # 25x25 grayscale


def _digit():
    from sklearn.datasets import load_digits

    return (load_digits().images[0] * 255 / 16).round().astype(np.uint8)  # 8x8: below MIN


def _want(image: Image.Image) -> torch.Tensor:
    return ImageTransform(RES, min_size=MIN)(image)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder of good and bad images; returns (root, expected tensors by key, captions by key)."""
    root = tmp_path_factory.mktemp("folder")
    (root / "sub").mkdir()
    photos = _photos()
    want, captions = {}, {}

    def add(name, image_bytes, caption, expected):
        path = root / name
        path.write_bytes(image_bytes)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption + "\n")
        if expected is not None:
            key = path.relative_to(root).with_suffix("").as_posix()
            want[key], captions[key] = expected, caption

    def enc(arr_or_image, fmt, **kw):
        image = arr_or_image if isinstance(arr_or_image, Image.Image) else Image.fromarray(arr_or_image)
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kw)
        return buf.getvalue()

    jpeg = enc(photos["astronaut"], "JPEG", quality=95)
    add("astronaut.jpg", jpeg, "an astronaut with a flag", _want(Image.open(io.BytesIO(jpeg))))
    add("chelsea.png", enc(photos["chelsea"], "PNG"), None, _want(Image.fromarray(photos["chelsea"])))
    (root / "chelsea.json").write_text(json.dumps({"caption": "a tabby cat", "source": "skimage", "quality": 0.9,
                                                   "photographer": "unknown"}))
    captions["chelsea"] = "a tabby cat"
    add("sub/coffee.webp", enc(photos["coffee"], "WEBP", lossless=True), "a cup of coffee",
        _want(Image.fromarray(photos["coffee"])))
    face = _face()
    add("sub/face.png", enc(face, "PNG"), "a face", _want(Image.fromarray(face)))
    rgba = np.dstack([photos["coffee"], np.full(photos["coffee"].shape[:2], 128, np.uint8)])
    add("rgba.png", enc(rgba, "PNG"), "half transparent coffee", _want(Image.fromarray(rgba)))
    pal = Image.fromarray(photos["chelsea"]).convert("P", palette=Image.ADAPTIVE, colors=32)
    add("palette.gif", enc(pal, "GIF"), "a cat in 32 colours", _want(pal))
    deep = (face.astype(np.uint16) * 257)
    add("deep16.png", enc(deep, "PNG"), "a 16-bit face", _want(Image.fromarray(face)))  # 16-bit == 8-bit * 257
    add("tiny.png", enc(_digit(), "PNG"), "the digit zero", None)
    add("truncated.jpg", jpeg[: len(jpeg) // 3], "half an astronaut", None)
    add("empty.png", b"", "nothing", None)
    add("notimage.png", b"this is a text file\n", "text", None)
    (root / "nocaption.jpg").write_bytes(jpeg)
    (root / ".hidden.jpg").write_bytes(b"resource fork")  # hidden files and folders are not indexed
    (root / ".cache").mkdir()
    (root / ".cache" / "thumb.jpg").write_bytes(jpeg)
    (root / ".cache" / "thumb.txt").write_text("a thumbnail")
    (root / "notes.md").write_text("not an image suffix")
    modes = {name: Image.open(root / name).mode for name in
             ("astronaut.jpg", "sub/face.png", "rgba.png", "palette.gif", "deep16.png")}
    assert modes == {"astronaut.jpg": "RGB", "sub/face.png": "L", "rgba.png": "RGBA", "palette.gif": "P",
                     "deep16.png": "I;16"}  # the files really are in the modes the tests are about
    return root, want, captions


BAD = {"tiny.png": "image too small", "truncated.jpg": "corrupt image", "empty.png": "empty file",
       "notimage.png": "not an image"}


def test_folder_loads_every_good_image_and_reports_every_bad_one(folder, tmp_path):
    root, want, captions = folder
    ds = ImageFolderDataset(root, ImageTransform(RES, min_size=MIN), progress=False)
    assert len(ds) == len(want) + len(BAD)  # nocaption is not indexed
    assert ds.report.counts == {"missing caption": 1}
    batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_records))
    got = {}
    for batch in batches:
        for image, caption, key, meta in zip(batch["image"], batch["caption"], batch["key"], batch["meta"]):
            got[key] = (image, caption, meta)
    assert set(got) == set(want)
    for key, expected in want.items():
        torch.testing.assert_close(got[key][0], expected, rtol=0, atol=1e-6)  # same pixels, same transform
        assert got[key][1] == captions[key]
    assert _source_meta(got["chelsea"][2]) == {"source": "skimage", "quality": 0.9, "photographer": "unknown"}
    assert sum(b["skipped"] for b in batches) == len(BAD)
    assert ds.report.counts == {"missing caption": 1, **{r: 1 for r in BAD.values()}}
    by_path = {s.path: s.reason for s in ds.report.items}
    for name, reason in BAD.items():
        assert by_path[str(root / name)] == reason
    assert "skipped 5 items" in ds.report.summary()
    json_path, csv_path = ds.report.write(tmp_path / "skips")
    written = json.loads(json_path.read_text())
    assert written["total"] == 5 and written["counts"]["empty file"] == 1
    rows = list(csv.DictReader(csv_path.open()))
    assert {r["reason"] for r in rows} == {"missing caption", *BAD.values()}


def test_folder_raise_policy_names_the_path_and_reason(folder):
    root, _, _ = folder
    with pytest.raises(DataError, match=r"nocaption\.jpg: missing caption"):
        ImageFolderDataset(root, ImageTransform(RES), on_error="raise", progress=False)
    ds = ImageFolderDataset(root, ImageTransform(RES, min_size=MIN), on_error="raise",
                            allow_missing_captions=True, progress=False)
    keys = [e.key for e in ds.entries]
    assert ds[keys.index("nocaption")]["caption"] == ""
    with pytest.raises(DataError, match=r"truncated\.jpg: corrupt image"):
        ds[keys.index("truncated")]
    with pytest.raises(DataError, match=r"tiny\.png: image too small \(short side 8 px"):
        ds[keys.index("tiny")]


def test_check_dataset_with_workers_and_the_journal(folder, tmp_path):
    root, want, _ = folder
    transform = ImageTransform(RES, crop="random", flip=True, min_size=MIN)
    journal = tmp_path / "skips.jsonl"
    ds = ImageFolderDataset(root, transform, report=SkipReport("f", journal=journal), progress=False, seed=3)
    report = check_dataset(ds, num_workers=2, progress=False)
    assert report.counts == {"missing caption": 1, **{r: 1 for r in BAD.values()}}
    # a training-style DataLoader: workers report through the journal; crops follow (seed, epoch, index)
    ds.set_epoch(2)
    serial = [b for b in DataLoader(ds, batch_size=3, collate_fn=collate_records)]
    parallel = [b for b in DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_records)]
    assert [b["key"] for b in serial] == [b["key"] for b in parallel]
    for a, b in zip(serial, parallel):
        assert torch.equal(a["image"], b["image"])
    merged = SkipReport.from_journal(journal)
    assert merged.counts == report.counts  # each bad item counted once over workers and epochs
    i = next(i for i, e in enumerate(ds.entries) if e.key == "chelsea")  # 100x151: many crops
    first = ds[i]["image"]
    assert torch.equal(first, ds[i]["image"])
    assert not all(torch.equal(first, (ds.set_epoch(e), ds[i]["image"])[1]) for e in range(3, 6))


def test_manifest_jsonl_keeps_unknown_columns_and_validates_known_ones(tmp_path):
    photos = _photos()
    (tmp_path / "img").mkdir()
    rows = []
    for i, (name, arr) in enumerate(photos.items()):
        Image.fromarray(arr).save(tmp_path / "img" / f"{name}.png")
        rows.append({"file_name": f"img/{name}.png", "text": f"photo of {name}", "source": "skimage",
                     "quality": 1 - i / 4, "sigma_tn": 0.1 * i, "corruption": {"kind": "noise", "level": i},
                     "aesthetic": 5.0 + i})
    rows.append({"file_name": "img/absent.png", "text": "lost", "aesthetic": None})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = ManifestDataset(manifest, ImageTransform(RES), progress=False)
    assert len(ds) == 4
    rec = ds[1]
    assert rec["key"] == "img/chelsea" and rec["caption"] == "photo of chelsea"
    assert _source_meta(rec["meta"]) == {"source": "skimage", "quality": 0.75, "sigma_tn": 0.1,
                                         "corruption": {"kind": "noise", "level": 1}, "aesthetic": 6.0}
    torch.testing.assert_close(rec["image"], ImageTransform(RES)(Image.fromarray(photos["chelsea"])), rtol=0, atol=0)
    assert ds[3] is None and ds.report.counts == {"missing file": 1}
    batch = collate_records([ds[i] for i in range(4)])
    torch.testing.assert_close(batch["quality"], torch.tensor([1.0, 0.75, 0.5]))
    torch.testing.assert_close(batch["sigma_tn"], torch.tensor([0.0, 0.1, 0.2]))
    assert batch["skipped"] == 1 and collate_records([None, None]) is None


def test_manifest_csv_with_image_root_and_parquet_with_bytes(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    face, coffee = _face(), _photos()["coffee"]
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(face).save(images / "face.png")
    manifest = tmp_path / "meta" / "m.csv"
    manifest.parent.mkdir()
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "quality", "corruption", "licence"])
        w.writerow(["face.png", "a face", "0.5", '{"kind": "blur", "sigma": 1.5}', "cc-by"])
        w.writerow(["face.png", "the same face", "", "jpeg", ""])
    ds = ManifestDataset(manifest, ImageTransform(RES), image_root=images, progress=False)
    assert _source_meta(ds[0]["meta"]) == {"quality": 0.5, "corruption": {"kind": "blur", "sigma": 1.5}, "licence": "cc-by"}
    assert _source_meta(ds[1]["meta"]) == {"corruption": "jpeg", "licence": ""}
    torch.testing.assert_close(ds[0]["image"], ImageTransform(RES)(Image.fromarray(face)), rtol=0, atol=0)
    buf = io.BytesIO()
    Image.fromarray(coffee).save(buf, format="PNG")
    table = pa.table({"image": [{"bytes": buf.getvalue(), "path": "coffee.png"}, {"bytes": b"junk", "path": "x.png"}],
                      "caption": [["coffee", "a cup"], ["junk"]], "key": ["c0", "c1"]})
    pq.write_table(table, tmp_path / "m.parquet")
    pds = make_dataset(tmp_path / "m.parquet", resolution=RES, progress=False)
    rec = pds[0]
    assert rec["key"] == "c0" and rec["caption"] in ("coffee", "a cup")
    torch.testing.assert_close(rec["image"], ImageTransform(RES)(Image.fromarray(coffee)), rtol=0, atol=0)
    choices = set()
    for epoch in range(12):  # one caption of the list per sample, reproducibly
        pds.set_epoch(epoch)
        choices.add(pds[0]["caption"])
        assert pds[0]["caption"] == pds[0]["caption"]
    assert choices == {"coffee", "a cup"}
    assert pds[1] is None and pds.report.counts == {"not an image": 1}


def _csv(path, header, *rows):
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def test_manifest_errors_name_file_row_and_columns(tmp_path):
    t = ImageTransform(RES)
    m = _csv(tmp_path / "a.csv", ["file", "text", "quality"], ["x.png", "ok", "1"], ["y.png", "bad", "high"])
    with pytest.raises(ValueError, match=r"a\.csv, row 2, column 'quality': expected a number in \[0, 1\], got 'high'"):
        ManifestDataset(m, t, progress=False)
    for bad in ("1.5", "nan", "-0.1"):
        _csv(m, ["file", "text", "quality"], ["x.png", "ok", bad])
        with pytest.raises(ValueError, match="row 1, column 'quality'"):
            ManifestDataset(m, t, progress=False)
    _csv(m, ["file", "text", "sigma_tn"], ["x.png", "ok", "-1"])
    with pytest.raises(ValueError, match="column 'sigma_tn': expected a number >= 0"):
        ManifestDataset(m, t, progress=False)
    j = tmp_path / "b.jsonl"
    j.write_text(json.dumps({"path": "x.png", "caption": "c", "quality": True}) + "\n")
    with pytest.raises(ValueError, match="b.jsonl, line 1, column 'quality'"):
        ManifestDataset(j, t, progress=False)
    j.write_text(json.dumps({"path": "x.png", "caption": "c", "source": 3}) + "\n")
    with pytest.raises(ValueError, match="column 'source': expected a string"):
        ManifestDataset(j, t, progress=False)
    j.write_text('{"path": "x.png", "caption": "c"}\n{broken\n')
    with pytest.raises(ValueError, match="b.jsonl, line 2: not valid JSON"):
        ManifestDataset(j, t, progress=False)
    _csv(m, ["file", "text"], ["x.png", "ok"])
    with pytest.raises(ValueError, match=r"no image path column 'img'; the columns are file, text"):
        ManifestDataset(m, t, path_column="img", progress=False)
    _csv(m, ["picture", "words"], ["x.png", "ok"])
    with pytest.raises(ValueError, match=r"no image path column .*the columns are picture, words; choose one with "
                                         r"data.image_column \(--image-column"):
        ManifestDataset(m, t, progress=False)
    with pytest.raises(ValueError, match=r"no caption column .*the columns are picture, words"):
        ManifestDataset(m, t, path_column="picture", progress=False)
    _csv(m, ["url", "caption"], ["https://example.com/a.jpg", "remote"])
    with pytest.raises(ValueError, match=r"a URL \(https://example.com/a.jpg\).*microdiff data download"):
        ManifestDataset(m, t, progress=False)
    _csv(m, ["path", "caption"], ["a.png", "local"], ["http://example.com/b.jpg", "remote"])
    with pytest.raises(ValueError, match=r"row 2, column 'path': the image is a URL"):
        ManifestDataset(m, t, progress=False)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        ManifestDataset(tmp_path / "missing.csv", t)


def test_manifest_missing_captions_follow_the_policy(tmp_path):
    Image.fromarray(_face()).save(tmp_path / "f.png")
    m = _csv(tmp_path / "m.csv", ["path", "caption"], ["f.png", "face"], ["f.png", "  "])
    ds = ManifestDataset(m, ImageTransform(RES), progress=False)
    assert len(ds) == 1 and ds.report.counts == {"missing caption": 1}
    assert len(ManifestDataset(m, ImageTransform(RES), allow_missing_captions=True, progress=False)) == 2
    with pytest.raises(DataError, match="missing caption"):
        ManifestDataset(m, ImageTransform(RES), on_error="raise", progress=False)


def _hf_dataset(tmp_path):
    import datasets

    photos = _photos()
    paths = []
    for name, arr in photos.items():
        Image.fromarray(arr).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    (tmp_path / "junk.png").write_bytes(b"junk")
    ds = datasets.Dataset.from_dict({
        "image": paths + [str(tmp_path / "junk.png")],
        "text": ["an astronaut", "a cat", None, "junk"],
        "quality": [1.0, 0.5, 1.0, None],
        "photographer": ["nasa", "?", "?", "?"],
    }).cast_column("image", datasets.Image())
    return ds, photos


def test_hf_saved_dataset(tmp_path):
    import datasets

    ds, photos = _hf_dataset(tmp_path)
    ds.save_to_disk(tmp_path / "saved")
    hf = make_dataset(tmp_path / "saved", resolution=RES, progress=False)
    assert isinstance(hf, HFImageDataset) and hf.image_column == "image" and hf.caption_column == "text"
    assert len(hf) == 3 and hf.report.counts == {"missing caption": 1}
    rec = hf[1]
    assert rec["caption"] == "a cat" and _source_meta(rec["meta"]) == {"quality": 0.5, "photographer": "?"}
    torch.testing.assert_close(rec["image"], ImageTransform(RES)(Image.fromarray(photos["chelsea"])), rtol=0, atol=0)
    assert hf[2] is None and hf.report.counts == {"missing caption": 1, "not an image": 1}
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(tmp_path / "dict")
    assert len(HFImageDataset(tmp_path / "dict", split="test", transform=ImageTransform(RES), progress=False)) == 1
    with pytest.raises(ValueError, match="no split 'valid'; the splits are train, test"):
        HFImageDataset(tmp_path / "dict", split="valid", transform=ImageTransform(RES))
    with pytest.raises(ValueError, match="no caption column .title.; the columns are image, text, quality, photo"):
        HFImageDataset(ds, caption_column="title", transform=ImageTransform(RES))
    bad = ds.map(lambda r: {"quality": 7.0})
    with pytest.raises(ValueError, match="row 0, column 'quality'"):
        HFImageDataset(bad, transform=ImageTransform(RES), progress=False)


def test_hf_imagefolder_with_metadata(tmp_path):
    data = tmp_path / "imf"
    (data / "train").mkdir(parents=True)
    face = _face()
    with (data / "train" / "metadata.jsonl").open("w") as f:
        for i in range(3):
            Image.fromarray(np.roll(face, i, axis=1)).save(data / "train" / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"face {i}", "source": "lfw"}) + "\n")
    hf = make_dataset("hf:imagefolder", resolution=RES, data_dir=str(data),
                      load_kwargs={"cache_dir": str(tmp_path / "cache")}, progress=False)
    assert len(hf) == 3
    recs = sorted((hf[i] for i in range(3)), key=lambda r: r["caption"])
    for i, rec in enumerate(recs):
        assert rec["caption"] == f"face {i}" and _source_meta(rec["meta"]) == {"source": "lfw"}
        torch.testing.assert_close(rec["image"], ImageTransform(RES)(Image.fromarray(np.roll(face, i, axis=1))),
                                   rtol=0, atol=0)


def test_make_dataset_picks_the_source_and_rejects_unknown_ones(folder, tmp_path):
    root, _, _ = folder
    assert isinstance(make_dataset(root, resolution=RES, progress=False), ImageFolderDataset)
    with pytest.raises(ValueError, match="unknown dataset source 'bogus'.*hf:<name>"):
        make_dataset("bogus", resolution=RES)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.txt: not a dataset source"):
        make_dataset(tmp_path / "notes.txt", resolution=RES)
    with pytest.raises(ValueError, match="needs transform=... or resolution"):
        make_dataset(root)
    with pytest.raises(ValueError, match="on_error must be 'skip' or 'raise'"):
        make_dataset(root, resolution=RES, on_error="ignore")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ImageFolderDataset(tmp_path / "nowhere", ImageTransform(RES))


def test_cli_check_writes_the_report(folder, tmp_path, capsys):
    root, _, _ = folder
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(root), "--resolution", "16", "--min-size", "12", "--out",
                              str(tmp_path / "rep"), "--no-progress"])
    assert run(args) == 0
    report = json.loads((tmp_path / "rep.json").read_text())
    assert report["total"] == 5 and report["counts"]["image too small"] == 1
    assert "skipped 5 items" in capsys.readouterr().out


# --- SkipReport ----------------------------------------------------------------------------------
def test_skip_report_counts_dedupes_merges_and_pickles():
    a, b = SkipReport("a"), SkipReport("b")
    assert a.add("x.png", "corrupt image", "truncated") and not a.add("x.png", "corrupt image")
    a.add("y.png", "missing caption")
    b.add("z.png", "corrupt image")
    b.add("x.png", "corrupt image")
    a.merge(b, [Skip("w.png", "empty file")])
    assert a.total == 4 and a.counts == {"corrupt image": 2, "missing caption": 1, "empty file": 1}
    assert a.summary() == "a: skipped 4 items (corrupt image: 2, missing caption: 1, empty file: 1)"
    assert SkipReport("e").summary() == "e: nothing skipped"
    c = pickle.loads(pickle.dumps(a))
    assert c.items == a.items and c.add("v.png", "r")
    assert OnError.parse("raise") is OnError.RAISE


def test_skip_report_logs_the_first_n_and_counts_all(caplog):
    report = SkipReport("r", warn_first=3)
    with caplog.at_level(logging.WARNING, logger="microdiff.data"):
        for i in range(10):
            report.add(f"{i}.png", "corrupt image", "boom")
    assert len(caplog.records) == 3 and report.total == 10
    assert "0.png: corrupt image (boom)" in caplog.records[0].getMessage()
    assert "further skips are counted but not logged" in caplog.records[-1].getMessage()


def _append_skips(pickled_report, start):
    report = pickle.loads(pickled_report)  # what a spawned DataLoader worker holds
    for i in range(start, start + 50):
        report.add(f"{i}.png", "corrupt image")


def test_journal_collects_skips_from_several_processes(tmp_path):
    journal = tmp_path / "j.jsonl"
    pickled = pickle.dumps(SkipReport("main", journal=journal))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_skips, args=(pickled, s)) for s in (0, 25, 50)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    merged = SkipReport.from_journal(journal)
    assert len(journal.read_text().splitlines()) == 150  # every line intact
    assert merged.total == 100 and merged.counts == {"corrupt image": 100}


def test_errors_survive_pickling_as_dataloader_workers_send_them():
    from microdiff.data.transforms import ImageDecodeError

    err = pickle.loads(pickle.dumps(DataError("a/b.png", "corrupt image", "truncated")))
    assert (err.path, err.reason, err.detail) == ("a/b.png", "corrupt image", "truncated")
    assert str(err).startswith("a/b.png: corrupt image (truncated); ")
    assert str(DataError("message only")) == "message only"
    dec = pickle.loads(pickle.dumps(ImageDecodeError("no such file", "missing file", "x.png")))
    assert (str(dec), dec.reason, dec.detail) == ("x.png: no such file", "missing file", "no such file")


def test_folder_sidecar_problems(tmp_path):
    Image.fromarray(_face()).save(tmp_path / "a.png")
    Image.fromarray(_face()).save(tmp_path / "b.png")
    (tmp_path / "a.json").write_text('{"caption": "a face", "quality": "good"}')
    (tmp_path / "b.json").write_text('{"caption": "b face", ')
    with pytest.raises(ValueError, match=r"a\.json, column 'quality': expected a number in \[0, 1\], got 'good'"):
        ImageFolderDataset(tmp_path, ImageTransform(RES), progress=False)
    (tmp_path / "a.json").write_text('{"text": "from json", "sigma_tn": "0.25", "corruption": "noise"}')
    (tmp_path / "a.txt").write_text("from txt")  # the .txt caption wins; the json still gives meta
    ds = ImageFolderDataset(tmp_path, ImageTransform(RES), progress=False)
    assert len(ds) == 1 and ds.report.counts == {"bad sidecar": 1}
    assert ds[0]["caption"] == "from txt" and _source_meta(ds[0]["meta"]) == {"sigma_tn": 0.25, "corruption": "noise"}
