"""Memory a replica must give back: weights it swapped out or evicted, and /dev/shm it shares with Ray.

Two Ray Serve habits make this more than "drop the reference":

- After a replica's ``__init__`` and first ``reconfigure``, Ray runs ``gc.collect(); gc.freeze()``
  (``RAY_SERVE_FREEZE_GC_ON_STARTUP``, on by default), so the collector never looks at anything that existed
  then. A model loaded at start-up that sits in a reference cycle (a forward hook bound to the module, a
  compiled wrapper) would stay in memory forever after a swap. Plain modules are freed by reference
  counting, which freezing does not affect; ``collect_if_unreferenced`` handles the rest.
- Ray's object store lives in /dev/shm too (30% of RAM by default) and fills it lazily, so /dev/shm's free
  space overstates what fastload's shm tier may take. ``reserve_object_store`` lowers the tier's budget so
  the two never compete for the same bytes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import weakref
from pathlib import Path
from typing import Any

from fastload_core.storage.settings import StorageSettings, parse_size
from fastload_core.storage.shm import ShmTier

log = logging.getLogger("fastload.ray")

CAPACITY_VARIABLE = "FASTLOAD_SHM_CAPACITY"


def collect_if_unreferenced(ref: weakref.ref[Any], what: str) -> bool:
    """Free the object behind ``ref`` now if only garbage keeps it alive, after its owner dropped every
    strong reference it held. Returns whether it is gone.

    A plain collection first (cheap: it skips what Ray froze); if the object survives and the collector is
    frozen, thaw it for one full collection and freeze what is still alive again, as Ray did at start-up.
    An object still alive after that is in use (a request that is still running holds it) and goes when
    that reference does.

    It runs on the caller's thread, the replica's event loop included: the full collection holds the GIL
    from start to end (about 0.1-0.2 s with torch and Ray loaded), so a thread or an executor would stall
    the loop just as long and only add a hand-off; once per swap or eviction is the price.
    """
    if ref() is None:
        return True
    gc.collect()
    if ref() is not None and gc.get_freeze_count() > 0:
        gc.unfreeze()
        try:
            gc.collect()
        finally:
            gc.freeze()
    gone = ref() is None
    if not gone:
        log.info("fastload: %s is still referenced (a request still using it?); it is freed when that ends", what)
    return gone


class EvictionRelease:
    """What ``load_model_async`` sets as a multiplexed model's ``__del__``: Ray's multiplexer awaits
    ``model.__del__()`` when it evicts a model and then drops it.

    At that moment the multiplexer still holds the model, so this only schedules the collection for the
    event loop's next turn, when that reference is gone. Calling it again does nothing (Ray replaces the
    attribute after the call, and the garbage collector never calls an instance attribute, but be safe).
    """

    def __init__(self, module: Any | None, what: str = "an evicted model") -> None:
        self._ref: weakref.ref[Any] | None = weakref.ref(module) if module is not None else None
        self._what = what
        self.released = False

    async def release(self) -> None:
        if self.released or self._ref is None:
            return
        self.released = True
        ref, what = self._ref, self._what
        asyncio.get_running_loop().call_soon(collect_if_unreferenced, ref, what)

    def __reduce__(self) -> tuple[type[EvictionRelease], tuple[None]]:
        # torch.save(model) pickles the instance dict: a copy has nothing of this one's to release.
        return (EvictionRelease, (None,))


def object_store_bytes() -> int | None:
    """This node's Ray object store capacity, or None outside a Ray worker."""
    import ray

    if not ray.is_initialized():
        return None
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            value = node.get("Resources", {}).get("object_store_memory")
            return int(value) if value is not None else None
    return None


def shm_budget(shm_dir: Path, *, reserved: int, configured: int | float | None) -> int:
    """Bytes the shm tier at ``shm_dir`` may hold when ``reserved`` bytes of its filesystem belong to someone
    else who has not necessarily claimed them yet (Ray's object store).

    What is really free for the tier is the filesystem's free space plus what the tier already holds, minus
    the reservation. Ray's store counts in full even where it has filled part of it already (that part is
    missing from the free space too): an underestimate, never an overcommit. ``configured`` (bytes, a
    fraction of the filesystem, or None for unlimited) caps the result.
    """
    probe = shm_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    stats = os.statvfs(probe)
    total = stats.f_blocks * stats.f_frsize
    free = stats.f_bavail * stats.f_frsize
    held = ShmTier(shm_dir).usage()
    available = max(free + held - reserved, 0)
    if configured is None:
        return available
    cap = int(total * configured) if isinstance(configured, float) else configured
    return min(cap, available)


def reserve_object_store() -> int | None:
    """Lower this process's shm-tier budget (``FASTLOAD_SHM_CAPACITY``) so the tier and Ray's object store
    fit /dev/shm together. Only where the tier shares a filesystem with /dev/shm; a budget set by the user
    stays the upper bound. Returns the budget, or None when nothing was changed."""
    settings = StorageSettings.from_env()
    if settings.shm_dir is None or not os.path.isdir("/dev/shm"):
        return None
    reserved = object_store_bytes()
    if reserved is None or not _same_filesystem(settings.shm_dir, Path("/dev/shm")):
        return None
    configured = parse_size(os.environ.get(CAPACITY_VARIABLE, "50%"), variable=CAPACITY_VARIABLE)
    budget = shm_budget(settings.shm_dir, reserved=reserved, configured=configured)
    os.environ[CAPACITY_VARIABLE] = str(budget)
    log.info("fastload: shm tier budget %.1f MiB (/dev/shm free space, less %.1f MiB for Ray's object store)",
             budget / 2**20, reserved / 2**20)
    return budget


def _same_filesystem(a: Path, b: Path) -> bool:
    while not a.exists() and a != a.parent:
        a = a.parent
    return os.stat(a).st_dev == os.stat(b).st_dev
