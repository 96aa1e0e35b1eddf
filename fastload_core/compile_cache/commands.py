"""``fastload doctor``: can this node use its compile caches, and can it compile at all?

Run it on a new node before traffic arrives: a wrong Redis address or a missing C++ compiler shows up
here as one line, instead of as slow cold starts that nobody connects to the cause.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
from collections.abc import Callable

from .._compat import COMPILE_CACHE_MINIMUM, torch_version
from ..storage.uri import redact
from .cache import URL_VARIABLE, default_url
from .keys import triton_version
from .manage import STALE_AFTER_S, check_backend, collect_garbage


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    doctor = subparsers.add_parser(
        "doctor",
        help="check the compile-cache backends and the compiler toolchain",
        description=f"Checks each --cache URL (default: ${URL_VARIABLE}, else the local directory cache) "
        "with a probe write, read and delete, and that torch.compile can build kernels here.",
    )
    doctor.add_argument("--cache", action="append", metavar="URL", help="a compile-cache URL; repeatable")
    doctor.add_argument("--serve", action="append", metavar="URL",
                        help="a `fastload serve` endpoint to check (default: $FASTLOAD_SERVE_URL, if set); repeatable")
    doctor.set_defaults(func=run_doctor)


def run_doctor(args: argparse.Namespace) -> int:
    urls = args.cache or [default_url()]
    checks: list[tuple[str, Callable[[], tuple[bool, str]]]] = [
        (f"compile cache {redact(url)}", functools.partial(check_backend, url)) for url in urls
    ]
    checks.append(("toolchain", _check_toolchain))
    from ..serve.doctor import URL_VARIABLE, check_endpoint

    serve_urls = args.serve or ([os.environ[URL_VARIABLE]] if os.environ.get(URL_VARIABLE) else [])
    checks += [(f"serve endpoint {url}", functools.partial(check_endpoint, url)) for url in serve_urls]
    failed = 0
    for name, check in checks:
        ok, message = check()
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {message}")
    return 1 if failed else 0


def _check_toolchain() -> tuple[bool, str]:
    """Inductor builds CPU kernels with a C++ compiler and GPU kernels with Triton."""
    import torch

    parts = [f"torch {torch.__version__}"]
    if torch_version() < COMPILE_CACHE_MINIMUM:
        need = ".".join(map(str, COMPILE_CACHE_MINIMUM))
        return False, f"{parts[0]}: the compile cache needs torch >= {need} (torch.compiler.save_cache_artifacts)"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        compiler = get_cpp_compiler()
    except Exception as exc:
        return False, f"{parts[0]}; no C++ compiler for inductor's CPU kernels ({exc})"
    parts.append(f"C++ compiler {shutil.which(compiler) or compiler}")
    if torch.cuda.is_available():
        triton = triton_version()
        if triton == "absent":
            return False, "; ".join([*parts, "CUDA is present but triton is not installed"])
        parts.append(f"{triton}, {torch.cuda.get_device_name()}")
    return True, "; ".join(parts)


def add_gc_arguments(gc: argparse.ArgumentParser) -> None:
    """``fastload cache gc``'s compile-cache options (the command itself belongs to the storage CLI)."""
    gc.add_argument("--compile-cache", metavar="URL",
                    help="compile cache whose stale temp files to remove (default: FASTLOAD_COMPILE_CACHE)")


def run_gc(args: argparse.Namespace) -> str:
    """The compile-cache part of ``fastload cache gc``: one line saying what was removed."""
    return collect_garbage(getattr(args, "compile_cache", None), older_than=STALE_AFTER_S).describe()
