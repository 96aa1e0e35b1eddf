"""The directory backend on file systems without hard links."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastload_core import errors
from fastload_core.compile_cache.directory import DirectoryBackend
from fastload_core.compile_cache.errors import UnsafeCacheKeyError


def test_without_hard_links_it_still_keeps_the_first_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: str, dst: str) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    backend = DirectoryBackend((tmp_path / "mount").as_uri())
    assert backend.put("v1-a", b"first") is True
    assert backend.put("v1-a", b"second") is False
    assert backend.get("v1-a") == b"first"
    assert [p.name for p in (tmp_path / "mount").iterdir()] == ["v1-a.flcc"]  # no temp files left


def test_keys_cannot_name_paths(tmp_path: Path) -> None:
    backend = DirectoryBackend((tmp_path / "d").as_uri())
    for bad in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(UnsafeCacheKeyError, match="unsafe compile-cache key") as caught:
            backend.get(bad)
        # one error tree: the same base as storage's unsafe keys, and still the ValueError it was
        assert isinstance(caught.value, errors.UnsafeKeyError) and isinstance(caught.value, ValueError)
        assert caught.value.key == bad


# --- issue 11.9: temp files of killed stores are found and removed by age and lock ---------------------

_ROOT = Path(__file__).resolve().parents[2]


def _old(path: Path, seconds: float = 7200) -> Path:
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))
    return path


def test_a_killed_store_leaves_a_temp_file_that_gc_removes(tmp_path: Path) -> None:
    root = tmp_path / "cc"
    script = (
        "import os, sys\n"
        "from fastload_core.compile_cache.directory import DirectoryBackend\n"
        "backend = DirectoryBackend(sys.argv[1])\n"
        "real_fsync = os.fsync\n"
        "def die(fd):\n"
        "    real_fsync(fd)\n"
        "    os.kill(os.getpid(), 9)  # SIGKILL mid-store: no finally runs\n"
        "os.fsync = die\n"
        "backend.put('v1-killed', b'x' * 100000)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, root.as_uri()], cwd=_ROOT, check=False,
                          env={**os.environ, "PYTHONPATH": str(_ROOT)})
    assert done.returncode == -signal.SIGKILL
    [leftover] = root.glob(".v1-killed.*.tmp")
    backend = DirectoryBackend(root.as_uri())
    assert backend.collect_garbage(older_than=3600) == (0, 0)  # young: may still be a live writer's
    _old(leftover)
    assert backend.collect_garbage(older_than=3600) == (1, 100000)
    assert not leftover.exists() and backend.entries() == []


def test_gc_keeps_a_temp_file_a_live_store_holds(tmp_path: Path) -> None:
    root = tmp_path / "cc"
    root.mkdir()
    live = root / ".v1-live.abc.tmp"
    live.write_bytes(b"half")
    _old(live)
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # what put() holds while it writes and publishes
        assert DirectoryBackend(root.as_uri()).collect_garbage(older_than=60) == (0, 0)
    assert live.exists()
    link = root / ".v1-link.abc.tmp"
    link.symlink_to(tmp_path / "elsewhere")
    assert DirectoryBackend(root.as_uri()).collect_garbage(older_than=60) == (1, 4)
    assert link.is_symlink() and not live.exists()  # links are not followed, nor removed


def test_a_store_still_publishes_one_entry_and_leaves_no_temp_file(tmp_path: Path) -> None:
    backend = DirectoryBackend((tmp_path / "cc").as_uri())
    assert backend.put("v1-a", b"first") and not backend.put("v1-a", b"second")
    assert backend.put("v1-a", b"third", overwrite=True)
    assert backend.get("v1-a") == b"third"
    assert [p.name for p in (tmp_path / "cc").iterdir()] == ["v1-a.flcc"]


def test_cache_gc_command_collects_compile_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "cc"
    root.mkdir()
    stale = root / ".v1-dead.xyz.tmp"
    stale.write_bytes(b"z" * 1234)
    _old(stale)
    staging = tmp_path / "fl" / "compile" / "inductor" / ".restore-abc"
    staging.mkdir(parents=True)
    (staging / "half.so").write_bytes(b"so")
    _old(staging)
    env = {**os.environ, "PYTHONPATH": str(_ROOT), "FASTLOAD_CACHE_DIR": str(tmp_path / "fl"),
           "FASTLOAD_SHM_DIR": str(tmp_path / "shm")}
    done = subprocess.run([sys.executable, "-m", "fastload_core", "cache", "gc", "--compile-cache", str(root)],
                          capture_output=True, text=True, env=env, cwd=_ROOT, check=False)
    assert done.returncode == 0, done.stderr
    assert f"compile cache {root.as_uri()}: removed 1 stale temp file(s) (1234 bytes), 1 stale restore" in done.stdout
    assert not stale.exists() and not staging.exists()
    bad = subprocess.run([sys.executable, "-m", "fastload_core", "cache", "gc", "--compile-cache", "gopher://x"],
                         capture_output=True, text=True, env=env, cwd=_ROOT, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("fastload: error: ") and "gopher://x" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_an_unsafe_key_on_the_command_line_is_one_error_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "fastload_core", "cache", "rm", "--compile", "../escape",
                             "--compile-cache", (tmp_path / "d").as_uri()], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "fastload: error: refusing unsafe compile-cache key '../escape': it is empty, holds a '/' or starts "
        "with '.'; keys are the digests `fastload cache ls` shows"]


# --- review: on NFS, flock is an fcntl lock, which needs a writable fd and may not be there at all ---


def _stale_temp_files(root: Path, *names: str) -> list[Path]:
    root.mkdir(parents=True)
    paths = [root / f".{name}.abc.tmp" for name in names]
    for path in paths:
        path.write_bytes(b"dead")
        _old(path)
    return paths


def test_gc_locks_with_a_writable_fd_as_nfs_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_flock = fcntl.flock

    def nfs_flock(fd: int, operation: int) -> None:
        # NFS emulates flock with fcntl byte-range locks: an exclusive one on a read-only fd is EBADF
        if operation & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", nfs_flock)
    root = tmp_path / "nfs"
    _stale_temp_files(root, "v1-dead")
    assert DirectoryBackend(root.as_uri()).collect_garbage(older_than=60) == (1, 4)
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("code", [errno.EBADF, errno.ENOLCK])
def test_gc_leaves_a_file_it_cannot_lock_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    real_flock = fcntl.flock

    def no_lock_for_one(fd: int, operation: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".v1-unlockable.abc.tmp"):
            raise OSError(code, os.strerror(code))  # a mount without lock support: its writer may be alive
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", no_lock_for_one)
    root = tmp_path / "cc"
    unlockable, *others = _stale_temp_files(root, "v1-unlockable", "v1-dead-a", "v1-dead-b")
    assert DirectoryBackend(root.as_uri()).collect_garbage(older_than=60) == (2, 8)
    assert unlockable.exists() and not any(path.exists() for path in others)
