#!/usr/bin/env bash
# Create .venv and install fastload into it (idempotent). Usage: scripts/setup.sh [EXTRAS]
#   scripts/setup.sh            the core (demo)
#   scripts/setup.sh dev        everything the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# torch is pinned to 2.13.0 in pyproject.toml: a CPU build that pip finds locally on this fleet's machines.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
