"""``file:///dir``: entries as files in a directory — local disk, or a shared mount (Ceph, NFS).

The default backend, because it needs no server. On a shared mount it is also a cluster-wide cache.
Publication is a hard link of a fully written, fsynced temp file: ``link`` fails if the name exists,
which gives ``SET NX`` semantics on local file systems and NFS alike, and a reader can never open a
half-written entry. Where hard links are unsupported, an atomic rename is used instead.

A store killed mid-write leaves its ``.<key>.<random>.tmp`` behind (up to the size of an entry). The
writer holds an exclusive ``flock`` on its temp file until the entry is published, so a temp file
that is old *and* unlocked belongs to a dead writer: ``collect_garbage`` (run by ``fastload cache gc``)
removes exactly those, and never a file a live store is still writing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .base import CompileCacheBackend, StoredEntry
from .errors import CacheURLError, UnsafeCacheKeyError

_SUFFIX = ".flcc"
_TEMP_SUFFIX = ".tmp"


class DirectoryBackend(CompileCacheBackend):
    scheme = "file"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise CacheURLError(url, "expected file:///absolute/directory")
        self.root = Path(unquote(parts.path))

    def _path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise UnsafeCacheKeyError(key, "it is empty, holds a '/' or starts with '.'")
        return self.root / f"{key}{_SUFFIX}"

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def get_prefix(self, key: str, nbytes: int) -> bytes | None:
        try:
            with self._path(key).open("rb") as file:
                return file.read(nbytes)
        except FileNotFoundError:
            return None

    def put(self, key: str, blob: bytes, *, overwrite: bool = False) -> bool:
        target = self._path(key)
        self.root.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{key}.", suffix=_TEMP_SUFFIX, dir=self.root)
        try:
            with os.fdopen(fd, "wb") as file:
                # Held until the file is closed, after publication: marks the temp file as live for gc.
                fcntl.flock(file.fileno(), fcntl.LOCK_EX)
                file.write(blob)
                file.flush()
                os.fsync(file.fileno())
                return self._publish(temp, target, overwrite=overwrite)
        finally:
            if os.path.exists(temp):
                os.unlink(temp)

    @staticmethod
    def _publish(temp: str, target: Path, *, overwrite: bool) -> bool:
        if overwrite:
            os.replace(temp, target)
            return True
        try:
            os.link(temp, target)
        except FileExistsError:
            return False
        except OSError:
            # No hard links here (some FUSE and SMB mounts): rename if still absent. The window
            # between the check and the rename can let two racers both write, but each writes a
            # complete, verified entry, so one valid entry remains either way.
            if target.exists():
                return False
            os.replace(temp, target)
        return True

    def collect_garbage(self, *, older_than: float) -> tuple[int, int]:
        """Remove temp files of stores that died: older than ``older_than`` seconds and not locked."""
        removed = nbytes = 0
        if not self.root.is_dir():
            return 0, 0
        now = time.time()
        for path in self.root.glob(f".*{_TEMP_SUFFIX}"):
            try:
                info = path.lstat()
            except FileNotFoundError:
                continue  # published or cleaned up meanwhile
            if not stat.S_ISREG(info.st_mode) or now - info.st_mtime < older_than:
                continue  # a young file may belong to a writer that has not taken its lock yet
            try:
                # Writable: on NFS, flock is emulated with fcntl locks, and an exclusive one needs a fd open
                # for writing (EBADF otherwise), which would make gc fail on the shared mounts it is for.
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except PermissionError:  # another user's file: a local flock needs no write access
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError:
                    continue
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        continue  # a live store holds it
                    if exc.errno in (errno.EBADF, errno.ENOLCK):
                        continue  # this mount cannot tell us whether a store is alive: leave the file
                    raise
                if os.fstat(fd).st_ino != info.st_ino:
                    continue  # replaced between the listing and the open
                path.unlink(missing_ok=True)
                removed += 1
                nbytes += info.st_size
            finally:
                os.close(fd)
        return removed, nbytes

    def delete(self, key: str) -> bool:
        try:
            self._path(key).unlink()
            return True
        except FileNotFoundError:
            return False

    def entries(self) -> list[StoredEntry]:
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.glob(f"*{_SUFFIX}")):
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed while listing
                continue
            key = path.name[: -len(_SUFFIX)]
            found.append(StoredEntry(key=key, size=stat.st_size, stored_at=stat.st_mtime))
        return found

    def check(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".probe-", dir=self.root):
            pass  # proves we can create (and remove) files there
        return f"{self.root} is writable, {len(self.entries())} entries"
