#!/usr/bin/env bash
# GPU acceptance check, one script, well under six minutes on a CUDA machine:
#   1. refuses to run (exit 1) where torch sees no CUDA device: a silent skip would read as a pass;
#   2. runs the GPU-marked tests (pytest -m gpu);
#   3. runs the load benchmark's GPU scenario: fastload load_file(device="cuda") against
#      safetensors.torch.load_file(device="cuda"), fastsafetensors and Run:ai on the same warm file,
#      with the pinned host-to-device bandwidth measured in the same rounds as the limit;
#   4. runs the compile-cache benchmark on cuda (file backend, one round: cold vs warm replica);
#   5. prints the tables and the GPU target verdicts; exits 3 if a GPU target fails.
# Environment: PYTHON (default python), SIZE_GB (2), ROUNDS (3), BENCH_DIR (/tmp/fastload-bench),
# OUT_DIR (bench-out/gpu; JSON and markdown land here), MARKDOWN (a docs file to update, optional).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SIZE_GB=${SIZE_GB:-2}
ROUNDS=${ROUNDS:-3}
BENCH_DIR=${BENCH_DIR:-/tmp/fastload-bench}
OUT_DIR=${OUT_DIR:-bench-out/gpu}
export PYTHONPATH="$PWD:$PWD/integrations${PYTHONPATH:+:$PYTHONPATH}"
started=$SECONDS

"$PYTHON" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: FAILED: torch.cuda.is_available() is False (torch %s, CUDA build %s); "
             "this check must run on a CUDA machine" % (torch.__version__, torch.version.cuda))
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY

echo "== pytest -m gpu"
set +e
timeout 150 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "gpu_check: warning: no GPU-marked tests were collected"
elif [ "$status" -ne 0 ]; then
    echo "gpu_check: FAILED: pytest -m gpu exited with $status" >&2
    exit "$status"
fi

mkdir -p "$OUT_DIR"
echo "== GPU load benchmark (${SIZE_GB} GiB, ${ROUNDS} rounds)"
markdown_args=()
if [ -n "${MARKDOWN:-}" ]; then markdown_args=(--markdown "$MARKDOWN"); fi
timeout 300 "$PYTHON" benchmarks/bench_load.py --scenarios gpu --size-gb "$SIZE_GB" --rounds "$ROUNDS" \
    --dir "$BENCH_DIR" --json "$OUT_DIR/gpu.json" "${markdown_args[@]}" | tee "$OUT_DIR/gpu.md"

echo "== compile cache on cuda (file backend, 1 round)"
timeout 150 "$PYTHON" benchmarks/bench_compile.py --device cuda --backends file --rounds 1 \
    --json "$OUT_DIR/compile.json" | tee "$OUT_DIR/compile.md" || echo "gpu_check: compile benchmark failed" >&2

echo "gpu_check: finished in $((SECONDS - started))s"
if grep -E '^\| GPU .*\*\*FAIL\*\*' "$OUT_DIR/gpu.md" >/dev/null; then
    echo "gpu_check: a GPU target FAILED (see the Targets table above)" >&2
    exit 3
fi
if ! grep -E '^\| GPU .*\*\*PASS\*\*' "$OUT_DIR/gpu.md" >/dev/null; then
    echo "gpu_check: FAILED: the GPU scenario produced no verdicts" >&2
    exit 4
fi
