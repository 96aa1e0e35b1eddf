"""Start writing a download's bytes to a durable tier's disk while the download is still running.

A durable tier publishes an entry only after fsyncing its files (base.py, ``Tier.publish``). Left alone, the
kernel writes a freshly downloaded GiB back lazily, and most of it is still dirty when the download ends:
the fsync then writes it all on the critical path (0.3-0.6 s per GiB measured here, after a 2-4 s download).
Asking for write-out of each range as it completes (``sync_file_range(SYNC_FILE_RANGE_WRITE)``: start
writeback, do not wait for it, keep the pages cached for the load that follows) overlaps the disk with the
network, and leaves the fsync little to do. Linux only; elsewhere, and on any error, it does nothing (the
fsync still makes the entry durable: this only moves work earlier).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._safefs import UnsafePath, open_file

log = logging.getLogger("fastload.storage.writeback")

_SYNC_FILE_RANGE_WRITE = 2


def _load() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function: Any = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load()


class EarlyWriteback:
    """A progress listener (``Progress.listeners``) that starts write-out of each completed range of the files
    under ``files_dir``."""

    def __init__(self, files_dir: Path) -> None:
        self.files_dir = files_dir

    @staticmethod
    def available() -> bool:
        return _sync_file_range is not None

    def __call__(self, name: str, start: int, end: int) -> None:
        if _sync_file_range is None or end <= start:
            return
        try:
            fd = open_file(self.files_dir / name, os.O_RDONLY)
        except (OSError, UnsafePath):
            return
        try:
            if _sync_file_range(fd, start, end - start, _SYNC_FILE_RANGE_WRITE) != 0:
                log.debug("sync_file_range(%s, %d, %d): %s", name, start, end, os.strerror(ctypes.get_errno()))
        finally:
            os.close(fd)
