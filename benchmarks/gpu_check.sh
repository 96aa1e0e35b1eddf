#!/usr/bin/env bash
# GPU acceptance check for a short GPU lease: one script, under five minutes on an H100 (issue 14).
#   1. refuses to run (exit 1) where torch sees no CUDA device: a silent skip would read as a pass;
#   2. side by side (none of them is a load figure): builds the 4 GiB checkpoint (safetensors only),
#      runs the compile-cache check on cuda (bench_compile.py, file backend, one round: a cold and a
#      warm replica; its times are not quiet-machine figures; on an H200 the compile path took 22 s and
#      the export path did not finish inside a 120 s cap: give it BUDGET_S - BENCH_S of 180 s or more)
#      and `pytest -m "$PYTEST_MARKS"` (default "gpu and not slow": the 4 slow GPU tests compile on cuda,
#      about 3.5 min together on an H200, past a 120 s cap; PYTEST_MARKS=gpu runs them, with a bigger
#      BUDGET_S);
#      then, alone, the set-up probe (benchmarks/gpu_probe.py: what pinning, the device allocation and
#      the streams cost a fresh process; probe.json; a failed probe is a warning, not a failure);
#   3. then, alone, the load benchmark's GPU scenarios, every run a fresh process, medians of ROUNDS,
#      one benchmark run per scenario (a scenario cut short does not take the other's figures with it):
#      gpu      (file in /dev/shm): safetensors, fastsafetensors, Run:ai, fastload (first load in a
#               process; second load in a process), against limits measured in the same rounds: a
#               parallel pread into pinned memory and one pinned host-to-device copy of the file's size;
#      gpu-cold (file on local disk, page cache dropped before every run): the same loaders against an
#               O_DIRECT parallel read. Where the page cache cannot be dropped (posix_fadvise fails and
#               /proc/sys/vm/drop_caches needs root), the cold rows say so and are skipped;
#   4. writes everything under OUT_DIR and exits non-zero if any GPU target or step failed.
# Every step runs under `timeout`, bounded by what is left of BUDGET_S, so the whole script ends in time.
# BENCH_S of the budget is kept for the benchmark: the steps before it (build, pytest, compile check, side
# by side) end when only that much is left; the first scenario gets 55% of what remains, the last all of
# it. A benchmark rewrites SCENARIO.md after every round, so one that a budget kills still leaves the
# tables of the rounds that finished (marked partial).
#
# Usage: benchmarks/gpu_check.sh [--dry-run]
#   --dry-run: no GPU needed. Runs the same steps on the CPU at a tiny size (the GPU scenarios' methods
#   load to the CPU; pytest only collects the GPU tests; the compile check runs on cpu), to catch a
#   broken script before a GPU lease is spent on it. Its figures mean nothing; its verdicts are n/a.
# Environment: PYTHON (python3), SIZE_GB (4), ROUNDS (3), BENCH_DIR (/tmp/fastload-bench: local disk),
#   OUT_DIR (else $OUT, else bench-out/gpu), BUDGET_S (290), BENCH_S (170: kept for the benchmark), PYTEST_MARKS,
#   MARKDOWN (a docs file to update, optional), SCENARIOS (gpu,gpu-cold), METHODS (safetensors,
#   fastsafetensors,runai,fastload,fastload-repeat; add fastload-repin (a warm process re-pinning its staging),
#   fastload-alloc, -buf4, -buf8, -buf32, -buf64, -buffered (cold reads through the page cache), -threads8,
#   -threads24, -threads32 (other loader settings) to compare them; the limits always run), COLD_METHODS
#   (the gpu-cold scenario's, else METHODS: a cold run costs a disk read),
#   SKIP_TESTS=1 / SKIP_COMPILE=1 / SKIP_PROBE=1 (for a rerun of only what is missing).
# Output (OUT_DIR, at most 8 files: what a lease returns): summary.txt (each step's status, the GPU verdicts,
#   a failed pytest's last lines, the exit code), compile.md, probe.json, per scenario SCENARIO.md, and
#   details.tar.gz with every log and JSON: pytest.log, build.log, compile.json/.log, probe.log, and per
#   scenario SCENARIO.json (every run, with fastload's stages) and SCENARIO.log (per-run progress).
# Exit status: 0 all passed; 1 no CUDA; 2 a GPU test failed; 3 a GPU target failed; 4 a benchmark step
#   failed or produced no verdicts; 5 the compile-cache check failed; 6 a step ran out of time. The first
#   failure's code is kept; every step runs regardless, so one lease yields every figure.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; elif [ -n "${1:-}" ]; then
    echo "gpu_check: unknown argument '$1' (usage: benchmarks/gpu_check.sh [--dry-run])" >&2; exit 64
fi
PYTHON=${PYTHON:-python3}
SIZE_GB=${SIZE_GB:-4}
ROUNDS=${ROUNDS:-3}
BENCH_DIR=${BENCH_DIR:-/tmp/fastload-bench}
OUT_DIR=${OUT_DIR:-${OUT:-bench-out/gpu}}
SCENARIOS=${SCENARIOS:-gpu,gpu-cold}
METHODS=${METHODS:-safetensors,fastsafetensors,runai,fastload,fastload-repeat}
COLD_METHODS=${COLD_METHODS:-$METHODS}
PYTEST_MARKS=${PYTEST_MARKS:-gpu and not slow}
SKIP_PROBE=${SKIP_PROBE:-0}
SKIP_TESTS=${SKIP_TESTS:-0}
SKIP_COMPILE=${SKIP_COMPILE:-0}
DEVICE=cuda:0
if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu
    SIZE_GB=${DRY_SIZE_GB:-0.0625}
    BUDGET_S=${BUDGET_S:-900}  # a dry run checks the steps, not the time they take on a GPU machine
    BENCH_S=${BENCH_S:-120}
    COMPILE_CAP=600  # compiling on a small CPU takes minutes
fi
COMPILE_CAP=${COMPILE_CAP:-180}  # bounded by what the budget leaves before the benchmark (BUDGET_S - BENCH_S)
BUDGET_S=${BUDGET_S:-290}
BENCH_S=${BENCH_S:-170}
export PYTHONPATH="$PWD:$PWD/integrations${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR" "$BENCH_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
# A lease returns at most 8 files from $OUT: the readable ones (summary.txt, compile.md, probe.json, gpu.md,
# gpu-cold.md) stay in OUT_DIR, and every log and JSON goes into details.tar.gz, packed after each step
# and at exit, so a kill still leaves the steps before it.
DETAILS=$(mktemp -d)
pack() {  # written aside, then renamed: a kill mid-write leaves the previous complete archive
    tar -czf "$OUT_DIR/.details.tar.gz.part" -C "$DETAILS" . 2>/dev/null \
        && mv "$OUT_DIR/.details.tar.gz.part" "$OUT_DIR/details.tar.gz"
}
trap 'pack; rm -rf "$DETAILS"' EXIT
started=$SECONDS
status=0

say() { echo "gpu_check: $*" | tee -a "$SUMMARY"; }
fail() {  # fail CODE MESSAGE: remember the first failure's code, keep going so one lease yields everything
    say "FAILED: $2"
    if [ "$status" -eq 0 ]; then status=$1; fi
}
left() { echo $((BUDGET_S - (SECONDS - started))); }
limit() {  # limit CAP: a step's timeout, the smaller of CAP and what is left of the budget
    local remaining
    remaining=$(left)
    if [ "$remaining" -lt 1 ]; then remaining=1; fi  # `timeout 0` would mean no limit at all
    if [ "$remaining" -lt "$1" ]; then echo "$remaining"; else echo "$1"; fi
}
before_bench() {  # before_bench CAP: a pre-benchmark step's timeout, leaving BENCH_S of the budget untouched
    local remaining
    remaining=$(( $(left) - BENCH_S ))
    if [ "$remaining" -lt 10 ]; then remaining=10; fi
    if [ "$remaining" -lt "$1" ]; then echo "$remaining"; else echo "$1"; fi
}

if [ "$DRY_RUN" = 1 ]; then
    say "dry run on the CPU (${SIZE_GB} GiB): checks the script, measures nothing"
else
    if ! "$PYTHON" - <<'PY' 2>&1 | tee -a "$SUMMARY"; then
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: FAILED: torch.cuda.is_available() is False (torch %s, CUDA build %s); "
             "this check must run on a CUDA machine" % (torch.__version__, torch.version.cuda))
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
        exit 1
    fi
fi
say "load average at start: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores; budget ${BUDGET_S}s"

# Built, and the compile-cache check run, while the GPU tests run: none of the three is a load figure.
# The load benchmark then runs alone. The compile check's times are therefore not quiet-machine figures;
# what it checks is that a second process on cuda hits the cache.
"$PYTHON" - "$BENCH_DIR" "$SIZE_GB" >"$DETAILS/build.log" 2>&1 <<'PY' &
import sys, time
from pathlib import Path
from fastload_core.bench.checkpoints import GIB, describe, ensure_checkpoint
began = time.perf_counter()
checkpoint = ensure_checkpoint(Path(sys.argv[1]), int(float(sys.argv[2]) * GIB), pickle=False)
print(f"built {checkpoint.safetensors} in {time.perf_counter() - began:.1f}s: {describe(checkpoint.config)}")
PY
build_pid=$!
compile_pid=
if [ "$SKIP_COMPILE" != 1 ]; then
    timeout "$(before_bench "$COMPILE_CAP")" "$PYTHON" benchmarks/bench_compile.py --device "${DEVICE%%:*}" --backends file --rounds 1 \
        --json "$DETAILS/compile.json" >"$OUT_DIR/compile.md" 2>"$DETAILS/compile.log" &
    compile_pid=$!
fi

if [ "$SKIP_TESTS" != 1 ]; then
    echo "== pytest -m '$PYTEST_MARKS'"
    if [ "$DRY_RUN" = 1 ]; then pytest_args=(--collect-only -q); else pytest_args=(-q); fi
    timeout "$(before_bench 120)" "$PYTHON" -m pytest -m "$PYTEST_MARKS" "${pytest_args[@]}" -p no:cacheprovider tests 2>&1 \
        | tee "$DETAILS/pytest.log" | tail -n 25
    code=${PIPESTATUS[0]}
    if [ "$code" -eq 5 ]; then say "warning: no GPU-marked tests were collected"
    elif [ "$code" -eq 124 ]; then fail 6 "pytest -m '$PYTEST_MARKS' ran out of time (see pytest.log in details.tar.gz)"
    elif [ "$code" -ne 0 ]; then
        fail 2 "pytest -m '$PYTEST_MARKS' exited with $code; its last lines:"
        tail -n 15 "$DETAILS/pytest.log" | sed 's/^/    /' >>"$SUMMARY"
    else say "pytest -m '$PYTEST_MARKS': passed ($(tail -n 1 "$DETAILS/pytest.log"))"; fi
    pack
fi

if [ -n "$compile_pid" ]; then
    echo "== compile cache on ${DEVICE%%:*} (file backend, 1 round)"
    wait "$compile_pid"
    code=$?
    cat "$OUT_DIR/compile.md"
    if [ "$code" -eq 124 ]; then fail 6 "the compile-cache check ran out of time (see compile.log in details.tar.gz)"
    elif [ "$code" -ne 0 ]; then fail 5 "the compile-cache check exited with $code: $(tail -n 1 "$DETAILS/compile.log")"
    else say "compile-cache check: finished (ran beside pytest -m gpu and the checkpoint build)"; fi
    pack
fi

if ! wait "$build_pid"; then
    fail 4 "building the ${SIZE_GB} GiB checkpoint failed: $(tail -n 1 "$DETAILS/build.log")"
    say "finished in $((SECONDS - started))s, exit $status; outputs in $OUT_DIR"
    exit "$status"
fi
say "$(tail -n 1 "$DETAILS/build.log")"

# The set-up cost model (pinning by registration and by allocation, from one thread and from 16, the device
# allocation, registering the file's own mapping): alone, before the benchmark, so its figures are quiet.
if [ "$DRY_RUN" = 1 ] || [ "$SKIP_PROBE" = 1 ]; then
    say "set-up probe: skipped (a dry run, or SKIP_PROBE=1)"
else
    checkpoint=$(sed -n 's/^built \(.*\) in [0-9.]*s: .*/\1/p' "$DETAILS/build.log")
    if timeout "$(before_bench 60)" "$PYTHON" benchmarks/gpu_probe.py "$checkpoint" --json "$OUT_DIR/probe.json" \
        >"$DETAILS/probe.log" 2>&1; then
        say "set-up probe: written to probe.json"
    else
        say "warning: the set-up probe failed (not a target; see probe.log in details.tar.gz): $(tail -n 1 "$DETAILS/probe.log")"
    fi
fi

# One benchmark run per scenario, each with its own tables and verdicts, so a scenario cut short by the
# budget does not take the other's figures with it.
markdown_args=()
if [ -n "${MARKDOWN:-}" ]; then markdown_args=(--markdown "$MARKDOWN"); fi
scenarios=(${SCENARIOS//,/ })
for index in "${!scenarios[@]}"; do
    scenario=${scenarios[$index]}
    if [ "$index" -lt $(( ${#scenarios[@]} - 1 )) ]; then cap=$(( $(left) * 55 / 100 )); else cap=$(left); fi
    echo "== load benchmark: $scenario (${SIZE_GB} GiB, ${ROUNDS} rounds, device ${DEVICE}, up to ${cap}s)"
    rm -f "$OUT_DIR/$scenario.md"
    methods=$METHODS
    if [ "$scenario" = gpu-cold ]; then methods=$COLD_METHODS; fi
    timeout "$(limit "$cap")" "$PYTHON" benchmarks/bench_load.py --scenarios "$scenario" --device "$DEVICE" \
        --methods "$methods" --size-gb "$SIZE_GB" --rounds "$ROUNDS" --dir "$BENCH_DIR" --timeout 60 \
        --json "$DETAILS/$scenario.json" --partial "$OUT_DIR/$scenario.md" \
        --note "benchmarks/gpu_check.sh on $(hostname), load average at start $(cut -d' ' -f1-3 /proc/loadavg)" \
        "${markdown_args[@]}" >"$DETAILS/$scenario.out" 2>"$DETAILS/$scenario.log"
    code=$?
    # The whole report (also one stopped by SIGTERM) replaces the partial one written after each round.
    if grep -q '^## ' "$DETAILS/$scenario.out"; then mv "$DETAILS/$scenario.out" "$OUT_DIR/$scenario.md"; fi
    touch "$OUT_DIR/$scenario.md"
    pack
    cat "$OUT_DIR/$scenario.md"
    grep -E '^\| GPU .*\*\*(PASS|FAIL)\*\*' "$OUT_DIR/$scenario.md" >>"$SUMMARY"
    if [ "$code" -eq 124 ] || [ "$code" -eq 143 ]; then
        fail 6 "the $scenario benchmark ran out of time; $scenario.md holds the rounds that finished"
    elif [ "$code" -ne 0 ]; then fail 4 "the $scenario benchmark exited with $code: $(tail -n 1 "$DETAILS/$scenario.log")"
    elif grep -E '^\| GPU .*\*\*FAIL\*\*' "$OUT_DIR/$scenario.md" >/dev/null; then
        fail 3 "$scenario: a GPU target failed (see the Targets table in $scenario.md)"
    elif [ "$DRY_RUN" = 0 ] && ! grep -E '^\| GPU .*\*\*PASS\*\*' "$OUT_DIR/$scenario.md" >/dev/null; then
        fail 4 "$scenario produced no GPU verdicts (see $scenario.md, and $scenario.log in details.tar.gz)"
    else
        say "$scenario: $(grep -cE '^\| GPU .*\*\*PASS\*\*' "$OUT_DIR/$scenario.md") GPU target(s) passed"
    fi
done

say "finished in $((SECONDS - started))s, exit $status; outputs in $OUT_DIR"
exit "$status"
