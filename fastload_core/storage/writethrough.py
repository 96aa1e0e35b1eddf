"""Write-through: after a fetch has published a model in the tier it asked for, the slower tiers between
that tier and the model's source (local disk, the shared mount) are filled from the published copy on a
thread of their own, so the caller does not wait for disk writes and fsyncs it did not ask for.

Each copy goes through the store's usual prepare → copy and verify → publish path, so a crash in between
leaves each tier complete or absent. A failure is logged and reported through ``on_fetch_finish`` (the
store pairs every start with a finish), never raised into the fetch that already returned. A process does
not exit with a write-through pending: the wait is hooked into threading's own exit hook (the one
``concurrent.futures`` uses) and registered after it, so it runs first, while thread pools still accept
work, and says what it is waiting for. A forked child forgets its parent's jobs (their threads are not
in it); the parent still waits for them.

The copy runs at a lower CPU priority (``NICE``) than the rest of the process: it fills tiers nobody is
waiting for, while the workers or replicas that the fetch unblocked are starting on the same cores
(imports, mapping, the first request). It still gets every idle cycle, and the wait at exit is unchanged.
Except where someone does wait: a copy onto a shared tier is what other nodes wait for (under the
cluster's lease on that entry), so a job that starts with one (``start(..., waited_on=True)``) keeps the
caller's priority until that copy is published and only then calls ``lower_priority``.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  (imported first: our exit hook must run before its own)
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("fastload.storage")

NICE = 19
"""The write-through thread's niceness (Linux, where a thread's niceness is its own); threads it starts
inherit it. The lowest there is, because frameworks already lower their workers' (Ray starts replicas at
15, where a 10 would not be lower at all); the copy still gets every idle cycle."""


@dataclass(eq=False)
class WriteThrough:
    """One model's write-through into ``tiers``; ``published``/``errors`` fill in as each tier is done."""

    uri: str
    tiers: tuple[str, ...]
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    published: list[str] = field(default_factory=list)
    errors: dict[str, BaseException] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)


_lock = threading.Lock()
_pending: set[WriteThrough] = set()
_hooked = False


def start(uri: str, tiers: tuple[str, ...], run: Callable[[WriteThrough], None], *,
          waited_on: bool = False) -> WriteThrough:
    """Run ``run(job)`` on a new thread and return the job. ``run`` records its outcome in the job.

    The thread lowers its priority to ``NICE`` before ``run`` starts, unless ``waited_on``: then the copy
    begins with a part that others are waiting for (a shared tier), at the caller's priority, and ``run``
    calls ``lower_priority()`` once that part is done."""
    job = _register(uri, tiers)
    thread = threading.Thread(target=_run, args=(job, run, waited_on), name="fastload-write-through")
    thread.start()
    return job


def track(uri: str, tiers: tuple[str, ...], future: Future[Any]) -> WriteThrough:
    """Count work already running on a thread of its own as a pending write-through until ``future`` is done:
    ``wait`` and the exit hook wait for it too. A streamed load hands its tensors out once the download
    verified, while its fetch thread still writes the RAM tier's copy from them and publishes it
    (storage.streaming); that copy is a write-through in all but name."""
    job = _register(uri, tiers)

    def done(finished: Future[Any]) -> None:
        try:
            error = finished.exception()
        except BaseException as exc:  # cancelled
            error = exc
        if error is None:
            job.published.extend(tiers)
        else:
            job.errors[tiers[0] if tiers else "*"] = error
        _finish(job)

    future.add_done_callback(done)
    return job


def _run(job: WriteThrough, run: Callable[[WriteThrough], None], waited_on: bool) -> None:
    try:
        if not waited_on:
            lower_priority()
        run(job)
    except BaseException as exc:  # run() records per-tier failures itself; this is a bug, still never fatal
        log.exception("%s: write-through to %s failed", job.uri, ", ".join(job.tiers))
        job.errors.setdefault("*", exc)
    finally:
        _finish(job)


def _register(uri: str, tiers: tuple[str, ...]) -> WriteThrough:
    """A new job, pending (``wait`` and the exit hook wait for it) until ``_finish``."""
    job = WriteThrough(uri, tiers)
    with _lock:
        _pending.add(job)
        _hook_exit()
    return job


def _finish(job: WriteThrough) -> None:
    job.finished = time.monotonic()
    with _lock:
        _pending.discard(job)
    job.done.set()


def lower_priority() -> None:
    """Raise the calling thread's niceness to ``NICE`` (never lower it); threads it starts afterwards
    inherit it. Only on Linux, where ``setpriority(PRIO_PROCESS, tid)`` names one thread; elsewhere it
    would renice the whole process. A write-through's ``run`` calls it when the rest of its copy is one that
    nobody waits for."""
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if current < NICE:
            os.setpriority(os.PRIO_PROCESS, tid, NICE)
    except OSError as exc:  # a sandbox that forbids it: the copy runs at normal priority
        log.debug("write-through keeps its priority: %s", exc)


def pending() -> list[WriteThrough]:
    with _lock:
        return sorted(_pending, key=lambda job: job.started)


def wait(timeout: float | None = None) -> list[WriteThrough]:
    """Wait for every write-through running now, and for those they start (a streamed load's RAM copy starts
    the write-through to the default tier when it is published); return them (those still running after
    ``timeout`` have ``finished`` None)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    waited: list[WriteThrough] = []
    while True:
        jobs = [job for job in pending() if job not in waited]
        if not jobs:
            return waited
        waited.extend(jobs)
        for job in jobs:
            job.wait(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        if deadline is not None and time.monotonic() >= deadline:
            return waited


def _at_exit() -> None:
    jobs = pending()
    if not jobs:
        return
    log.info("waiting for %d write-through(s) to finish before exit: %s", len(jobs),
             "; ".join(f"{job.uri} -> {', '.join(job.tiers)}" for job in jobs))
    wait()


def _forget_in_child() -> None:
    """A forked child has none of its parent's threads: it must not wait for their jobs at exit."""
    global _lock
    _lock = threading.Lock()
    _pending.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _hook_exit() -> None:
    global _hooked
    if _hooked:
        return
    register = getattr(threading, "_register_atexit", None)  # CPython >= 3.9; private but stable
    try:
        if register is None:
            raise RuntimeError("no threading._register_atexit")
        register(_at_exit)
    except RuntimeError:  # already shutting down, or another interpreter: the threads are non-daemon anyway
        atexit.register(_at_exit)
    _hooked = True


__all__ = ["NICE", "WriteThrough", "lower_priority", "pending", "start", "track", "wait"]
