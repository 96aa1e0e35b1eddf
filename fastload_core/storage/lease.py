"""A cross-node lease on Redis, so nodes sharing a ``shared_fs`` tier do not download the same model at
once. Built on redis-py's ``Lock`` (SET NX PX with a token, compare-and-delete on release); a background
thread renews it while the download runs, and it expires on its own if the holder dies. Without Redis,
nodes may download twice; atomic publication keeps every reader correct either way.

That is also why a Redis outage never fails a fetch: the lease only saves duplicate downloads, so when the
server refuses connections or does not answer within ``FASTLOAD_REDIS_TIMEOUT`` seconds, fastload warns
once, fetches without the lease, and leaves Redis alone for a while before trying it again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import FastloadError
from .errors import FetchTimeoutError, StorageError
from .uri import redact

log = logging.getLogger("fastload.storage")

_RETRY_AFTER = 30.0  # seconds without trying an unavailable Redis again
_warned: set[str] = set()  # URLs whose outage was reported in this process


class RedisLease:
    def __init__(self, url: str, *, ttl: float = 60.0, prefix: str = "fastload:lease:",
                 timeout: float = 2.0) -> None:
        """``timeout`` bounds every Redis call (connect and reply), so a server that never answers costs
        at most that long before the fetch goes on without the lease."""
        try:
            import redis
        except ImportError:
            raise StorageError("FASTLOAD_REDIS_URL is set but the redis package is not installed; install "
                               "fastload[redis] or unset FASTLOAD_REDIS_URL") from None
        self.url = url
        self.ttl = ttl
        self.prefix = prefix
        self.timeout = timeout
        self._unavailable_until = 0.0
        try:
            self._client: Any = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        except ValueError as exc:
            raise StorageError(f"FASTLOAD_REDIS_URL={redact(url)!r} is not a Redis URL ({exc}); expected "
                               "redis://host:6379/0") from None

    def close(self) -> None:
        self._client.close()

    def taken(self, key: str) -> bool:
        """Whether some node holds the lease for ``key`` now. True as well while Redis cannot say: a caller
        about to remove what that node may be writing had better wait for an answer."""
        if time.monotonic() < self._unavailable_until:
            return True
        try:
            return bool(self._client.exists(self.prefix + key))
        except Exception as exc:  # redis-py's ConnectionError / TimeoutError, socket errors: an outage
            self._outage(exc)
            return True

    def _outage(self, exc: Exception) -> None:
        self._unavailable_until = time.monotonic() + _RETRY_AFTER
        shown = redact(self.url)
        if shown in _warned:
            log.debug("Redis at %s still unavailable: %r", shown, exc)
            return
        _warned.add(shown)
        log.warning("Redis at %s is unavailable (%s: %s); fetching without the cross-node lease (other nodes "
                    "may download the same model once more; nothing else changes)", shown, type(exc).__name__,
                    exc)

    def _acquire(self, lock: Any, key: str, *, timeout: float, ready: Callable[[], bool], uri: str, tier: str,
                 poll: float) -> str:
        """``"held"``, ``"ready"`` (another node published meanwhile) or ``"unavailable"`` (Redis is down)."""
        if time.monotonic() < self._unavailable_until:
            return "unavailable"
        started = time.monotonic()
        try:
            while not lock.acquire(blocking=False):
                if ready():
                    return "ready"
                if time.monotonic() - started > timeout:
                    raise FetchTimeoutError(uri, tier, time.monotonic() - started, "another node (Redis lease)")
                time.sleep(poll)
        except FastloadError:
            raise
        except Exception as exc:  # redis-py's ConnectionError / TimeoutError, socket errors: an outage
            self._outage(exc)
            return "unavailable"
        if ready():  # the other node finished and let go between two polls
            self._release(lock, key)
            return "ready"
        return "held"

    @staticmethod
    def _release(lock: Any, key: str) -> None:
        try:
            lock.release()
        except Exception as exc:
            log.debug("Redis lease on %s was already gone at release: %r", key, exc)

    @contextmanager
    def hold(self, key: str, *, timeout: float, ready: Callable[[], bool], uri: str, tier: str,
             poll: float = 0.25) -> Iterator[bool]:
        """Yield True while holding the lease for ``key`` (or when Redis is unavailable: go ahead without
        it); yield False as soon as ``ready()`` says another node has published the entry. Raise
        ``FetchTimeoutError`` after ``timeout`` seconds of neither."""
        lock = self._client.lock(self.prefix + key, timeout=self.ttl, blocking=False, thread_local=False)
        state = self._acquire(lock, key, timeout=timeout, ready=ready, uri=uri, tier=tier, poll=poll)
        if state != "held":
            yield state == "unavailable"
            return
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.ttl / 3):
                try:
                    lock.reacquire()
                except Exception as exc:  # the lease lapsed: another node may start; rename keeps us safe
                    log.warning("could not renew the Redis lease on %s: %r", key, exc)
                    return

        renewer = threading.Thread(target=renew, name="fastload-lease", daemon=True)
        renewer.start()
        try:
            yield True
        finally:
            stop.set()
            renewer.join()
            self._release(lock, key)
