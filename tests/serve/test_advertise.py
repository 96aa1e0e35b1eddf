"""A node's claims in the peer registry end with the node: a clean stop leaves no claim behind for peers to
try, whichever way the claim was made (the store claims an entry the moment it publishes it, before the
advertiser's next listing)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from fastload_core.serve.advertise import Advertiser
from fastload_core.storage.peers import PeerRegistry
from fastload_core.storage.store import TieredStore
from tests.serve.test_serve import advertised

pytestmark = [pytest.mark.redis]

ADDRESS = "127.0.0.1:9"


def test_stop_withdraws_a_claim_the_store_made_before_the_advertiser_listed_it(
        redis_url: str, shm_root: Path, tmp_path: Path) -> None:
    store = TieredStore.from_env()
    registry = PeerRegistry(redis_url, ttl=30.0)
    advertiser = Advertiser(store, registry, ADDRESS)
    advertiser.start()
    time.sleep(0.5)  # its first listing (nothing held) is done: it sleeps until its next, 10 s on
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    store.fetch(str(model), tier="shm")
    held = {(entry.slug, entry.version) for tier in store.tiers for entry in tier.entries()}
    assert held, "the fetch published nothing to claim"
    registry.advertise(ADDRESS, held)  # what the store does at publication when it knows its address
    advertiser.stop()
    assert not advertised(redis_url, ADDRESS)


def test_stop_withdraws_what_the_advertiser_claimed_for_an_entry_since_evicted(
        redis_url: str, shm_root: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    store = TieredStore.from_env()
    store.fetch(str(model), tier="shm")
    registry = PeerRegistry(redis_url, ttl=30.0)
    advertiser = Advertiser(store, registry, ADDRESS)
    advertiser.sync()
    assert advertised(redis_url, ADDRESS)
    [(slug, version)] = {(info.entry.slug, info.entry.version) for info in store.ls(tier="shm")}
    store.rm(f"{slug}/{version}")
    advertiser.stop()
    assert not advertised(redis_url, ADDRESS)


def test_after_stop_the_store_claims_nothing_it_publishes(
        redis_url: str, shm_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fastload serve exits after its write-throughs finish, and each publishes an entry into a tier."""
    monkeypatch.setenv("FASTLOAD_REDIS_URL", redis_url)
    monkeypatch.setenv("FASTLOAD_SERVE_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("FASTLOAD_SERVE_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("FASTLOAD_PEER_ADVERTISE", ADDRESS)
    store = TieredStore.from_env()
    assert store.peers is not None and store.peers.advertise == ADDRESS
    advertiser = Advertiser(store, PeerRegistry(redis_url, ttl=30.0), ADDRESS)
    advertiser.start()
    advertiser.stop()
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    store.fetch(str(model), tier="shm")
    assert store.ls(tier="shm")
    assert not advertised(redis_url, ADDRESS)


class _OneEntryStore:
    """A store whose one tier holds one entry (or nothing, once ``evicted``)."""

    peers = None

    def __init__(self) -> None:
        self.evicted = False
        store = self

        class Tier:
            shared = False

            def entries(self) -> list[Any]:
                return [] if store.evicted else [SimpleNamespace(slug="s3-models-m-abc", version="v1")]

        self.tiers = [Tier()]


def fail_next_pipeline(registry: PeerRegistry) -> None:
    """The registry's next Redis call times out, once: a blip, not an outage."""
    real = registry._client.pipeline

    def flaky(*args: Any, **kwargs: Any) -> Any:
        registry._client.pipeline = real
        raise redis.exceptions.TimeoutError("Timeout reading from socket")

    registry._client.pipeline = flaky


def test_one_failed_renewal_does_not_take_the_node_out_of_the_registry(redis_url: str) -> None:
    registry, reader = PeerRegistry(redis_url, ttl=1.5), PeerRegistry(redis_url, ttl=1.5)
    advertiser = Advertiser(_OneEntryStore(), registry, ADDRESS)  # type: ignore[arg-type]
    advertiser.start()
    try:
        time.sleep(0.2)
        assert reader.holders("s3-models-m-abc", "v1") == [ADDRESS]
        fail_next_pipeline(registry)
        seen = []
        deadline = time.monotonic() + 4.5  # three TTLs; the registry used to be skipped for 30 s
        while time.monotonic() < deadline:
            seen.append(reader.holders("s3-models-m-abc", "v1") == [ADDRESS])
            time.sleep(0.1)
        assert registry._client.pipeline.__name__ != "flaky", "the blip never happened"
        assert seen[-10:] == [True] * 10
    finally:
        advertiser.stop()


def test_a_withdrawal_that_failed_is_tried_again(redis_url: str) -> None:
    registry = PeerRegistry(redis_url, ttl=30.0)
    store = _OneEntryStore()
    advertiser = Advertiser(store, registry, ADDRESS)  # type: ignore[arg-type]
    advertiser.sync()
    assert advertised(redis_url, ADDRESS)
    store.evicted = True
    fail_next_pipeline(registry)
    advertiser.sync()
    assert advertised(redis_url, ADDRESS)  # the registry could not be told
    advertiser.sync()
    assert not advertised(redis_url, ADDRESS)


def test_after_a_failure_a_fetchs_own_claim_waits_out_the_pause_and_the_advertisers_does_not(
        redis_url: str) -> None:
    registry = PeerRegistry(redis_url, ttl=30.0)
    fail_next_pipeline(registry)
    assert not registry.advertise(ADDRESS, [("s3-models-m-abc", "v1")])  # the blip: the pause begins
    calls = []
    real = registry._client.pipeline
    registry._client.pipeline = lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs)
    assert not registry.advertise(ADDRESS, [("s3-models-m-abc", "v1")], in_outage=False)
    assert calls == []  # a fetch's claim: not tried, so the fetch pays no second timeout
    assert registry.advertise(ADDRESS, [("s3-models-m-abc", "v1")])
    assert calls == [1] and advertised(redis_url, ADDRESS)
