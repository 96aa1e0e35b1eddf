"""``TieredStore``: resolve a model URI to the fastest tier holding it, fetching down the chain and
promoting on the way up, once per node.

The chain is explicit: a list of tiers, fastest first, plus the origins registered for URI schemes. A
``fetch`` looks for the model's current version (the origin's identity for every file) in the tiers; on a
miss it fills the target tier straight from the nearest holder (or the origin), so a cold fetch into RAM
never waits for a disk; the tiers in between are then written through from the published copy on a
thread of their own (writethrough.py). Filling one tier is always the same five steps: per-entry lock
(single flight on the node; plus a Redis lease for a shared tier), check again, reserve room and
preallocate, write and verify, fsync (durable tiers) and rename. A tier that cannot make room is skipped
with a warning and the model is served from the next tier down.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import filelock

from .._safefs import UnsafePath, open_file
from ..errors import PluginError
from ..plugins import collect, notify
from . import writethrough
from .base import (
    JOURNAL_NAME,
    Entry,
    Journal,
    Origin,
    Source,
    Tier,
    check_segment,
    parse_entry_key,
    pwrite_all,
    tier_for_path,
)
from .copy import EntrySource
from .errors import (
    OUT_OF_SPACE,
    BadURIError,
    FetchTimeoutError,
    IntegrityError,
    NotCachedError,
    OriginError,
    StorageError,
    TierFullError,
    UnsafeKeyError,
)
from .eviction import (
    Pin,
    drop_damaged,
    in_use,
    make_room,
    pin_entry,
    remove_orphan_lock,
    remove_stale_partials,
    shrink_to_budget,
    try_evict,
)
from .lease import RedisLease
from .local_disk import LocalDiskTier
from .meta import FILES_DIR, EntryMeta, Manifest, is_version_digest
from .peers import BUSY_PAUSE, Holders, PeerRegistry, PeerSettings, PeerSource
from .progress import DeferredRange, Mirror, Progress
from .settings import VERIFY_MODES, StorageSettings
from .shared_fs import SharedFsTier
from .shm import ShmTier
from .uri import ModelURI, confine, is_uri, parse_uri
from .verify import BLOCK_SIZE, BlockDigests, file_digests
from .writeback import EarlyWriteback

log = logging.getLogger("fastload.storage")

OriginFactory = Callable[[], Origin]
_DAMAGED_RETRIES = 2


class _DamagedSource(Exception):
    """A promotion found its source entry damaged and dropped it: fetch again from further down."""

    def __init__(self, error: IntegrityError) -> None:
        self.error = error
        super().__init__(str(error))


class FetchWatch(Protocol):
    """Told where a fetch from the origin writes and which byte ranges have landed (the streaming loader)."""

    def started(self, tier: str, files_dir: Path, manifest: Manifest) -> None: ...

    def range_done(self, name: str, start: int, end: int) -> None: ...

    # Optional: ``mirrors`` (file name -> progress.Mirror), private copies the origin may receive into, and
    # ``verified()``, called when a download into mirrors has verified, before the files are written from
    # them and the entry published (the reader may hand its tensors out from then on).


_SCHEME = re.compile(r"^[a-z][a-z0-9+.\-]*$")


def accept_scheme(scheme: object, factory: object) -> tuple[str, OriginFactory]:
    """The contract of ``register_storage_schemes``: ``register(scheme, factory)``, ``factory()`` an ``Origin``."""
    if not isinstance(scheme, str) or not _SCHEME.match(scheme.lower()):
        raise PluginError(f"register_storage_schemes got scheme {scheme!r}; a scheme is a str such as 's3'")
    if not callable(factory):
        raise PluginError(f"register_storage_schemes got factory {factory!r} for {scheme!r}; it must be "
                          "callable with no arguments and return a storage Origin")
    return scheme.lower(), factory


def registered_origins() -> dict[str, tuple[str, OriginFactory]]:
    """Scheme -> (plugin, factory), through the ``register_storage_schemes`` hook. Plugins are called the
    last registered first and the first claim of a scheme wins, so a third-party plugin may replace a
    built-in scheme."""
    found: dict[str, tuple[str, OriginFactory]] = {}
    for registration in collect("register_storage_schemes", accept_scheme):
        scheme, factory = registration.value
        found.setdefault(scheme, (registration.plugin, factory))
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
        verify: str = "size",
        peers: PeerSettings | None = None,
    ) -> None:
        """``tiers`` fastest first. ``origins`` maps schemes to origins; None means the registered ones.
        ``verify`` is how hard a cache hit is checked: ``size``, ``sample`` or ``full`` (see verify.py)."""
        if verify not in VERIFY_MODES:
            raise StorageError(f"verify={verify!r}: expected one of {', '.join(VERIFY_MODES)}")
        self.verify = verify
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
        self.peers = peers
        self._registry = PeerRegistry(peers.redis_url, ttl=peers.ttl, timeout=peers.timeout) if peers else None

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
        lease = RedisLease(settings.redis_url, ttl=settings.lease_ttl,
                           timeout=settings.redis_timeout) if settings.redis_url else None
        return cls(tiers, default_tier=default, fetch_timeout=settings.fetch_timeout, lease=lease,
                   offline=settings.offline, verify=settings.verify, peers=PeerSettings.from_env())

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
                plugin, factory = factories[scheme]
                origin = factory()
                if not isinstance(origin, Origin):
                    raise PluginError(f"the storage scheme {scheme}:// registered by plugin {plugin!r} built "
                                      f"{type(origin).__name__}, not a fastload_core.storage.Origin")
                self._origins[scheme] = origin
            return self._origins[scheme]

    # --- public API ------------------------------------------------------------------------------
    def fetch(self, uri: str | os.PathLike[str], *, tier: str | None = None,
              revision: str | None = None) -> Path:
        """Local path of the model in the fastest tier holding it (or in ``tier``): the file for a single
        object, a directory of its files for a prefix."""
        with self.pin(uri, tier=tier, revision=revision) as path:
            return path

    def pin(self, uri: str | os.PathLike[str], *, tier: str | None = None,
            revision: str | None = None, watch: FetchWatch | None = None, land: str | None = None,
            manifest: Manifest | None = None) -> Pin:
        """Like ``fetch``, but the entry stays marked in use (never evicted) until the pin is released.
        ``watch`` hears where a download from the origin lands and its progress (none on a hit). ``land``,
        with no ``tier``, is where a model found in no tier lands first (the default tier and the others below
        it are written through from there); a hit is still served from the tier that holds it, unpromoted. A
        streaming reader passes the fastest tier: it copies the bytes out as they land, and a download into
        RAM does not wait on a disk. A damaged
        entry met on the way (a hit that fails its checks, a promotion source whose bytes do not match their
        digests) is dropped and the model fetched again from further down. ``manifest``: what the caller
        resolved for ``uri`` a moment ago (``resolve``), used instead of asking the origin again: ``fastload
        serve`` resolves each key before it knows it has a miss, and a second HEAD per miss was a round trip
        on the miss's critical path. The download is still pinned to its ETag, so an object overwritten since
        fails the fetch rather than mixing versions."""
        if manifest is not None and revision is not None:
            raise StorageError("pin: pass a resolved manifest or a revision, not both")
        for attempt in range(_DAMAGED_RETRIES + 1):
            try:
                return self._pin(uri, tier=tier, revision=revision, watch=watch, land=land, resolved=manifest)
            except _DamagedSource as damaged:
                if attempt == _DAMAGED_RETRIES:
                    raise damaged.error from None
        raise AssertionError("unreachable")

    def _pin(self, uri: str | os.PathLike[str], *, tier: str | None, revision: str | None,
             watch: FetchWatch | None, land: str | None = None, resolved: Manifest | None = None) -> Pin:
        parsed = parse_uri(uri)
        target = self._tier(tier or self.default_tier)
        if parsed.bare and tier is None:
            if not os.path.exists(parsed.path):
                raise OriginError(parsed.path, "no such file or directory", code="NotFound")
            if os.path.isdir(parsed.path) and not any(files for _, _, files in os.walk(parsed.path)):
                raise OriginError(parsed.path, "directory is empty", code="NotFound")  # as file:// says
            return Pin(Path(parsed.path))
        origin = self.origin(parsed.scheme, uri=str(parsed))
        if resolved is not None and resolved.uri != str(parsed):
            raise StorageError(f"pin({str(parsed)!r}) was given the manifest of {resolved.uri!r}")
        manifest = resolved if resolved is not None else self._resolve(parsed, origin, revision)
        shown = str(parsed)
        target_index = self.tiers.index(target)
        scan = range(len(self.tiers)) if tier is None else range(target_index, len(self.tiers))
        source: Pin | None = None
        source_index = len(self.tiers)
        for index in scan:
            candidate = self.tiers[index]
            pinned = pin_entry(candidate, parsed.slug, manifest.version, verify=self.verify)
            if pinned is not None:
                notify("on_tier_hit", uri=shown, tier=candidate.name, path=str(pinned.path))
                if index <= target_index:
                    return pinned
                source, source_index = pinned, index
                break
            notify("on_tier_miss", uri=shown, tier=candidate.name)
        if source is None and tier is None and land is not None:  # in no tier: land where the caller wants it
            target = self._tier(land)
            target_index = self.tiers.index(target)
        if source is None or self.tiers[source_index].shared:  # no copy on this node: a peer's RAM first
            slower = [tier for tier in self.tiers[target_index + 1:source_index] if not tier.shared]
            peered = self._from_peers(parsed, manifest, origin, source, target, watch, slower)
            if peered is not None:
                return peered
        return self._fill_up(parsed, manifest, origin, source, source_index, target_index, watch)

    def resolve(self, uri: str | os.PathLike[str], *, revision: str | None = None) -> Manifest:
        """What ``fetch`` would fetch: the manifest of the model's current version (or of ``revision``), from
        one request to the origin, or none when a tier holds that revision or the store is offline. Fetches no
        bytes; raises as ``fetch`` would for a model that is not there."""
        parsed = parse_uri(uri)
        return self._resolve(parsed, self.origin(parsed.scheme, uri=str(parsed)), revision)

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
            cached = self._newest_cached(parsed, revision)
            if cached is None:
                held = "this model" if revision is None else f"its revision {revision}"
                raise NotCachedError(f"{parsed}: FASTLOAD_OFFLINE is set and no tier holds {held}", uri=str(parsed))
            return cached
        # A fastload version is this store's name for what it cached, never the origin's (an origin's own
        # revision, an S3 VersionId, goes to the origin): the origin is asked for its current version, which
        # serves only when it is that one. The adapters pin every worker to the version its node warmed, and
        # another one, taken silently, would mix them.
        ours = revision is not None and is_version_digest(revision)
        try:
            manifest = origin.resolve(parsed, None if ours else revision)
        except OriginError as exc:
            cached = self._newest_cached(parsed, revision) if exc.code == "Unreachable" else None
            if cached is None:
                raise
            log.warning("%s: origin unreachable (%s); serving the newest cached version %s", parsed,
                        exc.problem, cached.version)
            return cached
        if ours and manifest.version != revision:
            raise NotCachedError(f"{parsed}: no tier holds version {revision} any more, and the origin has only "
                                 f"version {manifest.version}; fetch without a revision to take that one",
                                 uri=str(parsed))
        return manifest

    def _newest_cached(self, parsed: ModelURI, revision: str | None = None) -> Manifest | None:
        """The newest cached version, or with ``revision`` (an origin's own, such as an S3 VersionId) the
        newest whose files are all at that revision."""
        entries = [e for tier in self.tiers for e in tier.entries(parsed.slug)
                   if revision is None or all(f.version_id == revision for f in e.meta.files)]
        if not entries:
            return None
        return max(entries, key=lambda e: e.meta.created).meta.as_manifest()

    # --- peers (see peers.py) ----------------------------------------------------------------------
    def _from_peers(self, parsed: ModelURI, manifest: Manifest, origin: Origin, source: Pin | None,
                    target: Tier, watch: FetchWatch | None, slower: Sequence[Tier]) -> Pin | None:
        """Fill ``target`` straight from the first peer holding this exact version, falling back within the
        same fill to the usual source (``source``, else the origin), and write through to this node's
        ``slower`` tiers as any fill does. None when no peer is known or the tier is full (the usual chain
        then decides what to do)."""
        if self._registry is None or self.peers is None or self.offline:
            return None
        holders = self._registry.holders(parsed.slug, manifest.version, exclude=self.peers.advertise)
        if not holders:
            return None
        fallback: Source = origin
        if source is not None and source.entry is not None:
            fallback = EntrySource.of(source.entry)
        peers = PeerSource(self.peers, holders, parsed.slug, manifest.version, fallback)
        if source is None and self.lease is not None and any(t.shared for t in self.tiers):
            # Falling back to the origin would skip the lease: when every holder is busy, let the usual chain
            # wait on the lease for a holder with a free slot or the shared copy (_fill_leased).
            if not peers.connect(manifest):
                return None
        else:
            peers.start(manifest)  # the first peer's client and metadata, while _fill locks and preallocates
        try:
            pinned = self._fill(target, parsed, manifest, peers, watch, slower)
        except TierFullError:
            return None  # ``source`` is still held: the usual chain serves from it
        except IntegrityError as exc:  # peers' bad bytes never get here: the shared entry failed its digests
            if source is not None and source.entry is not None and source.tier in self._by_name:
                source.release()
                drop_damaged(self._by_name[source.tier], source.entry, exc.problem)
                raise _DamagedSource(exc) from exc
            raise
        except BaseException:
            if source is not None:
                source.release()
            raise
        finally:
            # A peer connection the download never took up (the tier was full, or another process on this node
            # filled the entry while this one waited for its lock) frees that peer's upload slot now
            peers.close()
        if source is not None:
            source.release()
        return pinned

    # --- filling ---------------------------------------------------------------------------------
    def _fill_up(self, parsed: ModelURI, manifest: Manifest, origin: Origin, source: Pin | None,
                 source_index: int, target_index: int, watch: FetchWatch | None = None) -> Pin:
        """Land the model in the target tier straight from its source (the origin, or the nearest tier
        holding it); the tiers in between are written through from that copy, off the critical path. A
        tier that cannot make room is skipped with a warning and the next one down takes its place."""
        filled: Pin | None = None
        last_error: TierFullError | None = None
        try:
            for index in range(target_index, source_index):
                tier = self.tiers[index]
                try:
                    filled = self._fill(tier, parsed, manifest, origin if source is None else source,
                                        watch if source is None else None, self.tiers[index + 1:source_index])
                    break
                except TierFullError as exc:
                    last_error = exc
                    log.warning("%s: %s; serving it from tier %s instead", parsed, exc,
                                self.tiers[index + 1].name if index + 1 < len(self.tiers) else "none")
                    notify("on_tier_full", uri=str(parsed), tier=tier.name, nbytes=manifest.total_size)
        except BaseException:
            if source is not None:
                source.release()
            raise
        if filled is None and source is None:
            raise StorageError(f"{parsed}: no tier can hold this model ({manifest.total_size} bytes)",
                               uri=str(parsed)) from last_error
        if filled is None:
            assert source is not None
            return source
        if source is not None:
            source.release()
        return filled

    def _fill(self, tier: Tier, parsed: ModelURI, manifest: Manifest, source: Origin | Pin,
              watch: FetchWatch | None = None, slower: Sequence[Tier] = (), *, quiet: bool = False) -> Pin:
        """Fill one tier under its per-entry lock, then start the write-through into ``slower``."""
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
            existing = pin_entry(tier, slug, version, verify=self.verify)
            if existing is not None:  # another process finished it while we waited
                notify("on_tier_hit", uri=shown, tier=tier.name, path=str(existing.path))
                return existing
            if isinstance(source, Origin) and self.lease is not None:
                shared = tier if tier.shared else next((t for t in slower if t.shared), None)
                if shared is not None:
                    remaining = max(self.fetch_timeout - (time.monotonic() - started), 0.0)
                    return self._fill_leased(tier, shared, parsed, manifest, source, watch, slower, remaining)
            pinned = self._write(tier, parsed, manifest, source, watch, quiet=quiet)
            self._write_through(pinned, parsed, manifest, slower)
            return pinned
        finally:
            lock.release()

    def _fill_leased(self, tier: Tier, shared: Tier, parsed: ModelURI, manifest: Manifest, origin: Origin,
                     watch: FetchWatch | None, slower: Sequence[Tier], timeout: float) -> Pin:
        """One origin download per cluster: the node holding the Redis lease on the shared tier's entry
        downloads into ``tier`` and keeps the lease until its write-through has published the shared copy;
        the others wait for that copy and read it instead of the origin. With peers, a waiting node stops
        waiting as soon as a node advertises the entry in its RAM (the holder's fill publishes there first,
        seconds before the shared copy) and pulls it from that peer. A peer serves a few fills at once
        (``fastload serve --max-uploads``); when every holder refuses, the node goes back to waiting, checking
        the registry and the shared copy, and tries again after ``BUSY_PAUSE``: each fill that completes
        advertises one more holder, so the fleet's fill spreads as a tree, and the origin is read once. Which
        holders are worth asking (live, free) is ``peers.Holders``'s business; this method keeps the lease."""
        shown = str(parsed)
        slug, version = parsed.slug, manifest.version
        assert self.lease is not None
        deadline = time.monotonic() + timeout
        peers = Holders(self._registry, self.peers, slug, version)

        def ready() -> bool:
            holders = peers.live()
            return bool(peers.free(holders)) or (not holders and shared.lookup(slug, version) is not None)

        while True:
            lease = ExitStack()
            mine = lease.enter_context(self.lease.hold(
                _lease_key(shared, slug, version), timeout=max(deadline - time.monotonic(), 0.0), uri=shown,
                tier=shared.name, ready=ready))
            try:
                holders = peers.live()
                if free := peers.free(holders):
                    lease.close()
                    source = peers.source(free, origin)  # the origin if every one fails mid-transfer
                    if not source.connect(manifest):
                        peers.refused(source)
                        continue
                    pinned = self._write(tier, parsed, manifest, source, watch)
                    self._write_through(pinned, parsed, manifest, [t for t in slower if not t.shared])
                    return pinned
                if holders:
                    # Every holder is busy serving others: wait for a slot (each fill that completes adds a
                    # holder, so the fleet fills as a tree), not the shared copy, whose one mount every
                    # waiting node would share, nor the origin.
                    lease.close()
                    if time.monotonic() > deadline:
                        raise FetchTimeoutError(shown, shared.name, timeout, "busy peers")
                    time.sleep(BUSY_PAUSE / 2)
                    continue
                copy = pin_entry(shared, slug, version, verify=self.verify)
                if copy is not None:
                    lease.close()
                    notify("on_tier_hit", uri=shown, tier=shared.name, path=str(copy.path))
                    if shared is tier:
                        return copy
                    try:
                        pinned = self._write(tier, parsed, manifest, copy)
                    finally:
                        copy.release()
                    self._write_through(pinned, parsed, manifest, slower[:list(slower).index(shared)])
                    return pinned
                if not mine:  # what made this node stop waiting is gone again (a claim lapsed): wait on
                    lease.close()
                    continue
                pinned = self._write(tier, parsed, manifest, origin, watch)
            except BaseException:
                lease.close()
                raise
            if shared is tier:
                lease.close()
            self._write_through(pinned, parsed, manifest, slower, lease=lease)
            return pinned

    def _write_through(self, pinned: Pin, parsed: ModelURI, manifest: Manifest, tiers: Sequence[Tier], *,
                       lease: ExitStack | None = None) -> None:
        """Copy the entry just published (``pinned``) into ``tiers`` on a thread of its own (see
        writethrough.py), shared tiers first: other nodes may be waiting for that copy. ``lease``, when
        given, is released once the shared copy is published (or has failed). The thread keeps this
        process's priority while it writes a shared tier and drops to ``writethrough.NICE`` only for the
        tiers after it, the copies nobody waits for."""
        lease = lease or ExitStack()
        tier = self._by_name.get(pinned.tier or "")
        source = pin_entry(tier, parsed.slug, manifest.version) if tiers and tier is not None else None
        if source is None:  # nothing to do (or the entry is already gone: nothing to copy from)
            lease.close()
            return
        order = sorted(tiers, key=lambda t: not t.shared)

        def run(job: writethrough.WriteThrough) -> None:
            try:
                for target in order:
                    if not target.shared:  # the shared copies (first) are done: the rest waits for no one
                        writethrough.lower_priority()
                    try:
                        self._fill(target, parsed, manifest, source, quiet=True).release()
                        job.published.append(target.name)
                    except TierFullError as exc:
                        log.warning("%s: write-through skipped tier %s (%s)", parsed, target.name, exc)
                        notify("on_tier_full", uri=str(parsed), tier=target.name, nbytes=manifest.total_size)
                        job.errors[target.name] = exc
                    except _DamagedSource as damaged:  # the copy we published is damaged, and now dropped
                        log.warning("%s: write-through to %s stopped: %s", parsed, target.name, damaged.error)
                        job.errors[target.name] = damaged.error
                        return
                    except Exception as exc:
                        log.warning("%s: write-through to %s failed (the copy in %s serves meanwhile): %s",
                                    parsed, target.name, source.tier, exc)
                        job.errors[target.name] = exc
                    finally:
                        if target.shared:
                            lease.close()
            finally:
                lease.close()
                source.release()
                seconds = time.monotonic() - job.started
                log.info("%s: write-through from %s to %s done in %.2fs", parsed, source.tier,
                         ", ".join(job.published) or "no tier", seconds)

        writethrough.start(str(parsed), tuple(t.name for t in order), run,
                           waited_on=any(t.shared for t in order))

    def _write(self, tier: Tier, parsed: ModelURI, manifest: Manifest, source: Origin | Pin,
               watch: FetchWatch | None = None, *, quiet: bool = False) -> Pin:
        shown = str(parsed)
        slug, version = parsed.slug, manifest.version
        writer: Source
        if isinstance(source, Pin):
            if source.entry is None:
                raise StorageError(f"{shown}: promotion source {source.path} is not a tier entry")
            writer = EntrySource.of(source.entry)
        else:
            writer = source
        partial = tier.prepare(slug, version, manifest, make_room=lambda need: make_room(
            tier, need, keep={(slug, version)}, uri=manifest.uri))
        journal = Journal(partial / JOURNAL_NAME)
        nbytes = manifest.total_size
        what = f"{shown} -> {tier.name}"
        notify("on_fetch_start", uri=shown, tier=tier.name, nbytes=nbytes)
        started = time.monotonic()
        try:  # every start is paired with one finish, carrying the error when there is one
            progress = Progress(what, nbytes, enabled=self.show_progress and not quiet)
            if tier.durable and EarlyWriteback.available():  # the publishing fsync finds the bytes mostly written
                progress.listeners.append(EarlyWriteback(partial / FILES_DIR))
            mirrors: dict[str, Mirror] = {}
            handed_out = False  # a streamed load's tensors are out: this fill is only the cache copy now
            if watch is not None:
                watch.started(tier.name, partial / FILES_DIR, manifest)
                progress.listeners.append(watch.range_done)
                mirrors = dict(getattr(watch, "mirrors", None) or {})
                progress.mirrors.update(mirrors)
            try:
                try:
                    checksums = writer.download(manifest, partial / FILES_DIR, journal=journal, progress=progress)
                except BaseException as exc:
                    if mirrors and not isinstance(exc, IntegrityError):  # keep what arrived, for the resume
                        _keep_received(partial / FILES_DIR, journal, mirrors, shown)
                    raise
                if mirrors:
                    # Verified: the reader may hand the tensors out now, while the file is written from the
                    # mirror (progress.Mirror says why then) and the entry published.
                    verified = getattr(watch, "verified", None)
                    if verified is not None:
                        verified()
                        handed_out = True
                    _write_mirrors(partial / FILES_DIR, journal, mirrors, shown)
            except IntegrityError as exc:
                tier.discard(partial)  # bad bytes or a dead version: nothing worth resuming
                if isinstance(source, Pin) and source.entry is not None and source.tier in self._by_name:
                    # A promotion copies a published entry: bytes that fail its digests mean the source is
                    # damaged. Drop it, or every later promotion fails the same way; the retry fetches afresh.
                    drop_damaged(self._by_name[source.tier], source.entry, exc.problem)
                    raise _DamagedSource(exc) from exc
                raise
            except OSError as exc:
                if exc.errno in OUT_OF_SPACE:
                    tier.discard(partial)
                    if handed_out:  # not the next tier: it would download the whole model again, for a cache copy
                        raise StorageError(f"{shown}: tier {tier.name!r} filled up while the streamed model's cache "
                                           "copy was written; the model is loaded, and the next start downloads it "
                                           "again", tier=tier.name) from exc
                    raise TierFullError(tier.name, nbytes, 0, uri=shown, filesystem_full=True) from exc
                raise
            finally:
                progress.close()
            meta = EntryMeta.from_manifest(manifest, checksums,
                                           digests=self._digests(writer, manifest, journal, partial / FILES_DIR))
            tier.publish(slug, version, partial, meta)
            if not tier.shared and self._registry is not None and self.peers is not None and self.peers.advertise:
                # A holder at once, not at fastload serve's next listing: at a fleet's cold start each finished
                # fill is the next node's source, so the tree grows as fast as fills complete.
                # Skipped while the registry is paused after a failure: this fetch does not wait on its timeout.
                self._registry.advertise(self.peers.advertise, [(slug, version)], in_outage=False)
        except BaseException as exc:
            notify("on_fetch_finish", uri=shown, tier=tier.name, nbytes=nbytes,
                   seconds=time.monotonic() - started, error=exc)
            raise
        seconds = time.monotonic() - started
        log.info("%s: %d bytes in %.2fs (%.1f MiB/s)", what, nbytes, seconds,
                 nbytes / max(seconds, 1e-9) / 2**20)
        notify("on_fetch_finish", uri=shown, tier=tier.name, nbytes=nbytes, seconds=seconds, error=None)
        pinned = pin_entry(tier, slug, version)  # sizes only: the bytes were verified a moment ago
        if pinned is None:
            raise StorageError(f"{shown}: entry vanished from tier {tier.name!r} right after publication "
                               "(is something else deleting files there?)", tier=tier.name)
        return pinned

    def _digests(self, writer: Source, manifest: Manifest, journal: Journal,
                 files_dir: Path) -> dict[str, tuple[int, str]]:
        """Block digests for the new entry: a promotion keeps those it verified in the copy; an origin that
        hashed ranges as they arrived left them in the journal; anything else is read back and digested."""
        digests = dict(getattr(writer, "digests", None) or {})  # an EntrySource's, or a peer's
        for item in manifest.files:
            if item.name not in digests and (joined := journal.file_digests(item.name, item.size)):
                digests[item.name] = joined
        missing = [item.name for item in manifest.files if item.name not in digests]
        digests.update(self._digest(files_dir, missing))
        return digests

    @staticmethod
    def _digest(files_dir: Path, names: list[str]) -> dict[str, tuple[int, str]]:
        """Block digests of freshly written files, read back while they are still in the page cache, so
        later hits (FASTLOAD_VERIFY=sample|full) and promotions can check them (for sources that did not
        compute them on the way)."""
        if not names:
            return {}
        workers = max(1, min(4, len(names), os.cpu_count() or 1))
        with ThreadPoolExecutor(workers, thread_name_prefix="fastload-digest") as pool:
            found = pool.map(lambda name: (BLOCK_SIZE, file_digests(files_dir / name)), names)
            return dict(zip(names, found, strict=True))

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
            slug, version = parse_entry_key(target)
        removed: list[Entry] = []
        busy: list[Entry] = []
        for t in self._selected(tier):
            with t.tier_lock():
                for entry in t.entries(slug) if (t.root / slug).is_dir() else []:
                    if version is not None and entry.version != version:
                        continue
                    (removed if try_evict(t, entry) else busy).append(entry)
        return removed, busy

    def _leased(self, tier: Tier) -> Callable[[str, str], bool] | None:
        """Whether a node holds the cross-node lease on filling ``tier`` with a version (shared tiers, Redis)."""
        lease = self.lease
        if lease is None or not tier.shared:
            return None
        return lambda slug, version: lease.taken(_lease_key(tier, slug, version))

    def gc(self, *, tier: str | None = None) -> dict[str, int]:
        """Remove dead writers' partials, leftover trash and orphaned lock files, then evict LRU entries
        until each tier is within its budget. Returns counts by kind."""
        counts = {"partials": 0, "trash": 0, "locks": 0, "evicted": 0}
        for t in self._selected(tier):
            if not t.root.is_dir():
                continue
            with t.tier_lock():
                # Another host's download idle for longer than any fetch waits for one has no writer left,
                # unless a node holds its lease (one resuming it after a reboot).
                counts["partials"] += remove_stale_partials(t, keep=set(), foreign_idle=self.fetch_timeout,
                                                            leased=self._leased(t))
                for trash in t.trash():
                    t.discard(trash)
                    counts["trash"] += 1
                live = {(e.slug, e.version) for e in t.entries()}
                for slug, version, lock_file in t.use_locks():
                    if (slug, version) not in live and remove_orphan_lock(t, lock_file, slug, version):
                        counts["locks"] += 1
                counts["evicted"] += shrink_to_budget(t)
        return counts


def _lease_key(tier: Tier, slug: str, version: str) -> str:
    """The Redis lease a node holds while it fills ``tier`` (a shared one) with this version."""
    return f"{tier.name}:{slug}:{version}"


# --- files received into mirrors (progress.Mirror) ------------------------------------------------------
_MIRROR_CHUNK = 1024 * 1024
_local = threading.local()


def _write_mirrors(files_dir: Path, journal: Journal, mirrors: dict[str, Mirror], uri: str) -> None:
    """Write each range an origin received into a mirror and deferred into its file, check what the file now
    holds against the block digests computed as the range arrived, and only then journal it.

    Why the check: the mirror is the memory of tensors the reader may already have handed out (this runs
    after the download verified), and a caller may write to them. The file must get the verified bytes or
    nothing: a range that no longer matches is an ``IntegrityError``, and the store drops the partial entry
    instead of publishing it (the next start downloads again). Each 1 MiB is read back right after it is
    written, while it is still in the CPU's cache, so the check costs XXH3 and a cache-hot copy. The ranges
    are written by a few threads at once: the copy into tmpfs is mostly the kernel's page allocation, which
    spreads over the cores, and a process that exits right after its load waits for it (writethrough)."""
    fds: dict[str, int] = {}
    jobs: list[tuple[str, Mirror, DeferredRange]] = []
    try:
        for name, mirror in mirrors.items():
            ranges = mirror.take_deferred()
            if not ranges:
                continue
            try:
                fds[name] = open_file(confine(files_dir, name, uri=uri), os.O_RDWR)
            except UnsafePath as exc:
                raise UnsafeKeyError(exc.path, exc.problem, uri=uri) from None
            jobs.extend((name, mirror, deferred) for deferred in ranges)

        def one(job: tuple[str, Mirror, DeferredRange]) -> None:
            name, mirror, deferred = job
            fd = fds[name]
            buffer: memoryview | None = getattr(_local, "buffer", None)
            if buffer is None:
                buffer = _local.buffer = memoryview(bytearray(_MIRROR_CHUNK))
            block_size, expected = deferred.blocks
            blocks = BlockDigests(block_size)
            for offset in range(deferred.start, deferred.end, _MIRROR_CHUNK):
                length = min(_MIRROR_CHUNK, deferred.end - offset)
                pwrite_all(fd, mirror.view[offset:offset + length], offset)
                back = buffer[:length]
                if os.preadv(fd, [back], offset) != length:
                    raise IntegrityError(uri, name, f"short read back at byte {offset} of the cache copy")
                blocks.update(back)
            if blocks.hexdigest() != expected:
                raise IntegrityError(uri, name, f"bytes {deferred.start}-{deferred.end} changed in memory before "
                                                "the cache copy was written from them (were the streamed tensors "
                                                "modified at once?)")
            journal.record(name, deferred.start, deferred.end, deferred.digest, deferred.blocks)

        if jobs:
            workers = max(1, min(4, os.cpu_count() or 1, len(jobs)))
            pool = ThreadPoolExecutor(workers, thread_name_prefix="fastload-mirror-write")
            try:
                for future in [pool.submit(one, job) for job in jobs]:
                    future.result()
            finally:  # after a failure the partial is dropped: the ranges not started yet need not be written
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        for fd in fds.values():
            os.close(fd)


def _keep_received(files_dir: Path, journal: Journal, mirrors: dict[str, Mirror], uri: str) -> None:
    """A download that failed still keeps the ranges it received whole: they go to the file and the journal,
    so the retry resumes after them as it would have without a mirror. Best effort: the fetch's own error is
    the one raised."""
    try:
        _write_mirrors(files_dir, journal, mirrors, uri)
    except Exception as exc:
        log.debug("%s: the ranges received before the failure were not kept: %r", uri, exc)


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
