"""What the page cache holds: ``mincore`` through libc, shared by the loader and the benchmark.

Python's ``mmap`` exposes no address for a read-only mapping, so residency is asked on a mapping made
with libc's own ``mmap`` (never touched, so asking does not fault anything in). A sample of evenly
spread windows answers "cached or not" in microseconds; the whole vector (what the benchmark reports)
costs ~50 ms per 2 GiB.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager

PAGE = mmap.PAGESIZE

libc = ctypes.CDLL(None, use_errno=True)
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
libc.mincore.restype = ctypes.c_int
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mmap.restype = ctypes.c_void_p
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.munmap.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_fraction_at(address: int, size: int, windows: int | None = 64, window_pages: int = 64) -> float:
    """The share of the pages of the mapping at ``address`` that are in memory.

    ``windows=None`` asks about every page; otherwise ``windows`` windows of ``window_pages`` pages,
    evenly spread, are sampled. An address that is not page-aligned, or a failing ``mincore``, reads
    as 0 (nothing known to be resident).
    """
    pages = -(-size // PAGE)
    if pages == 0 or address % PAGE:
        return 0.0
    if windows is None:
        windows, window_pages = 1, pages
    window_pages = min(window_pages, pages)
    vector = (ctypes.c_ubyte * window_pages)()
    starts = sorted({index * (pages - window_pages) // max(1, windows - 1) for index in range(windows)})
    resident = 0
    for start in starts:
        length = min(window_pages * PAGE, size - start * PAGE)
        if libc.mincore(address + start * PAGE, length, vector) != 0:
            return 0.0
        resident += sum(byte & 1 for byte in bytes(vector)[: -(-length // PAGE)])
    return resident / (len(starts) * window_pages)


@contextmanager
def mapped(fd: int, size: int) -> Iterator[int]:
    """A read-only shared mapping of ``fd`` that is never touched; yields its address."""
    address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address in (None, _MAP_FAILED):
        raise OSError(ctypes.get_errno(), f"mmap of fd {fd} failed")
    try:
        yield address
    finally:
        libc.munmap(address, size)


def file_resident_fraction(fd: int, *, sample: bool = True) -> float:
    """The share of open file ``fd``'s pages in the page cache (sampled unless ``sample=False``)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0.0
    with mapped(fd, size) as address:
        return resident_fraction_at(address, size, 64 if sample else None)
