"""The downloader against a real HTTP server on 127.0.0.1 (ThreadingHTTPServer in a thread, port 0).

The server serves Pillow-generated PNG/JPEG images of known sizes (RGB, RGBA, L, an EXIF-rotated
JPEG, one smaller than the resolution), a 404, a 403, a truncated JPEG, a response slower than the
timeout, an HTML page, a 503 that succeeds on the third request, a 503 that never does, a tiny image,
two bodies over the size cap (with and without Content-Length) and an X-Robots-Tag: noai image. It
logs every request, so retries and resumes are checked by what was actually fetched. Expected sizes
after resizing are computed here by hand (short side -> 32, long side rounded half up).
"""

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from microdiff.data.download import (DownloadError, ImageSettings, add_arguments, center_crop_box, download,
                                     process_image, read_status, resize_size, run, sample_key)

RES = 32
FAST = dict(resolution=RES, min_size=16, timeout=0.3, retries=2, backoff=0.01, max_bytes=60_000, progress=False)


# ----------------------------------------------------------------------------- test server
def _image_bytes(size, mode="RGB", fmt="PNG", seed=0, **save):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def _exif_rotated_jpeg():
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return _image_bytes((80, 40), fmt="JPEG", seed=5, exif=exif)


ROUTES = {  # path -> (status, content type, body, options)
    "/a.png": (200, "image/png", _image_bytes((64, 48), seed=1), {}),
    "/b.jpg": (200, "image/jpeg", _image_bytes((40, 100), fmt="JPEG", seed=2, quality=90), {}),
    "/c.png": (200, "image/png", _image_bytes((50, 50), "RGBA", seed=3), {}),
    "/d.png": (200, "image/png", _image_bytes((96, 64), "L", seed=4), {}),
    "/e.jpg": (200, "image/jpeg", _exif_rotated_jpeg(), {}),
    "/f.png": (200, "image/png", _image_bytes((20, 30), seed=6), {}),  # upscaled to 32 x 48
    "/tiny.png": (200, "image/png", _image_bytes((8, 8), seed=7), {}),
    "/broken.jpg": (200, "image/jpeg", _image_bytes((64, 64), fmt="JPEG", seed=8)[:1500], {}),
    "/page.html": (200, "text/html", b"<html><body>not an image</body></html>", {}),
    "/moved-d.png": (302, "text/plain", b"", {"headers": {"Location": "/d.png"}}),
    "/forbidden": (403, "text/plain", b"no", {}),
    "/flaky.png": (200, "image/png", _image_bytes((48, 64), seed=9), {"fail_first": 2}),
    "/down": (503, "text/plain", b"busy", {}),
    "/slow.png": (200, "image/png", _image_bytes((40, 40), seed=10), {"delay": 1.0}),
    "/slow-once.png": (200, "image/png", _image_bytes((40, 40), seed=11), {"delay_first": 4.0}),
    "/huge.png": (200, "image/png", os.urandom(100_000), {}),
    "/huge-stream.png": (200, "image/png", os.urandom(100_000), {"no_length": True}),
    "/noai.png": (200, "image/png", _image_bytes((40, 40), seed=12), {"headers": {"X-Robots-Tag": "noai, noimageai"}}),
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        path = urllib.parse.urlsplit(self.path).path
        with server.lock:
            server.log.append(self.path)
            server.counts[path] += 1
            n = server.counts[path]
        status, ctype, body, opt = ROUTES.get(path, (404, "text/plain", b"not found", {}))
        time.sleep(opt.get("delay", 0) + (opt.get("delay_first", 0) if n == 1 else 0))
        if n <= opt.get("fail_first", 0):
            status, ctype, body = 503, "text/plain", b"try again"
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            for name, value in opt.get("headers", {}).items():
                self.send_header(name, value)
            if not opt.get("no_length"):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): expected
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def _server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.lock, server.log, server.counts = threading.Lock(), [], Counter()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(_server):
    """The running server with an empty request log; ``server.url(path)`` builds a URL."""
    with _server.lock:
        _server.log.clear()
        _server.counts.clear()
    _server.url = lambda path: f"http://127.0.0.1:{_server.server_address[1]}{path}"
    return _server


def _write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def _tar_samples(out_dir):
    """key -> {ext: bytes} over every shard, plus shard index -> list of member names in order."""
    samples, members = {}, {}
    for tar_path in sorted(out_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members[int(tar_path.stem)] = tar.getnames()
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples, members


# ----------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize("size, expected", [((64, 48), (43, 32)), ((40, 100), (32, 80)), ((50, 50), (32, 32)),
                                            ((20, 30), (32, 48)), ((1000, 10), (3200, 32)), ((33, 32), (33, 32)),
                                            ((44, 32), (44, 32)), ((64, 96), (32, 48)), ((96, 63), (49, 32)),
                                            ((65, 64), (33, 32)), ((64, 69), (32, 35))])
def test_resize_size_keeps_aspect_and_rounds_half_up(size, expected):
    # by hand: 64*32/48 = 42.67 -> 43; 96*32/63 = 48.76 -> 49; 100*32/40 = 80 exactly;
    # ties 65*32/64 = 32.5 -> 33 and 69*32/64 = 34.5 -> 35 (half up, not Python's half to even)
    assert resize_size(*size, RES) == expected


def test_center_crop_box():
    assert center_crop_box(43, 32, 32) == (5, 0, 37, 32)
    assert center_crop_box(32, 80, 32) == (0, 24, 32, 56)


def test_process_image_reports_reasons():
    with pytest.raises(DownloadError) as e:
        process_image(b"<html></html>", ImageSettings(resolution=RES))
    assert e.value.reason == "not an image"
    with pytest.raises(DownloadError) as e:
        process_image(ROUTES["/broken.jpg"][2], ImageSettings(resolution=RES))
    assert e.value.reason == "corrupt image" and "truncated" in e.value.detail
    with pytest.raises(DownloadError) as e:
        process_image(ROUTES["/tiny.png"][2], ImageSettings(resolution=RES, min_size=16))
    assert e.value.reason == "too small" and "8x8" in e.value.detail
    # transparency is composited on white; no resize with resolution=None
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0], rgba[:, 20:, 3] = 200, 255  # red, left half fully transparent
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    data, info = process_image(buffer.getvalue(), ImageSettings(resolution=None, image_format="png"))
    out = np.asarray(Image.open(io.BytesIO(data)))
    assert out.shape == (40, 40, 3) and (out[:, :20] == 255).all() and (out[:, 20:] == [200, 0, 0]).all()
    data, info = process_image(ROUTES["/a.png"][2], ImageSettings(resolution=RES, crop=True, image_format="png"))
    assert info == {"original_width": 64, "original_height": 48, "original_format": "PNG", "width": 32, "height": 32}
    # centre crop of the resized image equals Pillow's own resize then crop, pixel for pixel (lossless png)
    reference = Image.open(io.BytesIO(ROUTES["/a.png"][2])).resize((43, 32), Image.Resampling.LANCZOS, reducing_gap=3.0)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(reference)[:, 5:37])


# ----------------------------------------------------------------------------- end to end
def test_download_end_to_end(server, tmp_path):
    u = server.url
    rows = [
        {"url": u("/a.png"), "caption": "a noisy landscape", "source": "web", "license": "cc-by"},  # 0
        {"url": u("/b.jpg"), "caption": "a tall jpeg", "source": "web"},  # 1
        {"url": u("/missing.png"), "caption": "gone"},  # 2
        {"url": u("/c.png"), "caption": "transparent"},  # 3
        {"url": u("/broken.jpg"), "caption": "truncated"},  # 4
        {"url": u("/slow.png"), "caption": "slow"},  # 5
        {"url": u("/page.html"), "caption": "html"},  # 6
        {"url": u("/flaky.png"), "caption": "flaky"},  # 7
        {"url": u("/tiny.png"), "caption": "tiny"},  # 8
        {"url": u("/huge.png"), "caption": "huge"},  # 9
        {"url": u("/huge-stream.png"), "caption": "huge, no length"},  # 10
        {"url": u("/d.png"), "caption": "gray"},  # 11
        {"url": u("/e.jpg"), "caption": "rotated by exif"},  # 12
        {"url": u("/forbidden"), "caption": "forbidden"},  # 13
        {"url": u("/down"), "caption": "always 503"},  # 14
        {"url": u("/noai.png"), "caption": "opted out"},  # 15
        {"url": "", "caption": "no url"},  # 16
        {"url": "ftp://example.com/x.png", "caption": "ftp"},  # 17
    ]
    tail = [{"url": u("/f.png"), "caption": "small, upscaled"},  # 19
            {"url": u("/a.png?again=1"), "caption": "clash", "width": 999}]  # 20
    manifest = _write_jsonl(tmp_path / "urls.jsonl", rows, ['{"url": broken json'] + [json.dumps(r) for r in tail])
    out = tmp_path / "out"
    t0 = time.monotonic()
    report = download(manifest, out, workers=4, shard_size=4, **FAST)
    assert time.monotonic() - t0 < 8

    failed = {"http 404": 1, "corrupt image": 1, "timeout": 1, "not an image": 1, "too small": 1, "too large": 2,
              "http 403": 1, "http 503": 1, "opted out": 1, "no url": 1, "bad url": 1, "bad row": 1}
    assert report.success == 8 and report.failed_by_reason == failed and report.rows == 21
    assert report.shards == 6 and report.shards_resumed == 0 and report.rows_fetched == 21
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["failed_by_reason"] == failed and on_disk["success"] == 8 and on_disk["failed"] == 13

    # retries: transient ones retried up to 1 + retries requests, 4xx and size/content failures never
    counts = server.counts
    assert counts["/flaky.png"] == 3 and counts["/down"] == 3 and counts["/slow.png"] == 3
    for path in ["/missing.png", "/forbidden", "/broken.jpg", "/page.html", "/tiny.png", "/huge.png",
                 "/huge-stream.png", "/noai.png"]:
        assert counts[path] == 1, path

    with open(out / "failures.csv", newline="") as f:
        failures = list(csv.DictReader(f))
    assert [(int(r["row"]), r["reason"]) for r in failures] == [
        (2, "http 404"), (4, "corrupt image"), (5, "timeout"), (6, "not an image"), (8, "too small"),
        (9, "too large"), (10, "too large"), (13, "http 403"), (14, "http 503"), (15, "opted out"),
        (16, "no url"), (17, "bad url"), (18, "bad row")]
    assert failures[0]["url"] == u("/missing.png") and failures[0]["key"] == "000000002"
    assert "line 19" in failures[-1]["detail"]  # the broken manifest line is named

    # shards: row r -> shard r // 4, key f"{r:09d}", members in row order, only successes in the tars
    samples, members = _tar_samples(out)
    ok_rows = [0, 1, 3, 7, 11, 12, 19, 20]
    assert sorted(samples) == [sample_key(r) for r in ok_rows]
    assert sorted(members) == [0, 1, 2, 3, 4, 5]
    assert members[0] == [f"00000000{r}.{ext}" for r in (0, 1, 3) for ext in ("jpg", "txt", "json")]
    for shard, names in members.items():
        assert all(int(name[:9]) // 4 == shard for name in names)
    expected = {0: ((64, 48), (43, 32)), 1: ((40, 100), (32, 80)), 3: ((50, 50), (32, 32)), 7: ((48, 64), (32, 43)),
                11: ((96, 64), (48, 32)), 12: ((40, 80), (32, 64)), 19: ((20, 30), (32, 48)), 20: ((64, 48), (43, 32))}
    captions = {i: r["caption"] for i, r in enumerate(rows)} | {19: tail[0]["caption"], 20: tail[1]["caption"]}
    urls = {i: r["url"] for i, r in enumerate(rows)} | {19: tail[0]["url"], 20: tail[1]["url"]}
    for row, (original, resized) in expected.items():
        sample = samples[sample_key(row)]
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == resized, row
        assert sample["txt"].decode() == captions[row]
        meta = json.loads(sample["json"])
        assert (meta["original_width"], meta["original_height"]) == original and meta["status"] == "success"
        assert (meta["width"], meta["height"]) == resized and meta["url"] == urls[row] and meta["row"] == row
        assert meta["key"] == sample_key(row) and len(meta["sha256"]) == 64
    meta0 = json.loads(samples[sample_key(0)]["json"])
    assert meta0["source"] == "web" and meta0["license"] == "cc-by" and meta0["original_format"] == "PNG"
    meta20 = json.loads(samples[sample_key(20)]["json"])
    assert meta20["manifest_width"] == 999 and meta20["width"] == 43  # a clashing column is kept, renamed
    # status files: one row per source row of the shard, in order, with the reason of each failure
    status = read_status(out / "00001.jsonl")
    assert [r["row"] for r in status] == [4, 5, 6, 7] and [r["reason"] for r in status] == \
        ["corrupt image", "timeout", "not an image", ""]
    assert status[3]["attempts"] == 3 and status[3]["status"] == "success"
    assert not list(out.glob("*.partial"))
    assert "http 404" in report.format_table() and "success" in report.format_table()


def test_shards_read_back_with_webdataset(server, tmp_path):
    import webdataset as wds

    paths = ["/a.png", "/b.jpg", "/moved-d.png"]  # the last one redirects to /d.png
    rows = [{"url": server.url(p), "caption": f"caption {i}"} for i, p in enumerate(paths)]
    download(_write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "out", workers=2, shard_size=2, crop=True, **FAST)
    tars = sorted(str(p) for p in (tmp_path / "out").glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002"]
    assert [s["txt"] for s in samples] == ["caption 0", "caption 1", "caption 2"]
    assert all(s["jpg"].size == (RES, RES) for s in samples)
    assert samples[2]["json"]["original_width"] == 96 and server.counts["/d.png"] == 1


def test_keys_and_bytes_do_not_depend_on_workers(server, tmp_path):
    paths = ["/a.png", "/missing.png", "/c.png", "/e.jpg", "/page.html"]
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"url": server.url(p), "caption": p} for p in paths])
    for workers in (1, 3):
        download(manifest, tmp_path / f"w{workers}", workers=workers, shard_size=2, image_format="webp", **FAST)
    names = sorted(p.name for p in (tmp_path / "w1").iterdir() if p.name != "report.json")
    assert names == ["00000.jsonl", "00000.tar", "00001.jsonl", "00001.tar", "00002.jsonl", "00002.tar",
                     "download.json", "failures.csv"]
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w3" / name).read_bytes(), name
    samples, _ = _tar_samples(tmp_path / "w1")
    assert sorted(samples) == ["000000000", "000000002", "000000003"] and "webp" in samples["000000002"]


def test_resume_fetches_only_missing_shards(server, tmp_path):
    rows = [{"url": server.url(f"/a.png?i={i}"), "caption": f"c{i}"} for i in range(8)]
    manifest = _write_jsonl(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    download(manifest, out, workers=2, shard_size=2, **FAST)
    first = {p.name: p.read_bytes() for p in out.glob("0000*")}
    assert len(server.log) == 8
    # shard 0 lost its tar; shard 1 lost everything; shard 2 "crashed" after its tar rename but before
    # its status file (leaving a .partial behind); shard 3 is intact
    (out / "00000.tar").unlink()
    (out / "00001.tar").unlink()
    (out / "00001.jsonl").unlink()
    (out / "00002.jsonl").unlink()
    (out / "00002.tar.partial").write_bytes(b"garbage from a killed run")
    server.log.clear()
    report = download(manifest, out, workers=2, shard_size=2, **FAST)
    assert sorted(server.log) == [f"/a.png?i={i}" for i in range(6)]
    assert report.shards_resumed == 1 and report.rows_fetched == 6 and report.success == 8 and report.rows == 8
    assert {p.name: p.read_bytes() for p in out.glob("0000*")} == first
    assert not list(out.glob("*.partial"))
    server.log.clear()
    report = download(manifest, out, workers=2, shard_size=2, **FAST)
    assert server.log == [] and report.shards_resumed == 4 and report.success == 8
    # a run cut short by --limit leaves a short last shard; a full rerun completes it
    out2 = tmp_path / "limited"
    download(manifest, out2, workers=2, shard_size=4, limit=5, **FAST)
    server.log.clear()
    report = download(manifest, out2, workers=2, shard_size=4, **FAST)
    assert sorted(server.log) == [f"/a.png?i={i}" for i in (4, 5, 6, 7)] and report.success == 8


def test_killed_run_restarts_the_unfinished_shard_only(server, tmp_path):
    paths = ["/a.png?k=0", "/a.png?k=1", "/a.png?k=2", "/slow-once.png"]  # row 3 hangs on its first request
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"url": server.url(p), "caption": p} for p in paths])
    out = tmp_path / "out"
    code = (f"from microdiff.data.download import download; download({str(manifest)!r}, {str(out)!r}, workers=1, "
            f"shard_size=2, resolution=32, min_size=16, timeout=30, progress=False)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        # kill it while row 3 hangs, after shard 0 (rows 0-1) was completed
        while (server.counts["/slow-once.png"] == 0 or not (out / "00000.jsonl").exists()) \
                and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert server.counts["/slow-once.png"] == 1, proc.stderr.read() if proc.poll() is not None else "no request"
    finally:
        proc.kill()
        proc.wait()
    assert (out / "00000.jsonl").is_file() and (out / "00001.tar.partial").is_file()
    assert not (out / "00001.jsonl").exists()
    server.log.clear()
    report = download(manifest, out, workers=1, shard_size=2, **FAST)
    assert sorted(server.log) == ["/a.png?k=2", "/slow-once.png"]
    assert report.shards_resumed == 1 and report.success == 4 and not list(out.glob("*.partial"))


# ----------------------------------------------------------------------------- sources
def test_jsonl_csv_parquet_and_hf_dataset_give_identical_shards(server, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"URL": [server.url(p) for p in ["/a.png", "/b.jpg", "/missing.png"]],
               "TEXT": ["one", "two, with a comma", "three"], "source": ["x", "y", "z"]}
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    _write_jsonl(tmp_path / "m.jsonl", rows)
    with open(tmp_path / "m.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.table(columns), tmp_path / "m.parquet")
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "hf"))
    outputs = {}
    for name in ["m.jsonl", "m.csv", "m.parquet", "hf"]:
        out = tmp_path / f"out-{name}"
        report = download(tmp_path / name, out, workers=2, shard_size=2, status_format="parquet", **FAST)
        assert report.success == 2 and report.failed_by_reason == {"http 404": 1}, name
        outputs[name] = [(out / f"0000{s}.tar").read_bytes() for s in range(2)]
        assert [r["reason"] for r in read_status(out / "00001.parquet")] == ["http 404"]
    assert all(tars == outputs["m.jsonl"] for tars in outputs.values())
    meta = json.loads(_tar_samples(tmp_path / "out-hf")[0]["000000001"]["json"])
    assert meta["caption"] == "two, with a comma" and meta["source"] == "y" and "URL" not in meta


def test_missing_url_column_lists_the_columns(tmp_path):
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"link": "http://x/a.png", "caption": "a"}])
    with pytest.raises(ValueError, match=r"m\.jsonl: found no URL column.*columns are: link, caption.*--url-column"):
        download(manifest, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match=r"no URL column 'image'; its columns are: link, caption"):
        download(manifest, tmp_path / "out", url_column="image", progress=False)
    with pytest.raises(ValueError, match=r"no caption column 'alt'.*--caption-column none"):
        download(manifest, tmp_path / "out", url_column="link", caption_column="alt", progress=False)


def test_missing_manifest_and_bad_settings_say_what_to_do(server, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope/urls\.parquet: no such manifest file"):
        download(tmp_path / "nope" / "urls.parquet", tmp_path / "out", progress=False)
    (tmp_path / "urls.xml").write_text("<urls/>")
    with pytest.raises(ValueError, match=r"urls\.xml: unknown manifest type '\.xml'"):
        download(tmp_path / "urls.xml", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="image_format 'gif'"):
        download(tmp_path / "urls.xml", tmp_path / "out", image_format="gif", progress=False)
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"url": server.url("/a.png"), "caption": "a"}])
    download(manifest, tmp_path / "out", **FAST)
    with pytest.raises(ValueError, match=r"other settings \(resolution: 32 -> 64\).*new --out"):
        download(manifest, tmp_path / "out", **(FAST | {"resolution": 64}))


# ----------------------------------------------------------------------------- CLI
def test_cli_download_prints_the_summary_table(server, tmp_path, capsys):
    # add_arguments / run as `microdiff data download` wires them (the parser here is the subcommand's own)
    parser = argparse.ArgumentParser(prog="microdiff data download")
    add_arguments(parser)
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"url": server.url(p), "text": p}
                                                   for p in ["/a.png", "/missing.png", "/b.jpg"]])
    args = parser.parse_args([str(manifest), "--out", str(tmp_path / "out"), "--resolution", "32", "--workers", "2",
                              "--timeout", "2", "--shard-size", "2", "--min-size", "16", "--format", "png"])
    code = run(args)
    captured = capsys.readouterr()
    assert code == 0
    assert "3 rows in 2 shards" in captured.out and "http 404" in captured.out and "failures.csv" in captured.out
    assert "img" in captured.err  # the tqdm bar (rate unit) went to stderr
    samples, _ = _tar_samples(tmp_path / "out")
    assert Image.open(io.BytesIO(samples["000000000"]["png"])).size == (43, 32)
    assert samples["000000000"]["txt"] == b"/a.png"
