"""The ``shm`` tier: /dev/shm, memory-backed. Fastest to load from and shared by every process on the
node through the page cache, but it is RAM: a small default budget, and entries vanish on reboot (so
publication skips the fsyncs that make the disk tiers durable)."""

from __future__ import annotations

from typing import ClassVar

from .base import Tier


class ShmTier(Tier):
    name: ClassVar[str] = "shm"
    durable: ClassVar[bool] = False
