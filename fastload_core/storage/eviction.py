"""In-use marking and LRU eviction.

A process that serves a model from a tier holds a *shared* ``flock`` on the entry's use-lock file for as
long as it reads or maps the files (a ``Pin``). Eviction takes the same lock *exclusively and without
waiting*: if anyone holds it shared, the entry is in use and skipped. flock is released by the kernel when
a process dies, so a crashed server never pins an entry forever. (filelock only offers exclusive locks,
hence ``fcntl`` here.) Mapped files would survive deletion anyway; the pin is what keeps the budget honest,
since an unlinked but mapped file still occupies /dev/shm until unmapped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import filelock

from .._safefs import UnsafePath, open_file
from ..plugins import notify
from .base import Entry, Tier, _host
from .errors import StorageError, TierFullError, UnsafeKeyError
from .meta import FILES_DIR
from .verify import check_blocks, check_sizes

log = logging.getLogger("fastload.storage")


class Pin:
    """A model path held in use. Release it (or leave the ``with`` block) when the model is unloaded::

        with store.pin("s3://bucket/m1/") as path:
            model = load_model(model, path)      # evictions skip this entry meanwhile

    For a model served for the life of the process keep the object and call ``release()`` when the model
    is dropped; garbage collection and process exit release it too.
    """

    def __init__(self, path: Path, *, fd: int | None = None, tier: str | None = None,
                 key: str | None = None, entry: Entry | None = None) -> None:
        self.path = path
        self.tier = tier
        self.key = key
        self.entry = entry
        self._finalizer = weakref.finalize(self, os.close, fd) if fd is not None else None

    @property
    def held(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return f"Pin({str(self.path)!r}, tier={self.tier!r}, {state})"


_CANNOT_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM)  # a mount this process may only read


def _open_lock(tier: Tier, slug: str, version: str) -> tuple[Path, int] | None:
    """Open (creating) an entry's use-lock file in its checked ``.locks`` directory, never through a link.

    On a mount this process may only read (a shared mount exported read-only to serving nodes) an existing
    lock file is opened read-only, as ``flock`` needs no write access, so nodes that can evict still see
    the pin. Where there is none, None: nothing here can evict from such a mount, so there is nothing to
    pin against, and the entry still serves."""
    try:
        path = tier.use_lock_path(slug, version)
        return path, open_file(path, os.O_RDWR | os.O_CREAT, 0o644)
    except UnsafePath as exc:
        raise UnsafeKeyError(exc.path, exc.problem) from None
    except OSError as exc:
        if exc.errno not in _CANNOT_WRITE:
            raise
    try:
        path = tier.use_lock_path(slug, version, create=False)
        return path, open_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except UnsafePath as exc:
        raise UnsafeKeyError(exc.path, exc.problem) from None


def _same_file(fd: int, path: Path) -> bool:
    """After locking, the lock file may have been unlinked by an evictor; a lock on a dead inode guards
    nothing, so the caller retries on the current file."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def pin_entry(tier: Tier, slug: str, version: str, *,
              verify: str | Callable[[Entry], str] = "size") -> Pin | None:
    """Mark an entry in use and return its pin, or None when the tier does not hold it (any more) or held
    it damaged: ``verify`` (see verify.py) says how hard to look, or a function of the entry says it (a
    caller that checked this entry's blocks once already), and a damaged entry is dropped so the caller
    fetches it again."""
    if tier.lookup(slug, version) is None:
        return None
    fd: int | None = None
    while True:
        opened = _open_lock(tier, slug, version)
        if opened is None:  # a read-only mount: see _open_lock
            break
        lock_path, fd = opened
        fcntl.flock(fd, fcntl.LOCK_SH)  # an evictor holds it exclusively only for a rename
        if _same_file(fd, lock_path):
            break
        os.close(fd)
    try:
        entry = tier.lookup(slug, version)
        problem = damage(tier, entry, verify(entry) if callable(verify) else verify) if entry is not None else None
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    if entry is None or problem is not None:
        if fd is not None:
            os.close(fd)
        if entry is not None and problem is not None:
            drop_damaged(tier, entry, problem)
        return None
    with contextlib.suppress(OSError):  # a read-only shared mount still serves
        os.utime(entry.path / "meta.json")  # the LRU clock
    return Pin(entry.data_path, fd=fd, tier=tier.name, key=entry.key, entry=entry)


def damage(tier: Tier, entry: Entry, verify: str) -> str | None:
    """What is wrong with a published entry (None when nothing is): a missing file or one whose size differs
    from the metadata always; for ``sample``/``full``, blocks that differ from their recorded digests. Links
    and foreign files under it raise ``UnsafeKeyError`` instead: those are refused, not repaired."""
    problem = check_sizes(entry.meta.files, tier.file_sizes(entry))
    if problem is not None or verify == "size":
        return problem
    for item in entry.meta.files:
        problem = check_blocks(entry.path / FILES_DIR / item.name, item, verify)
        if problem is not None:
            return problem
    return None


def drop_damaged(tier: Tier, entry: Entry, problem: str) -> None:
    """Remove a damaged entry so the next fetch replaces it. Processes still mapping its files keep them
    (unlinking never touches a mapping); the entry directory is checked to be the same one that was found
    damaged, so a good copy published meanwhile by another process is left alone."""
    log.warning("tier %s: dropping damaged entry %s/%s of %s: %s; it will be fetched again", tier.name,
                entry.slug, entry.version, entry.meta.uri, problem)
    try:
        found = tier.lookup(entry.slug, entry.version)
    except StorageError:
        return
    if found is not None and found.meta.created == entry.meta.created:
        try:
            tier.discard(entry.path)
        except OSError as exc:
            if exc.errno not in _CANNOT_WRITE:
                raise
            return  # a read-only mount: skipped here (the caller falls through), repaired where it is written
        notify("on_evict", tier=tier.name, key=entry.key, nbytes=entry.size)


def in_use(tier: Tier, entry: Entry) -> bool:
    """Whether some process holds ``entry`` pinned (a momentary probe, for ``cache ls``)."""
    try:
        if not tier.use_lock_path(entry.slug, entry.version, create=False).exists():
            return False
    except FileNotFoundError:  # no .locks directory: nobody ever pinned anything here
        return False
    opened = _open_lock(tier, entry.slug, entry.version)
    if opened is None:
        return False
    fd = opened[1]
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def try_evict(tier: Tier, entry: Entry) -> bool:
    """Remove ``entry`` unless some process holds it in use. Returns whether it was removed."""
    opened = _open_lock(tier, entry.slug, entry.version)
    if opened is None:
        return False
    lock_path, fd = opened
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if not _same_file(fd, lock_path):
            return False
        tier.discard(entry.path)
        lock_path.unlink(missing_ok=True)
    finally:
        os.close(fd)
    log.info("evicted %s/%s (%d bytes) from tier %s", entry.slug, entry.version, entry.size, tier.name)
    notify("on_evict", tier=tier.name, key=entry.key, nbytes=entry.size)
    return True


def remove_stale_partials(tier: Tier, keep: set[tuple[str, str]], *, foreign_idle: float | None = None,
                          leased: Callable[[str, str], bool] | None = None) -> int:
    """Discard this host's partial downloads whose writer is gone (its fetch lock is free). Returns the
    number removed. A partial of an entry in ``keep`` is about to be resumed and stays.

    Another host's partial has its fetch lock on that host, so only its age tells: with ``foreign_idle``, one
    nothing was written into for that many seconds goes too. Without this, a pod killed mid-fill (pods get new
    host names, so nobody resumes it) left a full-size partial on the shared mount, or on a node's disk,
    that the budget charged forever. ``leased(slug, version)`` says whether some node holds the fill's
    cross-node lease (a shared tier with Redis): one resuming that partial right now, which keeps it."""
    removed = 0
    host = _host()
    for partial in list(tier.partials()):
        slug, version, partial_host = tier.partial_key(partial)
        if (slug, version) in keep:
            continue
        if partial_host != host:
            idle = foreign_idle is not None and _idle_for(partial) > foreign_idle
            if idle and not (leased is not None and leased(slug, version)):
                log.info("tier %s: removing %s, another host's download idle for over %.0f s", tier.name,
                         partial, foreign_idle)
                tier.discard(partial)
                removed += 1
            continue
        lock = tier.fetch_lock(slug, version)
        try:
            lock.acquire(timeout=0)
        except (filelock.Timeout, RuntimeError):
            continue
        try:
            tier.discard(partial)
            removed += 1
        finally:
            lock.release()
    return removed


def _idle_for(partial: Path) -> float:
    """Seconds since anything under ``partial`` was last written (its files' and directories' mtimes)."""
    newest = 0.0
    for dirpath, _, filenames in os.walk(partial):
        for path in [dirpath, *(os.path.join(dirpath, name) for name in filenames)]:
            with contextlib.suppress(FileNotFoundError):
                newest = max(newest, os.stat(path, follow_symlinks=False).st_mtime)
    return time.time() - newest


def shrink_to_budget(tier: Tier) -> int:
    """Evict least recently used entries nobody holds until the tier's usage is within its capacity (what
    ``cache gc`` does); the caller holds the tier lock. Returns how many entries were evicted. Each eviction
    is measured afresh, so the excess is counted once: three unused 8 MiB entries over a 20 MiB budget lose
    one, over a 10 MiB budget two."""
    capacity = tier.capacity()
    if capacity is None or tier.usage() <= capacity:
        return 0
    evicted = 0
    remove_stale_partials(tier, keep=set())
    for entry in sorted(tier.entries(), key=lambda e: e.last_used):
        if tier.usage() <= capacity:
            break
        if try_evict(tier, entry):
            evicted += 1
    usage = tier.usage()
    if usage > capacity:
        log.warning("tier %s stays over budget (%d of %d bytes): the rest is in use; release models or raise "
                    "FASTLOAD_%s_CAPACITY", tier.name, usage, capacity, tier.name.upper())
    return evicted


def remove_orphan_lock(tier: Tier, lock_path: Path, slug: str, version: str) -> bool:
    """Delete the use-lock file of an entry that no longer exists, but only while holding it exclusively
    (without waiting) and after checking again that the entry is still absent: an entry published and
    pinned since the caller listed the tier keeps its lock. Returns whether the file was removed."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return False  # gone already, or not a plain file (the tier's checks report those)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # pinned right now
        try:
            present = tier.lookup(slug, version) is not None
        except StorageError:
            return False  # not a name fastload writes: leave it for a person to look at
        if present or not _same_file(fd, lock_path):
            return False
        lock_path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def make_room(tier: Tier, need: int, *, keep: set[tuple[str, str]], uri: str | None = None) -> None:
    """Evict least recently used entries nobody holds until ``need`` more bytes fit; the caller holds the
    tier lock. Raises ``TierFullError`` when even that is not enough, so the store can fall through."""
    if need <= 0:
        return
    capacity = tier.capacity()

    def room() -> int:
        free = tier.free_bytes()
        return free if capacity is None else min(capacity - tier.usage(), free)

    available = room()
    if need <= available:
        return
    if capacity is not None and need > capacity:
        raise TierFullError(tier.name, need, capacity, uri=uri)
    if remove_stale_partials(tier, keep):
        available = room()
        if need <= available:
            return
    candidates = [entry for entry in sorted(tier.entries(), key=lambda e: e.last_used)
                  if (entry.slug, entry.version) not in keep and not in_use(tier, entry)]
    if available + sum(tier.charged(entry) for entry in candidates) < need:
        # Evicting now would only empty the tier of models the next fetches promote again: it cannot fit.
        raise TierFullError(tier.name, need, max(available, 0), uri=uri)
    for entry in candidates:
        if try_evict(tier, entry):
            available = room()
            if need <= available:
                return
    raise TierFullError(tier.name, need, max(available, 0), uri=uri)
