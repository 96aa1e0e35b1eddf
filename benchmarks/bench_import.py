"""What a fresh process waits for: import plus a warm load, fastload against safetensors (issue 7).

A serving worker starts, imports its loader and loads the weights once; for a warm file (in
/dev/shm or the page cache) the imports are a real share of that. Each run here is a new
interpreter that imports torch (outside the clock: every method pays it alike), then starts the
clock, imports the loader's package, loads the file with ``fastload_core.load_file`` or
``safetensors.torch.load_file``, reads one byte of every 4 KiB page of every tensor (so a lazy
mapping pays its page faults) and stops the clock. Methods alternate within each round, the order
shuffled per round; medians and the spread over rounds are reported, plus the ratio per round.

Usage: python benchmarks/bench_import.py [--size-gb 1] [--rounds 9] [--markdown docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK_START = "<!-- env:import:start -->"
MARK_END = "<!-- env:import:end -->"

# The child: only the standard library and torch before the clock starts.
CHILD = r"""
import json, sys, time
import torch

method, path = sys.argv[1], sys.argv[2]
started = time.perf_counter()
if method == "fastload":
    import fastload_core
    imported = time.perf_counter()
    tensors = fastload_core.load_file(path)
else:
    import safetensors.torch
    imported = time.perf_counter()
    tensors = safetensors.torch.load_file(path)
loaded = time.perf_counter()
nbytes, checksum = 0, 0
for tensor in tensors.values():
    if tensor.numel():
        raw = tensor.reshape(-1).view(torch.uint8)
        checksum += int(raw[::4096].sum(dtype=torch.int64)) + int(raw[-1])
        nbytes += raw.numel()
finished = time.perf_counter()
print(json.dumps({"method": method, "seconds": finished - started, "import": imported - started,
                  "load": loaded - imported, "touch": finished - loaded, "bytes": nbytes,
                  "checksum": checksum}))
"""

METHODS = {"fastload": "`import fastload_core` + `fastload_core.load_file`",
           "safetensors": "`import safetensors.torch` + `safetensors.torch.load_file`"}


def write_checkpoint(path: Path, size_bytes: int) -> str:
    """The load benchmark's synthetic decoder (hundreds of tensors, bf16), safetensors only."""
    sys.path.insert(0, str(REPO))
    from safetensors.torch import save_file

    from fastload_core.bench.checkpoints import TransformerConfig, describe, synthetic_state_dict

    config = TransformerConfig.for_size(size_bytes, "bf16")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        save_file(synthetic_state_dict(config), str(temporary))
        temporary.rename(path)
    return describe(config)


def run_child(method: str, path: Path, env: dict[str, str]) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", CHILD, method, str(path)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{method} run failed:\n{done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def summarize(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size in GiB (default 1)")
    parser.add_argument("--rounds", type=int, default=9, help="rounds; medians are reported (default 9)")
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm/fastload-bench-import"),
                        help="RAM-backed directory for the warm file (default /dev/shm/fastload-bench-import)")
    parser.add_argument("--keep", action="store_true", help="leave the checkpoint in --dir afterwards")
    parser.add_argument("--markdown", type=Path, help="write the report between the env:import markers of this file")
    parser.add_argument("--note", action="append", default=[], help="a line to add to the report (repeatable)")
    args = parser.parse_args()
    if args.rounds < 1 or args.size_gb <= 0:
        parser.error("--rounds must be >= 1 and --size-gb > 0")

    load_at_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
    path = args.dir / f"import-bench-{args.size_gb:g}GiB-bf16.safetensors"
    described = write_checkpoint(path, int(args.size_gb * (1 << 30)))
    runs: dict[str, list[dict[str, float]]] = {method: [] for method in METHODS}
    with tempfile.TemporaryDirectory(prefix="fastload-bench-import-") as scratch:
        # No user cache, no FASTLOAD_* setting from outside; the repository first on the path.
        # Bytecode may be written: an installed package has its .pyc files, and the untimed first runs write
        # the repository's (with PYTHONDONTWRITEBYTECODE every fastload run would compile its sources).
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLOAD_") and k != "PYTHONDONTWRITEBYTECODE"}
        env.update(FASTLOAD_CACHE_DIR=scratch, FASTLOAD_SHM_DIR=f"{scratch}/shm",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
        for method in METHODS:  # untimed: byte-compiles, and puts the file and the libraries in the page cache
            run_child(method, path, env)
        for round_index in range(args.rounds):
            order = list(METHODS)
            random.Random(round_index).shuffle(order)
            for method in order:
                runs[method].append(run_child(method, path, env))
            print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
                f"{m} {runs[m][-1]['seconds']:.3f}s" for m in METHODS), file=sys.stderr, flush=True)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)

    checksums = {run["checksum"] for method_runs in runs.values() for run in method_runs}
    ratios = [f["seconds"] / s["seconds"] for f, s in zip(runs["fastload"], runs["safetensors"], strict=True)]
    median = {m: statistics.median(r["seconds"] for r in runs[m]) for m in METHODS}
    ratio = median["fastload"] / median["safetensors"]
    import safetensors
    import torch

    lines = [
        "## Fresh process: import + warm load (issue 7)",
        "",
        f"Machine: {os.cpu_count()} cores; load average at start {load_at_start}; Python "
        f"{sys.version.split()[0]}, torch {torch.__version__}, safetensors {safetensors.__version__}.",
        "",
        f"Command: `python benchmarks/bench_import.py {shlex.join(sys.argv[1:])}`",
        "",
        f"Checkpoint: {described}; in `{args.dir}` (tmpfs, so warm).",
        *(f"\n{note}" for note in args.note),
        "",
        "Each run is a fresh interpreter: `import torch` happens before the clock; the clock covers the "
        "loader's import, the load and a read of one byte of every 4 KiB page of every tensor. "
        f"{args.rounds} rounds, methods in shuffled order per round; median (min–max) seconds.",
        "",
        "| method | total s | import s | load s | touch s |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, label in METHODS.items():
        got = runs[method]
        lines.append(f"| {label} | {summarize([r['seconds'] for r in got])} | "
                     f"{summarize([r['import'] for r in got])} | {summarize([r['load'] for r in got])} | "
                     f"{summarize([r['touch'] for r in got])} |")
    verdict = "met" if ratio <= 1.1 else "NOT met"
    import_ms = statistics.median(r["import"] for r in runs["fastload"]) * 1000
    lines += [
        "",
        f"fastload ÷ safetensors, ratio of the medians: **{ratio:.2f}×** (per round "
        f"{min(ratios):.2f}–{max(ratios):.2f}×); target ≤ 1.1×: {verdict}. `import fastload_core` after "
        f"`import torch`: median {import_ms:.1f} ms (target ≤ 30 ms: {'met' if import_ms <= 30 else 'NOT met'}); "
        "fastload's remaining imports (its storage URI check and loader; pluggy and the plugin manager only where "
        "a plugin is installed) happen inside "
        "`load_file` and are in its load column.",
        f"Same bytes read by every run: {'yes' if len(checksums) == 1 else 'NO'} "
        f"({runs['fastload'][0]['bytes'] / 1e9:.3f} GB).",
        "",
        "Leaves out: `import torch` itself (the same for both), the interpreter's start, and a cold file "
        "(see the load benchmark's cold scenario).",
    ]
    report = "\n".join(lines)
    print(report)
    if args.markdown:
        text = args.markdown.read_text() if args.markdown.exists() else "# Benchmarks\n"
        block = f"{MARK_START}\n{report}\n{MARK_END}"
        start, end = text.find(MARK_START), text.find(MARK_END)
        text = (text[:start] + block + text[end + len(MARK_END):] if start != -1 and end > start
                else text.rstrip() + "\n\n" + block + "\n")
        args.markdown.write_text(text)
    return 0 if len(checksums) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
