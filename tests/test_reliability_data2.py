"""Issue 17, round 2: what a red team found in the data commands, each through the CLI where the user
meets it (``microdiff.cli.main`` in this process: a few seconds in all, no subprocess start-ups).

Defects (red-team case ids): two precomputes into one folder (pc22); a damaged shard kept on a precompute
or download rerun (pc15, dl20) and a damaged image tar reported as "missing caption" with its other
items lost uncounted (dl21); a download of no image exiting 0 (dl13, dl17); options silently ignored
(ds9 and the others of that kind); shapes reruns mixing two datasets (ds10b, z1); inspect of an empty
folder giving no reason (di2); train-autoencoder and annotate writing into other people's folders and
replacing earlier runs (ae4, ae13, an2, an3); named output files overwritten (g8, g9, g10, di6); a
shapes run with no room check (ds12).

The data is real: shapes PNGs written here, served over HTTP from 127.0.0.1 for the downloader,
precomputed with the identity autoencoder and a tiny built-in text encoder, then damaged as disks and
copies damage files (bytes flipped in the middle of a tar).
"""

from __future__ import annotations

import functools
import json
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from microdiff.cli import main
from microdiff.data.shapes import write_shapes_folder
from microdiff.utils.locks import FolderLock

TEXT = "builtin:byte-d16-l1-h2-len96-mlp2-seed0"
PRECOMPUTE = ["--autoencoder", "identity", "--text-encoder", TEXT, "--resolution", "16", "--shard-size", "16",
              "--device", "cpu", "--no-progress"]


# ----------------------------------------------------------------------------- helpers
def _main(capsys, *args):
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exit_:  # argparse's own errors
        rc = exit_.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_line_error(result, *names):
    """Exit status 2, exactly one error line naming every one of ``names``, no traceback."""
    rc, out, err = result
    assert rc == 2, (rc, out[-2000:], err[-2000:])
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for name in names:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


def _flip(path: Path, start: int, stop: int) -> None:
    """Invert bytes [start, stop) in place: what a bad disk or a broken copy does to the middle of a file."""
    data = bytearray(path.read_bytes())
    for i in range(start, stop):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def web(tmp_path):
    """A manifest of 5 shapes PNGs served from 127.0.0.1, and the download options of a quick run."""
    write_shapes_folder(tmp_path / "www", 5, resolution=16, seed=0, progress=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(tmp_path / "www")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rows = [{"url": f"http://127.0.0.1:{server.server_port}/{i:05d}.png", "caption": f"shape {i}"} for i in range(5)]
    (tmp_path / "u.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    yield tmp_path / "u.jsonl", ["--resolution", "16", "--min-size", "8", "--retries", "0", "--no-progress"]
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------- precompute: pc22, pc15
def test_a_second_precompute_into_a_folder_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    """pc22: the second of two precomputes into one folder died on the first's temporary file. Now each
    run locks --out (held here by this process, as a running precompute holds it)."""
    out = tmp_path / "lat"
    out.mkdir()
    with FolderLock(out, ".precompute-rank0.lock", "data precompute"):
        line = _one_line_error(_main(capsys, "data", "precompute", "shapes:20", "--out", out, *PRECOMPUTE),
                               "--out", out, "another data precompute", f"process {os.getpid()}")
    assert "wait for it to finish" in line
    assert not list(out.glob("shard-*"))  # it wrote nothing
    rc, stdout, _ = _main(capsys, "data", "precompute", "shapes:20", "--out", out, *PRECOMPUTE)  # released: runs
    assert rc == 0 and "all 2 shards done" in stdout


def test_a_precompute_rerun_redoes_a_damaged_shard_and_says_so(tmp_path, capsys):
    """pc15: bytes flipped inside shard-000001.tar; the rerun said "3 were already done and up to date"."""
    out = tmp_path / "lat"
    assert _main(capsys, "data", "precompute", "shapes:40", "--out", out, *PRECOMPUTE)[0] == 0
    tar = out / "shard-000001.tar"
    intact = tar.read_bytes()
    _flip(tar, 3000, 3200)
    rc, stdout, err = _main(capsys, "data", "precompute", "shapes:40", "--out", out, *PRECOMPUTE)
    assert rc == 0, err
    assert "shard-000001.tar: content hash mismatch" in stdout and "redone" in stdout
    assert "wrote 1 shards" in stdout and "2 were already done, intact" in stdout
    assert tar.read_bytes() == intact  # redone to the same bytes
    record = json.loads((out / "shard-000001.json").read_text())
    assert record["file"]["bytes"] == len(intact)
    # data check compares every shard with its recorded hash: damage inside a member (the tar still
    # reads, the latents are wrong) is found too
    _flip(tar, 3000, 3200)
    line = _one_line_error(_main(capsys, "data", "check", out, "--out", tmp_path / "rep", "--no-progress"),
                           str(out), "damaged shard", "shard-000001.tar")
    assert "rerun precompute" in line
    report = json.loads((tmp_path / "rep.json").read_text())
    assert report["counts"] == {"corrupt shard": 1} and "content hash mismatch" in report["items"][0]["detail"]


# ----------------------------------------------------------------------------- download: dl20, dl21, dl13, dl17
def test_a_damaged_image_shard_is_a_corrupt_shard_everywhere_and_a_rerun_fetches_it_again(web, tmp_path, capsys):
    """dl21: data check on a download tar with a damaged member header said "missing caption: 1" and
    "0 items indexed" (tarfile stops silently at a bad header: 4 items vanished uncounted); dl20: a
    download rerun kept the damaged shard."""
    manifest, options = web
    out = tmp_path / "web"
    assert _main(capsys, "data", "download", manifest, "--out", out, *options)[0] == 0
    tar = out / "00000.tar"
    intact = tar.read_bytes()
    _flip(tar, 1500, 1700)  # the second member's header
    # check: a corrupt shard (with the images it held), not a missing caption; one line, exit 2
    line = _one_line_error(_main(capsys, "data", "check", out, "--resolution", "16", "--out", tmp_path / "rep",
                                 "--no-progress"), "damaged shard", "00000.tar", "rerun the download")
    report = json.loads((tmp_path / "rep.json").read_text())
    assert report["counts"] == {"corrupt shard": 1} and "holds 5 images" in report["items"][0]["detail"]
    assert "missing caption" not in line + json.dumps(report)
    # inspect counts it under that reason
    rc, stdout, _ = _main(capsys, "data", "inspect", out, "--no-progress")
    assert "corrupt shard: 1" in stdout
    # train refuses it in one line: going on would train on less data than the user has without saying so
    config = {"model": {"backbone": "MicroDiT_Nano_2"}, "data": {"source": str(out), "resolution": 16},
              "encoders": {"text": TEXT}, "train": {"steps": 1, "batch_size": 2, "micro_batch_size": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    _one_line_error(_main(capsys, "train", tmp_path / "c.yaml", "--out", tmp_path / "run"), "00000.tar",
                    "corrupt", "rerun `microdiff data download`")
    # a download rerun finds the damage by the hash it recorded and fetches the shard's rows again
    assert (out / "00000.sha256").read_text().split()[1] == "00000.tar"  # sha256sum -c reads it
    rc, stdout, err = _main(capsys, "data", "download", manifest, "--out", out, *options)
    assert rc == 0, err
    assert "00000.tar: damaged since it was downloaded" in stdout and "fetched again" in stdout
    assert tar.read_bytes() == intact
    rc, stdout, _ = _main(capsys, "data", "check", out, "--resolution", "16", "--out", tmp_path / "rep",
                          "--no-progress")
    assert rc == 0 and "5 items indexed, 5 usable" in stdout


def test_a_download_that_writes_no_image_is_an_error_pointing_to_the_reports(tmp_path, capsys):
    """dl17: every row failed, exit 0; dl13: --limit 0 downloaded nothing, exit 0."""
    manifest = tmp_path / "u.jsonl"
    manifest.write_text(json.dumps({"url": "http://127.0.0.1:1/a.png", "caption": "a"}) + "\n")
    out = tmp_path / "w"
    line = _one_line_error(_main(capsys, "data", "download", manifest, "--out", out, "--retries", "0",
                                 "--timeout", "2", "--no-progress"),
                           "no image was downloaded", "connection error", "failures.csv", "report.json")
    assert str(out) in line
    assert json.loads((out / "report.json").read_text())["failed_by_reason"] == {"connection error": 1}
    assert "connection error" in (out / "failures.csv").read_text()
    _one_line_error(_main(capsys, "data", "download", manifest, "--out", tmp_path / "w0", "--limit", "0",
                          "--no-progress"), "--limit", ">= 1")
    assert not (tmp_path / "w0").exists()


# ----------------------------------------------------------------------------- options that did nothing: ds9 ...
@pytest.mark.parametrize("argv, named", [
    (["data", "shapes", "--out", "{t}/s", "--n", "2", "--resolution", "16", "--corrupt-fraction", "0.5"],
     ["--corrupt-fraction", "--corruption"]),
    (["data", "check", "{t}/img", "--seed", "3", "--out", "{t}/r"], ["--seed", "shapes"]),
    (["data", "check", "shapes:4", "--min-size", "8", "--out", "{t}/r"], ["--min-size", "shapes:4"]),
    (["data", "check", "shapes:4", "--workers", "2", "--out", "{t}/r"], ["--workers"]),
    (["data", "inspect", "{t}/img", "--seed", "3"], ["--seed", "shapes"]),
    (["data", "precompute", "{t}/img", "--seed", "3", "--out", "{t}/lat", *PRECOMPUTE], ["--seed", "--corruption"]),
    (["data", "download", "{t}/u.jsonl", "--out", "{t}/w", "--format", "png", "--quality", "80"],
     ["--quality", "png"]),
    (["data", "download", "{t}/u.jsonl", "--out", "{t}/w", "--split", "test"], ["--split", "manifest"]),
    (["train-autoencoder", "--data", "shapes:10", "--out", "{t}/ae", "--codebook-size", "64"],
     ["--codebook-size", "vqgan"]),
    (["train-autoencoder", "--data", "shapes:10", "--out", "{t}/ae", "--no-disc", "--disc-start", "5"],
     ["--disc-start", "--no-disc"]),
    (["train-autoencoder", "--data", "shapes:10", "--out", "{t}/ae", "--perceptual-weight", "2"],
     ["--perceptual-weight", "--perceptual-weights"]),
    (["train-autoencoder", "--data", "shapes:10", "--out", "{t}/ae", "--init", "{t}/img", "--channels", "8"],
     ["--channels", "--init"]),
    (["annotate", "shapes:10", "--out", "{t}/an", "--split", "corruption", "--quality-threshold", "0.3"],
     ["--quality-threshold", "--split quality"]),
    (["annotate", "{t}/img", "--out", "{t}/an", "--data-seed", "2"], ["--data-seed"]),
])
def test_an_option_that_would_do_nothing_is_refused_in_one_line(tmp_path, capsys, argv, named):
    write_shapes_folder(tmp_path / "img", 2, resolution=16, progress=False)
    (tmp_path / "u.jsonl").write_text(json.dumps({"url": "http://127.0.0.1:1/a.png", "caption": "a"}) + "\n")
    argv = [a.replace("{t}", str(tmp_path)) for a in argv]
    _one_line_error(_main(capsys, *argv, "--no-progress"), *named)
    for name in ("s", "r.json", "lat", "w", "ae", "an"):
        assert not (tmp_path / name).exists(), name  # refused before anything was written


# ----------------------------------------------------------------------------- shapes: ds10b, z1, ds12, g8
def test_shapes_reruns_resume_the_same_settings_and_refuse_others(tmp_path, capsys):
    """ds10b/z1: a rerun with other settings left 5 images at 32 px seed 7 among 5 at 16 px seed 0."""
    out = tmp_path / "d"
    assert _main(capsys, "data", "shapes", "--out", out, "--n", "6", "--resolution", "16", "--no-progress")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _one_line_error(_main(capsys, "data", "shapes", "--out", out, "--n", "5", "--resolution", "32", "--seed", "7",
                          "--no-progress"), "--out", "other settings", "resolution 16 -> 32", "seed 0 -> 7")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    # the same settings: a resume (a killed run's missing items are written, the others kept)
    (out / "00004.json").unlink()
    (out / "00004.png").unlink()
    assert _main(capsys, "data", "shapes", "--out", out, "--n", "6", "--resolution", "16", "--no-progress")[0] == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # someone else's folder
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "holiday.png").write_bytes(b"not ours")
    _one_line_error(_main(capsys, "data", "shapes", "--out", tmp_path / "mine", "--n", "2", "--no-progress"),
                    "--out", "other files", "holiday.png")
    # ds12: far more images than the file system can take: refused at once
    _one_line_error(_main(capsys, "data", "shapes", "--out", tmp_path / "huge", "--n", str(10**14),
                          "--no-progress"), "--n", "lower --n")
    assert not (tmp_path / "huge").exists()


def test_named_output_files_are_replaced_only_when_the_command_wrote_them(tmp_path, capsys):
    """g8 (shapes --grid), di6 (inspect --json), g9 (inspect --plot), g10 (check --out of another source)."""
    write_shapes_folder(tmp_path / "img", 3, resolution=16, progress=False)
    write_shapes_folder(tmp_path / "img2", 2, resolution=16, seed=1, progress=False)
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"my own picture")
    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "notes"}')
    _one_line_error(_main(capsys, "data", "shapes", "--out", tmp_path / "s", "--n", "2", "--resolution", "16",
                          "--grid", mine, "--no-progress"), "--grid", "not written by microdiff data shapes")
    _one_line_error(_main(capsys, "data", "inspect", tmp_path / "img", "--json", notes, "--no-progress"), "--json")
    _one_line_error(_main(capsys, "data", "inspect", tmp_path / "img", "--plot", mine, "--no-progress"), "--plot")
    assert mine.read_bytes() == b"my own picture" and notes.read_text() == '{"my": "notes"}'
    # their own files they replace
    for _ in range(2):
        assert _main(capsys, "data", "shapes", "--out", tmp_path / "s", "--n", "2", "--resolution", "16",
                     "--grid", tmp_path / "grid.png", "--no-progress")[0] == 0
        assert _main(capsys, "data", "inspect", tmp_path / "img", "--json", tmp_path / "i.json", "--plot",
                     tmp_path / "i.png", "--no-progress")[0] == 0
    assert json.loads((tmp_path / "i.json").read_text())["written_by"] == "microdiff data inspect"
    # a check report of one source is not replaced by the report of another
    check = ["data", "check", "--resolution", "16", "--out", tmp_path / "rep", "--no-progress"]
    assert _main(capsys, *check[:2], tmp_path / "img", *check[2:])[0] == 0
    assert _main(capsys, *check[:2], tmp_path / "img", *check[2:])[0] == 0  # the same source: replaced
    _one_line_error(_main(capsys, *check[:2], tmp_path / "img2", *check[2:]), "--out", "not a skip report of")
    assert json.loads((tmp_path / "rep.json").read_text())["source"] == str(tmp_path / "img")


# ----------------------------------------------------------------------------- inspect: di2
def test_inspect_of_an_empty_folder_says_what_it_found_and_what_a_source_is(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = _one_line_error(_main(capsys, "data", "inspect", tmp_path / "empty", "--no-progress"),
                           "found nothing", "it is empty", "a source is an image folder")
    assert "reasons above" not in line
    (tmp_path / "empty" / "readme.md").write_text("hello")
    _one_line_error(_main(capsys, "data", "check", tmp_path / "empty", "--out", tmp_path / "r", "--no-progress"),
                    "holds 1 file(s) and no image")


# ----------------------------------------------------------------------------- train-autoencoder: ae4, ae13
AE = ["--resolution", "16", "--steps", "2", "--batch-size", "4", "--no-disc", "--channels", "4",
      "--channel-mult", "1,2", "--device", "cpu", "--no-progress"]


def test_train_autoencoder_never_writes_into_a_folder_it_did_not_make(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.csv").write_text("my metrics\n")
    (mine / "metrics.json").write_text('{"mine": 1}')
    _one_line_error(_main(capsys, "train-autoencoder", "--data", "shapes:40", "--out", mine, *AE),
                    "--out", "other files", "train-autoencoder")
    assert sorted(p.name for p in mine.iterdir()) == [".lock", "metrics.csv", "metrics.json"]
    assert (mine / "metrics.csv").read_text() == "my metrics\n"
    # ae13: --holdout beyond the fifth of the data that may be held out (40 images: 8)
    _one_line_error(_main(capsys, "train-autoencoder", "--data", "shapes:40", "--out", tmp_path / "run",
                          "--holdout", "100", *AE), "--holdout 100", "--holdout 8")
    _one_line_error(_main(capsys, "train-autoencoder", "--data", "shapes:40", "--out", tmp_path / "run",
                          "--steps", "0", *AE[2:]), "--steps")
    # its own run folder: trains, and a rerun with more steps resumes; a run in progress locks it
    run = tmp_path / "run"
    assert _main(capsys, "train-autoencoder", "--data", "shapes:40", "--out", run, *AE)[0] == 0
    rc, stdout, _ = _main(capsys, "train-autoencoder", "--data", "shapes:40", "--out", run, *AE[:2], "--steps", "3",
                          *AE[4:])
    assert rc == 0 and "resuming from" in stdout
    with FolderLock(run, ".lock", "microdiff train-autoencoder run"):
        _one_line_error(_main(capsys, "train-autoencoder", "--data", "shapes:40", "--out", run, *AE),
                        "another microdiff train-autoencoder run", f"process {os.getpid()}")


# ----------------------------------------------------------------------------- annotate: an2, an3
AN = ["--resolution", "16", "--corruption", "noise:0.3@0.5", "--steps", "3", "--width", "4", "--grid-size", "4",
      "--draws", "1", "--batch-size", "8", "--device", "cpu", "--no-progress"]


def test_annotate_keeps_other_runs_and_foreign_folders(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text('{"my": "summary"}')
    _one_line_error(_main(capsys, "annotate", "shapes:24", "--out", mine, *AN), "--out", "not written by",
                    "annotate")
    assert (mine / "summary.json").read_text() == '{"my": "summary"}'
    out = tmp_path / "an"
    assert _main(capsys, "annotate", "shapes:24", "--out", out, *AN)[0] == 0
    first = (out / "annotations.csv").read_bytes()
    assert _main(capsys, "annotate", "shapes:24", "--out", out, *AN)[0] == 0  # the same settings: redone
    assert (out / "annotations.csv").read_bytes() == first
    _one_line_error(_main(capsys, "annotate", "shapes:24", "--out", out, *AN, "--eps", "0.1"),
                    "--out", "other settings", "eps 0.05 -> 0.1", "--overwrite")
    assert (out / "annotations.csv").read_bytes() == first
    assert json.loads((out / "summary.json").read_text())["settings"]["eps"] == 0.05
    assert _main(capsys, "annotate", "shapes:24", "--out", out, *AN, "--eps", "0.1", "--overwrite")[0] == 0
    assert json.loads((out / "summary.json").read_text())["settings"]["eps"] == 0.1
    with FolderLock(out, ".lock", "microdiff annotate run"):
        _one_line_error(_main(capsys, "annotate", "shapes:24", "--out", out, *AN), "another microdiff annotate run")
