"""`microdiff data inspect`: counts and mixes read from captions and metadata only, for every kind of
source, checked against what was written."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
import io

import pytest

from microdiff.data.inspect import inspect_source, iter_source, summarise
from microdiff.data.shapes import write_shapes_folder


def test_folder_with_a_missing_caption_and_corrupted_shapes(tmp_path):
    write_shapes_folder(tmp_path / "img", 12, resolution=16, seed=0, corruption=[(0.5, "noise:0.2")], progress=False)
    (tmp_path / "img" / "00003.txt").unlink()
    json_path = tmp_path / "img" / "00003.json"
    meta = json.loads(json_path.read_text())
    meta.pop("caption", None)
    json_path.write_text(json.dumps(meta))
    summary = inspect_source(str(tmp_path / "img"), json_path=str(tmp_path / "s.json"), plot_path=str(tmp_path / "h.png"))
    # what training uses: the uncaptioned image is skipped (and counted by reason), not a sample
    assert summary["samples"] == 11 and summary["missing_captions"] == 1
    assert summary["skipped_by_reason"] == {"missing caption": 1}
    corrupted = sum(json.loads((tmp_path / "img" / f"{i:05d}.json").read_text())["corruption"] == "noise"
                    for i in range(12) if i != 3)
    assert summary["corruptions"].get("noise", 0) == corrupted and summary["sources"] == {"shapes": 11}
    assert json.loads((tmp_path / "s.json").read_text())["samples"] == 11
    assert (tmp_path / "h.png").stat().st_size > 0


def test_manifests_and_caption_statistics(tmp_path):
    rows = [{"path": "a.png", "caption": "a red circle", "quality": 0.5, "source": "web"},
            {"path": "b.png", "caption": "blue", "source": "scan", "corruption": "jpeg"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with open(tmp_path / "m.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "caption", "source"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in ("path", "caption", "source")} for r in rows)
    for name in ("m.jsonl", "m.csv"):
        s = summarise(iter_source(str(tmp_path / name)))
        assert s["samples"] == 2 and s["sources"] == {"web": 1, "scan": 1}
        assert s["caption_words"]["min"] == 1 and s["caption_words"]["max"] == 3
    assert summarise(iter_source(str(tmp_path / "m.jsonl")))["quality"]["annotated"] == 1


def test_webdataset_tars_and_shapes_spec(tmp_path):
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(png, "PNG")
    with tarfile.open(tmp_path / "000000.tar", "w") as tar:
        for key, caption in (("000000001", "one"), ("000000002", "two words")):
            for ext, data in (("txt", caption.encode()), ("json", json.dumps({"source": "web"}).encode()),
                              ("png", png.getvalue())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    s = summarise(iter_source(str(tmp_path)))
    assert s["samples"] == 2 and s["caption_words"]["max"] == 2 and s["sources"] == {"web": 2}
    assert summarise(iter_source("shapes:7"))["samples"] == 7


def test_cli_and_missing_source(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "microdiff", "data", "inspect", "shapes:5"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0 and "shapes:5: 5 samples" in r.stdout
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        list(iter_source(str(tmp_path / "nope")))
