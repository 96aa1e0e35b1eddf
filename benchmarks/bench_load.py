"""``python benchmarks/bench_load.py ARGS`` is ``fastload bench ARGS``: runs from a checkout without installing."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastload_core.bench.commands import add_arguments, run  # after the path fix above


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_load.py", description="The fastload load benchmark.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
