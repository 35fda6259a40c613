"""``microdiff eval generate``: one image per (prompt, seed) of a prompt list, for FID and CLIP score on
COCO-30K-style captions or a prompt suite of your own (DrawBench, PartiPrompts, ...).

    microdiff eval generate --prompts coco30k.csv --checkpoint runs/md/pipeline --out gen/coco
    torchrun --nproc_per_node 8 -m microdiff eval generate --prompts coco30k.csv --checkpoint DIR --out gen/coco
    microdiff eval generate --prompts drawbench.txt --checkpoint DIR --out gen/db --seeds 0,1,2,3 --guidance 5
    microdiff eval fid --gen gen/coco/images --ref coco-val.npz          # then score them
    microdiff eval clip-score --prompts gen/coco/index.csv

Prompts files:
  .csv / .tsv    a caption column (the first of caption, prompt, prompts, text; any case) and optionally an
                 id column (id, image_id, prompt_id); without one, id = data row number (1 = first row)
  .txt           one prompt per line; id = line number (1-based; blank lines are skipped, still counted)
  .json / .jsonl a list of {"id": ..., "prompt": ...} objects (caption / text accepted; id optional: its
                 position, 1-based) or of plain strings; .jsonl holds one per line

Output folder (``--out``: new, empty, or an earlier ``--out`` of eval generate; a folder holding other
files is refused, and nothing in it is changed):
  images/{id}_s{seed}.png   one per prompt and seed (ids made file-safe), the settings in PNG text chunks
  index.csv                 id, seed, prompt, file (file name inside images/)
  generate.json             the settings the images were made with: a rerun with other settings refuses
  .lock                     held while a run writes (a second run into the folder is refused)

Resumable: an image that exists is kept (and counted) when it was made from the same prompt text
and noise seed with the same settings, as its PNG text chunks say. One of ours whose prompt changed
in the prompts file (or whose row moved, which changes its noise) is stale: it is made again, and the
summary says how many and which (``N of them again, replacing images of an earlier run ...: 3_s0.png``).
Settings are compared by content: guidance, steps, sampler, eta, size, dtype and the checkpoint's
content hash (moving the pipeline folder is fine; retraining into it is another checkpoint, refused).
Only files this command wrote (its ``microdiff:written_by`` text chunk) are ever replaced: a file in
images/ that it did not write (a user's, or one of ``microdiff sample``) is refused, never
overwritten. Each PNG is written to a hidden temporary file and renamed, so a killed run never
leaves a half-written image.

Determinism: row i of the file (0-based) with seed s is sampled exactly as
``pipe.generate([prompt_i], seed=s * SEED_STRIDE + i)``: the pipeline gives every image its own
generator (seed + k for image k of a call), so one ``generate`` call serves a batch of consecutive rows,
each with its own seed, and the image does not depend on the batch size, the number of processes or
resuming (up to float round-off of batched kernels; on the CPU the pixels are identical). With
``--seeds 0`` the images equal ``pipe.generate(all_prompts, seed=0)``. Reordering the rows of the file
changes which noise a prompt gets; the id only names the file.

Several processes (torchrun): the work is cut into batches of --batch-size consecutive rows per seed,
and rank r takes batches r, r + W, r + 2W, ... on cuda:LOCAL_RANK (cpu without a GPU). The batches do
not depend on W, so one process and eight write the same images. Rank 0 shows the progress bar, waits
for the others and writes index.csv.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils.argtypes import Parser, finite_float, non_negative_float, positive_int
from ..utils.devices import backbone_dtype
from ..utils.errors import debug_enabled
from ..utils.files import WRITTEN_BY, output_folder, stamp, write_png_atomic, write_text_atomic
from ..utils.locks import FolderLock
from .errors import USER_ERRORS, first_line
from .images import IMAGE_SUFFIXES

DEFAULT_GUIDANCE = 1.5  # micro_diffusion's classifier-free guidance for its COCO FID numbers
SEED_STRIDE = 1_000_000_000  # seed s of row i uses the pipeline seed s * SEED_STRIDE + i
MAX_SEED = (2**63 - 1) // SEED_STRIDE - 1  # s * SEED_STRIDE + i must stay a 63-bit generator seed
ID_COLUMNS = ("id", "image_id", "prompt_id")
CAPTION_COLUMNS = ("caption", "prompt", "prompts", "text")
IMAGES_DIR = "images"
INDEX_NAME = "index.csv"
SETTINGS_NAME = "generate.json"
CHECKED = ("checkpoint_hash", "guidance", "steps", "sampler", "eta", "height", "width", "dtype", "seed_stride")
PNG_KEYS = ("id", "prompt", "seed", "noise_seed", "sampler", "steps", "guidance", "checkpoint", "settings")
COMMAND = "eval generate"
LOCK_NAME = ".lock"
SHOWN = 5  # file names listed in the summary (images made again), then a count


# ----------------------------------------------------------------------------- prompts files

@dataclass(frozen=True)
class PromptItem:
    id: str
    prompt: str
    name: str  # the id made safe for a file name

    def file(self, seed: int) -> str:
        return f"{self.name}_s{seed}.png"


def read_prompts(path: str | Path) -> list[PromptItem]:
    """The prompts of a .csv/.tsv, .txt or .json/.jsonl file (see the module docstring), in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {'a folder, not a' if path.is_dir() else 'no such'} prompts file; pass a .csv/.tsv with a caption column, a .txt "
                                "with one prompt per line, or a .json/.jsonl list of {id, prompt}")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".txt", ".json", ".jsonl"):
        raise ValueError(f"{path}: unknown prompts file type {suffix or '(none)'!r}; use .csv, .tsv, .txt, .json "
                         "or .jsonl")
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; it needs at least one prompt")
    if suffix in (".csv", ".tsv"):
        pairs = _read_table(path, text, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".txt":
        pairs = [(str(n), line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        pairs = _read_json(path, text, suffix == ".jsonl")
    if not pairs:
        raise ValueError(f"{path}: no prompts in the file (only a header or blank lines)")
    return _items(path, pairs)


def _pick(columns: list[str], wanted: tuple[str, ...]) -> str | None:
    lowered = {c.strip().lower(): c for c in columns if c is not None}
    return next((lowered[w] for w in wanted if w in lowered), None)


def _read_table(path: Path, text: str, delimiter: str) -> list[tuple[str, str]]:
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    columns = list(reader.fieldnames or [])
    caption = _pick(columns, CAPTION_COLUMNS)
    if caption is None:
        raise ValueError(f"{path}: no caption column; expected one of {', '.join(CAPTION_COLUMNS)} "
                         f"(columns found: {', '.join(map(str, columns)) or 'none'})")
    id_column = _pick(columns, ID_COLUMNS)
    pairs = []
    for n, row in enumerate(reader, 1):
        prompt = (row.get(caption) or "").strip()
        if not prompt:
            raise ValueError(f"{path}: data row {n} has an empty {caption!r}; fill it in or remove the row")
        key = (row.get(id_column) or "").strip() if id_column else str(n)
        if not key:
            raise ValueError(f"{path}: data row {n} has an empty {id_column!r}; fill it in or remove the column "
                             "(ids are then row numbers)")
        pairs.append((key, prompt))
    return pairs


def _read_json(path: Path, text: str, lines: bool) -> list[tuple[str, str]]:
    try:
        if lines:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid {'JSON lines' if lines else 'JSON'} ({err})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of {{\"id\", \"prompt\"}} objects or strings; got a "
                         f"{type(records).__name__}")
    pairs = []
    for n, record in enumerate(records, 1):
        if isinstance(record, str):
            record = {"prompt": record}
        if not isinstance(record, dict):
            raise ValueError(f"{path}: item {n} is a {type(record).__name__}; use {{\"id\", \"prompt\"}} or a string")
        prompt_key, id_key = _pick(list(record), CAPTION_COLUMNS), _pick(list(record), ID_COLUMNS)
        prompt = str(record[prompt_key]).strip() if prompt_key else ""
        if not prompt:
            raise ValueError(f"{path}: item {n} has no prompt; give one of {', '.join(CAPTION_COLUMNS)} "
                             f"(keys found: {', '.join(record) or 'none'})")
        key = str(record[id_key]).strip() if id_key and record[id_key] is not None else str(n)
        pairs.append((key or str(n), prompt))
    return pairs


def safe_name(key: str) -> str:
    """An id as a file-name stem: letters, digits, '_', '-' and '.' kept, anything else becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).lstrip(".") or "_"


def _items(path: Path, pairs: list[tuple[str, str]]) -> list[PromptItem]:
    items, seen = [], {}
    for key, prompt in pairs:
        name = safe_name(key)
        if name in seen:
            other = seen[name]
            why = f"id {key!r} appears twice" if other == key else f"ids {other!r} and {key!r} both become {name!r}"
            raise ValueError(f"{path}: {why}; ids name the image files, so they must be unique (or drop the id "
                             "column to number the rows)")
        seen[name] = key
        items.append(PromptItem(key, prompt, name))
    return items


# ----------------------------------------------------------------------------- the work plan

def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: give a comma list of whole numbers, e.g. 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: give distinct whole numbers >= 0, e.g. 0,1,2")
    if max(seeds) >= MAX_SEED:
        raise ValueError(f"--seeds {text!r}: seeds must be below {MAX_SEED} (row i of seed s samples with "
                         f"s * {SEED_STRIDE} + i, a 63-bit number)")
    return seeds


def plan_batches(n_items: int, seeds: list[int], batch_size: int) -> list[tuple[int, int, int]]:
    """(seed, start, stop): --batch-size consecutive rows per seed; rank r takes every W-th batch."""
    return [(s, start, min(start + batch_size, n_items)) for s in seeds for start in range(0, n_items, batch_size)]


def consecutive_runs(rows: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in rows:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


# ----------------------------------------------------------------------------- files

def settings_hash(settings: dict[str, Any]) -> str:
    """A short content hash of the settings an image depends on (``CHECKED``), kept in every PNG."""
    payload = json.dumps({k: settings.get(k) for k in CHECKED}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def image_state(path: Path, item: PromptItem, noise_seed: int, digest: str) -> str:
    """What an existing image is: "same" (made from this prompt and noise seed with these settings),
    "stale" (ours, but made from another prompt text, noise seed or settings: make it again) or
    "foreign" (not written by eval generate, e.g. by microdiff sample or a user, or unreadable: never
    overwritten)."""
    info = _png_text(path)
    if info is None or not _ours(info):
        return "foreign"
    same = (info.get("microdiff:prompt") == item.prompt and info.get("microdiff:noise_seed") == str(noise_seed)
            and info.get("microdiff:settings", digest) == digest)  # images from before the hash: generate.json
    return "same" if same else "stale"


def _png_text(path: Path) -> dict[str, str] | None:
    """The text chunks of a PNG, or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return {k: v for k, v in img.info.items() if isinstance(v, str)}
    except Exception:  # noqa: BLE001 - any unreadable file is simply not one of ours
        return None


def _ours(info: dict[str, str]) -> bool:
    """PNG text chunks of an image this command wrote: its stamp, or (images from before the stamp) the
    keys only eval generate writes (microdiff sample writes neither)."""
    stamped = info.get(f"microdiff:{WRITTEN_BY}")
    if stamped is not None:
        return stamped == stamp(COMMAND)[WRITTEN_BY]
    return all(f"microdiff:{key}" in info for key in ("id", "prompt", "noise_seed"))


def _settings_ours(data: Any) -> bool:
    """generate.json of this command: its stamp, or (folders from before the stamp) the checked keys."""
    if not isinstance(data, dict):
        return False
    if WRITTEN_BY in data:
        return data[WRITTEN_BY] == stamp(COMMAND)[WRITTEN_BY]
    return "seed_stride" in data and "checkpoint" in data


def check_folder(out: Path) -> None:
    """``--out`` must be new, empty, or this command's earlier output (its generate.json); a folder holding
    anything else, or an images/ file this command did not write, is refused in one line (nothing is
    changed). Other settings are check_settings' business."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a folder; pass a folder for images/, index.csv and generate.json")
    if not out.is_dir():
        return
    entries = sorted(e.name for e in out.iterdir() if e.name != LOCK_NAME)
    settings = out / SETTINGS_NAME
    if not settings.is_file():
        images = out / IMAGES_DIR
        leftover = []
        for name in entries:
            inside = sorted(images.iterdir()) if name == IMAGES_DIR and images.is_dir() else None
            leftover += [f"{IMAGES_DIR}/{e.name}" for e in inside] if inside is not None else [name]
        if leftover:
            shown = ", ".join(leftover[:3]) + (f" and {len(leftover) - 3} more" if len(leftover) > 3 else "")
            raise ValueError(f"--out {out}: holds files that microdiff {COMMAND} did not write ({shown}; no "
                             f"{SETTINGS_NAME}); pass another --out, a new or empty folder (nothing was changed)")
        return
    try:
        data = json.loads(settings.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{settings}: unreadable ({first_line(err)}); delete it if the images in {out} are "
                         "yours") from None
    if not _settings_ours(data):
        raise ValueError(f"--out {out}: {SETTINGS_NAME} was not written by microdiff {COMMAND}; pass another --out, "
                         "a new or empty folder (nothing was changed)")
    folder = out / IMAGES_DIR
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue  # not read as an image by eval fid / clip-score (a killed run's .tmp is removed at the end)
        info = _png_text(path) if path.is_file() else None
        if info is None or not _ours(info):
            raise ValueError(f"{path}: not an image that microdiff {COMMAND} wrote; move it away or use another "
                             "--out (nothing was changed)")


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to add images made with other settings to a folder (one-line error naming the field)."""
    path = out / SETTINGS_NAME
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({first_line(err)}); delete it if the images in {out} are yours") from None
    if not isinstance(old, dict):
        raise ValueError(f"{path}: not a settings object; delete it if the images in {out} are yours")
    # the checkpoint by content; folders from before the content hash compare its path
    keys = CHECKED if "checkpoint_hash" in old else ("checkpoint",) + CHECKED[1:]
    for key in keys:
        if key in old and old[key] != settings[key]:
            what = "the checkpoint's content" if key == "checkpoint_hash" else f"{key}={old[key]!r}"
            now = f"{settings['checkpoint']} now holds other weights or defaults" if key == "checkpoint_hash" \
                else f"this run asks {key}={settings[key]!r}"
            raise ValueError(f"{path}: the images in {out} were made with {what}, {now}; use another --out, or "
                             "delete the folder to start over")


def _existing_images(out: Path, items: list[PromptItem], plan: list[tuple[int, int, int]],
                     digest: str) -> dict[tuple[int, int], str]:
    """(seed, row) -> "same" / "stale" for the planned images that exist; a file there that is not ours
    is refused in one line (it is never overwritten)."""
    states = {}
    for seed, start, stop in plan:
        for i in range(start, stop):
            path = out / IMAGES_DIR / items[i].file(seed)
            if path.is_file():
                state = image_state(path, items[i], seed * SEED_STRIDE + i, digest)
                if state == "foreign":
                    raise ValueError(f"{path}: not an image that microdiff {COMMAND} wrote (no stamp of it in its "
                                     "text chunks, or unreadable); move it away or use another --out")
                states[(seed, i)] = state
    return states


def write_index(out: Path, items: list[PromptItem], seeds: list[int]) -> tuple[int, int]:
    """index.csv (id, seed, prompt, file) of the images that exist; returns (rows written, missing)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "seed", "prompt", "file"])
    written = missing = 0
    for seed in seeds:
        for item in items:
            if (out / IMAGES_DIR / item.file(seed)).is_file():
                writer.writerow([item.id, seed, item.prompt, item.file(seed)])
                written += 1
            else:
                missing += 1
    write_text_atomic(out / INDEX_NAME, buffer.getvalue())
    return written, missing


# ----------------------------------------------------------------------------- the command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", required=True,
                        help="prompts file: .csv/.tsv with a caption column (caption, prompt, prompts or text) and "
                             "optional id column (id, image_id, prompt_id); .txt one per line (id = line number); "
                             ".json/.jsonl list of {id, prompt}")
    parser.add_argument("--checkpoint", required=True, help="pipeline folder (Pipeline.save_pretrained, microdiff "
                        "convert) or hub id")
    parser.add_argument("--out", required=True, help="output folder (new, empty, or an earlier --out of eval "
                        "generate): images/{id}_s{seed}.png, index.csv, generate.json. A rerun keeps the images made "
                        "from the same prompt text, seed and settings, makes again (and lists) its own images whose "
                        "prompt text or row changed in the file, and refuses other settings (or checkpoint content) "
                        "and any file it did not write")
    parser.add_argument("--seeds", default="0", help="comma list of seeds, one image per prompt and seed (default 0)")
    parser.add_argument("--guidance", type=finite_float, default=DEFAULT_GUIDANCE,
                        help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE:g}: the setting "
                             "micro_diffusion reports COCO FID at; FID prefers low guidance, looks and CLIP score "
                             "prefer higher, e.g. 5)")
    parser.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the pipeline's)")
    parser.add_argument("--sampler", default=None, help="euler, euler_ancestral, heun, ddim, dpmpp_2m, ... "
                        "(default: the pipeline's)")
    parser.add_argument("--eta", type=non_negative_float, default=None, help="noise of the samplers that have it (ddim: 1 = "
                        "ancestral; euler_ancestral, dpmpp_3m_sde); refused for the others")
    parser.add_argument("--size", type=positive_int, default=None, help="image side in pixels (default: the pipeline's)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per forward (default 32)")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N prompts of the file")
    parser.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when there is a GPU, else cpu), "
                        "cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", help="backbone weights dtype: auto (bfloat16 on cuda, float32 "
                        "elsewhere), float32, bfloat16, float16")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """``microdiff eval generate``: bad input ends with a one-line error and exit status 2."""
    from .errors import report_error

    if getattr(args, "debug", False) or debug_enabled():
        return _run(args)
    try:
        return _run(args)
    except USER_ERRORS as err:
        if type(err).__name__ == "OutOfMemoryError":
            return report_error("eval generate", f"out of GPU memory at --batch-size {args.batch_size}; try a "
                                "smaller --batch-size")
        return report_error("eval generate", first_line(err))


def _run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..pipeline import Pipeline
    from ..train.distributed import barrier, gather_objects, setup_distributed, teardown

    started = time.perf_counter()
    seeds = parse_seeds(args.seeds)
    items = read_prompts(args.prompts)[: args.limit]
    out = Path(args.out)
    check_folder(out)  # before the pipeline loads: a foreign folder costs nothing
    info = setup_distributed(args.device, field="--device")
    lock = None
    try:
        dtype = backbone_dtype(args.dtype, info.device, "--dtype")
        pipe = Pipeline.from_pretrained(args.checkpoint, device=info.device, dtype=dtype)
        chosen = pipe.check_options(args.steps, args.sampler, args.eta, args.size, args.size, args.guidance)
        checkpoint = Path(args.checkpoint)
        settings = {"checkpoint": str(checkpoint.resolve()) if checkpoint.is_dir() else str(args.checkpoint),
                    "checkpoint_hash": pipe.fingerprint(), "guidance": chosen["guidance_scale"],
                    "steps": chosen["num_inference_steps"], "sampler": chosen["sampler"], "eta": chosen["eta"],
                    "height": chosen["height"], "width": chosen["width"], "dtype": str(dtype).replace("torch.", ""),
                    "seed_stride": SEED_STRIDE, "prompts": str(args.prompts)}
        settings["settings"] = settings_hash(settings)
        check_settings(out, settings)  # every rank, before any rank writes
        plan = plan_batches(len(items), seeds, args.batch_size)
        states = _existing_images(out, items, plan, settings["settings"])  # every rank: the same decision
        error = None
        if info.is_main:  # one writer per folder: rank 0 holds the lock for the whole job
            try:
                output_folder(out, "--out")
                lock = FolderLock(out, LOCK_NAME, f"microdiff {COMMAND} run").acquire()
                check_folder(out)  # again, now that nobody else can be writing
            except USER_ERRORS as err:
                error = first_line(err)
        errors = [e for e in gather_objects(error, info) if e]
        if errors:
            raise ValueError(errors[0])
        (out / IMAGES_DIR).mkdir(exist_ok=True)
        barrier(info)
        if info.is_main:
            write_text_atomic(out / SETTINGS_NAME, json.dumps({**stamp(COMMAND), **settings}, indent=1))

        mine = plan[info.rank::info.world_size]
        todo = [(s, [i for i in range(a, b) if states.get((s, i)) != "same"]) for s, a, b in mine]
        skipped = sum(b - a for _, a, b in mine) - sum(len(rows) for _, rows in todo)
        redone = [items[i].file(s) for s, a, b in mine for i in range(a, b) if states.get((s, i)) == "stale"]
        generated = 0
        desc = "generate" + (f" (rank 0 of {info.world_size})" if info.distributed else "")
        with tqdm(total=sum(len(rows) for _, rows in todo), unit="img", desc=desc, dynamic_ncols=True,
                  disable=args.quiet or not info.is_main) as bar:
            for seed, rows in todo:
                for run_rows in consecutive_runs(rows):
                    images = pipe.generate([items[i].prompt for i in run_rows], seed=seed * SEED_STRIDE + run_rows[0],
                                           num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                                           sampler=settings["sampler"], eta=args.eta, height=settings["height"],
                                           width=settings["width"], batch_size=len(run_rows))
                    for i, image in zip(run_rows, Pipeline.to_pil(images)):
                        item = items[i]
                        meta = {**stamp(COMMAND), "id": item.id, "prompt": item.prompt, "seed": seed,
                                "noise_seed": seed * SEED_STRIDE + i,
                                **{k: settings[k] for k in ("sampler", "steps", "guidance", "checkpoint", "settings")}}
                        write_png_atomic(image, out / IMAGES_DIR / item.file(seed), meta)
                    generated += len(run_rows)
                    bar.update(len(run_rows))
        barrier(info)
        counts = gather_objects((generated, skipped, redone), info)
        if info.is_main:
            for stale in (out / IMAGES_DIR).glob(".*.tmp"):  # left by killed runs; every rank is done now
                stale.unlink(missing_ok=True)
            written, missing = write_index(out, items, seeds)
            total_new, total_skipped = (sum(c[k] for c in counts) for k in range(2))
            redone = sorted(name for c in counts for name in c[2])
            seconds = time.perf_counter() - started
            shown = ", ".join(redone[:SHOWN]) + (f" and {len(redone) - SHOWN} more" if len(redone) > SHOWN else "")
            again = (f" ({len(redone)} of them again, replacing images of an earlier run whose prompt text or row "
                     f"had changed: {shown})" if redone else "")
            print(f"generated {total_new} images{again}, skipped {total_skipped} that existed, in {seconds:.1f} s "
                  f"({len(items)} prompts x {len(seeds)} seed(s), {info.world_size} process(es)); "
                  f"{out / INDEX_NAME}: {written} rows" + (f", {missing} missing" if missing else ""))
        return 0
    finally:
        if lock is not None:
            lock.release()
        teardown(info)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="microdiff eval generate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = ["PromptItem", "read_prompts", "safe_name", "parse_seeds", "plan_batches", "write_png_atomic",
           "add_arguments", "run", "main", "SEED_STRIDE", "DEFAULT_GUIDANCE"]


if __name__ == "__main__":
    sys.exit(main())
