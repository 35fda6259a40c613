"""Shared by the benchmark scripts: machine description and the RESULTS.md section writer.

Each script owns one section of RESULTS.md, delimited by HTML comments, and replaces it on each
run, so the file always holds the latest result of every benchmark with the machine it ran on."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    threads = torch.get_num_threads()
    return (f"{cpu}, {os.cpu_count()} cores ({threads} torch threads), {device}; "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return out + ("+local changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_csv(rows: list[dict], path) -> None:
    """Rows as CSV with every column any row has (missing cells empty)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, restval="")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))  # every column any row has, in order
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section of RESULTS.md that belongs to benchmark ``name``."""
    stamp = f"{_dt.date.today().isoformat()}, commit {commit()}, {machine()}"
    section = f"<!-- {name}:start -->\n## {name}\n\n_{stamp}_\n\n{body.strip()}\n<!-- {name}:end -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nWritten by the scripts in this folder; each section is replaced when its script runs again.\n"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)
