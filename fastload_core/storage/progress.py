"""Progress: a bar on a terminal, periodic log lines otherwise (servers log, they have no terminal); and
``Watermark``, how far the contiguous landed prefix of one file reaches while its ranges land in any order."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fastload.storage")

RangeListener = Callable[[str, int, int], None]


class Progress:
    """Thread-safe byte counter shared by a fetch's workers. ``listeners`` hear each completed byte range
    ``(file name, start, end)``: the streaming loader uses them to load tensors as their bytes land."""

    def __init__(self, label: str, total: int, *, enabled: bool = True, interval: float = 5.0) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.listeners: list[RangeListener] = []
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
