"""The ``fastload`` command line.

Each feature module contributes its own subcommands through ``add_commands(subparsers)``; every
subcommand sets ``func(args) -> int`` as its handler. Bad input ends in a one-line error and exit
status 2, never a traceback (``-v`` adds the traceback for a bug report).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from .errors import FastloadError

_COMMAND_MODULES = (
    "fastload_core.loader.commands",
    "fastload_core.storage.commands",
    "fastload_core.serve.commands",
    "fastload_core.compile_cache.commands",
    "fastload_core.bench.commands",
    "fastload_core.demo",
)

DESCRIPTION = (
    "Fast cold starts for PyTorch models: tiered model storage (S3, shared mount, local disk, /dev/shm), "
    "a safetensors loader, and a torch.compile artifact cache."
)
EPILOG = (
    "Exit status: 0 done; 1 a check failed or there was nothing to do (doctor found a problem, cache rm "
    "matched nothing or kept an entry in use, the demo's outputs differed); 2 an error, printed as one "
    "line starting 'fastload: error:'. Run 'fastload COMMAND --help' for a command's options."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastload", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log fastload at debug level and other libraries at info; show tracebacks")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(subparsers)
    return parser


def configure_logging(verbose: bool) -> None:
    """fastload's own messages at INFO (progress, what a load cost); other libraries at WARNING, so
    botocore's "Found credentials in environment variables" and the like stay out of the output."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("fastload").setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.func(args))
    except FastloadError as exc:
        return _fail(str(exc), args.verbose)
    except OSError as exc:  # the filesystem said no: a missing parent, a full disk, a permission
        return _fail(_describe_os_error(exc), args.verbose)
    except KeyboardInterrupt:
        print("fastload: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unexpected library error: still one line, the traceback on -v
        hint = "" if args.verbose else " (run with -v for the traceback)"
        return _fail(f"unexpected {type(exc).__name__}: {_first_line(exc)}{hint}", args.verbose)


def _fail(message: str, verbose: bool) -> int:
    if verbose:
        traceback.print_exc()
    print(f"fastload: error: {message}", file=sys.stderr)
    return 2


def _describe_os_error(exc: OSError) -> str:
    where = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name is not None)
    reason = exc.strerror or _first_line(exc)
    if isinstance(exc, FileExistsError) and exc.filename is not None and not os.path.isdir(exc.filename):
        reason = "exists and is not a directory"  # makedirs on a file says only "File exists"
    return f"{where}: {reason}" if where else reason


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
