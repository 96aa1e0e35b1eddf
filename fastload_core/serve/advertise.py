"""Keeps this node's claims in the peer registry in step with its tiers.

Every third of the TTL (and at once when poked: a miss was published, an entry evicted here) it lists the
entries of the node's own tiers, renews the claim on each and withdraws the claims on entries that are
gone, whichever process evicted them. The shared tier is left out: every node reads it already. On stop
it withdraws everything, so peers stop asking a node that is going away.
"""

from __future__ import annotations

import logging
import threading

from ..hookspecs import hookimpl
from ..storage.peers import PeerRegistry
from ..storage.store import TieredStore

log = logging.getLogger("fastload.serve")


class Advertiser:
    def __init__(self, store: TieredStore, registry: PeerRegistry, address: str) -> None:
        self.store = store
        self.registry = registry
        self.address = address
        self._claimed: set[tuple[str, str]] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fastload-advertise", daemon=True)

    def held(self) -> set[tuple[str, str]]:
        return {(entry.slug, entry.version) for tier in self.store.tiers if not tier.shared
                for entry in tier.entries()}

    def sync(self) -> None:
        current = self.held()
        gone = self._claimed - current
        if gone:
            self.registry.withdraw(self.address, gone)
        if current:
            self.registry.advertise(self.address, current)
        self._claimed = current

    def poke(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as exc:  # a tier that cannot be listed now: try again next round
                log.warning("could not advertise this node's entries: %s: %s", type(exc).__name__, exc)
            self._wake.wait(self.registry.ttl / 3)
            self._wake.clear()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        if self._claimed:
            self.registry.withdraw(self.address, self._claimed)
        self._claimed = set()

    # A plugin of the serving process: its own evictions are withdrawn at once.
    @hookimpl
    def on_evict(self, tier: str, key: str, nbytes: int) -> None:
        self.poke()
