"""Progress: a bar on a terminal, periodic log lines otherwise (servers log, they have no terminal); and
``Watermark``, how far the contiguous landed prefix of one file reaches while its ranges land in any order."""

from __future__ import annotations

import logging
import mmap
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

log = logging.getLogger("fastload.storage")

RangeListener = Callable[[str, int, int], None]


class Progress:
    """Thread-safe byte counter shared by a fetch's workers. ``listeners`` hear each completed byte range
    ``(file name, start, end)``: the streaming loader uses them to load tensors as their bytes land.
    ``mirrors`` (file name -> ``Mirror``) are private copies an origin may fill as it downloads."""

    def __init__(self, label: str, total: int, *, enabled: bool = True, interval: float = 5.0) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.listeners: list[RangeListener] = []
        self.mirrors: dict[str, Mirror] = {}
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._last_log = self._started
        self._interval = interval
        self._enabled = enabled
        self._bar: Any = None
        if enabled and total and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                             leave=False)

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            if self._bar is not None:
                self._bar.update(nbytes)
            elif self._enabled:
                now = time.monotonic()
                if now - self._last_log >= self._interval:
                    self._last_log = now
                    rate = self.done / max(now - self._started, 1e-9) / 2**20
                    log.info("%s: %.0f%% (%d/%d bytes, %.1f MiB/s)", self.label,
                             100 * self.done / max(self.total, 1), self.done, self.total, rate)

    def range_done(self, name: str, start: int, end: int) -> None:
        for listener in self.listeners:
            listener(name, start, end)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class DeferredRange(NamedTuple):
    """A range received into a ``Mirror`` and not yet written to the file, with its journal record."""

    start: int
    end: int
    digest: str | None
    blocks: tuple[int, str]


class Mirror:
    """Private memory the size of one file, which an origin may receive the file's bytes into before it
    writes them to the file, and which ranges it has filled.

    Why: the streaming load gives the caller private copies of the tensors (``copy=True``). Copying them out
    of the landed file costs one more pass over every byte, in one thread, and on a small machine that pass
    trailed the download by up to a second (docs/benchmarks.md, "S3 speed"). Received straight from the
    socket into this memory, the bytes need no copy at all: the file is written from it, and the tensors are
    views of it. An origin that does not fill it (another tier, a peer, a range resumed from the journal)
    leaves gaps, which the reader copies from the file as before (``gaps``). Anonymous, 4 KiB pages, faulted
    in by the receiving threads (see ``loader.cpu.allocate_private`` for why not huge pages here).

    The origin need not write the file during the download at all: a range it received here and hashed it
    ``defer``s, with what the journal would have recorded for it, and the store writes the file from the
    mirror once the whole download verified (``TieredStore._write``), after the reader was told it may hand
    the tensors out. That takes the page-cache copy (tmpfs: about 0.35 s of system time per GiB on the 2-core
    VM, as much as the mirror's own first touch) off the critical path of a streamed load. A deferred range
    is journalled only once it is in the file, so a crash never leaves a journal naming bytes the file lacks.
    """

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"a mirror needs a positive size, got {size}")
        self.memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self.memory)
        self._filled: dict[int, int] = {}
        self._deferred: list[DeferredRange] = []
        self._lock = threading.Lock()

    def defer(self, start: int, end: int, digest: str | None, blocks: tuple[int, str]) -> None:
        """Bytes ``[start, end)`` are in the mirror but not in the file: whoever publishes the file writes them
        from here and journals them (``digest``, ``blocks``: what the journal records for the range)."""
        with self._lock:
            self._deferred.append(DeferredRange(start, end, digest, blocks))

    def take_deferred(self) -> list[DeferredRange]:
        """The deferred ranges not yet taken, in file order; each is handed out once."""
        with self._lock:
            taken, self._deferred = self._deferred, []
        return sorted(taken, key=lambda r: r.start)

    def filled(self, start: int, end: int) -> None:
        """Bytes ``[start, end)`` are in the mirror (called once the whole range is, before it is reported
        landed, so a reader that sees it landed also sees it filled)."""
        with self._lock:
            self._filled[start] = end

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` not filled, in order."""
        with self._lock:
            filled = sorted((s, e) for s, e in self._filled.items() if s < end and e > start)
        missing, position = [], start
        for s, e in filled:
            if s > position:
                missing.append((position, s))
            position = max(position, e)
        if position < end:
            missing.append((position, end))
        return missing


class Watermark:
    """The contiguous prefix of one file that has landed, as byte ranges complete in any order.

    Parallel ranged writes finish out of order; a reader (the S3 origin's sequential hasher, the
    streaming loader) may only use bytes below ``position``. One type for both, so the bookkeeping
    lives in one place.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.position = 0
        self._pending: dict[int, int] = {}

    def complete(self, start: int, end: int) -> None:
        """Range ``[start, end)`` has landed; advance ``position`` over every range now contiguous."""
        with self.cond:
            self._pending[start] = end
            while self.position in self._pending:
                self.position = self._pending.pop(self.position)
            self.cond.notify_all()

    def wait_until(self, target: int, stop: Callable[[], bool], poll: float) -> int:
        """Block until ``position >= target`` or ``stop()`` is true (checked at least every ``poll``
        seconds, and at once after ``wake``); return ``position``."""
        with self.cond:
            while self.position < target and not stop():
                self.cond.wait(poll)
            return self.position

    def wake(self) -> None:
        """Make waiters check their ``stop`` now (the fetch failed or finished)."""
        with self.cond:
            self.cond.notify_all()
