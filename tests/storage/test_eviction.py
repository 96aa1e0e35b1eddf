"""``cache gc``'s eviction and lock-file clean-up: the excess over a budget is counted once, and a use-lock
is deleted only while gc holds it (so an entry pinned meanwhile keeps its lock)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from fastload_core.storage import LocalDiskTier, SharedFsTier, ShmTier, TieredStore, writethrough
from fastload_core.storage.base import Entry, Tier
from tests.storage.helpers import read_only

MiB = 1024 * 1024


def _model(tmp_path: Path, name: str, files: dict[str, int] | int) -> str:
    """The URI of a model directory at the origin: ``files`` by name and size, or one model.safetensors."""
    path = tmp_path / "models" / name
    path.mkdir(parents=True)
    for file, size in (files if isinstance(files, dict) else {"model.safetensors": files}).items():
        (path / file).write_bytes(os.urandom(size))
    return f"file://{path}"


def _three_entries(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "tier"
    store = TieredStore([LocalDiskTier(root, capacity=None)], show_progress=False)
    uris = [_model(tmp_path, name, 8 * MiB) for name in ("a", "b", "c")]
    for uri in uris:
        store.fetch(uri)
    return root, uris


def _filled_read_only_share(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, locks: str) -> tuple[str, Path, Path]:
    """A model a writer node put on the shared mount (its lock files kept, or never made), then the mount
    read-only here: the model's URI, the mount and the shared copy."""
    uri, shared = _model(tmp_path, "m", MiB), tmp_path / "shared"
    filled = TieredStore([SharedFsTier(shared, capacity=None)], show_progress=False).fetch(uri)
    if locks == "never made":
        shutil.rmtree(shared / ".locks")
    read_only(monkeypatch, shared)
    return uri, shared, filled


@pytest.mark.parametrize(("budget", "evicted"), [(20 * MiB, 1), (10 * MiB, 2)])
def test_gc_counts_the_excess_once(tmp_path: Path, budget: int, evicted: int) -> None:
    root, _ = _three_entries(tmp_path)
    store = TieredStore([LocalDiskTier(root, capacity=budget)], show_progress=False)
    assert store.gc()["evicted"] == evicted
    tier = store.tiers[0]
    assert len(tier.entries()) == 3 - evicted and tier.usage() <= budget


def test_gc_keeps_the_lock_of_an_entry_pinned_after_it_listed_the_tier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, uris = _three_entries(tmp_path)
    store = TieredStore([LocalDiskTier(root, capacity=None)], show_progress=False)
    held = store.pin(uris[0])
    tier = store.tiers[0]
    lock_files = sorted((root / ".locks").glob("use-*.lock"))
    assert len(lock_files) == 3
    real_entries = Tier.entries

    def listed_before_publication(self: Tier, slug: str | None = None) -> list[Entry]:
        # gc listed the tier just before these entries were published and pinned: the race of issue 11.6.
        return [] if slug is None else real_entries(self, slug)

    monkeypatch.setattr(Tier, "entries", listed_before_publication)
    counts = store.gc()
    monkeypatch.undo()
    assert held.key is not None
    pinned_lock = tier.use_lock_path(*held.key.split("/"))
    assert pinned_lock.exists(), "gc deleted the use-lock of a pinned entry"
    assert counts["locks"] == 0  # the unpinned entries exist too: their locks are not orphans either
    # Had the lock gone, the next gc would make a fresh one, lock it and evict the entry while it is held.
    store_small = TieredStore([LocalDiskTier(root, capacity=1)], show_progress=False)
    store_small.gc()
    assert [e.meta.uri for e in tier.entries()] == [uris[0]]
    held.release()


def test_gc_removes_the_lock_of_an_entry_that_is_gone(tmp_path: Path) -> None:
    root, _uris = _three_entries(tmp_path)
    store = TieredStore([LocalDiskTier(root, capacity=None)], show_progress=False)
    tier = store.tiers[0]
    entry = tier.entries()[0]
    tier.discard(entry.path)  # removed behind the store's back: its lock file is an orphan
    assert store.gc()["locks"] == 1
    assert not tier.use_lock_path(entry.slug, entry.version).exists()


@pytest.mark.parametrize("locks", ["made by a writer node", "never made"])
def test_a_read_only_shared_mount_still_serves_and_lists_what_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, locks: str
) -> None:
    uri, shared, filled = _filled_read_only_share(tmp_path, monkeypatch, locks)
    store = TieredStore([SharedFsTier(shared, capacity=None)], show_progress=False)
    assert store.fetch(uri) == filled
    with store.pin(uri) as path:
        assert path == filled
        assert [info.in_use for info in store.ls()] == [locks == "made by a writer node"]
    assert [info.in_use for info in store.ls()] == [False]


@pytest.mark.parametrize("given", ["as fetched", "resolved"])
def test_pin_path_holds_an_entry_under_a_cache_directory_reached_through_a_link(tmp_path: Path, given: str) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "cache").symlink_to(tmp_path / "real")
    store = TieredStore([LocalDiskTier(tmp_path / "cache" / "local", capacity=None)], show_progress=False)
    path = store.fetch(_model(tmp_path, "m", MiB))
    with store.pin_path(path if given == "as fetched" else path.resolve()) as pinned:
        assert pinned == (path if given == "as fetched" else path.resolve())
        assert [info.in_use for info in store.ls()] == [True]


def test_a_fill_that_cannot_fit_even_after_eviction_evicts_nothing(tmp_path: Path) -> None:
    fast = ShmTier(tmp_path / "shm", capacity=11 * MiB)
    store = TieredStore([fast, LocalDiskTier(tmp_path / "disk", capacity=None)], show_progress=False)
    big, small = _model(tmp_path, "a", 8 * MiB), [_model(tmp_path, "b", MiB), _model(tmp_path, "c", MiB)]
    held = store.pin(big, tier="shm")
    for uri in small:
        store.fetch(uri, tier="shm")
    writethrough.wait(30)  # their copies onto disk hold them until written: idle only after that
    landed = store.fetch(_model(tmp_path, "d", 3 * MiB), tier="shm")  # 3 MiB > 1 free + 2 evictable: it cannot fit
    assert landed.is_relative_to(tmp_path / "disk")
    assert sorted(entry.size for entry in fast.entries()) == [MiB, MiB, 8 * MiB], "idle entries evicted for nothing"
    held.release()


def _foreign_partial(root: Path, version: str, *, idle: float = 0.0) -> Path:
    """Another host's partial download (a pod's, named after it), nothing written into it for ``idle`` s."""
    path = root / "file-m-0123456789abcdef" / f".partial-{version}-pod7f9c"
    (path / "files").mkdir(parents=True)
    (path / "files" / "w.bin").write_bytes(b"x" * MiB)
    then = time.time() - idle
    for written in [path, path / "files", path / "files" / "w.bin"]:
        os.utime(written, (then, then))
    return path


def test_gc_removes_another_hosts_download_idle_for_longer_than_any_fetch_waits(tmp_path: Path) -> None:
    """A pod killed mid-fill left its partial under a host name nobody resumes: gc frees it once it has been
    idle for longer than the fetch timeout, and leaves a live one (another node's download) alone."""
    root = tmp_path / "tier"
    store = TieredStore([LocalDiskTier(root, capacity=None)], fetch_timeout=60, show_progress=False)
    dead, live = _foreign_partial(root, "a" * 20, idle=3600), _foreign_partial(root, "b" * 20)
    assert store.gc()["partials"] == 1
    assert not dead.exists() and live.exists()


@pytest.mark.redis
def test_gc_keeps_an_idle_shared_partial_whose_fill_lease_a_node_holds(tmp_path: Path, redis_url: str) -> None:
    """A node resuming its partial on the shared mount after a reboot holds the fill's lease: gc on another
    node leaves that partial alone, however old its last write."""
    import redis

    from fastload_core.storage.lease import RedisLease

    root = tmp_path / "shared"
    store = TieredStore([SharedFsTier(root, capacity=None)], fetch_timeout=60, lease=RedisLease(redis_url),
                        show_progress=False)
    partial = _foreign_partial(root, "c" * 20, idle=3600)
    client = redis.Redis.from_url(redis_url)
    client.set(f"fastload:lease:shared_fs:file-m-0123456789abcdef:{'c' * 20}", "held", ex=60)
    assert store.gc()["partials"] == 0 and partial.exists()
    client.delete(f"fastload:lease:shared_fs:file-m-0123456789abcdef:{'c' * 20}")
    assert store.gc()["partials"] == 1 and not partial.exists()


def test_an_entry_written_by_a_newer_fastload_is_listed_and_evictable(tmp_path: Path) -> None:
    """A mixed fleet shares one mount: a sidecar with a field this version does not know still reads."""
    root, _ = _three_entries(tmp_path)
    tier = LocalDiskTier(root, capacity=None)
    first = tier.entries()[0]
    meta = json.loads((first.path / "meta.json").read_text())
    meta["files"][0]["added_by_a_later_version"] = "anything"
    (first.path / "meta.json").write_text(json.dumps(meta))
    assert len(tier.entries()) == 3
    store = TieredStore([LocalDiskTier(root, capacity=1)], show_progress=False)
    assert store.gc()["evicted"] == 3 and store.tiers[0].usage() == 0


def test_a_fill_that_fits_once_small_files_are_evicted_is_not_refused(tmp_path: Path) -> None:
    """What eviction gives back is counted in blocks, as the budget charges them: ten 1-byte files take
    ten blocks, not ten bytes."""
    shm = ShmTier(tmp_path / "shm", capacity=100 * 1024)
    store = TieredStore([shm, LocalDiskTier(tmp_path / "disk", capacity=None)], show_progress=False)
    for name in ("a", "b"):
        store.fetch(_model(tmp_path, name, {f"f{i}.bin": 1 for i in range(10)}), tier="shm")
    writethrough.wait(30)
    landed = store.fetch(_model(tmp_path, "c", {"w.bin": 40_000}), tier="shm")
    assert landed.is_relative_to(tmp_path / "shm"), "refused although evicting one small model made room"
    assert len(shm.entries()) == 2


@pytest.mark.parametrize("locks", ["made by a writer node", "never made"])
def test_a_damaged_entry_on_a_read_only_mount_is_passed_over_not_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, locks: str
) -> None:
    uri, shared, damaged = _filled_read_only_share(tmp_path, monkeypatch, locks)
    data = (Path(uri.removeprefix("file://")) / "model.safetensors").read_bytes()
    os.truncate(damaged / "model.safetensors", 1000)  # the mount is read-only to fastload, not to the test
    store = TieredStore([SharedFsTier(shared, capacity=None), LocalDiskTier(tmp_path / "disk", capacity=None)],
                        default_tier="local_disk", show_progress=False)
    path = store.fetch(uri)  # from the origin: the shared copy cannot be repaired from here
    assert path.is_relative_to(tmp_path / "disk") and (path / "model.safetensors").read_bytes() == data
    assert (damaged / "model.safetensors").stat().st_size == 1000  # left for a writer node to replace
