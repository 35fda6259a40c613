"""The downloader against a real HTTP server on 127.0.0.1 (ThreadingHTTPServer in a thread, port 0).

The server serves Pillow-generated PNG/JPEG images of known sizes (RGB, RGBA, L, an EXIF-rotated
JPEG, one smaller than the resolution), a 404, a 403, a truncated JPEG, a response slower than the
timeout, an HTML page, a 503 that succeeds on the third request, a 503 that never does, a tiny image,
two bodies over the size cap (with and without Content-Length), an X-Robots-Tag: noai image,
responses that trickle their status line, headers or body one byte at a time for 20 s, a redirect
loop, a redirect to file://, and a 12 KB PNG that declares (and really holds) 100 M pixels. It
logs every request, so retries and resumes are checked by what was actually fetched. Expected sizes
after resizing are computed here by hand (short side -> 32, long side rounded half up).
"""

import argparse
import csv
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from microdiff.cli import build_parser, main
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


def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width, height):
    """A real 1-bit black PNG of width x height: ~12 KB for 10000 x 10000 (100 M pixels, which Pillow
    decodes to 100 MB, 300 MB as RGB), written row by row so making it costs no memory."""
    row, packer = b"\x00" + bytes((width + 7) // 8), zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def _with_declared_size(png, width, height):
    """A valid small PNG whose IHDR now declares width x height (its CRC recomputed): lies about its size."""
    ihdr = png[12:29]  # type + 13 data bytes, after the 8-byte signature and the 4-byte length
    patched = ihdr[:4] + struct.pack(">II", width, height) + ihdr[12:]
    return png[:12] + patched + struct.pack(">I", zlib.crc32(patched)) + png[33:]


def _drip(prefix, dripped):
    """A raw response: ``prefix`` at once, then ``dripped`` one byte every 0.5 s (20 s for 40 bytes)."""
    return {"raw": (prefix, dripped)}


_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 40\r\n"
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
    "/drip-status": (200, "", b"", _drip(b"", _HEAD + b"\r\n" + bytes(40))),  # not even a status line in time
    "/drip-headers": (200, "", b"", _drip(b"HTTP/1.1 200 OK\r\n", b"".join(b"X-Wait-%d: 1\r\n" % i for i in range(4)))),
    "/drip-body": (200, "", b"", _drip(_HEAD + b"\r\n", bytes(40))),
    "/loop": (302, "text/plain", b"", {"headers": {"Location": "/loop"}}),
    "/to-file": (302, "text/plain", b"", {"headers": {"Location": "file:///etc/passwd"}}),
    "/bomb.png": (200, "image/png", _bomb_png(10_000, 10_000), {}),
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
        if "raw" in opt:
            return self._drip(*opt["raw"])
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

    def _drip(self, prefix, dripped):
        try:
            self.wfile.write(prefix)
            for i in range(len(dripped)):
                time.sleep(0.5)
                self.wfile.write(dripped[i:i + 1])
        except OSError:  # the client hung up, as it should at its deadline
            pass
        self.close_connection = True

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


def test_process_image_refuses_too_many_pixels_from_the_header():
    # a 40 x 30 PNG whose header claims 30000 x 30000 (900 M pixels, over Pillow's own bomb limit too) and
    # one that claims 8000 x 6000 (48 M, under Pillow's limit): both refused by their declared size, before
    # any decoding, with their own reason (not "corrupt image", not the bytes cap's "too large")
    small = _image_bytes((40, 30), seed=13)
    for (width, height), said in [((30_000, 30_000), "900000000 pixels"), ((8_000, 6_000), "8000x6000")]:
        with pytest.raises(DownloadError) as e:
            process_image(_with_declared_size(small, width, height), ImageSettings(resolution=RES, min_size=16))
        assert e.value.reason == "too many pixels", (width, height)
        assert said in e.value.detail and "--max-megapixels" in e.value.detail
    # the cap is a setting: 1200 pixels passes 40 x 30 exactly, 1199 does not
    assert process_image(small, ImageSettings(resolution=RES, min_size=16, max_pixels=1200))[1]["width"] == 43
    with pytest.raises(DownloadError, match="1200 pixels > max 1199"):
        process_image(small, ImageSettings(resolution=RES, min_size=16, max_pixels=1199))


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
    names = sorted(p.name for p in (tmp_path / "w1").iterdir() if p.name not in ("report.json", "download.json"))
    assert names == [".download.lock", "00000.jsonl", "00000.sha256", "00000.tar", "00001.jsonl", "00001.sha256",
                     "00001.tar", "00002.jsonl", "00002.sha256", "00002.tar", "failures.csv"]
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w3" / name).read_bytes(), name
    settings = [json.loads((tmp_path / w / "download.json").read_text()) for w in ("w1", "w3")]
    assert [s["runs"][0]["workers"] for s in settings] == [1, 3]  # the runs differ, the dataset does not
    dataset = [{k: v for k, v in s.items() if k != "runs"} for s in settings]
    assert dataset[0] == dataset[1] and dataset[0]["resolution"] == RES
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


# ----------------------------------------------------------------------------- limits
def test_timeout_caps_the_whole_attempt_whatever_the_server_does(server, tmp_path):
    # three servers keep one attempt alive for 20 s or more by sending a byte every 0.5 s: of the status
    # line, of the headers, of the body. Each recv returns well inside --timeout 1, so only a cap on the
    # whole attempt ends them; before it, the header drips held an attempt for 20 s.
    paths = ["/drip-status", "/drip-headers", "/drip-body", "/a.png"]
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"url": server.url(p), "caption": p} for p in paths])
    build_parser()  # the first call imports every command's module: not part of what is timed
    t0 = time.monotonic()
    code = main(["data", "download", str(manifest), "--out", str(tmp_path / "out"), "--timeout", "1",
                 "--retries", "0", "--workers", "4", "--resolution", "32", "--min-size", "16", "--no-progress"])
    elapsed = time.monotonic() - t0
    assert code == 0
    # measured on an idle 2-core machine: 1.0-1.1 s (the three attempts run in parallel); 8 s leaves room
    # for a loaded machine and is still far below the 20 s a per-recv timeout allows
    assert elapsed < 8, elapsed
    status = read_status(tmp_path / "out" / "00000.jsonl")
    assert [(r["reason"], r["attempts"]) for r in status] == [("timeout", 1)] * 3 + [("", 1)]
    assert all("1 s" in r["detail"] for r in status[:3]), [r["detail"] for r in status]
    assert [server.counts[p] for p in paths] == [1, 1, 1, 1]


def test_retried_timeouts_each_get_one_timeout(server, tmp_path):
    # with retries, every attempt is capped: 1 + 2 attempts of 0.8 s plus the backoff, not 3 x 24 s
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"url": server.url("/drip-headers"), "caption": "x"}])
    t0 = time.monotonic()
    report = download(manifest, tmp_path / "out", **(FAST | {"timeout": 0.8, "retries": 2}))
    assert time.monotonic() - t0 < 10  # measured: 2.5 s
    assert report.failed_by_reason == {"timeout": 1} and server.counts["/drip-headers"] == 3


def test_redirect_loops_and_redirects_to_other_schemes_are_refused(server, tmp_path):
    rows = [{"url": server.url(p), "caption": p} for p in ["/loop", "/to-file", "/moved-d.png"]]
    report = download(_write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "out", **FAST)
    status = read_status(tmp_path / "out" / "00000.jsonl")
    assert [r["status"] for r in status] == ["failed", "failed", "success"] and report.success == 1
    assert status[0]["reason"] == "http 302" and "infinite loop" in status[0]["detail"]
    assert status[1]["reason"] == "http 302" and "file:///etc/passwd" in status[1]["detail"]
    assert server.counts["/loop"] <= 11  # urllib's cap on a redirect chain


def test_decompression_bomb_is_refused_before_decoding(server, tmp_path):
    # a 12 KB PNG of 10000 x 10000 pixels (100 M: decoding it takes ~500 MB) next to an ordinary image,
    # through the CLI in a fresh process whose peak memory we read: refused by its header, counted under
    # its own reason in the status file and the report, the run goes on, and memory stays flat
    rows = [{"url": server.url(p), "caption": p} for p in ["/bomb.png", "/a.png"]]
    manifest = _write_jsonl(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    # (the command's own parser and run(), as `microdiff data download` wires them, without importing the
    # other commands: this process starts in ~2 s)
    code = ("import argparse, json, resource, sys; from microdiff.data.download import add_arguments, run; "
            "parser = argparse.ArgumentParser(); add_arguments(parser); args = parser.parse_args(sys.argv[1:]); "
            "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; before = peak(); "
            "rc = run(args); print(json.dumps({'rc': rc, 'grew_mb': (peak() - before) / 1024}))")
    args = [str(manifest), "--out", str(out), "--resolution", "32", "--min-size", "16", "--workers", "2",
            "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0
    # measured: grows ~1 MB after the fix, ~460-480 MB before (the bomb decoded, converted to RGB, resized)
    assert result["grew_mb"] < 150, result
    status = read_status(out / "00000.jsonl")
    assert status[0]["reason"] == "too many pixels" and "10000x10000" in status[0]["detail"]
    assert status[0]["status"] == "failed" and status[1]["status"] == "success"
    report = json.loads((out / "report.json").read_text())
    assert report["failed_by_reason"] == {"too many pixels": 1} and report["success"] == 1
    assert "too many pixels" in proc.stdout  # the summary table
    # the flag moves the cap: at 0.001 megapixels (1000 pixels) the 64 x 48 image is refused as well
    code = main(["data", "download", str(manifest), "--out", str(tmp_path / "tight"), "--resolution", "32",
                 "--min-size", "16", "--max-megapixels", "0.001", "--no-progress"])
    assert code == 2  # no image at all: an error, after the reports are written
    assert [r["reason"] for r in read_status(tmp_path / "tight" / "00000.jsonl")] == ["too many pixels"] * 2


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


def test_manifests_with_a_byte_order_mark_read_like_any_other(server, tmp_path):
    # Excel's "CSV UTF-8" and some editors start the file with a BOM; it is no part of the first column
    url = server.url("/a.png")
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfurl,caption\n" + url.encode() + b",caf\xc3\xa9\n")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"url": url, "caption": "caf\u00e9"}).encode() + b"\n")
    for name in ["bom.csv", "bom.jsonl"]:
        report = download(tmp_path / name, tmp_path / f"out-{name}", **FAST)
        assert report.success == 1, (name, report.failed_by_reason)
        assert _tar_samples(tmp_path / f"out-{name}")[0]["000000000"]["txt"].decode() == "caf\u00e9"


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


# ----------------------------------------------------------------------------- user errors
def _cli_error(capsys, args):
    """Run `microdiff data download ARGS`; return its one stderr line (after checking exit 2, one line)."""
    code = main(["data", "download", *map(str, args), "--no-progress"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    assert lines[0].startswith("microdiff data download: error: "), lines
    return lines[0]


@pytest.mark.parametrize("flags, named", [
    (["--workers", "0"], "--workers"), (["--workers", "-3"], "--workers"),
    (["--timeout", "0"], "--timeout"), (["--timeout", "-1"], "--timeout"), (["--timeout", "nan"], "--timeout"),
    (["--timeout", "inf"], "--timeout"), (["--resolution", "-4"], "--resolution"),
    (["--retries", "-1"], "--retries"), (["--max-mb", "0"], "--max-mb"), (["--max-mb", "nan"], "--max-mb"),
    (["--max-megapixels", "0"], "--max-megapixels"), (["--min-size", "-1"], "--min-size"),
    (["--quality", "0"], "--quality"), (["--quality", "101"], "--quality"), (["--shard-size", "0"], "--shard-size"),
    (["--limit", "-1"], "--limit"), (["--crop", "--resolution", "0"], "--crop"),
])
def test_bad_settings_end_in_one_line_naming_the_flag(server, tmp_path, capsys, flags, named):
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"url": server.url("/a.png"), "caption": "a"}])
    line = _cli_error(capsys, [manifest, "--out", tmp_path / "out", *flags])
    assert named in line, line
    assert server.counts["/a.png"] == 0 and not (tmp_path / "out").exists()  # refused before anything ran


def test_bad_sources_end_in_one_line_naming_the_file(tmp_path, capsys):
    out = ["--out", tmp_path / "out"]
    assert "nope.jsonl: no such manifest" in _cli_error(capsys, [tmp_path / "nope.jsonl", *out])
    nourl = _write_jsonl(tmp_path / "nourl.jsonl", [{"link": "http://x/a.png", "caption": "a"}])
    line = _cli_error(capsys, [nourl, *out])
    assert "nourl.jsonl" in line and "link, caption" in line and "--url-column" in line
    (tmp_path / "empty.csv").write_text("url,caption\n")
    assert "empty.csv: no rows" in _cli_error(capsys, [tmp_path / "empty.csv", *out])
    (tmp_path / "blank.jsonl").write_text("\n\n")
    assert "blank.jsonl: no rows" in _cli_error(capsys, [tmp_path / "blank.jsonl", *out])
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00\x01 binary\n")
    line = _cli_error(capsys, [tmp_path / "binary.jsonl", *out])
    assert "binary.jsonl: no line is a JSON object" in line and "line 1: not UTF-8" in line
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    assert "bad.parquet: not a readable Parquet file" in _cli_error(capsys, [tmp_path / "bad.parquet", *out])
    (tmp_path / "latin1.csv").write_bytes("url,caption\nhttp://x/a.png,caf\u00e9\n".encode("latin-1"))
    line = _cli_error(capsys, [tmp_path / "latin1.csv", *out])
    assert "latin1.csv" in line and "UTF-8" in line and "line 2" in line
    assert not (tmp_path / "out").exists()


def test_bad_out_folders_end_in_one_line(server, tmp_path, capsys):
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"url": server.url("/a.png"), "caption": "a"}])
    (tmp_path / "afile").write_text("mine")
    line = _cli_error(capsys, [manifest, "--out", tmp_path / "afile"])
    assert "afile" in line and "not a folder" in line and (tmp_path / "afile").read_text() == "mine"
    line = _cli_error(capsys, [manifest, "--out", tmp_path / "afile" / "sub"])
    assert "afile/sub" in line and "--out" in line
    # a folder with someone else's files (images, a precompute's shards) is never written into
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "00000.tar").write_bytes(b"my shard")
    line = _cli_error(capsys, [manifest, "--out", tmp_path / "images"])
    assert "images" in line and "not empty" in line and "download.json" in line
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["00000.tar"]
    assert (tmp_path / "images" / "00000.tar").read_bytes() == b"my shard" and server.counts["/a.png"] == 0


def test_out_holding_another_download_is_refused_and_the_same_one_resumed(server, tmp_path, capsys):
    rows = [{"url": server.url(f"/a.png?i={i}"), "caption": f"c{i}"} for i in range(4)]
    manifest = _write_jsonl(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    base = [manifest, "--out", out, "--resolution", "32", "--min-size", "16", "--shard-size", "2", "--no-progress"]
    assert main(["data", "download", *map(str, base)]) == 0
    before = {p.name: p.read_bytes() for p in out.glob("0000*")}
    server.log.clear()
    capsys.readouterr()
    # other settings: refused, naming what changed
    line = _cli_error(capsys, [*base, "--resolution", "64"])
    assert "resolution: 32 -> 64" in line and "--out" in line
    other = _write_jsonl(tmp_path / "other.jsonl", rows)
    assert "source:" in _cli_error(capsys, [other, *base[1:]])
    # the same manifest file, edited since (row 1 now points elsewhere): refused, nothing fetched
    edited = [dict(r) for r in rows]
    edited[1]["url"] = server.url("/b.jpg")
    _write_jsonl(manifest, edited)
    line = _cli_error(capsys, base)
    assert "00000" in line and "row 1" in line and "changed" in line and "new --out" in line
    assert server.log == [] and {p.name: p.read_bytes() for p in out.glob("0000*")} == before
    # the same manifest and settings: resumed, nothing fetched again; rows appended later are fetched
    _write_jsonl(manifest, rows + [{"url": server.url("/a.png?i=4"), "caption": "c4"}])
    assert main(["data", "download", *map(str, base)]) == 0
    assert server.log == ["/a.png?i=4"]
    assert json.loads((out / "report.json").read_text())["success"] == 5
    assert [run["rows_fetched"] for run in json.loads((out / "download.json").read_text())["runs"]] == [4, 1]


def test_a_second_download_into_a_folder_in_use_is_refused(server, tmp_path, capsys):
    # one run hangs on a slow row while holding the folder; a second one into it is refused in one line
    # (the row's server sends one byte every 0.5 s for 54 s: the first run holds the folder that long)
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"url": server.url("/drip-status"), "caption": "slow"}])
    out = tmp_path / "out"
    code = (f"from microdiff.data.download import download; download({str(manifest)!r}, {str(out)!r}, "
            "timeout=120, retries=0, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while server.counts["/drip-status"] == 0 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert server.counts["/drip-status"] == 1, proc.stderr.read() if proc.poll() is not None else "no request"
        line = _cli_error(capsys, [manifest, "--out", out])
        assert str(out) in line and "another download" in line
    finally:
        proc.kill()
        proc.wait()
    # the first run died (kill -9): its lock went with it, and a rerun proceeds (to its end: the slow row
    # times out, so no image is downloaded, which is an error naming the failure report)
    assert main(["data", "download", str(manifest), "--out", str(out), "--timeout", "0.5", "--retries", "0",
                 "--no-progress"]) == 2
    assert "no image was downloaded" in capsys.readouterr().err and (out / "failures.csv").is_file()


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
    # the bar (on stderr) ends at 3/3 with elapsed<remaining, the rate, and the running ok/failed counts
    assert re.search(r"3/3 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+img/s, failed=1, ok=2\]", captured.err), captured.err
    # the totals by status and reason: printed, and kept in the output folder
    assert re.search(r"success +2 +66\.7", captured.out) and re.search(r"http 404 +1 +33\.3", captured.out)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["success"] == 2 and report["failed_by_reason"] == {"http 404": 1} and report["rows"] == 3
    samples, _ = _tar_samples(tmp_path / "out")
    assert Image.open(io.BytesIO(samples["000000000"]["png"])).size == (43, 32)
    assert samples["000000000"]["txt"] == b"/a.png"
