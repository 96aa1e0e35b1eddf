"""The ``fastload`` command line.

Each feature module contributes its own subcommands through ``add_commands(subparsers)``; every
subcommand sets ``func(args) -> int`` as its handler. Bad input ends in a one-line error and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from .errors import FastloadError

_COMMAND_MODULES = (
    "fastload_core.loader.commands",
    "fastload_core.storage.commands",
    "fastload_core.compile_cache.commands",
    "fastload_core.bench.commands",
    "fastload_core.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastload", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args))
    except FastloadError as exc:
        print(f"fastload: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
