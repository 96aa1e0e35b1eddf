"""Keeps this node's claims in the peer registry in step with its tiers.

Every third of the TTL (and at once when poked: a miss was published, an entry evicted here) it lists the
entries of the node's own tiers, renews the claim on each and withdraws the claims on entries that are
gone, whichever process evicted them. The shared tier is left out: every node reads it already. On stop
it withdraws everything and the store claims nothing more, so peers stop asking a node that is going away.
"""

from __future__ import annotations

import dataclasses
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
        unwithdrawn = gone if gone and not self.registry.withdraw(self.address, gone) else set()
        if current:
            self.registry.advertise(self.address, current)
        self._claimed = current | unwithdrawn  # what peers may still see: the next round withdraws it again

    def poke(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before the listing, so a poke during it brings the next one at once
            try:
                self.sync()
            except Exception as exc:  # a tier that cannot be listed now: try again next round
                log.warning("could not advertise this node's entries: %s: %s", type(exc).__name__, exc)
            self._wake.wait(self.registry.ttl / 3)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Withdraw what this node claimed and what it holds now: the store claims an entry the moment it
        publishes it, and a stop may come before the next listing took that entry up. The store claims
        nothing more: write-throughs that finish while the process exits publish entries of a node that no
        longer serves them. Once: fastload serve stops it when its shutdown begins, and again on every exit
        path (a failed bind never shuts down)."""
        if self._stop.is_set():
            return
        if self.store.peers is not None:
            self.store.peers = dataclasses.replace(self.store.peers, advertise=None)
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        claims = set(self._claimed)
        try:
            claims |= self.held()
        except Exception as exc:
            log.warning("could not list this node's entries to withdraw them: %s: %s", type(exc).__name__, exc)
        if claims:
            self.registry.withdraw(self.address, claims)
        self._claimed = set()

    # A plugin of the serving process: its own evictions are withdrawn at once.
    @hookimpl
    def on_evict(self, tier: str, key: str, nbytes: int) -> None:
        self.poke()
