"""The ``local_disk`` tier: a directory under the fastload cache dir on the node's own disk. The default
landing tier: survives restarts, costs no RAM, and is what ``fetch`` fills when no tier is named."""

from __future__ import annotations

from typing import ClassVar

from .base import Tier


class LocalDiskTier(Tier):
    name: ClassVar[str] = "local_disk"
