"""Peer fetching: a cold node pulls a model from a neighbour's RAM instead of the shared mount or S3.

Nodes that run ``fastload serve --advertise HOST:PORT`` record in Redis which entries (slug and version)
they hold: one sorted set per entry, ``fastload:peers:<slug>/<version>``, members the advertised
addresses, scores the time each claim lapses. A node renews its claims well inside the TTL and removes
them when it evicts, so a dead node disappears on its own. Readers ignore lapsed members.

A cold node asks for the holders of the exact version it resolved and downloads from the first one that
answers, through the peer's S3-compatible endpoint with ``S3Origin``'s own parallel ranged GETs (a peer is
an S3 endpoint), in ranges of ``FASTLOAD_PEER_PART_SIZE`` (64 MiB: a request costs both ends a few
milliseconds of CPU, which on a node that serves and fetches on the same few cores is time taken from the
bytes). While the store locks the entry and prepares the destination, the first peer's client is built
and its metadata fetched and checked on a thread of their own (``PeerSource.start``). Each peer range is
checked against the per-block XXH3 digests the peer recorded when it downloaded the model, as soon as it lands; the
digests come from the peer's metadata, whose version and ETags must match what this node resolved from the
origin itself. A peer that refuses the connection, answers slowly (``FASTLOAD_PEER_TIMEOUT`` seconds per
request) or sends bytes that do not match is skipped for the next one, and after the last one the fetch
continues from the usual source, overwriting every range, so nothing the peer sent survives unverified.

A node serves at most ``fastload serve --max-uploads`` fills at once (2 by default), so that a fleet's cold
start forms a tree rather than every node pulling from the first holder. Every request of one fill carries
the fill's id in ``FILL_HEADER``; a peer with no free slot answers the fill's first request with S3's
throttling reply (503 SlowDown), and the fill tries the next holder. ``PeerSource.connect`` does that before
anything is written, so that a node waiting on the shared mount's lease can go back to waiting when every
holder is busy, instead of going to the origin; once a fill is over it says so (``FILL_END_HEADER``), freeing
its slot at once.

Peer requests use the reserved bucket name ``fastload..peer`` (two adjacent dots: no S3 bucket can have
it), keys ``<slug>/<version>/meta.json`` and ``<slug>/<version>/files/<name>``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from .._safefs import open_file
from .base import Journal, Origin, Source
from .errors import IntegrityError, StorageError
from .meta import Checksums, EntryMeta, Manifest, RemoteFile
from .progress import Progress
from .settings import S3Settings, parse_size
from .uri import ModelURI, redact
from .verify import BLOCK_SIZE, DIGEST_CHARS

log = logging.getLogger("fastload.storage.peers")

ACCESS_KEY_VARIABLE = "FASTLOAD_SERVE_ACCESS_KEY_ID"  # the cluster's credentials for ``fastload serve``
SECRET_KEY_VARIABLE = "FASTLOAD_SERVE_SECRET_ACCESS_KEY"
PEER_BUCKET = "fastload..peer"
KEY_PREFIX = "fastload:peers:"
FILL_HEADER = "x-fastload-fill"  # the id of the fill a peer request belongs to: a peer limits fills, not requests
FILL_END_HEADER = "x-fastload-fill-end"  # on the request that ends a fill: its slot is free at once
_RETRY_AFTER = 30.0  # seconds the registry is left alone after an outage
BUSY_PAUSE = 0.5  # seconds a lease waiter leaves a busy peer alone before asking it again


class PeerBusy(StorageError):
    """The peer serves as many fills as it allows (it answered 503 SlowDown): try another holder, or wait."""


def peer_key(slug: str, version: str, name: str | None = None) -> str:
    """The object key a peer serves an entry's metadata (``name`` None) or one of its files under."""
    return f"{slug}/{version}/" + ("meta.json" if name is None else f"files/{name}")


@dataclass(frozen=True)
class PeerSettings:
    redis_url: str
    access_key: str
    secret_key: str
    timeout: float = 2.0  # seconds a peer may take to connect or to answer one read
    ttl: float = 30.0  # seconds a claim lives unless renewed
    concurrency: int = 16  # connections per peer client (the download's own parallelism is FASTLOAD_S3_CONCURRENCY)
    advertise: str | None = None  # this node's own address (``fastload serve --advertise``): never its own peer
    part_size: int = 64 * 1024 * 1024  # bytes per ranged GET, rounded down to whole digest blocks

    @classmethod
    def from_env(cls) -> PeerSettings | None:
        """Peer fetching is on where Redis and the serve credentials are configured (and not turned off
        with ``FASTLOAD_PEERS=off``)."""
        url = os.environ.get("FASTLOAD_REDIS_URL")
        key, secret = os.environ.get(ACCESS_KEY_VARIABLE), os.environ.get(SECRET_KEY_VARIABLE)
        if os.environ.get("FASTLOAD_PEERS", "").strip().lower() in ("0", "off", "no", "false"):
            return None
        if not (url and key and secret):
            return None
        try:
            timeout = float(os.environ.get("FASTLOAD_PEER_TIMEOUT") or 2.0)
            ttl = float(os.environ.get("FASTLOAD_PEER_TTL") or 30.0)
        except ValueError:
            raise StorageError("FASTLOAD_PEER_TIMEOUT and FASTLOAD_PEER_TTL are numbers of seconds") from None
        if timeout <= 0 or ttl <= 0:
            raise StorageError("FASTLOAD_PEER_TIMEOUT and FASTLOAD_PEER_TTL must be positive")
        part = parse_size(os.environ.get("FASTLOAD_PEER_PART_SIZE") or "64MiB", variable="FASTLOAD_PEER_PART_SIZE")
        if not isinstance(part, int) or part < 64 * 1024:
            raise StorageError("FASTLOAD_PEER_PART_SIZE must be a byte size of at least 64KiB, such as 64MiB")
        advertise = os.environ.get("FASTLOAD_PEER_ADVERTISE", "").strip() or None
        if advertise is not None:
            host, _, port = advertise.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
                raise StorageError(f"FASTLOAD_PEER_ADVERTISE={advertise!r}: expected HOST:PORT of this node's "
                                   "fastload serve --advertise, such as 10.0.0.5:9000")
        return cls(url, key, secret, timeout=timeout, ttl=ttl, part_size=part, advertise=advertise)


class PeerRegistry:
    """Who holds which entry, in Redis. An outage never fails a fetch: it reads as "no peers"."""

    def __init__(self, url: str, *, ttl: float = 30.0, timeout: float = 2.0) -> None:
        try:
            import redis
        except ImportError:
            raise StorageError("peer fetching needs the redis package; install fastload[redis]") from None
        self.url = url
        self.ttl = ttl
        self._client: Any = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        self._unavailable_until = 0.0

    def close(self) -> None:
        self._client.close()

    def _call(self, what: str, default: Any, function: Any, *args: Any, in_outage: bool = False) -> Any:
        """``function(*args)``, or ``default`` during an outage. A fetch's calls skip the registry for a while
        after a failure, so the fetch does not pay the timeout on every call; ``in_outage`` calls are tried
        all the same: the advertiser's claims, off any fetch's path, since a claim skipped for longer than its
        TTL lapses, and one blip would take the node out of every holder list until its next renewal."""
        if not in_outage and time.monotonic() < self._unavailable_until:
            return default
        try:
            result = function(*args)
            self._unavailable_until = 0.0  # back: lookups need not wait out the rest of the pause
            return result
        except Exception as exc:  # redis-py's connection and timeout errors: an outage
            self._unavailable_until = time.monotonic() + _RETRY_AFTER
            log.warning("peer registry at %s unavailable while trying to %s (%s: %s); going on without peers "
                        "for %.0fs", redact(self.url), what, type(exc).__name__, exc, _RETRY_AFTER)
            return default

    def advertise(self, address: str, entries: Iterable[tuple[str, str]], *, in_outage: bool = True) -> bool:
        """Claim (or renew the claim) that ``address`` holds each ``(slug, version)`` for one TTL. False when
        the registry could not be reached (logged). ``in_outage=False``: skipped while the registry is
        paused after a failure (a fetch's own claim)."""
        def run() -> bool:
            expires = time.time() + self.ttl
            pipe = self._client.pipeline(transaction=False)
            for slug, version in entries:
                key = KEY_PREFIX + f"{slug}/{version}"
                pipe.zadd(key, {address: expires})
                pipe.expire(key, max(1, int(self.ttl * 2)))
            pipe.execute()
            return True

        return bool(self._call("advertise", False, run, in_outage=in_outage))

    def withdraw(self, address: str, entries: Iterable[tuple[str, str]]) -> bool:
        """End ``address``'s claims on the entries; False when the registry could not be reached (logged)."""
        def run() -> bool:
            pipe = self._client.pipeline(transaction=False)
            for slug, version in entries:
                pipe.zrem(KEY_PREFIX + f"{slug}/{version}", address)
            pipe.execute()
            return True

        return bool(self._call("withdraw", False, run, in_outage=True))

    def holders(self, slug: str, version: str, *, exclude: str | None = None) -> list[str]:
        """Addresses whose claim on the entry is live, the most recently renewed first."""
        found = self._call("look up peers", [], self._client.zrevrangebyscore, KEY_PREFIX + f"{slug}/{version}",
                           "+inf", time.time())
        addresses = [item.decode() if isinstance(item, bytes) else str(item) for item in found]
        return [address for address in addresses if address != exclude]


class Holders:
    """The holders of one entry as a node waiting on the shared tier's lease sees them, across its tries:
    ``live`` ones (claimed in the registry, and not failed by this node lately) and, of those, ``free`` ones
    (not refused this node's fill lately). A holder that refused a fill (every upload slot taken) is asked
    again after ``BUSY_PAUSE``: its slots free as fills end. One that failed (refused the connection, timed
    out, sent a bad version) is left alone until its claim would have lapsed: if it is alive it renews the
    claim, and a dead one drops out of the registry by then anyway."""

    def __init__(self, registry: PeerRegistry | None, settings: PeerSettings | None, slug: str,
                 version: str) -> None:
        self.registry = registry
        self.settings = settings
        self.slug = slug
        self.version = version
        self._busy: dict[str, float] = {}  # address: monotonic time until which it is left alone
        self._dead: dict[str, float] = {}

    def live(self) -> list[str]:
        if self.registry is None or self.settings is None:
            return []
        now = time.monotonic()
        return [address for address in self.registry.holders(self.slug, self.version, exclude=self.settings.advertise)
                if self._dead.get(address, 0.0) <= now]

    def free(self, holders: list[str]) -> list[str]:
        now = time.monotonic()
        return [address for address in holders if self._busy.get(address, 0.0) <= now]

    def source(self, holders: list[str], fallback: Source) -> PeerSource:
        """A fill's source over ``holders`` (the free ones), then ``fallback``."""
        if self.settings is None:
            raise StorageError("peer fetching is not configured")
        return PeerSource(self.settings, holders, self.slug, self.version, fallback)

    def refused(self, source: PeerSource) -> None:
        """Note what ``source.connect`` met when no holder took the fill: busy ones, and failed ones."""
        now = time.monotonic()
        self._busy.update({address: now + BUSY_PAUSE for address in source.busy})
        self._dead.update({address: now + source.settings.ttl for address in source.peers
                           if address not in source.busy})


def fill_client(address: str, settings: PeerSettings, fill: str, ending: threading.Event) -> Any:
    """A client for one fill from one peer: every request carries the fill's id (signed, like any header), and
    once ``ending`` is set, the end marker too. Its own client, since the id differs per fill (built from the
    shared service model, a client costs about 15 ms). No botocore retries: a busy peer's SlowDown is an
    answer, not a fault, and the ranged reads retry on their own (S3Origin)."""
    from botocore.config import Config

    from .aws import new_session

    client = new_session().client(
        "s3", endpoint_url=f"http://{address}", region_name="us-east-1",
        aws_access_key_id=settings.access_key, aws_secret_access_key=settings.secret_key,
        config=Config(connect_timeout=settings.timeout, read_timeout=settings.timeout,
                      retries={"mode": "standard", "max_attempts": 1},
                      max_pool_connections=settings.concurrency + 4, s3={"addressing_style": "path"}))

    def mark(request: Any, **kwargs: Any) -> None:
        request.headers[FILL_HEADER] = fill
        if ending.is_set():
            request.headers[FILL_END_HEADER] = "1"

    client.meta.events.register("before-sign.s3", mark)
    return client


def _is_busy(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and (exc.response.get("Error", {}).get("Code") == "SlowDown" or
                                             exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 503)


class _MemoryJournal(Journal):
    """A journal that never touches the disk: what a peer wrote must not be resumed by the fallback."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.done = {}
        self.digests = {}
        self.path = Path(os.devnull)

    def record(self, name: str, start: int, end: int, md5: str | None,
               digests: tuple[int, str] | None = None) -> None:
        with self._lock:
            self.done[(name, start, end)] = md5
            if digests is not None:
                self.digests[(name, start, end)] = digests


class _CheckedProgress(Progress):
    """Checks each range against the peer's block digests the moment it lands, in the worker that wrote
    it, before anyone downstream (the streaming loader) hears of it."""

    def __init__(self, inner: Progress, dest: Path, digests: dict[str, tuple[int, str]], uri: str,
                 journal: Journal) -> None:
        super().__init__(inner.label, inner.total, enabled=False)
        self.inner = inner
        self.dest = dest
        self.digests = digests
        self.uri = uri
        self.journal = journal  # where the download threads left the digests of what they received

    def add(self, nbytes: int) -> None:
        self.inner.add(nbytes)

    def range_done(self, name: str, start: int, end: int) -> None:
        block, digests = self.digests[name]
        received = self.journal.digests.get((name, start, end))
        if received is not None and received[0] == block:  # hashed as it arrived: no second pass
            if received[1] != digests[start // block * DIGEST_CHARS:-(-end // block) * DIGEST_CHARS]:
                raise IntegrityError(self.uri, name, f"bytes {start}-{end} from the peer do not match its digests")
            self.inner.range_done(name, start, end)
            return
        fd = open_file(self.dest / name, os.O_RDONLY)
        try:
            for index in range(start // block, -(-end // block)):
                data = os.pread(fd, block, index * block)
                if xxhash.xxh3_64_hexdigest(data) != digests[index * DIGEST_CHARS:(index + 1) * DIGEST_CHARS]:
                    raise IntegrityError(self.uri, name, f"block {index} from the peer does not match its digest")
        finally:
            os.close(fd)
        self.inner.range_done(name, start, end)


@dataclass(frozen=True)
class _Connected:
    """A peer ready to be read: its client, and what its metadata says, checked against the manifest."""

    address: str
    client: Any
    ending: threading.Event
    digests: dict[str, tuple[int, str]]  # by file name: block size, block digests
    checksums: Checksums
    part_size: int


class PeerSource(Origin):
    """A fill's source: the peers holding the exact version, in order, then ``fallback`` (the origin, or the
    shared tier's entry). ``digests`` are the block digests of what was written, when they are known."""

    def __init__(self, settings: PeerSettings, peers: list[str], slug: str, version: str,
                 fallback: Source) -> None:
        self.settings = settings
        self.peers = peers
        self.slug = slug
        self.version = version
        self.fallback = fallback
        self.digests: dict[str, tuple[int, str]] = {}
        self.used: str | None = None  # the peer that supplied the bytes, None for the fallback
        self.busy: list[str] = []  # peers that refused this fill (all their upload slots taken)
        self.fill = uuid.uuid4().hex
        self._first: tuple[Manifest, Future[_Connected]] | None = None
        self._ready: _Connected | None = None
        self._tried: set[str] = set()

    def resolve(self, uri: ModelURI, revision: str | None) -> Manifest:
        if not isinstance(self.fallback, Origin):
            raise StorageError("a peer source resolves through its origin")
        return self.fallback.resolve(uri, revision)

    def start(self, manifest: Manifest) -> None:
        """Start connecting to the first peer (building its client, fetching and checking its metadata) on a
        thread of its own, so that it overlaps the store's locking and preparation of the destination (which
        preallocates on the disk tiers; the RAM tier does not, so there the overlap is a few milliseconds).
        ``download`` picks the result up; a failure there is that peer's failure."""
        if not self.peers or self._first is not None:
            return
        executor = ThreadPoolExecutor(1, thread_name_prefix="fastload-peer-connect")
        self._first = (manifest, executor.submit(self._connect, self.peers[0], manifest))
        executor.shutdown(wait=False)

    def connect(self, manifest: Manifest) -> bool:
        """Find a holder that takes this fill now, before anything is written: True when one did (``download``
        starts with it); False when every holder was busy (``busy``) or failed, so the caller can wait for
        another holder or the shared copy rather than go to the origin."""
        for address in self.peers:
            if address in self._tried:
                continue
            self._tried.add(address)
            try:
                self._ready = self._connect(address, manifest)
                return True
            except Exception as exc:
                self._skip(manifest, address, exc, time.monotonic())
        return False

    def _skip(self, manifest: Manifest, address: str, exc: BaseException, started: float) -> None:
        from ..plugins import notify

        if isinstance(exc, PeerBusy):
            self.busy.append(address)
            log.info("%s: peer %s is busy (all its upload slots taken); trying the next source", manifest.uri,
                     address)
            return
        log.warning("%s: peer %s failed (%s: %s); trying the next source", manifest.uri, address,
                    type(exc).__name__, exc)
        notify("on_peer_fetch", uri=manifest.uri, peer=address, nbytes=0, seconds=time.monotonic() - started,
               error=exc)

    def download(self, manifest: Manifest, dest: Path, *, journal: Journal, progress: Progress) -> Checksums:
        from ..plugins import notify

        candidates: list[str | _Connected] = [self._ready] if self._ready is not None else []
        candidates += [address for address in self.peers if address not in self._tried]
        self._ready = None
        written = False
        for index, candidate in enumerate(candidates):
            started = time.monotonic()
            address = candidate if isinstance(candidate, str) else candidate.address
            self._tried.add(address)
            peer: _Connected | None = None
            try:
                if isinstance(candidate, _Connected):
                    peer = candidate
                elif index == 0 and self._first is not None and self._first[0] is manifest:
                    first, self._first = self._first, None  # ended below, not again by close()
                    peer = first[1].result()
                else:
                    peer = self._connect(address, manifest)
                written = True
                checksums = self._transfer(peer, manifest, dest, progress)
            except Exception as exc:
                self._skip(manifest, address, exc, started)
                continue
            finally:
                if peer is not None:
                    self._end(peer)
            seconds = time.monotonic() - started
            log.info("%s: %d bytes from peer %s in %.2fs", manifest.uri, manifest.total_size, address, seconds)
            notify("on_peer_fetch", uri=manifest.uri, peer=address, nbytes=manifest.total_size, seconds=seconds,
                   error=None)
            self.used = address
            return checksums
        if written:
            # A peer wrote into the files, possibly over ranges an earlier download's journal records (a resumed
            # partial): the fallback must not trust those, or a range that failed its digests could be published
            journal.forget()
        checksums = self.fallback.download(manifest, dest, journal=journal, progress=progress)
        self.digests = dict(getattr(self.fallback, "digests", None) or {})
        return checksums

    def close(self) -> None:
        """End a fill ``connect`` or ``start`` began that ``download`` never took up (the target tier was full),
        so the peer's slot frees now rather than after its idle time. Ending a fill twice is harmless."""
        ready, self._ready = self._ready, None
        if ready is not None:
            self._end(ready)
        first, self._first = self._first, None
        if first is not None:
            first[1].add_done_callback(lambda done: None if done.exception() else self._end(done.result()))

    def _end(self, peer: _Connected) -> None:
        """Tell the peer this fill is over, so its slot serves the next node now rather than after its idle
        time; a failure here only costs that wait."""
        peer.ending.set()
        try:
            peer.client.head_object(Bucket=PEER_BUCKET, Key=peer_key(self.slug, self.version))
        except Exception as exc:
            log.debug("could not end the fill at peer %s: %r", peer.address, exc)

    def _connect(self, address: str, manifest: Manifest) -> _Connected:
        """The peer's client and its entry's metadata, refused unless it is exactly the version resolved
        here with usable block digests for every file."""
        ending = threading.Event()
        client = fill_client(address, self.settings, self.fill, ending)
        try:
            response = client.get_object(Bucket=PEER_BUCKET, Key=peer_key(self.slug, self.version))
        except Exception as exc:
            if _is_busy(exc):
                raise PeerBusy(f"peer {address} is serving as many fills as it allows") from None
            raise
        try:
            return self._check(address, client, ending, manifest, EntryMeta.from_json(response["Body"].read().decode()))
        except BaseException:
            self._end(_Connected(address, client, ending, {}, {}, 0))  # admitted: free the slot
            raise

    def _check(self, address: str, client: Any, ending: threading.Event, manifest: Manifest,
               meta: EntryMeta) -> _Connected:
        held = {item.name: item for item in meta.files}
        digests: dict[str, tuple[int, str]] = {}
        for item in manifest.files:
            mine = held.get(item.name)
            if meta.version != self.version or mine is None or mine.size != item.size or \
                    (item.etag and mine.etag and mine.etag != item.etag):
                raise IntegrityError(manifest.uri, item.name, "the peer's entry is not the version resolved here")
            if item.size == 0:  # an empty file has no blocks, so no digests to check
                digests[item.name] = (mine.block_size or BLOCK_SIZE, "")
                continue
            if not mine.digests or not mine.block_size or \
                    len(mine.digests) != DIGEST_CHARS * -(-item.size // mine.block_size):
                raise IntegrityError(manifest.uri, item.name, "the peer recorded no usable block digests")
            digests[item.name] = (mine.block_size, mine.digests)
        block = max(size for size, _ in digests.values()) if digests else 1
        part = max(block, self.settings.part_size // block * block)  # whole blocks: each range is checked alone
        if any(part % size for size, _ in digests.values()):
            raise IntegrityError(manifest.uri, "?", "the peer's files use different block sizes")
        checksums = {name: (item.checksum, item.part_size) for name, item in held.items()
                     if item.checksum and name in digests}
        return _Connected(address, client, ending, digests, checksums, part)

    def _transfer(self, peer: _Connected, manifest: Manifest, dest: Path, progress: Progress) -> Checksums:
        from .s3 import S3Origin

        files = tuple(RemoteFile(item.name, item.size, peer_key(self.slug, self.version, item.name), None, None)
                      for item in manifest.files)
        peer_manifest = Manifest(f"s3://{PEER_BUCKET}/", files, single=manifest.single,
                                 pinned_version=self.version)
        origin = S3Origin(S3Settings(concurrency=S3Settings.from_env().concurrency, part_size=peer.part_size,
                                     max_attempts=2), client=peer.client)
        journal = _MemoryJournal()
        checked = _CheckedProgress(progress, dest, peer.digests, manifest.uri, journal)
        origin.download(peer_manifest, dest, journal=journal, progress=checked)
        self.digests = peer.digests
        return peer.checksums
