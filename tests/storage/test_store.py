"""The tiered store: promotion, pins and eviction, fall-through, single flight across real processes,
and recovery from a downloader killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import filelock
import pytest

from fastload_core.hookspecs import hookimpl
from fastload_core.plugins import get_plugin_manager
from fastload_core.storage import (
    FetchTimeoutError,
    Journal,
    Manifest,
    Origin,
    RemoteFile,
    TieredStore,
    default_store,
    fetch,
    pin,
    prefetch,
    writethrough,
)
from fastload_core.storage.errors import BadURIError, NotCachedError, UnsafeKeyError
from fastload_core.storage.meta import Checksums, EntryMeta
from fastload_core.storage.progress import Progress
from fastload_core.storage.uri import ModelURI
from fastload_core.storage.verify import file_digests
from fastload_devservices.faultproxy import FaultProxy
from tests.storage.conftest import BUCKET, leftovers
from tests.storage.helpers import record_events, spawn

MiB = 1024 * 1024


def make_model(root: Path, name: str, size: int) -> tuple[Path, bytes]:
    model = root / name
    model.mkdir(parents=True)
    data = os.urandom(size)
    (model / "model.safetensors").write_bytes(data)
    (model / "config.json").write_text(f'{{"name": "{name}"}}')
    return model, data


def local_dir() -> Path:
    return Path(os.environ["FASTLOAD_CACHE_DIR"]) / "storage"


def test_a_local_path_is_served_where_it_lies(tmp_path: Path) -> None:
    model, _ = make_model(tmp_path, "m", 1000)
    assert fetch(model) == model
    assert fetch(str(model / "config.json")) == model / "config.json"


def test_file_uri_lands_on_local_disk_then_promotes_to_shm(tmp_path: Path, shm_root: Path) -> None:
    recorder = record_events()
    model, data = make_model(tmp_path, "m", 2 * MiB)
    uri = f"file://{model}"
    on_disk = fetch(uri)
    assert on_disk.is_relative_to(local_dir()) and (on_disk / "model.safetensors").read_bytes() == data
    in_shm = fetch(uri, tier="shm")
    assert in_shm.is_relative_to(shm_root) and (in_shm / "model.safetensors").read_bytes() == data
    assert fetch(uri) == in_shm  # the fastest tier holding it
    assert [(e["tier"]) for e in recorder.names("finish")] == ["local_disk", "shm"]
    assert recorder.names("finish")[0]["nbytes"] == 2 * MiB + len('{"name": "m"}')
    assert [e["tier"] for e in recorder.names("miss")][:2] == ["shm", "local_disk"]
    assert [e["tier"] for e in recorder.names("hit")] == ["local_disk", "shm"]
    (model / "config.json").write_text('{"name": "changed"}')  # a changed file is a new version
    assert (fetch(uri) / "config.json").read_text() == '{"name": "changed"}'


def test_lru_eviction_keeps_pinned_entries_and_falls_through(
    tmp_path: Path, shm_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTLOAD_SHM_CAPACITY", "2500000")  # room for two 1 MB models, not three
    recorder = record_events()
    uris = {}
    for name in ("m1", "m2", "m3", "m4"):
        model, _ = make_model(tmp_path, name, 1_000_000)
        uris[name] = f"file://{model}"
    fetch(uris["m1"], tier="shm")
    fetch(uris["m2"], tier="shm")
    writethrough.wait()  # a write-through keeps its source in use until its copy on disk is published
    time.sleep(0.01)
    fetch(uris["m1"], tier="shm")  # m1 is now more recently used than m2
    path3 = fetch(uris["m3"], tier="shm")
    assert path3.is_relative_to(shm_root)
    evicted = recorder.names("evict")
    assert len(evicted) == 1 and evicted[0]["tier"] == "shm" and "m2" in evicted[0]["key"]
    shm_models = {p.parent.parent.name.split("-")[1] for p in shm_root.glob("*/*/meta.json")}
    assert shm_models == {"m1", "m3"}

    with pin(uris["m1"], tier="shm") as p1, pin(uris["m3"], tier="shm") as p3:
        assert p1.is_relative_to(shm_root) and p3.is_relative_to(shm_root)
        path4 = fetch(uris["m4"], tier="shm")  # nothing evictable: served from local disk instead
        assert path4.is_relative_to(local_dir()) and (path4 / "config.json").read_text() == '{"name": "m4"}'
        assert [e["tier"] for e in recorder.names("full")] == ["shm"]
        assert len(recorder.names("evict")) == 1
    path4 = fetch(uris["m4"], tier="shm")  # pins released: m1 (least recent) makes room
    assert path4.is_relative_to(shm_root)
    assert len(recorder.names("evict")) == 2
    assert leftovers(shm_root) == []


def test_a_model_larger_than_the_tier_is_served_from_the_next(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTLOAD_SHM_CAPACITY", "100KiB")
    model, data = make_model(tmp_path, "big", 1 * MiB)
    path = fetch(f"file://{model}", tier="shm")
    assert path.is_relative_to(local_dir()) and (path / "model.safetensors").read_bytes() == data


def test_wait_for_another_fetch_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTLOAD_FETCH_TIMEOUT", "0.5")
    model, _ = make_model(tmp_path, "m", 1000)
    store = default_store()
    origin = store.origin("file")
    parsed = ModelURI("file", "", str(model))
    manifest = origin.resolve(parsed, None)
    tier = store._tier("local_disk")
    held = filelock.FileLock(tier.lock_dir / f"fetch-{parsed.slug}-{manifest.version}.lock")
    tier.lock_dir.mkdir(parents=True, exist_ok=True)
    probe = spawn(f"import time, filelock; lock = filelock.FileLock({str(held.lock_file)!r}); lock.acquire();"
                  "print('held', flush=True); time.sleep(30)")
    try:
        assert probe.stdout is not None and probe.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(FetchTimeoutError, match="FASTLOAD_FETCH_TIMEOUT"):
            fetch(f"file://{model}")
        assert time.monotonic() - started < 5
    finally:
        probe.kill()
        probe.communicate()


def test_symlinks_out_of_a_model_directory_are_refused(tmp_path: Path) -> None:
    model, _ = make_model(tmp_path, "m", 100)
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    os.symlink(secret, model / "leak.txt")
    with pytest.raises(UnsafeKeyError, match="outside"):
        fetch(f"file://{model}")


def test_offline_mode_serves_the_cached_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = make_model(tmp_path, "m", 1000)
    with pytest.raises(NotCachedError):
        monkeypatch.setenv("FASTLOAD_OFFLINE", "1")
        fetch(f"file://{model}")
    monkeypatch.delenv("FASTLOAD_OFFLINE")
    first = fetch(f"file://{model}")
    monkeypatch.setenv("FASTLOAD_OFFLINE", "1")
    (model / "model.safetensors").unlink()  # the origin is gone; the cache still serves
    assert fetch(f"file://{model}") == first and (first / "model.safetensors").read_bytes() == data


def test_unknown_scheme_and_unknown_tier_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(BadURIError, match="no storage backend for scheme 'hf'"):
        fetch("hf://org/model")
    with pytest.raises(Exception, match="unknown or unconfigured tier 'shared_fs'"):
        fetch(tmp_path, tier="shared_fs")


class MemoryOrigin(Origin):
    """A plugin-provided origin: ``mem://name/`` serves files from a dict."""

    scheme = "mem"
    files: ClassVar[dict[str, bytes]] = {"weights.bin": b"w" * 5000, "config.json": b"{}"}

    def resolve(self, uri: ModelURI, revision: str | None) -> Manifest:
        items = tuple(RemoteFile(n, len(d), n, identity="1") for n, d in self.files.items())
        return Manifest(str(uri), items, single=False)

    def download(self, manifest: Manifest, dest: Path, *, journal: Journal, progress: Progress) -> Checksums:
        for name, data in self.files.items():
            with open(dest / name, "r+b") as handle:
                handle.write(data)
        return {}


class MemoryPlugin:
    @hookimpl
    def register_storage_schemes(self, register: Any) -> None:
        register("mem", MemoryOrigin)


def test_plugins_add_schemes_through_the_hook() -> None:
    get_plugin_manager().register(MemoryPlugin(), name="mem-plugin")
    root = fetch("mem://demo/")
    assert (root / "weights.bin").read_bytes() == b"w" * 5000


class TaggedOrigin(MemoryOrigin):
    """A plugin origin whose revisions are its own names (a git ref, a release tag)."""

    scheme = "tagged"
    releases: ClassVar[dict[str, bytes]] = {"v1.0": b"old", "v2.0": b"new"}

    def resolve(self, uri: ModelURI, revision: str | None) -> Manifest:
        tag = revision or "v2.0"
        item = RemoteFile("w.bin", len(self.releases[tag]), tag, identity=tag)
        return Manifest(str(uri), (item,), single=True)

    def download(self, manifest: Manifest, dest: Path, *, journal: Journal, progress: Progress) -> Checksums:
        (item,) = manifest.files
        with open(dest / item.name, "r+b") as handle:
            handle.write(self.releases[item.locator])
        return {}


def test_an_origin_that_honours_its_own_revision_names_serves_them() -> None:
    class TaggedPlugin:
        @hookimpl
        def register_storage_schemes(self, register: Any) -> None:
            register("tagged", TaggedOrigin)

    get_plugin_manager().register(TaggedPlugin(), name="tagged-plugin")
    assert fetch("tagged://model/w.bin", revision="v1.0").read_bytes() == b"old"
    assert fetch("tagged://model/w.bin").read_bytes() == b"new"


def test_prefetch_in_background(tmp_path: Path) -> None:
    a, _ = make_model(tmp_path, "a", 1000)
    b, _ = make_model(tmp_path, "b", 1000)
    future = prefetch([f"file://{a}", f"file://{b}"], background=True)
    assert not isinstance(future, list)
    paths = future.result(timeout=30)
    assert [(p / "config.json").read_text() for p in paths] == ['{"name": "a"}', '{"name": "b"}']


def test_explicit_composition(tmp_path: Path) -> None:
    from fastload_core.storage import LocalDiskTier, ShmTier
    from fastload_core.storage.file import FileOrigin

    store = TieredStore([ShmTier(tmp_path / "shm", capacity=10 * MiB), LocalDiskTier(tmp_path / "disk")],
                        origins={"file": FileOrigin()}, default_tier="shm", show_progress=False)
    model, data = make_model(tmp_path, "m", 1000)
    path = store.fetch(f"file://{model}")
    assert path.is_relative_to(tmp_path / "shm") and (path / "model.safetensors").read_bytes() == data
    writethrough.wait()
    assert [i.entry.tier for i in store.ls()] == ["shm", "local_disk"]


# --- real processes against S3 ------------------------------------------------------------------------
FETCH_CODE = """
import os, sys, time
from pathlib import Path
go = Path(sys.argv[1]) if len(sys.argv) > 1 else None
while os.environ.get("GO_FILE") and not Path(os.environ["GO_FILE"]).exists():
    time.sleep(0.01)
from fastload_core.storage import fetch
print(fetch(os.environ["URI"]), flush=True)
"""


@pytest.mark.s3
@pytest.mark.slow
def test_six_processes_one_download(s3: Any, proxy: FaultProxy, tmp_path: Path) -> None:
    data = os.urandom(6 * MiB)
    s3.put_object(Bucket=BUCKET, Key="shared/w.bin", Body=data)
    proxy.delay = 0.03  # ~24 parts: the download takes long enough for everyone to pile up on the lock
    go = tmp_path / "go"
    env = {"URI": f"s3://{BUCKET}/shared/w.bin", "GO_FILE": str(go)}
    workers = [spawn(FETCH_CODE, env) for _ in range(6)]
    time.sleep(1.0)
    go.touch()
    outputs = [w.communicate(timeout=120) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err[-2000:] for _, err in outputs]
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1
    assert Path(paths.pop()).read_bytes() == data
    assert proxy.get_body_bytes == len(data)  # one download from origin, not six
    assert leftovers(local_dir()) == []


KILL_CODE = """
import os
from fastload_core.storage import fetch
fetch(os.environ["URI"])
"""


@pytest.mark.s3
@pytest.mark.slow
def test_sigkill_mid_download_leaves_nothing_torn_and_the_retry_resumes(s3: Any, proxy: FaultProxy) -> None:
    data = os.urandom(4 * MiB)
    s3.put_object(Bucket=BUCKET, Key="killed/w.bin", Body=data)
    gate = threading.Event()  # ranges after the 4th wait here, so the victim is surely mid-download when killed
    proxy.before_ranged_get = lambda count: None if count <= 4 else gate.wait(60)
    victim = spawn(KILL_CODE, {"URI": f"s3://{BUCKET}/killed/w.bin", "FASTLOAD_S3_CONCURRENCY": "2"})
    deadline = time.monotonic() + 60
    journal: list[Path] = []
    while time.monotonic() < deadline:
        journal = list(local_dir().rglob(".journal"))
        if journal and len(journal[0].read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    assert journal, "the downloader never got going"
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    proxy.before_ranged_get = None
    gate.set()
    assert not list(local_dir().rglob("meta.json"))  # nothing published
    partial_files = [p for p in local_dir().rglob("w.bin")]
    assert all(".partial-" in str(p) for p in partial_files)

    proxy.reset_counters()
    path = fetch(f"s3://{BUCKET}/killed/w.bin")
    assert path.read_bytes() == data
    assert proxy.get_body_bytes < len(data)  # resumed: the parts already on disk were not fetched again
    assert leftovers(local_dir()) == []
    (item,) = EntryMeta.read(path.parent.parent).files  # digests of the killed run's parts came from its journal
    assert item.block_size and item.digests == file_digests(path, item.block_size)


class BrokenScheme:
    """A scheme whose origin cannot be built here (like s3:// without boto3 installed)."""

    @hookimpl
    def register_storage_schemes(self, register: Any) -> None:
        def unavailable() -> Origin:
            raise ImportError("no module named 'imaginary'")

        register("broken", unavailable)


def test_origins_are_built_per_scheme_on_first_use(tmp_path: Path) -> None:
    get_plugin_manager().register(BrokenScheme(), name="broken-scheme")
    model, data = make_model(tmp_path, "m", MiB)
    assert (fetch(f"file://{model}") / "model.safetensors").read_bytes() == data  # not blocked by 'broken'
    with pytest.raises(ImportError, match="imaginary"):
        fetch("broken://bucket/model")
