"""Page-cache control for the cold scenarios: evict one file, and verify that it is gone.

Before every cold run the file's pages are dropped with ``posix_fadvise(DONTNEED)`` (per file: other
people's caches stay intact) and ``mincore`` checks that they are gone; ``drop_caches`` (root only) is
the fallback. A run whose file stayed cached is not a cold run: the runner skips it and says why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fastload_core.loader.pagecache import file_resident_fraction

MAX_RESIDENT_COLD = 0.01  # a cold run starts with at most this share of the file in the page cache


def resident_fraction(path: Path) -> float:
    """Share of ``path``'s pages in the page cache: ``mincore`` over every page of a mapping that is
    never touched (the loader's libc binding, ``fastload_core.loader.pagecache``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return file_resident_fraction(fd, sample=False)
    finally:
        os.close(fd)


@dataclass
class EvictionLog:
    """How the cold scenario evicted pages, and how well it worked (reported with the results)."""

    method: str = "posix_fadvise(POSIX_FADV_DONTNEED) per file"
    max_resident_after: float = 0.0
    fallbacks: int = 0
    failures: int = 0


def evict(path: Path, log: EvictionLog) -> float:
    """Drop ``path`` from the page cache; returns the fraction still resident afterwards."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    left = resident_fraction(path)
    if left > MAX_RESIDENT_COLD:
        log.fallbacks += 1
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
        except OSError:
            log.failures += 1
        left = resident_fraction(path)
    log.max_resident_after = max(log.max_resident_after, left)
    return left
