#!/usr/bin/env bash
# Create (or refresh) the project virtual environment in $VENV (default .venv) and install
# microdiff with the extras named in $EXTRAS (default "dev").
#
# A torch that is already installed is never replaced: if the venv (or the system Python it is
# created from) already has torch, its exact version is pinned through a constraints file, so pip
# cannot swap it for another build. On a machine without torch, pip installs torch normally.
set -euo pipefail

VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.microdiff-installed-$EXTRAS"

torch_version() {  # prints the torch version importable by interpreter $1, or nothing
    "$1" -c 'import torch, sys; sys.stdout.write(torch.__version__)' 2>/dev/null || true
}

if [ ! -x "$VENV/bin/python" ]; then
    if [ -n "$(torch_version "$PYTHON")" ]; then
        # Reuse the system torch instead of downloading another one.
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi

# Reinstall only when the package metadata changed since the last successful install.
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt requirements/test-references.txt ]; then
    exit 0
fi

CONSTRAINTS="$VENV/constraints.txt"
installed=$(torch_version "$VENV/bin/python")
if [ -n "$installed" ]; then
    # Pin the public version (2.14.1 for 2.14.1+cu130): "==" still matches the installed local build,
    # and pip can combine it with other caps such as "torch<=2.14.1", which it cannot do for "==2.14.1+cu130".
    echo "torch==${installed%%+*}" > "$CONSTRAINTS"
    echo "setup: keeping the installed torch $installed"
else
    : > "$CONSTRAINTS"
    echo "setup: no torch found, pip will install one"
fi

"$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" -e ".[$EXTRAS]"
if [[ ",$EXTRAS," == *",dev,"* ]]; then
    # Reference implementations for the tests, without their declared (torchvision) dependencies.
    "$VENV/bin/python" -m pip install --quiet --no-deps -c "$CONSTRAINTS" -r requirements/test-references.txt
fi
touch "$STAMP"
