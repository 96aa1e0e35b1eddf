"""``TieredStore``: resolve a model URI to the fastest tier holding it, fetching down the chain and
promoting on the way up, once per node.

The chain is explicit: a list of tiers, fastest first, plus the origins registered for URI schemes. A
``fetch`` looks for the model's current version (the origin's identity for every file) in the tiers; on a
miss it fills each tier between the nearest holder (or the origin) and the target, slowest first, each
from the one below. Filling one tier is always the same five steps: per-entry lock (single flight on the
node; plus a Redis lease for a shared tier), check again, reserve room and preallocate, write and verify,
fsync and rename. A tier that cannot make room is skipped with a warning and the model is served from
the next tier down.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import filelock

from ..plugins import collect, notify
from .base import JOURNAL_NAME, Entry, Journal, Origin, Source, Tier, check_segment, tier_for_path
from .copy import EntrySource
from .errors import (
    BadURIError,
    FetchTimeoutError,
    IntegrityError,
    NotCachedError,
    OriginError,
    StorageError,
    TierFullError,
)
from .eviction import Pin, in_use, make_room, pin_entry, remove_stale_partials, try_evict
from .lease import RedisLease
from .local_disk import LocalDiskTier
from .meta import FILES_DIR, EntryMeta, Manifest
from .progress import Progress
from .settings import StorageSettings
from .shared_fs import SharedFsTier
from .shm import ShmTier
from .uri import ModelURI, is_uri, parse_uri

log = logging.getLogger("fastload.storage")

OriginFactory = Callable[[], Origin]


class FetchWatch(Protocol):
    """Told where a fetch from the origin writes and which byte ranges have landed (the streaming loader)."""

    def started(self, tier: str, files_dir: Path, manifest: Manifest) -> None: ...

    def range_done(self, name: str, start: int, end: int) -> None: ...


def registered_origins() -> dict[str, OriginFactory]:
    """Schemes registered through the ``register_storage_schemes`` hook (built-ins first, so a plugin may
    replace one): ``register(scheme, factory)`` where ``factory()`` returns an ``Origin``."""
    found: dict[str, OriginFactory] = {}
    for args in collect("register_storage_schemes"):
        if len(args) != 2 or not isinstance(args[0], str) or not callable(args[1]):
            log.warning("ignoring a storage scheme registration that is not (scheme, factory): %r", args)
            continue
        found[args[0].lower()] = args[1]
    return found


@dataclass(frozen=True)
class EntryInfo:
    """One cached entry, for ``cache ls``."""

    entry: Entry
    in_use: bool


class TieredStore:
    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        origins: dict[str, Origin] | None = None,
        default_tier: str | None = None,
        fetch_timeout: float = 3600.0,
        lease: RedisLease | None = None,
        offline: bool = False,
        show_progress: bool = True,
    ) -> None:
        """``tiers`` fastest first. ``origins`` maps schemes to origins; None means the registered ones."""
        if not tiers:
            raise StorageError("a TieredStore needs at least one tier")
        self.tiers = list(tiers)
        self._by_name = {tier.name: tier for tier in self.tiers}
        if len(self._by_name) != len(self.tiers):
            raise StorageError("tier names must be unique")
        if default_tier is None:
            default_tier = "local_disk" if "local_disk" in self._by_name else self.tiers[-1].name
        self.default_tier = self._tier(default_tier).name
        self.fetch_timeout = fetch_timeout
        self.lease = lease
        self.offline = offline
        self.show_progress = show_progress
        self._origins: dict[str, Origin] = dict(origins) if origins is not None else {}
        self._use_registered = origins is None
        self._origin_lock = threading.Lock()

    @classmethod
    def from_env(cls, settings: StorageSettings | None = None) -> TieredStore:
        """The store ``fetch`` uses: shm (if /dev/shm exists), local disk, the shared mount if configured."""
        settings = settings or StorageSettings.from_env()
        tiers: list[Tier] = []
        if settings.shm_dir is not None:
            tiers.append(ShmTier(settings.shm_dir, capacity=settings.shm_capacity))
        tiers.append(LocalDiskTier(settings.local_dir, capacity=settings.local_disk_capacity))
        if settings.shared_dir is not None:
            tiers.append(SharedFsTier(settings.shared_dir, capacity=settings.shared_fs_capacity,
                                      lock_dir=settings.local_dir / ".locks" / "shared_fs"))
        default = settings.default_tier if settings.default_tier in {t.name for t in tiers} else "local_disk"
        lease = RedisLease(settings.redis_url, ttl=settings.lease_ttl) if settings.redis_url else None
        return cls(tiers, default_tier=default, fetch_timeout=settings.fetch_timeout, lease=lease,
                   offline=settings.offline)

    # --- lookup helpers --------------------------------------------------------------------------
    def _tier(self, name: str) -> Tier:
        try:
            return self._by_name[name]
        except KeyError:
            raise StorageError(f"unknown or unconfigured tier {name!r}; this store has "
                               f"{', '.join(self._by_name)} (set FASTLOAD_SHM_DIR / FASTLOAD_SHARED_DIR to "
                               "enable the others)", tier=name) from None

    def origin(self, scheme: str, *, uri: str = "") -> Origin:
        with self._origin_lock:
            if scheme not in self._origins:
                # Built lazily, per scheme: an s3 origin needs the s3 extra, a file:// URI must not.
                factories = registered_origins() if self._use_registered else {}
                if scheme not in factories:
                    known = ", ".join(sorted({*self._origins, *factories})) or "none"
                    raise BadURIError(uri or f"{scheme}://", f"no storage backend for scheme {scheme!r} "
                                                             f"(registered: {known}); install the plugin that "
                                                             "provides it")
                self._origins[scheme] = factories[scheme]()
            return self._origins[scheme]

    # --- public API ------------------------------------------------------------------------------
    def fetch(self, uri: str | os.PathLike[str], *, tier: str | None = None,
              revision: str | None = None) -> Path:
        """Local path of the model in the fastest tier holding it (or in ``tier``): the file for a single
        object, a directory of its files for a prefix."""
        with self.pin(uri, tier=tier, revision=revision) as path:
            return path

    def pin(self, uri: str | os.PathLike[str], *, tier: str | None = None,
            revision: str | None = None, watch: FetchWatch | None = None) -> Pin:
        """Like ``fetch``, but the entry stays marked in use (never evicted) until the pin is released.
        ``watch`` hears where a download from the origin lands and its progress (none on a hit)."""
        parsed = parse_uri(uri)
        target = self._tier(tier or self.default_tier)
        if parsed.bare and tier is None:
            if not os.path.exists(parsed.path):
                raise OriginError(parsed.path, "no such file or directory", code="NotFound")
            if os.path.isdir(parsed.path) and not any(files for _, _, files in os.walk(parsed.path)):
                raise OriginError(parsed.path, "directory is empty", code="NotFound")  # as file:// says
            return Pin(Path(parsed.path))
        origin = self.origin(parsed.scheme, uri=str(parsed))
        manifest = self._resolve(parsed, origin, revision)
        shown = str(parsed)
        target_index = self.tiers.index(target)
        scan = range(len(self.tiers)) if tier is None else range(target_index, len(self.tiers))
        source: Pin | None = None
        source_index = len(self.tiers)
        for index in scan:
            candidate = self.tiers[index]
            pinned = candidate.pin(parsed.slug, manifest.version)
            if pinned is not None:
                notify("on_tier_hit", uri=shown, tier=candidate.name, path=str(pinned.path))
                if index <= target_index:
                    return pinned
                source, source_index = pinned, index
                break
            notify("on_tier_miss", uri=shown, tier=candidate.name)
        return self._fill_up(parsed, manifest, origin, source, source_index, target_index, watch)

    def pin_path(self, path: str | os.PathLike[str]) -> Pin:
        """Pin a path ``fetch`` returned, for a caller that keeps using it (a loader mapping its files)."""
        found = tier_for_path(self.tiers, Path(path))
        if found is None:
            return Pin(Path(path))
        tier, slug, version = found
        pinned = pin_entry(tier, slug, version)
        if pinned is None:
            raise StorageError(f"{path} was evicted from tier {tier.name!r} before it was pinned; fetch it "
                               "again (or use pin(uri), which cannot lose that race)", tier=tier.name)
        pinned.path = Path(path)
        return pinned

    def prefetch(self, uris: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *,
                 tier: str | None = None, revision: str | None = None,
                 background: bool = False) -> list[Path] | Future[list[Path]]:
        """Warm one or more models ahead of need. ``background=True`` returns a ``Future`` at once, so a
        server can start fetching weights while it does its other start-up work."""
        items = [uris] if isinstance(uris, (str, os.PathLike)) else list(uris)

        def run() -> list[Path]:
            return [self.fetch(item, tier=tier, revision=revision) for item in items]

        if not background:
            return run()
        executor = ThreadPoolExecutor(1, thread_name_prefix="fastload-prefetch")
        future = executor.submit(run)
        executor.shutdown(wait=False)
        return future

    # --- resolve ---------------------------------------------------------------------------------
    def _resolve(self, parsed: ModelURI, origin: Origin, revision: str | None) -> Manifest:
        if revision is not None:
            for tier in self.tiers:
                try:
                    entry = tier.lookup(parsed.slug, check_segment(revision, "version"))
                except StorageError:
                    break  # not a fastload version digest: the origin's own revision (an S3 VersionId)
                if entry is not None:
                    return entry.meta.as_manifest()
        if self.offline:
            cached = self._newest_cached(parsed)
            if cached is None:
                raise NotCachedError(f"{parsed}: FASTLOAD_OFFLINE is set and no tier holds this model",
                                     uri=str(parsed))
            return cached
        try:
            return origin.resolve(parsed, revision)
        except OriginError as exc:
            cached = self._newest_cached(parsed) if exc.code == "Unreachable" else None
            if cached is None:
                raise
            log.warning("%s: origin unreachable (%s); serving the newest cached version %s", parsed,
                        exc.problem, cached.version)
            return cached

    def _newest_cached(self, parsed: ModelURI) -> Manifest | None:
        entries = [e for tier in self.tiers for e in tier.entries(parsed.slug)]
        if not entries:
            return None
        return max(entries, key=lambda e: e.meta.created).meta.as_manifest()

    # --- filling ---------------------------------------------------------------------------------
    def _fill_up(self, parsed: ModelURI, manifest: Manifest, origin: Origin, source: Pin | None,
                 source_index: int, target_index: int, watch: FetchWatch | None = None) -> Pin:
        current = source
        last_error: TierFullError | None = None
        try:
            for index in range(source_index - 1, target_index - 1, -1):
                tier = self.tiers[index]
                try:
                    filled = self._fill(tier, parsed, manifest, origin if current is None else current,
                                        watch if current is None else None)
                except TierFullError as exc:
                    last_error = exc
                    below = current.tier if current is not None else "the next tier"
                    log.warning("%s: tier %s cannot take it (%s); serving it from %s", parsed, tier.name,
                                exc, below)
                    notify("on_tier_full", uri=str(parsed), tier=tier.name, nbytes=manifest.total_size)
                    continue
                if current is not None:
                    current.release()
                current = filled
        except BaseException:
            if current is not None:
                current.release()
            raise
        if current is None:
            raise StorageError(f"{parsed}: no tier can hold this model ({manifest.total_size} bytes)",
                               uri=str(parsed)) from last_error
        return current

    def _fill(self, tier: Tier, parsed: ModelURI, manifest: Manifest, source: Origin | Pin,
              watch: FetchWatch | None = None) -> Pin:
        shown = str(parsed)
        slug, version = parsed.slug, manifest.version
        lock = tier.fetch_lock(slug, version)
        started = time.monotonic()
        try:
            lock.acquire(timeout=self.fetch_timeout)
        except filelock.Timeout:
            raise FetchTimeoutError(shown, tier.name, time.monotonic() - started,
                                    "another process on this node") from None
        try:
            existing = tier.pin(slug, version)
            if existing is not None:  # another process finished it while we waited
                notify("on_tier_hit", uri=shown, tier=tier.name, path=str(existing.path))
                return existing
            if tier.shared and self.lease is not None and isinstance(source, Origin):
                remaining = max(self.fetch_timeout - (time.monotonic() - started), 0.0)
                with self.lease.hold(f"{tier.name}:{slug}:{version}", timeout=remaining, uri=shown,
                                     tier=tier.name,
                                     ready=lambda: tier.lookup(slug, version) is not None) as mine:
                    if not mine:
                        existing = tier.pin(slug, version)
                        if existing is not None:
                            notify("on_tier_hit", uri=shown, tier=tier.name, path=str(existing.path))
                            return existing
                    return self._write(tier, parsed, manifest, source, watch)
            return self._write(tier, parsed, manifest, source, watch)
        finally:
            lock.release()

    def _write(self, tier: Tier, parsed: ModelURI, manifest: Manifest, source: Origin | Pin,
               watch: FetchWatch | None = None) -> Pin:
        shown = str(parsed)
        slug, version = parsed.slug, manifest.version
        writer: Source
        if isinstance(source, Pin):
            if source.entry is None:
                raise StorageError(f"{shown}: promotion source {source.path} is not a tier entry")
            writer = EntrySource(source.entry.path / FILES_DIR, source.entry.meta.checksums())
        else:
            writer = source
        partial = tier.prepare(slug, version, manifest)
        journal = Journal(partial / JOURNAL_NAME)
        nbytes = manifest.total_size
        notify("on_fetch_start", uri=shown, tier=tier.name, nbytes=nbytes)
        what = f"{shown} -> {tier.name}"
        progress = Progress(what, nbytes, enabled=self.show_progress)
        if watch is not None:
            watch.started(tier.name, partial / FILES_DIR, manifest)
            progress.listeners.append(watch.range_done)
        started = time.monotonic()
        try:
            checksums = writer.download(manifest, partial / FILES_DIR, journal=journal, progress=progress)
        except IntegrityError:
            tier.discard(partial)  # bad bytes or a dead version: nothing worth resuming
            raise
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                tier.discard(partial)
                raise TierFullError(tier.name, nbytes, 0, uri=shown) from exc
            raise
        finally:
            progress.close()
        meta = EntryMeta.from_manifest(manifest, checksums)
        tier.publish(slug, version, partial, meta)
        seconds = time.monotonic() - started
        log.info("%s: %d bytes in %.2fs (%.1f MiB/s)", what, nbytes, seconds,
                 nbytes / max(seconds, 1e-9) / 2**20)
        notify("on_fetch_finish", uri=shown, tier=tier.name, nbytes=nbytes, seconds=seconds)
        pinned = tier.pin(slug, version)
        if pinned is None:
            raise StorageError(f"{shown}: entry vanished from tier {tier.name!r} right after publication "
                               "(is something else deleting files there?)", tier=tier.name)
        return pinned

    # --- maintenance (the ``fastload cache`` commands) --------------------------------------------
    def _selected(self, tier: str | None) -> list[Tier]:
        return [self._tier(tier)] if tier else list(self.tiers)

    def ls(self, *, tier: str | None = None) -> list[EntryInfo]:
        return [EntryInfo(entry, in_use(t, entry)) for t in self._selected(tier) for entry in t.entries()]

    def rm(self, target: str, *, tier: str | None = None) -> tuple[list[Entry], list[Entry]]:
        """Remove the entries of a URI (every version) or of a ``slug[/version]`` key as ``cache ls`` shows.
        Returns (removed, skipped because in use)."""
        if is_uri(target):
            slug, version = parse_uri(target).slug, None
        else:
            slug, _, rest = target.partition("/")
            check_segment(slug, "model slug")
            version = check_segment(rest, "version") if rest else None
        removed: list[Entry] = []
        busy: list[Entry] = []
        for t in self._selected(tier):
            with t.tier_lock():
                for entry in t.entries(slug) if (t.root / slug).is_dir() else []:
                    if version is not None and entry.version != version:
                        continue
                    (removed if try_evict(t, entry) else busy).append(entry)
        return removed, busy

    def gc(self, *, tier: str | None = None) -> dict[str, int]:
        """Remove dead writers' partials, leftover trash and orphaned lock files, then evict LRU entries
        until each tier is within its budget. Returns counts by kind."""
        counts = {"partials": 0, "trash": 0, "locks": 0, "evicted": 0}
        for t in self._selected(tier):
            if not t.root.is_dir():
                continue
            with t.tier_lock():
                counts["partials"] += remove_stale_partials(t, keep=set())
                for trash in t.root.glob(".trash-*"):
                    t.discard(trash)
                    counts["trash"] += 1
                live = {(e.slug, e.version) for e in t.entries()}
                for lock_file in (t.root / ".locks").glob("use-*.lock"):
                    slug_version = lock_file.name[len("use-"):-len(".lock")]
                    slug, _, version = slug_version.rpartition("-")
                    if (slug, version) not in live:
                        lock_file.unlink(missing_ok=True)
                        counts["locks"] += 1
                capacity = t.capacity()
                if capacity is not None and t.usage() > capacity:
                    before = {(e.slug, e.version) for e in t.entries()}
                    try:
                        make_room(t, t.usage() - capacity, keep=set())
                    except TierFullError as exc:
                        log.warning("tier %s stays over budget: %s", t.name, exc)
                    counts["evicted"] += len(before - {(e.slug, e.version) for e in t.entries()})
        return counts


# --- the process-wide default store ------------------------------------------------------------------
_default_lock = threading.Lock()
_default: tuple[tuple[tuple[str, str], ...], TieredStore] | None = None


def default_store() -> TieredStore:
    """The store built from the environment; rebuilt when a ``FASTLOAD_*`` or ``AWS_*`` variable changes
    (tests and workers that set them after import get what they asked for)."""
    global _default
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("FASTLOAD_", "AWS_"))))
    with _default_lock:
        if _default is None or _default[0] != key:
            _default = (key, TieredStore.from_env())
        return _default[1]


__all__ = ["EntryInfo", "FetchWatch", "TieredStore", "default_store", "registered_origins"]
