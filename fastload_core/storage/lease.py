"""A cross-node lease on Redis, so nodes sharing a ``shared_fs`` tier do not download the same model at
once. Built on redis-py's ``Lock`` (SET NX PX with a token, compare-and-delete on release); a background
thread renews it while the download runs, and it expires on its own if the holder dies. Without Redis,
nodes may download twice; atomic publication keeps every reader correct either way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import FetchTimeoutError

log = logging.getLogger("fastload.storage")


class RedisLease:
    def __init__(self, url: str, *, ttl: float = 60.0, prefix: str = "fastload:lease:") -> None:
        import redis

        self.url = url
        self.ttl = ttl
        self.prefix = prefix
        self._client: Any = redis.Redis.from_url(url)

    def close(self) -> None:
        self._client.close()

    @contextmanager
    def hold(self, key: str, *, timeout: float, ready: Callable[[], bool], uri: str, tier: str,
             poll: float = 0.25) -> Iterator[bool]:
        """Yield True while holding the lease for ``key``; yield False as soon as ``ready()`` says another
        node has published the entry. Raise ``FetchTimeoutError`` after ``timeout`` seconds of neither."""
        lock = self._client.lock(self.prefix + key, timeout=self.ttl, blocking=False, thread_local=False)
        started = time.monotonic()
        while not lock.acquire(blocking=False):
            if ready():
                yield False
                return
            if time.monotonic() - started > timeout:
                raise FetchTimeoutError(uri, tier, time.monotonic() - started, "another node (Redis lease)")
            time.sleep(poll)
        if ready():  # the other node finished and let go between two polls
            lock.release()
            yield False
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
            try:
                lock.release()
            except Exception as exc:
                log.debug("Redis lease on %s was already gone at release: %r", key, exc)
