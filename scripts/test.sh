#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run lint, types and all tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: redis-server (tests start their own on free ports), g++ (inductor on CPU) and
# Java 17 (TorchServe's frontend).
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v g++ >/dev/null || missing+=(g++)
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
if [ ${#missing[@]} -gt 0 ]; then
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

bash scripts/setup.sh dev,bentoml,ray,torchserve

echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest "$@"
