"""The two small bases everything else builds on.

``Tier``: a directory on this machine holding verified entries under a byte budget. shm, local disk and the
shared mount differ only in where they live, their defaults, and whether other nodes see them.

``Origin``: where a model's bytes come from (S3, a mount named by ``file://``, a plugin's scheme). It
resolves a URI to a ``Manifest`` (files, sizes, identities) and writes those files into a directory a tier
has prepared. A lower tier's entry is a source in the same shape (``EntrySource``), which is how promotion
reuses the same prepare → write → verify → publish path.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import filelock

from .._safefs import UnsafePath, check_path, open_dir, open_file, scan_tree, secure_dir
from .errors import OUT_OF_SPACE, StorageError, TierFullError, UnsafeKeyError
from .meta import FILES_DIR, META_NAME, Checksums, EntryMeta, Manifest
from .uri import ModelURI, confine, safe_relpath

if TYPE_CHECKING:
    from .progress import Progress

log = logging.getLogger("fastload.storage")

JOURNAL_NAME = ".journal"
_PARTIAL = ".partial-"  # <slug>/.partial-<version>-<host>/: a download in progress (or a dead one)
_TRASH = ".trash-"  # <root>/.trash-<uuid>/: a directory being removed
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,200}$")


def _host() -> str:
    """This node's name in partial-directory names (FASTLOAD_NODE_ID overrides the host name, for nodes
    that share one, such as containers with a fixed hostname)."""
    name = os.environ.get("FASTLOAD_NODE_ID") or socket.gethostname()
    return re.sub(r"[^A-Za-z0-9]", "_", name)[:64] or "host"


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte of ``data`` is at ``offset`` (a write may take fewer than asked)."""
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_segment(value: str, what: str) -> str:
    """Slugs and versions become single directory names; anything else (a typed ``cache rm`` key) is
    refused before it reaches the filesystem."""
    if not _SEGMENT.match(value):
        raise UnsafeKeyError(value, f"not a valid {what} (letters, digits, '.', '_', '-'; no '/')")
    return value


def entry_key(slug: str, version: str) -> str:
    """How an entry is named outside its tier (``cache ls``/``rm``, ``on_evict``, ``Pin.key``)."""
    return f"{slug}/{version}"


def parse_entry_key(key: str) -> tuple[str, str | None]:
    """``(slug, version)`` of a ``slug/version`` key as ``entry_key`` writes it (or of a bare ``slug``),
    each part checked before it reaches the filesystem."""
    slug, _, version = key.partition("/")
    return check_segment(slug, "model slug"), check_segment(version, "version") if version else None


@dataclass(frozen=True)
class Entry:
    tier: str
    slug: str
    version: str
    path: Path
    meta: EntryMeta
    last_used: float

    @property
    def key(self) -> str:
        return entry_key(self.slug, self.version)

    @property
    def size(self) -> int:
        return self.meta.total_size

    @property
    def data_path(self) -> Path:
        """What ``fetch`` hands out: the single file, or the directory holding a prefix's files."""
        files = self.path / FILES_DIR
        return files / self.meta.files[0].name if self.meta.single else files


class Journal:
    """Which byte ranges of a partial download are complete (their MD5s, and the block digests of each range
    when the origin computed them as the bytes arrived), so a download interrupted by a crash or SIGKILL
    resumes from the parts it had instead of starting over, and its entry still gets block digests without
    reading the files back. Lines are appended only after a part's bytes are written, with no fsync between:
    after a power loss a line can outlive its bytes, so a resume hashes each recorded range from the file
    and checks it against its line before trusting it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.done: dict[tuple[str, int, int], str | None] = {}
        self.digests: dict[tuple[str, int, int], tuple[int, str]] = {}
        try:
            fd = open_file(path, os.O_RDONLY)
        except FileNotFoundError:
            text = ""
        except UnsafePath as exc:
            raise UnsafeKeyError(exc.path, exc.problem) from None
        else:
            with os.fdopen(fd, "r") as handle:
                text = handle.read()
        for line in text.splitlines(keepends=True):
            fields = line.rstrip("\n").split("\t")
            if not line.endswith("\n") or len(fields) not in (4, 6):
                continue  # a torn last line from a killed writer
            name, start, end, md5 = fields[:4]
            try:
                key = (name, int(start), int(end))
                self.done[key] = None if md5 == "-" else md5
                if len(fields) == 6:
                    self.digests[key] = (int(fields[4]), fields[5])
            except ValueError:
                continue

    def record(self, name: str, start: int, end: int, md5: str | None,
               digests: tuple[int, str] | None = None) -> None:
        """``digests``: block size and the block digests of ``[start, end)`` (``start`` a multiple of it)."""
        with self._lock:
            self.done[(name, start, end)] = md5
            extra = ""
            if digests is not None:
                self.digests[(name, start, end)] = digests
                extra = f"\t{digests[0]}\t{digests[1]}"
            try:
                fd = open_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            except UnsafePath as exc:
                raise UnsafeKeyError(exc.path, exc.problem) from None
            with os.fdopen(fd, "a") as handle:
                handle.write(f"{name}\t{start}\t{end}\t{md5 or '-'}{extra}\n")

    def has(self, name: str, start: int, end: int) -> bool:
        return (name, start, end) in self.done

    def forget(self) -> None:
        """Drop every recorded range: something this journal did not follow wrote into the files (a peer
        transfer that failed part-way), so no range can be trusted to hold what was recorded for it."""
        with self._lock:
            self.done.clear()
            self.digests.clear()
            self.path.unlink(missing_ok=True)

    def file_digests(self, name: str, size: int) -> tuple[int, str] | None:
        """The block digests of the whole file ``name``, joined from its recorded ranges; None unless they
        cover it from byte 0 to ``size`` in ranges that start on block boundaries of one block size."""
        with self._lock:
            by_start = {start: (end, found) for (item, start, end), found in self.digests.items() if item == name}
        position, block_size, parts = 0, None, []
        while position < size:
            if position not in by_start:
                return None
            end, (block, digests) = by_start[position]
            if block_size is None:
                block_size = block
            if block != block_size or block <= 0 or position % block or end <= position:
                return None
            parts.append(digests)
            position = end
        if position != size or (size and block_size is None):
            return None
        return (block_size or 0, "".join(parts)) if size else None


class Source(ABC):
    """Writes a manifest's files into ``dest`` (a prepared directory: every file exists at full size)."""

    @abstractmethod
    def download(self, manifest: Manifest, dest: Path, *, journal: Journal, progress: Progress) -> Checksums:
        """Fill the files; return the checksum of each file it verified or computed, by name."""


class Origin(Source):
    """A URI scheme's remote (or mounted) home of models."""

    scheme: ClassVar[str] = ""

    @abstractmethod
    def resolve(self, uri: ModelURI, revision: str | None) -> Manifest:
        """List the model's files at their current version (or at ``revision``, where the origin has one)."""


class Tier:
    """A directory of published entries ``<root>/<slug>/<version>/{meta.json,files/}`` with a budget.

    Writers fill ``<root>/<slug>/.partial-<version>-<host>/`` under the per-entry fetch lock, then fsync
    and rename it into place, so an entry either exists complete and verified or not at all.
    """

    name: ClassVar[str] = "tier"
    shared: ClassVar[bool] = False  # seen by other nodes: fetch locks stay node-local, a lease spans nodes
    durable: ClassVar[bool] = True  # survives a reboot: worth an fsync before publication (tmpfs is not)
    # Reserve a download's blocks when it is prepared (posix_fallocate). Where that means allocating every page
    # up front, in one thread, before the first byte arrives (tmpfs), the pages are better allocated by the
    # download threads' writes as the bytes land; the budget still charges a partial file its full size.
    preallocate: ClassVar[bool] = True

    def __init__(
        self, root: str | os.PathLike[str], *, capacity: int | float | None = None,
        lock_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self._capacity = self._checked_capacity(capacity)
        self.lock_dir = Path(lock_dir) if lock_dir is not None else self.root / ".locks"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, capacity={self.capacity()!r})"

    # --- budget ----------------------------------------------------------------------------------
    @classmethod
    def _checked_capacity(cls, capacity: int | float | None) -> int | float | None:
        """A float is a share of the filesystem, so ``1.5 * 2**30`` would mean a billion filesystems: a whole
        float is taken as bytes, and any other float outside (0, 1] is refused."""
        if isinstance(capacity, float):
            if capacity.is_integer() and capacity > 1:
                return int(capacity)
            if not 0 < capacity <= 1:
                raise StorageError(f"tier {cls.name!r}: capacity={capacity!r} is neither a number of bytes (an int) "
                                   "nor a share of the filesystem (a float in (0, 1], such as 0.5)")
        elif capacity is not None and capacity < 0:
            raise StorageError(f"tier {cls.name!r}: capacity={capacity!r} is negative; give bytes, a share of the "
                               "filesystem in (0, 1], or None for no budget")
        return capacity

    def capacity(self) -> int | None:
        """Bytes this tier may hold; a fractional setting is a share of its filesystem's size."""
        if isinstance(self._capacity, float):
            stats = os.statvfs(self._existing_ancestor())
            return int(stats.f_blocks * stats.f_frsize * self._capacity)
        return self._capacity

    def free_bytes(self) -> int:
        stats = os.statvfs(self._existing_ancestor())
        return stats.f_bavail * stats.f_frsize

    def usage(self) -> int:
        """Bytes allocated under the root (entries, partials, trash): what the budget is charged for."""
        total = 0
        if not self.root.exists():
            return 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            if dirpath == str(self.root) and ".locks" in dirnames:
                dirnames.remove(".locks")
            partial = any(part.startswith(_PARTIAL) for part in Path(dirpath).relative_to(self.root).parts[:2])
            for name in filenames:
                try:
                    total += _charged(os.lstat(os.path.join(dirpath, name)), partial=partial)
                except FileNotFoundError:
                    continue
        return total

    def charged(self, entry: Entry) -> int:
        """What evicting ``entry`` gives back to the budget: its blocks, sidecar included, as ``usage`` counts
        them (block-rounded, so more than ``entry.size`` for small files)."""
        return _allocated(entry.path, partial=False)

    def _existing_ancestor(self) -> Path:
        path = self.root
        while not path.exists() and path != path.parent:
            path = path.parent
        return path

    # --- layout ----------------------------------------------------------------------------------
    def entry_dir(self, slug: str, version: str) -> Path:
        return self.root / check_segment(slug, "model slug") / check_segment(version, "version")

    # Every name fastload writes under the root is made, and parsed back, in this block: gc, ``cache rm``
    # and eviction read what the tier wrote through these methods, never by slicing names themselves.
    def partial_dir(self, slug: str, version: str) -> Path:
        return self.entry_dir(slug, version).parent / f"{_PARTIAL}{version}-{_host()}"

    @staticmethod
    def partial_key(partial: Path) -> tuple[str, str, str]:
        """``(slug, version, host)`` of a directory ``partial_dir`` named (the host never holds a '-')."""
        version, _, host = partial.name[len(_PARTIAL):].rpartition("-")
        return partial.parent.name, version, host

    def trash(self) -> list[Path]:
        """What ``discard`` renamed out of sight and a crash left behind before it was removed."""
        return sorted(self.root.glob(f"{_TRASH}*"))

    def use_locks(self) -> Iterator[tuple[str, str, Path]]:
        """``(slug, version, path)`` of every use-lock file ``use_lock_path`` named, live entry or not."""
        for path in sorted((self.root / ".locks").glob("use-*.lock")):
            slug, _, version = path.name[len("use-"):-len(".lock")].rpartition("-")
            yield slug, version, path

    def unsafe(self, exc: UnsafePath) -> UnsafeKeyError:
        """The storage error for a path under this tier that fastload refuses to use."""
        return UnsafeKeyError(exc.path, exc.problem, tier=self.name)

    def checked_dir(self, *parts: str, create: bool = False) -> Path:
        """``root/parts...`` with no component a link, a special file or another user's (see ``_safefs``);
        made where missing when ``create``."""
        try:
            return secure_dir(self.root, parts, create=create)
        except UnsafePath as exc:
            raise self.unsafe(exc) from None

    def lookup(self, slug: str, version: str) -> Entry | None:
        return self._entry_at(self.entry_dir(slug, version))

    def _entry_at(self, path: Path) -> Entry | None:
        """The entry at ``path``, read without following links: a version directory or ``meta.json`` that
        is a link (say, to a directory with a forged sidecar) is refused with ``UnsafeKeyError``."""
        try:
            dir_fd = open_dir(self.root, path.relative_to(self.root).parts)
        except FileNotFoundError:
            return None
        except UnsafePath as exc:
            raise self.unsafe(exc) from None
        try:
            meta_fd = open_file(META_NAME, os.O_RDONLY, dir_fd=dir_fd)
            with os.fdopen(meta_fd, "rb") as handle:
                last_used = os.fstat(handle.fileno()).st_mtime
                meta = EntryMeta.from_json(handle.read().decode())
        except FileNotFoundError:
            return None
        except UnsafePath as exc:
            raise self.unsafe(UnsafePath(path / META_NAME, exc.problem)) from None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring entry %s with an unreadable %s: %r", path, META_NAME, exc)
            return None
        finally:
            os.close(dir_fd)
        return Entry(self.name, path.parent.name, path.name, path, meta, last_used)

    def file_sizes(self, entry: Entry) -> dict[str, int]:
        """Size of every file of ``entry`` by name, walked without following links; raises
        ``UnsafeKeyError`` for a link, special file or foreign-owned file anywhere under it."""
        try:
            dir_fd = open_dir(self.root, (entry.slug, entry.version, FILES_DIR))
        except FileNotFoundError:
            return {}
        except UnsafePath as exc:
            raise self.unsafe(exc) from None
        try:
            return scan_tree(dir_fd, entry.path / FILES_DIR)
        except UnsafePath as exc:
            raise self.unsafe(exc) from None
        finally:
            os.close(dir_fd)

    def _children(self, path: Path) -> list[Path]:
        """Subdirectories of ``path`` (dot-names skipped); links and other oddities are reported, not entered."""
        try:
            with os.scandir(path) as scan:
                names = sorted(entry.name for entry in scan if not entry.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = []
        for name in names:
            try:
                st = check_path(path / name, want="dir")
            except UnsafePath as exc:
                log.warning("tier %s: skipping %s: %s", self.name, exc.path, exc.problem)
                continue
            if st is not None:
                found.append(path / name)
        return found

    def entries(self, slug: str | None = None) -> list[Entry]:
        found: list[Entry] = []
        if not self.root.is_dir():
            return found
        if slug:
            try:
                slugs = [self.checked_dir(slug)]
            except (FileNotFoundError, UnsafeKeyError):
                return found
        else:
            slugs = self._children(self.root)
        for slug_dir in slugs:
            for version_dir in self._children(slug_dir):
                try:
                    entry = self._entry_at(version_dir)
                except UnsafeKeyError as exc:
                    log.warning("tier %s: skipping an entry fastload refuses to read: %s", self.name, exc)
                    continue
                if entry is not None:
                    found.append(entry)
        return found

    def partials(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        for slug_dir in self._children(self.root):
            with os.scandir(slug_dir) as scan:
                names = [entry.name for entry in scan if entry.name.startswith(_PARTIAL)]
            for name in names:
                if os.path.islink(slug_dir / name):
                    log.warning("tier %s: ignoring %s: a link, never followed", self.name, slug_dir / name)
                    continue
                yield slug_dir / name

    # --- locks -----------------------------------------------------------------------------------
    def fetch_lock(self, slug: str, version: str) -> filelock.BaseFileLock:
        """Single flight for one entry on this node. Only prevents duplicate work: correctness comes from
        publishing by rename. The kernel drops it when its holder dies, so there are no stale locks."""
        return self._file_lock(f"fetch-{slug}-{version}.lock")

    def tier_lock(self) -> filelock.BaseFileLock:
        """Serialises budget decisions (measure, evict, preallocate) between processes."""
        return self._file_lock("tier.lock")

    def _file_lock(self, name: str) -> filelock.BaseFileLock:
        # filelock opens its file with O_TRUNC and follows links: check the directory and the file first.
        base, parts = self.root, self.lock_dir.parts[len(self.root.parts):]
        if self.lock_dir.parts[:len(self.root.parts)] != self.root.parts:  # shared_fs: locks on local disk
            base, parts = self.lock_dir.parent.parent, self.lock_dir.parts[-2:]
        try:
            path = secure_dir(base, parts, create=True) / name
            check_path(path, want="file")
        except UnsafePath as exc:
            raise self.unsafe(exc) from None
        return filelock.FileLock(path)

    def use_lock_path(self, slug: str, version: str, *, create: bool = True) -> Path:
        return self.checked_dir(".locks", create=create) / f"use-{slug}-{version}.lock"

    # --- writing ---------------------------------------------------------------------------------
    def prepare(self, slug: str, version: str, manifest: Manifest, *,
                make_room: Callable[[int], None]) -> Path:
        """Create the partial directory with every file preallocated to its final size, under the tier lock
        so two processes filling the tier at once cannot both spend the same room. ``make_room(need)`` runs
        first, under that lock: the store passes eviction there (eviction sits above the tier and imports
        it, never the reverse), and raises ``TierFullError`` when ``need`` more bytes cannot fit."""
        partial = self.partial_dir(slug, version)
        with self.tier_lock():
            held = _allocated(partial)
            make_room(_footprint(manifest) - held)
            try:
                files_dir = self.checked_dir(slug, partial.name, FILES_DIR, create=True)
                for item in manifest.files:
                    path = confine(files_dir, item.name, uri=manifest.uri)
                    try:
                        secure_dir(files_dir, item.name.split("/")[:-1], create=True)
                        fd = open_file(path, os.O_RDWR | os.O_CREAT, 0o644)
                    except UnsafePath as exc:
                        raise self.unsafe(exc) from None
                    try:
                        if os.fstat(fd).st_size != item.size:
                            os.ftruncate(fd, item.size)
                        if item.size and self.preallocate:
                            _preallocate(fd, item.size)
                    finally:
                        os.close(fd)
            except OSError as exc:
                if exc.errno not in OUT_OF_SPACE:
                    raise
                # The filesystem ran out (of blocks, or of inodes: a many-file model on a small tmpfs) before
                # the budget said so. A partial this size is worth nothing: drop it so the tier is as it was.
                self.discard(partial)
                raise TierFullError(self.name, manifest.total_size, self.free_bytes(), uri=manifest.uri) from exc
        return partial

    def publish(self, slug: str, version: str, partial: Path, meta: EntryMeta) -> Path:
        """fsync every file (on a durable tier), write the sidecar last, and rename the directory into place.
        Losing a race to another node publishing the same version is fine: its copy is identical, ours is
        discarded. On tmpfs an fsync buys nothing (a reboot empties it anyway), so it is skipped there."""
        try:
            if self.durable:
                for dirpath, _dirnames, filenames in os.walk(partial / FILES_DIR):
                    for name in filenames:
                        fd = open_file(os.path.join(dirpath, name), os.O_RDONLY)
                        try:
                            os.fsync(fd)
                        finally:
                            os.close(fd)
                    fsync_dir(Path(dirpath))
            (partial / JOURNAL_NAME).unlink(missing_ok=True)
            meta.write(partial, fsync=self.durable)
            if self.durable:
                fsync_dir(partial)
            target = self.entry_dir(slug, version)
            check_path(target, want="dir")  # a planted link in the entry's place is refused, not replaced
        except UnsafePath as exc:
            raise self.unsafe(exc) from None
        try:
            os.rename(partial, target)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if self.lookup(slug, version) is None:  # a broken leftover without a sidecar: replace it
                self.discard(target)
                os.rename(partial, target)
            else:
                self.discard(partial)
        if self.durable:
            fsync_dir(target.parent)
        return target

    def discard(self, path: Path) -> None:
        """Remove a directory by renaming it out of sight first, so nobody sees it half deleted."""
        trash = self.root / f"{_TRASH}{uuid.uuid4().hex}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        if os.path.islink(trash):  # rmtree refuses links (rightly): the link itself goes, never its target
            os.unlink(trash)
            return
        shutil.rmtree(trash, ignore_errors=True)


def _footprint(manifest: Manifest, block: int = 4096) -> int:
    """Bytes the manifest's files occupy once written: each file rounded up to a whole block, so a model of
    thousands of small files is not mistaken for a few kilobytes."""
    return sum(-(-item.size // block) * block for item in manifest.files)


def _charged(stat: os.stat_result, *, partial: bool) -> int:
    """What a file counts against the budget: its allocated blocks; a download's file (sized in full when it
    was prepared, not necessarily allocated yet) at least its size, so the budget sees the room as spent."""
    allocated = stat.st_blocks * 512
    return max(allocated, -(-stat.st_size // 4096) * 4096) if partial else allocated


def _allocated(path: Path, *, partial: bool = True) -> int:
    """What the directory ``path`` (a partial one, or a published entry) is charged (see ``_charged``)."""
    total = 0
    if path.is_dir():
        for dirpath, _dirnames, filenames in os.walk(path):
            for name in filenames:
                with contextlib.suppress(FileNotFoundError):
                    total += _charged(os.lstat(os.path.join(dirpath, name)), partial=partial)
    return total


def _preallocate(fd: int, size: int) -> None:
    """Reserve the blocks now: on tmpfs a full tier fails here with ENOSPC instead of with SIGBUS when a
    mapped page is first touched, and the budget sees the bytes as spent."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def tier_for_path(tiers: list[Tier], path: Path) -> tuple[Tier, str, str] | None:
    """Which tier entry a path handed out by ``fetch`` belongs to (for ``pin(path)``). Both sides are
    resolved: a cache directory reached through a link (``/cache`` → ``/mnt/nvme/cache``) hands out paths
    that callers may resolve, and a path not matched would go unpinned, so evictable while mapped."""
    resolved = path.resolve()
    for tier in tiers:
        try:
            relative = resolved.relative_to(tier.root.resolve())
        except ValueError:
            continue
        parts = relative.parts
        if len(parts) >= 2:
            try:
                safe_relpath("/".join(parts[:2]))
            except UnsafeKeyError:
                return None
            return tier, parts[0], parts[1]
    return None
