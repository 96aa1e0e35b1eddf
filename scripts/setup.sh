#!/usr/bin/env bash
# Create .venv and install fastload into it (idempotent). Usage: scripts/setup.sh [EXTRAS]
#   scripts/setup.sh                              the core (demo)
#   scripts/setup.sh dev,bentoml,ray,torchserve   everything the test suite needs (scripts/test.sh)
# Versions come from scripts/constraints.txt: torch 2.13.0 is the CPU build on this fleet's local disk
# (an unpinned torch would download a multi-GB CUDA build), the rest a set seen to install together.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check -c scripts/constraints.txt)
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".${extras:+[$extras]}"
