"""The ``shm`` tier: /dev/shm, memory-backed. Fastest to load from and shared by every process on the
node through the page cache, but it is RAM: a small default budget, and entries vanish on reboot (so
publication skips the fsyncs that make the disk tiers durable)."""

from __future__ import annotations

from typing import ClassVar

from .base import Tier


class ShmTier(Tier):
    name: ClassVar[str] = "shm"
    durable: ClassVar[bool] = False
    # posix_fallocate on tmpfs allocates (and on this VM first-touches) every page in one thread before the
    # download starts: 0.4-0.8 s per GiB measured here, more than the writes into sparse pages save. A full
    # tmpfs then fails a download's write with ENOSPC (the store discards it and falls through, see store.py)
    # instead of failing its preparation.
    preallocate: ClassVar[bool] = False
