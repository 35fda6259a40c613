"""Undefined names, unused imports and syntax errors fail the suite (ruff's pyflakes rules), so a name
used without its import cannot reach a user as an internal error."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyflakes_rules_pass_on_the_sources_and_tests():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it comes with microdiff[dev])")
    proc = subprocess.run([ruff, "check", "--no-cache", "--isolated", "--select", "F,E9", "--output-format",
                           "concise", "src", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
