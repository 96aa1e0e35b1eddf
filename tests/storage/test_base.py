"""Tier basics on a bad day: a filesystem that runs out of room (or inodes) while preallocating, and links or
foreign files planted inside a tier by someone who can write there."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastload_core import load_file
from fastload_core.storage import LocalDiskTier, ShmTier, StorageError, TieredStore, UnsafeKeyError, parse_uri
from fastload_core.storage.base import _host
from tests.storage.conftest import leftovers


def _many_files(root: Path, count: int, size: int = 100) -> str:
    model = root / "many"
    model.mkdir(parents=True)
    for index in range(count):
        (model / f"part-{index:05d}.bin").write_bytes(bytes([index % 251]) * size)
    return f"file://{model}"


def _mount_tmpfs(mount_point: Path, options: str) -> Iterator[Path]:
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the fault-injection test covers it")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 20 MiB tmpfs holding at most 1000 inodes, where this machine lets us mount one (as root)."""
    yield from _mount_tmpfs(tmp_path / "tmpfs", "size=20m,nr_inodes=1000")


@pytest.fixture
def tmpfs_20m(tmp_path: Path) -> Iterator[Path]:
    yield from _mount_tmpfs(tmp_path / "tmpfs20", "size=20m")


@pytest.mark.slow
def test_the_issues_many_file_model_on_a_20_mib_tmpfs(tmp_path: Path, tmpfs_20m: Path) -> None:
    """Issue 11.7 as reported: 5121 small files, the shm tier's default budget (50% of the tmpfs). The bytes
    fit the budget, the blocks do not: the tier says so up front and the chain falls through."""
    uri = _many_files(tmp_path / "models", 5121)
    shm_root = tmpfs_20m / "fastload"
    store = TieredStore([ShmTier(shm_root, capacity=0.5), LocalDiskTier(tmp_path / "disk", capacity=None)],
                        show_progress=False)
    for _ in range(2):
        assert store.fetch(uri, tier="shm").is_relative_to(tmp_path / "disk")
        assert leftovers(shm_root) == [] and not list(shm_root.rglob("*.bin"))
    stats = os.statvfs(tmpfs_20m)
    assert stats.f_bfree == stats.f_blocks  # nothing of the model was left filling the tmpfs


def test_a_full_tmpfs_while_preallocating_falls_through(tmp_path: Path, small_tmpfs: Path) -> None:
    uri = _many_files(tmp_path / "models", 2000)  # 8 MiB of blocks: the budget allows it, the inodes do not
    shm_root = small_tmpfs / "fastload"
    store = TieredStore([ShmTier(shm_root, capacity=None), LocalDiskTier(tmp_path / "disk", capacity=None)],
                        show_progress=False)
    for _ in range(2):  # a retry behaves the same: nothing was left behind to trip over
        path = store.fetch(uri, tier="shm")
        assert path.is_relative_to(tmp_path / "disk") and len(list(path.iterdir())) == 2000
        assert leftovers(shm_root) == []
        assert sum(1 for _ in shm_root.rglob("*.bin")) == 0
    assert os.statvfs(small_tmpfs).f_ffree > 900  # the partial's inodes were given back


def test_enospc_from_fallocate_is_a_tier_full_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same failure injected at the OS boundary, so it is covered where no tmpfs can be mounted."""
    uri = _many_files(tmp_path / "models", 50)
    real = os.posix_fallocate
    shm_root = tmp_path / "shm"
    calls = []

    def fallocate(fd: int, offset: int, length: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(shm_root)):  # the small tier fills up
            calls.append(fd)
            if len(calls) > 20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, offset, length)

    class ReservingShm(ShmTier):  # a fast tier that reserves its blocks up front, as the disk tiers do
        preallocate = True

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    store = TieredStore([ReservingShm(shm_root, capacity=None), LocalDiskTier(tmp_path / "disk", capacity=None)],
                        show_progress=False)
    path = store.fetch(uri, tier="shm")
    assert path.is_relative_to(tmp_path / "disk")
    assert len(calls) == 21 and leftovers(shm_root) == [] and not list(shm_root.rglob("*.bin"))


def test_shm_downloads_are_sparse_but_charged_in_full(tmp_path: Path) -> None:
    """tmpfs pages are allocated by the download's writes, not all up front in one thread; the budget still
    counts a partial file at its full size, so two fillers cannot both spend the same room."""
    from fastload_core.storage.meta import Manifest, RemoteFile

    tier = ShmTier(tmp_path / "shm", capacity=None)
    manifest = Manifest("s3://b/m/", (RemoteFile("a.bin", 10 * 2**20 + 1, "m/a.bin"),
                                      RemoteFile("b/c.bin", 4096, "m/b/c.bin")), single=False)
    asked: list[int] = []
    partial = tier.prepare("m", "v1", manifest, make_room=asked.append)
    files = partial / "files"
    assert (files / "a.bin").stat().st_size == 10 * 2**20 + 1 and (files / "a.bin").stat().st_blocks == 0
    assert asked == [10 * 2**20 + 4096 + 4096]
    assert tier.usage() >= asked[0]
    asked.clear()
    assert tier.prepare("m", "v1", manifest, make_room=asked.append) == partial and asked == [0]  # already held


# --- links planted inside a tier (issue 11.1) ----------------------------------------------------------------


def _single_model(tmp_path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    tensors = {"w": torch.arange(64, dtype=torch.float32)}
    path = tmp_path / "models" / "m.safetensors"
    path.parent.mkdir(parents=True)
    save_file(tensors, str(path))
    return f"file://{path}", tensors


def _store(tmp_path: Path) -> TieredStore:
    return TieredStore([ShmTier(tmp_path / "shm", capacity=None), LocalDiskTier(tmp_path / "disk", capacity=None)],
                       show_progress=False)


def _version(store: TieredStore, uri: str) -> str:
    return store.origin("file").resolve(parse_uri(uri), None).version


@pytest.mark.parametrize("planted", ["slug", ".locks", "partial", "partial/files"])
def test_writes_never_follow_a_link_planted_in_a_tier(tmp_path: Path, planted: str) -> None:
    uri, _ = _single_model(tmp_path)
    store = _store(tmp_path)
    root, slug, version = tmp_path / "disk", parse_uri(uri).slug, _version(store, uri)
    outside = tmp_path / "outside"
    outside.mkdir()
    partial = f".partial-{version}-{_host()}"
    link = {"slug": root / slug, ".locks": root / ".locks", "partial": root / slug / partial,
            "partial/files": root / slug / partial / "files"}[planted]
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    with pytest.raises(UnsafeKeyError, match="symbolic link") as caught:
        store.fetch(uri)
    assert str(link) in str(caught.value)
    assert list(outside.iterdir()) == []  # nothing was written through the link


def test_a_linked_version_with_a_forged_sidecar_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, _tensors = _single_model(tmp_path)
    store = _store(tmp_path)
    real = store.fetch(uri).parent.parent  # <disk>/<slug>/<version>
    forged = tmp_path / "forged"
    shutil.copytree(real, forged)
    save_file({"w": torch.full((64,), 666.0)}, str(forged / "files" / "m.safetensors"))  # same size, new bytes
    shutil.rmtree(real)
    real.symlink_to(forged)
    with pytest.raises(UnsafeKeyError, match="symbolic link"):
        store.fetch(uri)
    monkeypatch.setenv("FASTLOAD_SHM_DIR", str(tmp_path / "shm"))
    monkeypatch.setenv("FASTLOAD_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "storage").symlink_to(tmp_path / "disk")  # the configured root may be a link
    with pytest.raises(UnsafeKeyError, match="symbolic link"):
        load_file(uri)  # never the forged weights


def test_a_linked_sidecar_and_a_linked_file_are_refused(tmp_path: Path) -> None:
    uri, _ = _single_model(tmp_path)
    store = _store(tmp_path)
    data = store.fetch(uri)
    entry = data.parent.parent
    target = tmp_path / "elsewhere.safetensors"
    data.rename(target)
    data.symlink_to(target)
    with pytest.raises(UnsafeKeyError, match="symbolic link"):
        store.fetch(uri)
    data.unlink()
    target.rename(data)
    meta = entry / "meta.json"
    forged_meta = tmp_path / "meta.json"
    meta.rename(forged_meta)
    meta.symlink_to(forged_meta)
    with pytest.raises(UnsafeKeyError, match="symbolic link"):
        store.fetch(uri)


def test_files_of_another_user_are_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can make a file owned by another user")
    uri, _ = _single_model(tmp_path)
    store = _store(tmp_path)
    data = store.fetch(uri)
    os.chown(data, 12345, 12345)
    with pytest.raises(UnsafeKeyError, match="owned by uid 12345"):
        store.fetch(uri)


def test_ls_and_gc_skip_a_planted_link_and_delete_nothing_behind_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri, _ = _single_model(tmp_path)
    store = _store(tmp_path)
    store.fetch(uri)
    outside = tmp_path / "outside"
    victim = outside / f".partial-0123456789abcdef0123-{_host()}" / "files"
    victim.mkdir(parents=True)
    (victim / "precious.bin").write_bytes(b"keep me")
    (tmp_path / "disk" / "planted").symlink_to(outside)
    assert [info.entry.meta.uri for info in store.ls()] == [uri]
    store.gc()
    assert (victim / "precious.bin").read_bytes() == b"keep me"  # gc did not sweep "partials" behind the link
    assert any("symbolic link" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("capacity", [1.5, 0.0, -0.5, float("nan"), -1])
def test_a_capacity_that_is_neither_bytes_nor_a_share_is_refused(tmp_path: Path, capacity: float) -> None:
    with pytest.raises(StorageError, match=r"tier 'shm': capacity="):
        ShmTier(tmp_path, capacity=capacity)


def test_a_whole_float_capacity_is_bytes_not_a_share_of_the_filesystem(tmp_path: Path) -> None:
    assert ShmTier(tmp_path, capacity=1.5 * 2**30).capacity() == 3 * 2**29
    assert ShmTier(tmp_path, capacity=1.0).capacity() == LocalDiskTier(tmp_path, capacity=1.0).capacity() > 1


def test_the_index_and_config_are_fetched_before_the_shards() -> None:
    """A streamed load reads the index to choose its shards: fetched after them (``-00001-`` sorts before
    ``.index``), it would hold every tensor back until the whole download had landed."""
    from fastload_core.storage.meta import Manifest, RemoteFile

    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json",
             "model.safetensors.index.json"]
    manifest = Manifest("s3://b/m/", tuple(RemoteFile(name, 1, name) for name in sorted(names)), single=False)
    assert [f.name for f in manifest.in_download_order()] == [
        "config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors"]
