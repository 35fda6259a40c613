"""Issue 17, the data layer, through the commands a user runs: bad files never stop a run and are
replaced the same way on every resume, rank and worker count (defect 3); skip totals by reason at the
end of every command (4); `microdiff data download`'s folder trains, precomputes, checks and inspects
(8); manifests in other encodings, with other column names, with repeated keys, and inspect counting
what training uses (12); precompute never keeps stale shards (6); every `microdiff data` command ends
in one line on bad input (11).

The data is real: shapes PNGs written here, then damaged as a user's files get damaged (a truncated
PNG, an empty file, text saved as .png, a lost caption); images served over HTTP from 127.0.0.1 for the
downloader. Training runs are `microdiff train` processes on 16 px images (a few seconds each).
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from microdiff.data.shapes import write_shapes_folder
from microdiff.data.shards import ShardStream, read_dataset_info

from train_helpers import TINY, env, losses

TEXT = "builtin:byte-d16-l1-h2-len96-mlp2-seed0"
BAD = {"00001.png": "corrupt image", "00002.png": "empty file", "00003.png": "not an image",
       "00004.png": "missing caption"}


# ----------------------------------------------------------------------------- helpers
def _cli(*args, cwd=None, timeout=300, extra_env=None):
    return subprocess.run([sys.executable, "-m", "microdiff", *map(str, args)], capture_output=True, text=True,
                          env={**env(), **(extra_env or {})}, cwd=cwd, timeout=timeout)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


TRAIN_STATUS = (2,)  # `microdiff train` ends a user error like every command: one line, status 2


def _one_line_error(proc, *names, status=(2,)):
    """Exit status 2, one error line naming every one of ``names``, no traceback (progress bars, the
    usage lines argparse prints and logged warnings aside)."""
    assert proc.returncode in status, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line or line.startswith("microdiff train:")]
    assert len(errors) == 1, proc.stderr
    for name in names:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


def _damage(folder: Path) -> None:
    """The four kinds of bad file of BAD: truncated PNG, zero bytes, text as .png, a lost caption."""
    png = folder / "00001.png"
    png.write_bytes(png.read_bytes()[:60])
    (folder / "00002.png").write_bytes(b"")
    (folder / "00003.png").write_text("this is not an image\n")
    (folder / "00004.txt").unlink()
    side = folder / "00004.json"
    meta = json.loads(side.read_text())
    meta.pop("caption", None)
    side.write_text(json.dumps(meta))


def _bad_folder(path: Path, n: int = 10) -> Path:
    write_shapes_folder(path, n, resolution=16, seed=0, progress=False)
    _damage(path)
    return path


def _config(path: Path, source, **sections) -> Path:
    data = json.loads(json.dumps(TINY))
    data["data"] = {"source": str(source), "resolution": 16}
    data["encoders"] = {"text": TEXT}
    data["train"].update(steps=4, batch_size=4, micro_batch_size=2)
    data["checkpoint"] = {"every": 2, "keep_last": 2}
    data["ema"] = {"decays": [0.9]}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(data))
    return path


def _train(config, out, *extra, timeout=300):
    return _ok(_cli("train", config, "--out", out, *extra, timeout=timeout))


def _skips(run: Path) -> dict:
    report = json.loads((run / "skips.json").read_text())
    return {"counts": report["counts"], "replaced": report["replaced"],
            "items": sorted((i["path"], i["reason"]) for i in report["items"])}


# ----------------------------------------------------------------------------- defects 3 and 4: training
def test_training_replaces_bad_files_identically_on_resume_and_with_workers(tmp_path):
    """10 images, 4 bad: with batch 4 in micro-batches of 2 some micro-batch holds only bad items (the
    old trainer died there with "stack expects a non-empty TensorList", at the same step on every
    resume). Now every micro-batch is full and the run finishes; a two-stage run (steps 2, then 4 with
    --resume auto) and an uninterrupted run with 2 DataLoader workers compute the same losses, and
    skips.json holds the same totals by reason, counted once per item however often it was drawn."""
    folder = _bad_folder(tmp_path / "img")
    staged = tmp_path / "staged"
    _train(_config(tmp_path / "c2.yaml", folder, train={"steps": 2}), staged)
    proc = _train(_config(tmp_path / "c.yaml", folder), staged, "--resume", "auto")
    assert sorted(losses(staged)) == [1, 2, 3, 4]
    skips = _skips(staged)
    assert skips["counts"] == {reason: 1 for reason in BAD.values()}
    assert {Path(p).name: reason for p, reason in skips["items"]} == BAD
    assert skips["replaced"] >= 2  # the bad images were drawn (and replaced) at least twice in 16 draws
    assert "img: skipped 4 items" in proc.stdout and "skips.json" in proc.stdout

    workers = tmp_path / "workers"
    _train(_config(tmp_path / "c3.yaml", folder, data={"num_workers": 2}), workers)
    assert losses(workers) == losses(staged)
    assert _skips(workers) == skips


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_bad_files_match_one_process(tmp_path):
    """torchrun, 2 CPU processes (gloo): each rank steps with its full half of every global batch, so the
    collectives stay in step, the losses equal one process's (to the all-reduce's summation order) and
    the totals gathered from both ranks equal one process's."""
    folder = _bad_folder(tmp_path / "img")
    config = _config(tmp_path / "c.yaml", folder, train={"steps": 3}, checkpoint={"every": 0})
    one, two = tmp_path / "one", tmp_path / "two"
    _train(config, one)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "microdiff", "train", str(config), "--out", str(two)]
    _ok(subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300))
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a[step], b[step])
    assert _skips(two) == _skips(one)


def test_sigma_first_replacements_are_eligible_at_their_sigma(tmp_path):
    """Ambient sigma_first picks each slot's sample among those usable at the slot's sigma. Files that
    break after the eligibility scan (read at training time) are replaced by a sample that is eligible
    at that sigma too, the same with or without workers."""
    from microdiff.diffusion.noise import make_noise_distribution
    from microdiff.train.ambient import EligibilityIndex, LevelTable, sigma_first_batch
    from microdiff.train.config import AmbientConfig, DataConfig
    from microdiff.train.data import SigmaFirstBatches, split_batch
    from microdiff.data.sources import build_dataset, scan_records

    folder = tmp_path / "img"
    write_shapes_folder(folder, 16, resolution=16, seed=0, progress=False)
    for i in range(0, 16, 2):  # half the images noisy: trusted only above sigma 1.0
        side = folder / f"{i:05d}.json"
        side.write_text(json.dumps(json.loads(side.read_text()) | {"sigma_tn": 1.0}))
    spec = DataConfig(source=str(folder), resolution=16)
    dataset = build_dataset(spec, progress=False)
    table = LevelTable(AmbientConfig(enabled=True), pixel_space=False)
    records = scan_records(dataset, "levels", progress=False)
    bounds = {key: table.bounds(table.levels(key, meta)) for key, meta in records}
    lo, hi = (np.array([bounds[k][j] for k, _ in records]) for j in (0, 1))
    index = EligibilityIndex(lo, hi)
    noise = make_noise_distribution("lognormal", p_mean=0.0, p_std=1.0)

    def chooser(step):
        sigma = noise.sample(8, generator=torch.Generator().manual_seed(step))
        redraw = torch.Generator().manual_seed(10_000 + step)
        return sigma_first_batch(index, sigma, lambda n, _r: noise.sample(n, generator=redraw), 0, step)

    for i in (0, 3, 6, 9):  # two noisy and two clean images break after the scan
        (folder / f"{i:05d}.png").write_bytes(b"")
    broken = {f"{i:05d}" for i in (0, 3, 6, 9)}
    seen = []
    for workers in (0, 2):
        batches = SigmaFirstBatches(dataset, DataConfig(source=str(folder), resolution=16, num_workers=workers), 8,
                                    split_batch(8, 1, 0, 4), chooser, eligible=index.eligible)
        keys = []
        for micro in batches.steps(0, 12):
            for _, batch in micro:
                assert len(batch["key"]) == 4 and batch["image"].shape[0] == 4
                for key, sigma in zip(batch["key"], batch["sigma"].tolist()):
                    low, high = bounds[key]
                    assert low < sigma <= high, (key, sigma, low, high)
                    assert key not in broken
                keys += batch["key"]
        skipped = {Path(item.path).stem for item in batches.skips().items}
        assert skipped <= broken and len(skipped) >= 2 and batches.skips().replaced >= len(skipped)
        assert set(batches.skips().counts) == {"empty file"}
        seen.append(keys)
    assert seen[0] == seen[1]


def test_a_source_with_nothing_readable_stops_in_one_line(tmp_path):
    folder = tmp_path / "img"
    write_shapes_folder(folder, 4, resolution=16, seed=0, progress=False)
    for png in folder.glob("*.png"):
        png.write_bytes(b"")
    error = _one_line_error(_cli("train", _config(tmp_path / "c.yaml", folder), "--out", tmp_path / "run"), "img",
                            status=TRAIN_STATUS)
    assert "none of the" in error and "usable" in error and "microdiff data check" in error


def test_other_commands_print_the_skip_totals(tmp_path):
    """precompute, data check, data inspect, train-autoencoder, annotate and eval memorization build
    the source as training does and end with the totals by reason."""
    folder = _bad_folder(tmp_path / "img", 12)
    want = "img: skipped 4 items"
    check = _ok(_cli("data", "check", "img", "--resolution", "16", "--out", "rep", "--no-progress", cwd=tmp_path))
    assert want in check.stdout and "11 items indexed, 8 usable" in check.stdout
    assert json.loads((tmp_path / "rep.json").read_text())["counts"] == {r: 1 for r in BAD.values()}
    inspect = _ok(_cli("data", "inspect", "img", "--no-progress", cwd=tmp_path))
    assert "img: 11 samples, 1 skipped (missing caption: 1)" in inspect.stdout  # images are not decoded there
    pre = _ok(_cli("data", "precompute", "img", "--out", "lat", "--autoencoder", "identity", "--text-encoder", TEXT,
                   "--resolution", "16", "--shard-size", "4", "--device", "cpu", "--no-progress", cwd=tmp_path))
    assert want in pre.stdout and read_dataset_info(tmp_path / "lat")["num_samples"] == 8
    vae = _ok(_cli("train-autoencoder", "--data", "img", "--out", "vae", "--kind", "vae", "--resolution", "16",
                   "--steps", "3", "--batch-size", "4", "--channels", "8", "--channel-mult", "1,2", "--no-disc",
                   "--holdout", "2", "--device", "cpu", "--no-progress", cwd=tmp_path))
    assert want in vae.stdout and "batch slot" in vae.stdout
    ann = _ok(_cli("annotate", "img", "--out", "ann", "--resolution", "16", "--corruption", "noise:0.3@0.5",
                   "--split", "corruption", "--steps", "3",
                   "--grid-size", "4", "--draws", "1", "--batch-size", "4", "--width", "8", "--heldout", "0.2",
                   "--device", "cpu", "--no-progress", cwd=tmp_path))
    assert want in ann.stdout
    gen = tmp_path / "gen"
    gen.mkdir()
    shutil.copy(folder / "00000.png", gen / "copy.png")
    mem = _ok(_cli("eval", "memorization", "--gen", "gen", "--train", "img", "--features", "pixels", "--k", "1",
                   "--skip-bad", "--pairs", "0", "--out", "mem", "--quiet", cwd=tmp_path))
    assert "training set img: skipped 4 items" in mem.stdout


def test_latent_sources_are_refused_in_one_line_where_images_are_needed(tmp_path):
    _ok(_cli("data", "precompute", "shapes:4", "--out", "lat", "--autoencoder", "identity", "--text-encoder", TEXT,
             "--resolution", "16", "--device", "cpu", "--no-progress", cwd=tmp_path))
    for args in (["data", "precompute", "lat", "--out", "again", "--autoencoder", "identity", "--text-encoder", TEXT],
                 ["train-autoencoder", "--data", "lat", "--out", "vae"],
                 ["annotate", "lat", "--out", "ann"]):
        error = _one_line_error(_cli(*args, "--no-progress", cwd=tmp_path), "lat")
        assert "holds precomputed latents" in error and "needs images" in error
    assert "4 samples read" in _ok(_cli("data", "check", "lat", "--out", "rep", "--no-progress", cwd=tmp_path)).stdout
    shard = tmp_path / "lat" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])  # a damaged shard stops training: check says so and fails
    error = _one_line_error(_cli("data", "check", "lat", "--out", "rep", "--no-progress", cwd=tmp_path), "shard-000000")
    assert "training stops at them" in error


# ----------------------------------------------------------------------------- defect 8: download folders
def _png(size, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


class _Images(BaseHTTPRequestHandler):
    ROUTES = {f"/{i}.png": (200, "image/png", _png((24 + i, 20), i)) for i in range(7)}
    ROUTES["/page.html"] = (200, "text/html", b"<html>not an image</html>")

    def do_GET(self):
        status, ctype, body = self.ROUTES.get(self.path, (404, "text/plain", b"not found"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def web_folder(tmp_path_factory):
    """A real `microdiff data download` folder: 7 images, a 404 and an HTML page from a local server."""
    root = tmp_path_factory.mktemp("download")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    rows = [{"url": f"{base}/{i}.png", "caption": f"random picture {i}", "source": "web"} for i in range(7)]
    rows[3:3] = [{"url": f"{base}/missing.png", "caption": "gone"}, {"url": f"{base}/page.html", "caption": "html"}]
    (root / "urls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        _ok(_cli("data", "download", "urls.jsonl", "--out", "web", "--resolution", "16", "--min-size", "8",
                 "--shard-size", "4", "--workers", "2", "--retries", "0", "--timeout", "5", "--no-progress", cwd=root))
    finally:
        server.shutdown()
        server.server_close()
    assert json.loads((root / "web" / "report.json").read_text())["success"] == 7
    return root


def test_a_download_folder_checks_inspects_precomputes_and_trains(web_folder, tmp_path):
    web = web_folder / "web"
    check = _ok(_cli("data", "check", web, "--resolution", "16", "--out", tmp_path / "rep", "--no-progress"))
    assert "7 items indexed, 7 usable" in check.stdout and "nothing skipped" in check.stdout
    inspect = _ok(_cli("data", "inspect", web, "--no-progress", "--json", tmp_path / "i.json"))
    summary = json.loads((tmp_path / "i.json").read_text())
    assert summary["samples"] == 7 and summary["sources"] == {"web": 7} and "7 samples" in inspect.stdout
    _ok(_cli("data", "precompute", web, "--out", tmp_path / "lat", "--autoencoder", "identity", "--text-encoder",
             TEXT, "--resolution", "16", "--shard-size", "4", "--device", "cpu", "--no-progress"))
    samples = list(ShardStream(tmp_path / "lat", shuffle_buffer=0))
    assert sorted(s["caption"] for s in samples) == sorted(f"random picture {i}" for i in range(7))
    assert {s["key"] for s in samples} == {f"{row:09d}" for row in (0, 1, 2, 5, 6, 7, 8)}  # download's row keys
    for source in (web, tmp_path / "lat"):  # the images, and their precomputed latents
        run = tmp_path / f"run-{Path(source).name}"
        _train(_config(tmp_path / "c.yaml", source, train={"steps": 2}, checkpoint={"every": 0}), run)
        assert sorted(losses(run)) == [1, 2]


def test_an_unfinished_download_is_refused_with_the_way_to_finish_it(web_folder, tmp_path):
    partial = tmp_path / "web"
    shutil.copytree(web_folder / "web", partial)
    (partial / "00001.jsonl").unlink()  # as a kill between the tar and its status file leaves it
    for args in (["data", "check", partial, "--out", tmp_path / "rep"], ["data", "inspect", partial],
                 ["data", "precompute", partial, "--out", tmp_path / "lat", "--autoencoder", "identity",
                  "--text-encoder", TEXT]):
        error = _one_line_error(_cli(*args, "--no-progress"), partial)
        assert "download is not finished" in error and "rerun `microdiff data download`" in error


def test_precompute_of_a_source_with_nothing_usable_is_an_error(tmp_path):
    folder = tmp_path / "img"
    write_shapes_folder(folder, 3, resolution=16, seed=0, progress=False)
    for png in folder.glob("*.png"):
        png.write_bytes(png.read_bytes()[:40])
    proc = _cli("data", "precompute", folder, "--out", tmp_path / "lat", "--autoencoder", "identity",
                "--text-encoder", TEXT, "--resolution", "16", "--device", "cpu", "--no-progress")
    error = _one_line_error(proc, folder)
    assert "every one of its 3 items was skipped (not an image: 3)" in error
    assert not (tmp_path / "lat" / "dataset.json").exists()


# ----------------------------------------------------------------------------- defect 12: manifests, inspect
def _manifest_rows(folder: Path):
    return [(f"img/{i:05d}.png", caption) for i, caption in enumerate(["café au lait", "a red circle",
                                                                         "naïve art", "crème brûlée"])]


def test_excel_and_latin1_csv_with_another_caption_column(tmp_path):
    """An Excel CSV (UTF-8 with a byte-order mark) and a Latin-1 CSV whose caption column is called
    "description": the error says how to name the column, --caption-column / data.caption_column
    name it, and the captions arrive as written (the Latin-1 file with a warning)."""
    write_shapes_folder(tmp_path / "img", 4, resolution=16, seed=0, progress=False)
    text = "file,description\r\n" + "".join(f"{path},{caption}\r\n" for path, caption in _manifest_rows(tmp_path))
    (tmp_path / "excel.csv").write_bytes(text.encode("utf-8-sig"))
    (tmp_path / "latin1.csv").write_bytes(text.encode("latin-1"))
    error = _one_line_error(_cli("data", "check", "excel.csv", "--out", "rep", "--no-progress", cwd=tmp_path),
                            "excel.csv", "file, description", "--caption-column")
    assert "\ufeff" not in error
    check = _ok(_cli("data", "check", "excel.csv", "--caption-column", "description", "--resolution", "16",
                     "--out", "rep", "--no-progress", cwd=tmp_path))
    assert "4 items indexed, 4 usable" in check.stdout
    pre = _ok(_cli("data", "precompute", "latin1.csv", "--caption-column", "description", "--out", "lat",
                   "--autoencoder", "identity", "--text-encoder", TEXT, "--resolution", "16", "--device", "cpu",
                   "--no-progress", cwd=tmp_path))
    assert "not UTF-8" in pre.stderr and "Windows-1252" in pre.stderr
    captions = sorted(s["caption"] for s in ShardStream(tmp_path / "lat", shuffle_buffer=0))
    assert captions == sorted(caption for _, caption in _manifest_rows(tmp_path))
    run = tmp_path / "run"
    _train(_config(tmp_path / "c.yaml", tmp_path / "excel.csv", data={"caption_column": "description"},
                   train={"steps": 2}, checkpoint={"every": 0}), run)
    assert sorted(losses(run)) == [1, 2]
    error = _one_line_error(_cli("train", _config(tmp_path / "c2.yaml", tmp_path / "img",
                                                  data={"caption_column": "description"}), "--out", tmp_path / "r2"),
                            "caption_column", status=TRAIN_STATUS)
    assert "manifests" in error


def test_repeated_keys_are_made_unique_with_a_warning(tmp_path):
    """Keys seed each sample's corruption and name its annotation: rows sharing a key would share both.
    The repeats become key#2, key#3 (in file order), with one warning giving the counts."""
    write_shapes_folder(tmp_path / "img", 4, resolution=16, seed=0, progress=False)
    rows = [{"path": f"img/{image:05d}.png", "caption": f"picture {i}", "key": key}
            for i, (image, key) in enumerate([(0, "a"), (0, "a"), (1, "b"), (0, "a")])]  # one image listed 3 times
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pre = _ok(_cli("data", "precompute", "m.jsonl", "--out", "lat", "--autoencoder", "identity", "--text-encoder",
                   TEXT, "--resolution", "16", "--device", "cpu", "--corruption", "noise:0.2@1", "--no-progress",
                   cwd=tmp_path))
    assert "1 key occur more than once (3 rows" in pre.stderr
    samples = {s["key"]: s for s in ShardStream(tmp_path / "lat", shuffle_buffer=0)}
    assert sorted(samples) == ["a", "a#2", "a#3", "b"]
    assert samples["a"]["caption"] == "picture 0" and samples["a#3"]["caption"] == "picture 3"
    a, a2, a3 = (samples[k]["latent"] for k in ("a", "a#2", "a#3"))  # one clean image, three noise draws
    assert not torch.equal(a, a2) and not torch.equal(a, a3) and not torch.equal(a2, a3)


def test_inspect_counts_what_training_would_use_and_skip(tmp_path):
    """A caption file that is not UTF-8, a malformed JSON sidecar, a blank caption and hidden files:
    inspect does not crash and counts exactly what `data check` (the training index) counts."""
    folder = tmp_path / "img"
    write_shapes_folder(folder, 8, resolution=16, seed=0, progress=False)
    (folder / "00001.txt").write_bytes(b"caf\xe9 \xff\xfe")
    (folder / "00002.json").write_text("{not json")
    (folder / "00003.txt").write_text("   \n")
    shutil.copy(folder / "00005.png", folder / ".hidden.png")
    shutil.copy(folder / "00005.txt", folder / ".hidden.txt")
    (folder / ".cache").mkdir()
    shutil.copy(folder / "00006.png", folder / ".cache" / "x.png")
    shutil.copy(folder / "00006.txt", folder / ".cache" / "x.txt")
    inspect = _ok(_cli("data", "inspect", folder, "--json", tmp_path / "i.json", "--no-progress"))
    summary = json.loads((tmp_path / "i.json").read_text())
    reasons = {"bad caption file": 1, "bad sidecar": 1, "missing caption": 1}
    assert summary["samples"] == 5 and summary["skipped_by_reason"] == reasons, summary
    assert "5 samples, 3 skipped" in inspect.stdout
    check = _ok(_cli("data", "check", folder, "--resolution", "16", "--out", tmp_path / "rep", "--no-progress"))
    assert json.loads((tmp_path / "rep.json").read_text())["counts"] == reasons
    assert "5 items indexed, 5 usable" in check.stdout
    assert summary["caption_words"]["min"] >= 1


# ----------------------------------------------------------------------------- defect 6: stale shards
def test_precompute_redoes_shards_whose_inputs_changed(tmp_path):
    folder = tmp_path / "img"
    write_shapes_folder(folder, 6, resolution=16, seed=0, progress=False)
    base = ["data", "precompute", folder, "--out", tmp_path / "lat", "--autoencoder", "identity", "--text-encoder",
            TEXT, "--shard-size", "2", "--device", "cpu", "--no-progress"]
    args = [*base, "--resolution", "16"]
    _ok(_cli(*args))
    tars = {p.name: p.read_bytes() for p in sorted((tmp_path / "lat").glob("shard-*.tar"))}
    (folder / "00003.txt").write_text("a caption written later\n")
    again = _ok(_cli(*args))
    assert "shard-000001.tar: its inputs changed" in again.stdout and "wrote 1 shards" in again.stdout
    captions = {s["key"]: s["caption"] for s in ShardStream(tmp_path / "lat", shuffle_buffer=0)}
    assert captions["00003"] == "a caption written later"
    now = {p.name: p.read_bytes() for p in sorted((tmp_path / "lat").glob("shard-*.tar"))}
    assert now["shard-000000.tar"] == tars["shard-000000.tar"] and now["shard-000002.tar"] == tars["shard-000002.tar"]
    assert now["shard-000001.tar"] != tars["shard-000001.tar"]
    assert "wrote 0 shards" in _ok(_cli(*args)).stdout  # nothing changed: nothing redone
    for name in ("00004", "00005"):  # items removed: the shard past the new end goes
        for suffix in (".png", ".txt", ".json"):
            (folder / (name + suffix)).unlink()
    fewer = _ok(_cli(*args))
    assert "removed 1 shard" in fewer.stdout and read_dataset_info(tmp_path / "lat")["num_samples"] == 4
    assert not (tmp_path / "lat" / "shard-000002.tar").exists()
    error = _one_line_error(_cli(*base, "--resolution", "8"), "resolution 16", "now 8")
    assert "another --out" in error


def test_precompute_never_writes_into_what_it_did_not_make(tmp_path):
    write_shapes_folder(tmp_path / "img", 2, resolution=16, seed=0, progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    base = ["data", "precompute", tmp_path / "img", "--autoencoder", "identity", "--text-encoder", TEXT,
            "--resolution", "16", "--device", "cpu", "--no-progress", "--out"]
    _one_line_error(_cli(*base, tmp_path / "notes.txt"), "--out", "existing file")
    _one_line_error(_cli(*base, tmp_path / "img"), "--out", "holds other files")
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == sorted(
        [".lock", ".shapes.json", *(f"{i:05d}{s}" for i in range(2) for s in (".png", ".txt", ".json"))])


# ----------------------------------------------------------------------------- defect 11: one line per mistake
def _main(capsys, *args):
    from microdiff.cli import main

    try:
        rc = main([str(a) for a in args])
    except SystemExit as exit_:  # argparse's own errors (type functions, missing arguments)
        rc = exit_.code
    return rc, capsys.readouterr()


@pytest.fixture
def sources(tmp_path):
    write_shapes_folder(tmp_path / "img", 2, resolution=16, seed=0, progress=False)
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    return tmp_path


PRE = ["--autoencoder", "identity", "--text-encoder", TEXT, "--device", "cpu", "--no-progress"]
CASES = [  # (arguments, what the one error line must name); {t} is the folder of the `sources` fixture
    (["data", "shapes", "--out", "{t}/s", "--n", "0"], ["--n", ">= 1"]),
    (["data", "shapes", "--out", "{t}/s", "--n", "-3"], ["--n"]),
    (["data", "shapes", "--out", "{t}/a-file", "--n", "2"], ["--out", "existing file"]),
    (["data", "shapes", "--out", "{t}/img/00000.png/x", "--n", "2"], ["--out"]),
    (["data", "shapes", "--out", "{t}", "--n", "2"], ["--out", "other files"]),
    (["data", "shapes", "--out", "{t}/s", "--resolution", "4"], ["--resolution", ">= 8"]),
    (["data", "shapes", "--out", "{t}/s", "--corruption", "bogus:1"], ["--corruption", "bogus"]),
    (["data", "shapes", "--out", "{t}/s", "--seed", "-1"], ["--seed"]),
    (["data", "check", "{t}/nope"], ["nope", "no such file or folder"]),
    (["data", "check", "{t}/img", "--workers", "-1"], ["--workers", ">= 0"]),
    (["data", "check", "{t}/img", "--resolution", "0"], ["--resolution", ">= 1"]),
    (["data", "check", "{t}/img", "--resolution", "abc"], ["--resolution", "'abc'"]),
    (["data", "check", "{t}/img", "--min-size", "0"], ["--min-size"]),
    (["data", "check", "{t}/img", "--out", "{t}/notes"], ["--out", "not a skip report"]),
    (["data", "check", "{t}/img", "--out", "{t}/dir"], ["--out", "is a folder"]),
    (["data", "check", "{t}/img", "--out", ""], ["--out", "file name prefix"]),
    (["data", "check", "mds:"], ["mds:", "index.json"]),
    (["data", "check", "{t}/img", "--out", "{t}/a-file/rep"], ["--out", "a-file"]),
    (["data", "check", "{t}/a-file"], ["a-file", "not a data source"]),
    (["data", "check", "shapes:0"], ["shapes:0", "N >= 1"]),
    (["data", "check", "{t}/img", "--caption-column", "words"], ["--caption-column", "manifest"]),
    (["data", "inspect", "{t}/nope"], ["nope"]),
    (["data", "inspect", "shapes:x"], ["shapes:x"]),
    (["data", "inspect", "{t}/img", "--json", "{t}/dir.json"], ["--json", "a folder"]),
    (["data", "precompute", "{t}/nope", "--out", "{t}/o", *PRE], ["nope"]),
    (["data", "precompute", "{t}/img", "--out", "{t}/a-file", *PRE], ["--out", "existing file"]),
    (["data", "precompute", "{t}/img", "--out", "{t}/o", "--workers", "-2", *PRE], ["--workers"]),
    (["data", "precompute", "{t}/img", "--out", "{t}/o", "--shard-size", "0", *PRE], ["--shard-size"]),
    (["data", "precompute", "{t}/img", "--out", "{t}/o", "--batch-size", "0", *PRE], ["--batch-size"]),
    (["data", "precompute", "{t}/img", "--out", "{t}/o", "--corruption", "noise:x@0.5", *PRE], ["--corruption"]),
    (["data", "precompute", "{t}/img", "--out", "{t}/o", "--min-quality", "2", *PRE], ["min_quality", "[0, 1]"]),
]


@pytest.mark.parametrize("args, names", CASES, ids=[" ".join(c[0][:3]) + f" #{i}" for i, c in enumerate(CASES)])
def test_every_data_command_ends_in_one_line_on_bad_input(sources, capsys, args, names):
    rc, captured = _main(capsys, *[a.format(t=sources) for a in args])
    assert rc == 2, (rc, captured.err)
    assert "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1, captured.err
    for name in names:
        assert name in errors[0], (name, errors[0])


@pytest.mark.parametrize("key, value, named", [("resolution", 0, "data.resolution"),
                                               ("num_workers", -1, "data.num_workers"),
                                               ("min_quality", 1.5, "data.min_quality"),
                                               ("seed", -2, "data.seed"),
                                               ("source", "", "data.source"),
                                               ("corruption", [[0.5, "noise:abc"]], "noise:abc")])
def test_train_config_data_values_are_range_checked(tmp_path, key, value, named):
    config = _config(tmp_path / "c.yaml", "shapes:8", data={key: value})
    _one_line_error(_cli("train", config, "--out", tmp_path / "run"), "c.yaml", named, status=TRAIN_STATUS)
