"""``fastload bench``: the load benchmark on the command line (wired in through ``cli._COMMAND_MODULES``)."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoints import DTYPES, GIB
from .report import update_markdown
from .runner import BenchConfig, run_bench
from .scenarios import METHOD_NAMES, SCENARIOS

DEFAULT_SCENARIOS = "warm,cold,model"


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time checkpoint loading: fastload against torch.load, safetensors, Run:ai, fastsafetensors",
        description=(
            "Writes a synthetic transformer-like checkpoint, loads it with every method in a fresh "
            "process (methods interleaved, several rounds), and prints medians, ratios and the target checks."
        ),
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size in GiB (default 2)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype (default bf16)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per scenario; medians are reported (default 5)")
    parser.add_argument("--scenarios", default=DEFAULT_SCENARIOS,
                        help=f"comma-separated, from {','.join(SCENARIOS)} (default {DEFAULT_SCENARIOS})")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated subset of {','.join(METHOD_NAMES)}; limits always run (default all)")
    parser.add_argument("--dir", type=Path, default=Path("bench-out"),
                        help="local-disk directory for the checkpoint and the cold scenario (default ./bench-out)")
    parser.add_argument("--warm-dir", type=Path, default=Path("/dev/shm/fastload-bench"),
                        help="RAM-backed directory for the warm scenarios (default /dev/shm/fastload-bench)")
    parser.add_argument("--keep-warm", action="store_true", help="leave the warm copy in --warm-dir afterwards")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take (default 900)")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="write the report into this file between <!-- bench:load --> markers")
    parser.add_argument("--json", type=Path, default=None, help="write every run's raw result here")
    parser.add_argument("--partial", type=Path, default=None,
                        help="rewrite this file with the report of the rounds finished so far after every round "
                             "(for a run that a time budget may kill)")
    parser.add_argument("--note", action="append", default=[], help="a line to add to the report (repeatable)")
    parser.add_argument("--device", default="cuda:0",
                        help="where the gpu scenarios load to (default cuda:0); 'cpu' runs them as a dry run "
                             "of the harness on a machine without a GPU (figures meaningless, verdicts n/a)")
    parser.add_argument("--quiet", action="store_true", help="no per-run progress on stderr")


def run(args: argparse.Namespace) -> int:
    if args.rounds < 1 or not (math.isfinite(args.size_gb) and args.size_gb > 0) or \
            not (math.isfinite(args.timeout) and args.timeout > 0):
        print("fastload bench: --rounds must be ≥ 1, and --size-gb and --timeout numbers above 0", file=sys.stderr)
        return 2
    bench = BenchConfig(
        size_bytes=int(args.size_gb * GIB),
        rounds=args.rounds,
        scenarios=[s.strip() for s in args.scenarios.split(",") if s.strip()],
        methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None,
        disk_dir=args.dir,
        warm_dir=args.warm_dir,
        dtype=args.dtype,
        timeout_s=args.timeout,
        keep_warm=args.keep_warm,
        device=args.device,
    )
    command = "fastload bench " + shlex.join(sys.argv[1:] if sys.argv[1:2] != ["bench"] else sys.argv[2:])
    try:
        outcome = run_bench(bench, command.strip(), args.note,
                            progress=(lambda _: None) if args.quiet else _progress,
                            partial=None if args.partial is None else partial(args.partial))
    except ValueError as exc:
        print(f"fastload bench: {exc}", file=sys.stderr)
        return 2
    print(outcome.markdown)
    missing = sorted({s.method.label for r in outcome.results.values() for s in r.summaries.values()
                      if s.median is None and "No module named" in (s.error or "")})
    if missing:
        print(f"\n{' and '.join(missing)}: n/a because not installed. They come with the bench extra: "
              "`bash scripts/setup.sh bench` in a clone of fastload, or `pip install 'fastload[bench]'`.")
    if args.markdown is not None and not outcome.cut_short:  # a partial run is not a record for the docs
        update_markdown(args.markdown, outcome.markdown)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(outcome.raw, indent=1))
    if outcome.cut_short:
        print("fastload bench: stopped by SIGTERM; the report above holds the runs that finished"
              + (f" ({args.markdown} left as it was)" if args.markdown is not None else ""), file=sys.stderr)
        return 143  # 128 + SIGTERM, as if the signal had ended it
    return 0


def partial(path: Path) -> Callable[[str], None]:
    """Write each report to ``path`` whole (a temporary file renamed over it): a reader, or a kill, never
    meets half a table."""

    def write(markdown: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(markdown + "\n")
        os.replace(temporary, path)

    return write


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
