"""Peer fetching's own decisions, without servers: the range size, the early connect, the fall-through.
The transfers themselves run against real ``fastload serve`` nodes in tests/serve/test_serve.py."""

from __future__ import annotations

import io
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fastload_core.storage import peers
from fastload_core.storage.base import Journal, Source
from fastload_core.storage.errors import IntegrityError, StorageError
from fastload_core.storage.meta import Checksums, EntryMeta, FileMeta, Manifest, RemoteFile
from fastload_core.storage.peers import PeerSettings, PeerSource
from fastload_core.storage.progress import Progress
from fastload_core.storage.verify import BLOCK_SIZE

MiB = 1024 * 1024
SIZE = 3 * BLOCK_SIZE + 100
MANIFEST = Manifest("s3://bucket/m/model.safetensors",
                    (RemoteFile("model.safetensors", SIZE, "m/model.safetensors", "abc-2"),), single=True)
VERSION = MANIFEST.version


def peer_meta(version: str = VERSION, size: int = SIZE) -> EntryMeta:
    return EntryMeta(MANIFEST.uri, version, True,
                     (FileMeta("model.safetensors", size, "abc-2", checksum="abc-2", part_size=8 * MiB,
                               block_size=BLOCK_SIZE, digests="0" * 16 * -(-size // BLOCK_SIZE)),))


class FakePeerClient:
    """Answers the metadata request as a peer would; ``gate`` holds the answer back until it is set."""

    def __init__(self, meta: EntryMeta | None, gate: threading.Event | None = None) -> None:
        self.meta = meta
        self.gate = gate
        self.threads: list[str] = []

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # botocore's argument names
        self.threads.append(threading.current_thread().name)
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.meta is None:
            raise ConnectionRefusedError("the peer is gone")
        assert (Bucket, Key) == (peers.PEER_BUCKET, peers.peer_key("slug", VERSION))
        return {"Body": io.BytesIO(self.meta.to_json().encode())}


class Fallback(Source):
    def __init__(self) -> None:
        self.calls = 0

    def download(self, manifest: Manifest, dest: Path, *, journal: Journal, progress: Progress) -> Checksums:
        self.calls += 1
        return {"model.safetensors": ("from-the-fallback", None)}


def settings(**overrides: Any) -> PeerSettings:
    return PeerSettings("redis://unused", "key", "secret", **overrides)


@pytest.fixture
def serve_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTLOAD_REDIS_URL", "redis://127.0.0.1:1")
    monkeypatch.setenv("FASTLOAD_SERVE_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("FASTLOAD_SERVE_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("FASTLOAD_PEERS", raising=False)


def test_peer_ranges_default_to_64mib_and_follow_the_environment(
        serve_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    found = PeerSettings.from_env()
    assert found is not None and found.part_size == 64 * MiB
    monkeypatch.setenv("FASTLOAD_PEER_PART_SIZE", "10MiB")
    found = PeerSettings.from_env()
    assert found is not None and found.part_size == 10 * MiB


@pytest.mark.parametrize("value", ["lots", "1KiB", "50%"])
def test_a_bad_peer_part_size_is_refused_by_name(serve_env: None, monkeypatch: pytest.MonkeyPatch,
                                                  value: str) -> None:
    monkeypatch.setenv("FASTLOAD_PEER_PART_SIZE", value)
    with pytest.raises(StorageError, match="FASTLOAD_PEER_PART_SIZE"):
        PeerSettings.from_env()


def test_the_address_a_node_claims_its_fills_under_follows_the_environment(
        serve_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASTLOAD_PEER_ADVERTISE", raising=False)
    found = PeerSettings.from_env()
    assert found is not None and found.advertise is None
    monkeypatch.setenv("FASTLOAD_PEER_ADVERTISE", "10.0.0.5:9000")
    found = PeerSettings.from_env()
    assert found is not None and found.advertise == "10.0.0.5:9000"


@pytest.mark.parametrize("value", ["10.0.0.5", "10.0.0.5:0", "host:port", "http://x/:9000"])
def test_a_bad_advertise_address_is_refused_by_name(serve_env: None, monkeypatch: pytest.MonkeyPatch,
                                                     value: str) -> None:
    monkeypatch.setenv("FASTLOAD_PEER_ADVERTISE", value)
    with pytest.raises(StorageError, match="FASTLOAD_PEER_ADVERTISE"):
        PeerSettings.from_env()


def test_ranges_are_whole_digest_blocks_so_each_is_checked_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "fill_client", lambda address, _settings, _fill, _ending: FakePeerClient(peer_meta()))
    source = PeerSource(settings(part_size=10 * MiB), ["peer:1"], "slug", VERSION, Fallback())
    connected = source._connect("peer:1", MANIFEST)
    assert connected.part_size == 8 * MiB  # 10 MiB rounded down to 4 MiB blocks
    assert connected.digests == {"model.safetensors": (BLOCK_SIZE, "0" * 64)}
    assert connected.checksums == {"model.safetensors": ("abc-2", 8 * MiB)}
    tiny = PeerSource(settings(part_size=64 * 1024), ["peer:1"], "slug", VERSION, Fallback())
    assert tiny._connect("peer:1", MANIFEST).part_size == BLOCK_SIZE  # never less than one block


@pytest.mark.parametrize("meta", [peer_meta(version="other"), peer_meta(size=SIZE - 1)])
def test_a_peer_holding_another_version_is_refused(monkeypatch: pytest.MonkeyPatch, meta: EntryMeta) -> None:
    monkeypatch.setattr(peers, "fill_client", lambda address, _settings, _fill, _ending: FakePeerClient(meta))
    source = PeerSource(settings(), ["peer:1"], "slug", VERSION, Fallback())
    with pytest.raises(IntegrityError, match="not the version resolved here"):
        source._connect("peer:1", MANIFEST)


def test_the_first_peer_is_connected_in_the_background_and_used_once(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gate = threading.Event()
    client = FakePeerClient(peer_meta(), gate)
    monkeypatch.setattr(peers, "fill_client", lambda address, _settings, _fill, _ending: client)
    transferred: list[peers._Connected] = []

    def transfer(self: PeerSource, peer: peers._Connected, manifest: Manifest, dest: Path,
                 progress: Progress) -> Checksums:
        transferred.append(peer)
        return peer.checksums

    monkeypatch.setattr(PeerSource, "_transfer", transfer)
    source = PeerSource(settings(), ["peer:1"], "slug", VERSION, Fallback())
    started = time.monotonic()
    source.start(MANIFEST)
    assert time.monotonic() - started < 5  # start() does not wait for the peer: the store prepares meanwhile
    gate.set()
    checksums = source.download(MANIFEST, tmp_path, journal=Journal(tmp_path / "j"),
                                progress=Progress("t", SIZE, enabled=False))
    assert checksums == {"model.safetensors": ("abc-2", 8 * MiB)}
    assert client.threads == ["fastload-peer-connect_0"]  # asked once, from the connecting thread
    assert [peer.address for peer in transferred] == ["peer:1"] and source.used == "peer:1"


def test_a_failed_early_connect_is_that_peers_failure_and_the_fill_goes_on(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clients = {"dead:1": FakePeerClient(None), "live:2": FakePeerClient(peer_meta())}
    monkeypatch.setattr(peers, "fill_client", lambda address, _settings, _fill, _ending: clients[address])
    monkeypatch.setattr(PeerSource, "_transfer", lambda self, peer, manifest, dest, progress: peer.checksums)
    fallback = Fallback()
    source = PeerSource(settings(), ["dead:1", "live:2"], "slug", VERSION, fallback)
    source.start(MANIFEST)
    with caplog.at_level(logging.WARNING, logger="fastload.storage.peers"):
        checksums = source.download(MANIFEST, tmp_path, journal=Journal(tmp_path / "j"),
                                    progress=Progress("t", SIZE, enabled=False))
    assert "peer dead:1 failed (ConnectionRefusedError" in caplog.text
    assert source.used == "live:2" and checksums == {"model.safetensors": ("abc-2", 8 * MiB)}
    assert fallback.calls == 0

    clients["live:2"] = FakePeerClient(None)
    source = PeerSource(settings(), ["dead:1", "live:2"], "slug", VERSION, fallback)
    source.start(MANIFEST)
    checksums = source.download(MANIFEST, tmp_path, journal=Journal(tmp_path / "j"),
                                progress=Progress("t", SIZE, enabled=False))
    assert fallback.calls == 1 and source.used is None
    assert checksums == {"model.safetensors": ("from-the-fallback", None)}


def test_a_connect_started_for_another_manifest_is_not_used(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    client = FakePeerClient(peer_meta())
    monkeypatch.setattr(peers, "fill_client", lambda address, _settings, _fill, _ending: client)
    monkeypatch.setattr(PeerSource, "_transfer", lambda self, peer, manifest, dest, progress: peer.checksums)
    source = PeerSource(settings(), ["peer:1"], "slug", VERSION, Fallback())
    source.start(Manifest(MANIFEST.uri, MANIFEST.files, single=True))  # equal, but not the one downloaded
    source.download(MANIFEST, tmp_path, journal=Journal(tmp_path / "j"), progress=Progress("t", SIZE, enabled=False))
    assert len(client.threads) == 2 and client.threads[1] == threading.current_thread().name


class EndingPeerClient(FakePeerClient):
    """Also records the request that ends a fill (the one sent once its ``ending`` event is set)."""

    def __init__(self, meta: EntryMeta, ending: list[threading.Event]) -> None:
        super().__init__(meta)
        self.ending = ending
        self.ended = 0

    def head_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        assert self.ending[-1].is_set()  # the end marker rides on this request
        self.ended += 1
        return {}


def test_a_fill_connected_but_never_downloaded_frees_the_peers_slot_on_close(
        monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[threading.Event] = []
    client = EndingPeerClient(peer_meta(), events)

    def make(address: str, _settings: PeerSettings, _fill: str, ending: threading.Event) -> EndingPeerClient:
        events.append(ending)
        return client

    monkeypatch.setattr(peers, "fill_client", make)
    source = PeerSource(settings(), ["peer:1"], "slug", VERSION, Fallback())
    assert source.connect(MANIFEST)
    assert client.ended == 0  # admitted and held for the download
    source.close()  # the target tier was full: the download never ran
    assert client.ended == 1
    source.close()
    assert client.ended == 1


class FakeRegistry:
    """The registry's answer for one entry: the addresses that claim it now."""

    def __init__(self, holders: list[str]) -> None:
        self.claims = holders

    def holders(self, slug: str, version: str, *, exclude: str | None = None) -> list[str]:
        return [address for address in self.claims if address != exclude]


def test_a_lease_waiter_skips_busy_holders_briefly_and_failed_ones_until_their_claim_would_lapse(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(peers.time, "monotonic", lambda: now[0])
    config = settings(ttl=6.0, advertise="me:1")
    registry = FakeRegistry(["busy:1", "dead:1", "free:1", "me:1"])
    holders = peers.Holders(registry, config, "slug", VERSION)  # type: ignore[arg-type]
    assert holders.live() == ["busy:1", "dead:1", "free:1"]  # never this node itself
    source = holders.source(["busy:1", "dead:1"], Fallback())
    source.busy.append("busy:1")  # what connect() records: busy:1 answered SlowDown, dead:1 failed
    holders.refused(source)
    live = holders.live()
    assert live == ["busy:1", "free:1"] and holders.free(live) == ["free:1"]
    now[0] += peers.BUSY_PAUSE + 0.01  # a busy holder is asked again soon: its slots free as fills end
    assert holders.free(holders.live()) == ["busy:1", "free:1"]
    now[0] += config.ttl  # a failed one only once its claim would have lapsed (a live node renews it)
    assert holders.free(holders.live()) == ["busy:1", "dead:1", "free:1"]


def test_without_peer_settings_a_lease_waiter_sees_no_holders() -> None:
    holders = peers.Holders(None, None, "slug", VERSION)
    assert holders.live() == [] and holders.free([]) == []
    with pytest.raises(StorageError, match="not configured"):
        holders.source(["a:1"], Fallback())


def test_a_fill_another_process_finished_meanwhile_frees_the_peers_slot(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A miss connects to the first peer while it waits for the entry's lock; when another process on this node
    # publishes the entry meanwhile (every TorchServe worker asks at once), the download never runs, and the
    # peer's upload slot must be freed now, not after its idle time (with 2 slots, N-1 workers would hold it).
    from fastload_core.storage.base import Origin
    from fastload_core.storage.local_disk import LocalDiskTier
    from fastload_core.storage.store import TieredStore
    from fastload_core.storage.uri import parse_uri

    class Writer(Origin):
        scheme = "s3"

        def resolve(self, uri: Any, revision: str | None) -> Manifest:
            return MANIFEST

        def download(self, manifest: Manifest, dest: Path, *, journal: Journal, progress: Progress) -> Checksums:
            (dest / "model.safetensors").write_bytes(b"w" * SIZE)
            return {}

    events: list[threading.Event] = []

    class Client(EndingPeerClient):
        def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
            return {"Body": io.BytesIO(self.meta.to_json().encode())}

    client = Client(peer_meta(), events)

    def make(address: str, _settings: PeerSettings, _fill: str, ending: threading.Event) -> Client:
        events.append(ending)
        return client

    monkeypatch.setattr(peers, "fill_client", make)
    origin = Writer()
    store = TieredStore([LocalDiskTier(tmp_path / "local")], origins={"s3": origin}, peers=settings(),
                        show_progress=False)
    store._registry = FakeRegistry(["peer:1"])  # type: ignore[assignment]
    tier, parsed = store.tiers[0], parse_uri(MANIFEST.uri)
    store._fill(tier, parsed, MANIFEST, origin).release()  # the other process's fill, published
    pinned = store._from_peers(parsed, MANIFEST, origin, None, tier, None, [])
    assert pinned is not None and pinned.path.is_file()
    pinned.release()
    deadline = time.monotonic() + 10
    while client.ended == 0 and time.monotonic() < deadline:  # the early connect ends once it has connected
        time.sleep(0.01)
    assert len(events) == 1 and client.ended == 1


def test_after_a_peer_wrote_into_a_resumed_partial_the_fallback_trusts_no_journalled_range(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The partial holds an interrupted origin download and its journal; a peer's transfer then writes into the
    # same files and fails its digests part-way. Ranges the journal records may now hold the peer's bad bytes:
    # the fallback must fetch them again (here: it must see an empty journal, in memory and on disk).
    journal = Journal(tmp_path / "journal")
    journal.record("model.safetensors", 0, BLOCK_SIZE, "crc32:1")
    monkeypatch.setattr(peers, "fill_client", lambda address, _settings, _fill, _ending: FakePeerClient(peer_meta()))

    def bad_transfer(self: PeerSource, peer: peers._Connected, manifest: Manifest, dest: Path,
                     progress: Progress) -> Checksums:
        (dest / "model.safetensors").write_bytes(b"bad" * 100)
        raise IntegrityError(manifest.uri, "model.safetensors", "bytes 0-4194304 from the peer do not match")

    seen: list[dict[Any, Any]] = []

    class Recording(Fallback):
        def download(self, manifest: Manifest, dest: Path, *, journal: Journal,
                     progress: Progress) -> Checksums:
            seen.append(dict(journal.done))
            return super().download(manifest, dest, journal=journal, progress=progress)

    monkeypatch.setattr(PeerSource, "_transfer", bad_transfer)
    source = PeerSource(settings(), ["peer:1"], "slug", VERSION, Recording())
    source.download(MANIFEST, tmp_path, journal=journal, progress=Progress("t", SIZE, enabled=False))
    assert seen == [{}] and Journal(tmp_path / "journal").done == {}

    untouched = Journal(tmp_path / "other")  # a peer that could not even connect wrote nothing: resume as usual
    untouched.record("model.safetensors", 0, BLOCK_SIZE, "crc32:1")
    monkeypatch.setattr(peers, "fill_client", lambda address, _settings, _fill, _ending: FakePeerClient(None))
    PeerSource(settings(), ["peer:1"], "slug", VERSION, Recording()).download(
        MANIFEST, tmp_path, journal=untouched, progress=Progress("t", SIZE, enabled=False))
    assert seen[-1] == {("model.safetensors", 0, BLOCK_SIZE): "crc32:1"}
