"""The ``shared_fs`` tier: a cluster-wide cache on a shared mount (CephFS, NFS), filled once per cluster.

Other nodes see it, so two things differ from the node-local tiers: the per-entry fetch lock lives on
local disk (flock over NFS is not reliable across nodes), and the store takes a Redis lease around
filling it when ``FASTLOAD_REDIS_URL`` is set. Partial directories carry the host name, so two nodes
racing without Redis never write the same file; the second rename simply loses.
"""

from __future__ import annotations

from typing import ClassVar

from .base import Tier


class SharedFsTier(Tier):
    name: ClassVar[str] = "shared_fs"
    shared: ClassVar[bool] = True
