"""``fastload cache ls|rm|gc``, ``fastload fetch URI [--tier T]`` and ``fastload warm URI... [--tier T]``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import FastloadError
from . import writethrough
from .settings import TIER_ORDER
from .store import default_store
from .uri import redact

_T = TypeVar("_T")


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fetch = subparsers.add_parser("fetch", help="fetch a model into the cache; print its path")
    fetch.add_argument("uri", help="s3://bucket/key, s3://bucket/prefix/, file:///mnt/models/m1 or a path")
    fetch.add_argument("--tier", choices=TIER_ORDER, help="tier to place it in (default: FASTLOAD_TIER)")
    fetch.add_argument("--revision", help="an S3 VersionId, or a cached version shown by `cache ls`")
    fetch.set_defaults(func=_fetch)

    warm = subparsers.add_parser("warm", help="prefetch models ahead of a deployment")
    warm.add_argument("uris", nargs="+", metavar="URI", help="models to fetch, as for `fastload fetch`")
    warm.add_argument("--tier", choices=TIER_ORDER, help="tier to place them in (default: FASTLOAD_TIER)")
    warm.set_defaults(func=_warm)

    cache = subparsers.add_parser("cache", help="inspect and clean the tiered cache")
    actions = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="list cached models per tier, and compile-cache entries")
    ls.add_argument("--tier", choices=TIER_ORDER, help="list only this tier (and not the compile cache)")
    ls.add_argument("--compile-cache", metavar="URL", help="compile cache to list (default: FASTLOAD_COMPILE_CACHE)")
    ls.set_defaults(func=_ls)
    rm = actions.add_parser(
        "rm", help="remove a model (every version) or one slug/version key",
        description="Exit status 0 when something was removed; 1 when nothing matched, or when an entry "
        "was kept because a running process uses it.",
    )
    rm.add_argument("target", help="a model URI, a key as `cache ls` prints it (slug or slug/version), "
                                   "or with --compile a compile-cache key")
    rm.add_argument("--tier", choices=TIER_ORDER, help="remove only from this tier (default: every tier)")
    rm.add_argument("--compile", action="store_true", help="TARGET is a compile-cache key")
    rm.add_argument("--compile-cache", metavar="URL", help="compile cache to remove from")
    rm.set_defaults(func=_rm)
    gc = actions.add_parser("gc", help="drop dead partial downloads and evict down to each tier's budget")
    gc.add_argument("--tier", choices=TIER_ORDER, help="clean only this tier (default: every tier)")
    from ..compile_cache.commands import add_gc_arguments

    add_gc_arguments(gc)
    gc.set_defaults(func=_gc)


def _fetch(args: argparse.Namespace) -> int:
    """Print the path (stdout) as soon as the asked tier has it; then wait for the write-through into the
    slower tiers and report both times on stderr, so ``path=$(fastload fetch ...)`` keeps working."""
    started = time.monotonic()
    print(default_store().fetch(args.uri, tier=args.tier, revision=args.revision), flush=True)
    published = time.monotonic() - started
    report = f"published at {published:.2f}s"
    for job in writethrough.wait():
        done = (job.finished or time.monotonic()) - started
        report += f"; write-through to {', '.join(job.published) or 'no tier'} done at {done:.2f}s"
        for tier, error in job.errors.items():
            report += f" ({tier} failed: {error})"
    print(report, file=sys.stderr)
    return 0


def _warm(args: argparse.Namespace) -> int:
    started = time.monotonic()
    paths = default_store().prefetch(args.uris, tier=args.tier)
    assert isinstance(paths, list)
    for uri, path in zip(args.uris, paths, strict=True):
        print(f"{uri}\t{path}")
    print(f"warmed {len(paths)} model(s) in {time.monotonic() - started:.1f}s")
    return 0


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def _ls(args: argparse.Namespace) -> int:
    store = default_store()
    tiers = [t for t in store.tiers if args.tier in (None, t.name)]
    for tier in tiers:
        capacity = tier.capacity()
        budget = _size(capacity) if capacity is not None else "unlimited"
        print(f"{tier.name}  {tier.root}  used {_size(tier.usage())} of {budget}")
        infos = store.ls(tier=tier.name)
        for info in sorted(infos, key=lambda i: -i.entry.last_used):
            entry = info.entry
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
            flag = "  in use" if info.in_use else ""
            print(f"  {entry.slug}/{entry.version}  {_size(entry.size):>10}  {used}  {entry.meta.uri}{flag}")
    if args.tier is None:
        _ls_compile(args.compile_cache)
    return 0


def _ls_compile(url: str | None) -> None:
    from ..compile_cache import default_url, list_entries

    url = url or default_url()
    entries = _compile_cache_call(url, "list", list_entries, url)
    print(f"compile cache  {redact(url)}  {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
          f"{_size(sum(e.size for e in entries))}")
    for compiled in sorted(entries, key=lambda e: -(e.stored_at or 0)):
        stored = time.strftime("%Y-%m-%d %H:%M", time.localtime(compiled.stored_at)) if compiled.stored_at else "?"
        print(f"  {compiled.key}  {_size(compiled.size):>10}  {stored}  {compiled.describe()}")


def _rm(args: argparse.Namespace) -> int:
    if args.compile:
        from ..compile_cache import default_url, remove_entry

        url = args.compile_cache or default_url()
        found = _compile_cache_call(url, "remove from", remove_entry, url, args.target)
        print(f"removed compile entry {args.target}" if found else f"no compile entry {args.target}")
        return 0 if found else 1
    removed, busy = default_store().rm(args.target, tier=args.tier)
    for entry in removed:
        print(f"removed {entry.tier}:{entry.slug}/{entry.version} ({_size(entry.size)})")
    for entry in busy:
        print(f"kept {entry.tier}:{entry.slug}/{entry.version}: in use by a running process")
    if not removed and not busy:
        print(f"nothing cached matches {args.target}")
    return 0 if removed and not busy else 1


def _compile_cache_call(url: str, action: str, function: Callable[..., _T], *args: Any) -> _T:
    """A compile-cache backend that is down raises its client's own errors (redis, botocore); on the
    command line that is one line naming the cache, not the client's traceback."""
    from ..compile_cache import CompileCacheError

    try:
        return function(*args)
    except FastloadError:
        raise
    except Exception as exc:
        raise CompileCacheError(f"cannot {action} the compile cache {redact(url)}: {type(exc).__name__}: "
                                f"{_first_line(exc)}; `fastload doctor --cache URL` checks it") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].rstrip(".") if lines else "no message"


def _gc(args: argparse.Namespace) -> int:
    counts = default_store().gc(tier=args.tier)
    if args.tier is None:  # conversions killed mid-write left their staging directories in the cache
        from .._staging import sweep
        from ..config import cache_dir

        counts["temps"] = sweep(cache_dir() / "converted")
    print(", ".join(f"{kind}: {count}" for kind, count in counts.items()))
    from ..compile_cache.commands import run_gc

    print(run_gc(args))
    return 0
