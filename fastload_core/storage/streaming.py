"""Watching a fetch from the origin while it lands: the byte side of the streaming load.

The fetch runs as usual (parallel ranged GETs into the cache tier, verified, published). A ``RangeWatch``
hears where the download writes and which byte ranges have landed, keeps each file's contiguous landed
prefix (a ``Watermark``) and an open descriptor on each partial file, so a reader can use the bytes below
the watermark while the rest is still arriving. Storage knows bytes only: turning them into tensors is
``fastload_core.loader.streaming``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

from .eviction import Pin
from .meta import Manifest
from .progress import Mirror, Watermark
from .store import TieredStore, default_store


class RangeWatch:
    """A ``FetchWatch`` that keeps the watched files' descriptors and each one's landed prefix, and with
    ``mirror=True`` a ``Mirror`` of each watched file: private memory the origin receives the bytes into
    (where it can: the S3 origin does) before writing them to the file, so a reader that wants a private
    copy of them has it without copying."""

    def __init__(self, wanted: Callable[[str], bool] = lambda name: True, *, mirror: bool = False) -> None:
        self.wanted = wanted
        self.mirror = mirror
        self.mirrors: dict[str, Mirror] = {}
        self.started_event = threading.Event()
        self.manifest: Manifest | None = None
        self.fds: dict[str, int] = {}
        self.marks: dict[str, Watermark] = {}
        self.sizes: dict[str, int] = {}
        self.failed: BaseException | None = None
        self.finished = False
        self.tier: str | None = None
        self.stats: dict[str, float] | None = None
        # Set when the download into the mirrors verified (``verified``) or the fetch ended (``finish``):
        # the reader may hand its tensors out after the first, and must raise what failed after the second.
        self.settled = threading.Event()
        self.is_verified = False
        self.closed = False
        # Counts the fills this watch followed after the first (``snapshot``); ``_switch`` makes a fill's start
        # (descriptors, marks) one step for the reader, and keeps ``close`` from freeing a number it replaces.
        self._generation = 0
        self._switch = threading.Lock()

    def snapshot(self) -> int:
        """What a reader takes before a step (``wait_for``, then reading): if this differs after the step, a
        fill restarted in the next tier meanwhile, and what the step read may be that file's unlanded bytes."""
        with self._switch:
            return self._generation

    def started(self, tier: str, files_dir: Path, manifest: Manifest) -> None:
        with self._switch:
            self._start(tier, files_dir, manifest)
        self.started_event.set()

    def _start(self, tier: str, files_dir: Path, manifest: Manifest) -> None:
        self.tier = tier
        if self.closed or self.is_verified:
            # A later fill of this fetch (the next tier down, after the first one filled up) that no reader
            # follows any more: the reader gave up, or it handed its tensors out already (the store does not
            # fall through after that; a defence). It must not receive into the tensors' memory, nor open
            # descriptors no one will close.
            self.mirrors = {}
            self.manifest = manifest
            return
        # Opened now, before the download: the partial directory is renamed when it is published, and
        # an open descriptor follows the file wherever it goes.
        replaced = list(self.marks.values())
        if self.manifest is not None:
            self._generation += 1
        for item in manifest.files:
            if self.wanted(item.name):
                fd = os.open(files_dir.joinpath(*item.name.split("/")), os.O_RDONLY)
                if item.name in self.fds:
                    # A fill before this one gave up (its tier filled up) and this tier starts over: the reader
                    # took the descriptor once, so its number now names this tier's file, not the discarded one
                    os.dup2(fd, self.fds[item.name])
                    os.close(fd)
                else:
                    self.fds[item.name] = fd
                self.marks[item.name] = Watermark()  # this file's landed prefix, from its first byte again
                self.sizes[item.name] = item.size
                if self.mirror and item.size > 0:
                    # the same memory on a restart: the reader's tensors are views of it
                    self.mirrors.setdefault(item.name, Mirror(item.size))
        for mark in replaced:  # a reader waiting on a discarded file's prefix moves to the new one (wait_for)
            mark.wake()
        self.manifest = manifest

    def range_done(self, name: str, start: int, end: int) -> None:
        mark = self.marks.get(name)
        if mark is not None:
            mark.complete(start, end)

    def verified(self) -> None:
        """The store's call: the download into the mirrors verified (the files are written from them next)."""
        if self.stats is not None:
            self.stats["verified"] = time.monotonic()
        self.is_verified = True
        self.settled.set()

    def finish(self, future: Future[Pin]) -> None:
        self.failed = future.exception()
        self.finished = True
        for mark in self.marks.values():
            mark.wake()
        self.started_event.set()
        self.settled.set()

    def wait_for(self, name: str, position: int) -> int:
        """Block until the first ``position`` bytes of ``name`` have landed; return how many have (at least
        ``position``: a reader takes everything that is there, not only what it asked for). Raise what
        failed the fetch."""
        while True:  # again when a restarted fill replaces the mark: the file it described was discarded
            mark = self.marks[name]
            reached = mark.wait_until(position, partial(self._stop_waiting, name, mark), 0.5)
            if self.marks[name] is mark:
                break
        if reached >= position:
            return reached
        if self.failed is not None:
            raise self.failed
        # The fetch finished: every byte is there (the ranges of a resumed download are not reported again).
        return max(position, self.sizes[name])

    def _stop_waiting(self, name: str, mark: Watermark) -> bool:
        return self.failed is not None or self.finished or self.marks[name] is not mark

    def close(self) -> None:
        """The reader is done: its descriptors close, and the watch lets go of the mirrors (the tensors, and
        the store while it writes the files from them, hold their own references), so nothing that keeps the
        watch (the fetch future's callbacks) keeps model-sized memory alive."""
        with self._switch:
            self.closed = True
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()
            self.mirrors = {}


class PendingPin(Pin):
    """The pin of a streamed load's cache entry when the tensors were handed out before it was published.

    Why: the tensors are handed out once the download verified; the fetch's thread then writes the RAM
    tier's files from the mirrors and publishes the entry (progress.Mirror says why that is off the critical
    path). ``tier`` is known at once; ``path`` (and ``with``) waits for the publication and raises what
    failed it; ``release`` never waits: the entry's own pin is released as soon as it exists."""

    def __init__(self, future: Future[Pin], tier: str | None) -> None:
        self._lock = threading.Lock()
        self._released = False
        self._settled = threading.Event()
        # The outcome, kept instead of the future: the future's done-callbacks reach the fetch's watch, and
        # through it the mirrors (memory the size of the model), which must go with the tensors, not the pin.
        self._pinned: Pin | None = None
        self._error: BaseException | None = None
        super().__init__(Path(), tier=tier)
        future.add_done_callback(self._publication_done)

    @property
    def path(self) -> Path:
        return self.result().path

    @path.setter
    def path(self, value: Path) -> None:  # Pin.__init__ sets it; the published path comes from the future
        pass

    def result(self) -> Pin:
        """The published entry's pin, once it is published (waiting for it); raises what failed it."""
        self._settled.wait()
        if self._error is not None:
            raise self._error
        assert self._pinned is not None
        return self._pinned

    @property
    def held(self) -> bool:
        if self._released:
            return False
        if not self._settled.is_set():
            return True
        return self._pinned is not None and self._pinned.held

    def release(self) -> None:
        with self._lock:
            self._released = True
            pinned = self._pinned
        if pinned is not None:
            pinned.release()

    def _publication_done(self, future: Future[Pin]) -> None:
        try:
            error = future.exception()
            with self._lock:
                if error is not None:
                    self._error = error
                else:
                    pinned = self._pinned = future.result()
                    self.tier, self.key, self.entry = pinned.tier, pinned.key, pinned.entry
                    if self._released:
                        pinned.release()
        finally:
            self._settled.set()

    def __repr__(self) -> str:
        state = "publishing" if not self._settled.is_set() else "held" if self.held else "released"
        return f"PendingPin(tier={self.tier!r}, {state})"


def watch_fetch(uri: str, *, tier: str | None = None, store: TieredStore | None = None,
                wanted: Callable[[str], bool] = lambda name: True, mirror: bool = False,
                stats: dict[str, float] | None = None) -> tuple[RangeWatch, Future[Pin]]:
    """Start pinning ``uri`` in the background, watched. ``watch.started_event`` is set when the download
    begins, or when the fetch ends without one (a hit, or a failure); the future holds the pin, verified
    and published. ``stats``, when given, receives ``fetch_done`` (monotonic time). ``mirror``: keep a
    ``Mirror`` of each wanted file (``RangeWatch``).

    With no ``tier``, a cold download lands in the fastest tier (RAM, when the shm tier is configured) and
    the default tier is written through from it after the pin: the reader copies the bytes out as they
    land, so landing them on disk first (page cache, write-out, fsync) would only put the disk on its
    critical path (1 GiB from SeaweedFS on the 2-core VM: 13.0 s into local_disk, 7.1 s into shm). A hit
    in any tier is read where it is."""
    store = store or default_store()
    watch = RangeWatch(wanted, mirror=mirror)
    watch.stats = stats
    executor = ThreadPoolExecutor(1, thread_name_prefix="fastload-stream-fetch")
    land = store.tiers[0].name if tier is None else None
    future = executor.submit(store.pin, uri, tier=tier, watch=watch, land=land)
    executor.shutdown(wait=False)
    if stats is not None:
        future.add_done_callback(lambda f: stats.__setitem__("fetch_done", time.monotonic()))
    future.add_done_callback(watch.finish)
    return watch, future


__all__ = ["PendingPin", "RangeWatch", "watch_fetch"]
