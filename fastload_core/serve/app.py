"""The ASGI application behind ``fastload serve``: read-only S3 (path-style GET and HEAD of objects with
Range, ListObjectsV2) over this node's tiers, plus the peer keys other nodes fetch entries by.

Nothing in a request ever becomes a path. An object key becomes a model URI, the URI a slug (a hash) and
the origin's identity a version, exactly as for ``fastload fetch``; the file served is the entry's one
file, opened without following links. A peer key names a slug and a version (checked as single path
segments) and a file that must be listed in that entry's metadata. Keys with ``.`` or ``..`` segments,
empty segments or control characters (also when percent-encoded) are refused outright, so a client
cannot even probe for them.

On a hit the bytes come from the fastest tier holding the current version. On a miss one fetch per
object runs through the store (the usual single flight, into ``tier``), and every request for that
object streams from the partial file as the ranges land, before the entry is published.

The origin's identity of a key (its ETag) is looked up at most once per ``resolve_ttl`` seconds, so a
client's many ranged GETs of one object cost the origin one HEAD, not one each: requests that arrive while
that HEAD is in flight wait for it rather than send their own (a parallel reader's first requests all
arrive at once), and the fetch a miss starts reuses it rather than resolving again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from .._safefs import UnsafePath, open_file
from ..errors import FastloadError
from ..plugins import notify
from ..storage.base import Entry, Tier, check_segment
from ..storage.errors import OriginError, StorageError, UnsafeKeyError
from ..storage.eviction import Pin, pin_entry
from ..storage.meta import FILES_DIR, Manifest
from ..storage.peers import FILL_END_HEADER, FILL_HEADER, PEER_BUCKET
from ..storage.progress import Watermark
from ..storage.store import TieredStore
from ..storage.uri import ModelURI, parse_uri
from .auth import Denied, ServeCredentials

log = logging.getLogger("fastload.serve")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

CHUNK = 4 * 1024 * 1024
_DIGITS = re.compile(r"[0-9]*")
_MAX_LIST_KEYS = 1000
_MAX_VERIFIED = 10_000  # published entries remembered as verified (``ServeApp._verify_level``)


class S3Error(Exception):
    """An S3 error response: HTTP status, S3's error code, a message for the client, extra headers."""

    def __init__(self, status: int, code: str, message: str,
                 headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self.status = status
        self.code = code
        self.headers = headers
        super().__init__(message)


class _Fill:
    """One peer fill being served: its requests in progress, and when it was last heard from."""

    __slots__ = ("active", "seen")

    def __init__(self, now: float) -> None:
        self.active = 0
        self.seen = now


@dataclass
class UploadLimit:
    """At most ``limit`` peer fills served at once (0: no limit), so that a fleet's cold start forms a tree:
    a node that is refused pulls from another holder, or waits for one, instead of every node sharing the
    first holder's uplink (docs/fleet.md). A fill is many parallel ranged GETs that carry the same
    ``FILL_HEADER``, so fills are counted, not requests. The client ends a fill with a request carrying
    ``FILL_END_HEADER`` too; a fill with no request in progress for ``idle`` seconds has ended without
    saying so (its client died) and frees its slot; a request whose client stops reading for ``idle`` seconds
    ends (``_Outcome.send_limit``), so a frozen client's requests do not hold it. Requests without the header
    (ordinary S3 clients) are not counted."""

    limit: int = 2
    idle: float = 10.0
    _fills: dict[str, _Fill] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self, fill: str) -> bool:
        """Count a request of ``fill`` in; False when it is a new fill and every slot is taken."""
        now = time.monotonic()
        with self._lock:
            known = self._fills.get(fill)
            if known is None:
                for name, other in list(self._fills.items()):
                    if other.active == 0 and now - other.seen > self.idle:
                        del self._fills[name]
                if self.limit and len(self._fills) >= self.limit:
                    return False
                known = self._fills[fill] = _Fill(now)
            known.active += 1
            known.seen = now
            return True

    def end(self, fill: str) -> None:
        """The client says the fill is over (done or given up): its slot is free at once."""
        with self._lock:
            self._fills.pop(fill, None)

    def leave(self, fill: str) -> None:
        with self._lock:
            known = self._fills.get(fill)
            if known is not None:
                known.active -= 1
                known.seen = time.monotonic()


def _origin_status(exc: OriginError) -> S3Error:
    status = {"NotFound": 404, "NoSuchBucket": 404, "AccessDenied": 403}.get(exc.code or "", 502)
    code = {404: "NoSuchBucket" if exc.code == "NoSuchBucket" else "NoSuchKey", 403: "AccessDenied"}.get(status,
                                                                                                     "BadGateway")
    return S3Error(status, code, exc.problem)


def split_path(raw_path: str) -> tuple[str, str]:
    """``(bucket, key)`` of a path-style request path, refusing anything that looks like traversal."""
    if not raw_path.startswith("/"):
        raise S3Error(400, "InvalidURI", "the path must start with /")
    bucket, _, key = raw_path[1:].partition("/")
    bucket = urllib.parse.unquote(bucket)
    decoded = urllib.parse.unquote(key)
    for text in (decoded, urllib.parse.unquote(decoded)):  # twice: %252e%252e is refused too
        segments = text.split("/")
        if any(s in (".", "..") for s in segments) or "\\" in text or \
                any(ord(c) < 32 or ord(c) == 127 for c in text) or (text and "" in segments[:-1]) or \
                text.startswith("/"):
            raise S3Error(400, "InvalidURI", "keys with '.' or '..' segments, empty segments, backslashes or "
                                             "control characters are refused")
    return bucket, decoded


@dataclass
class _Range:
    start: int
    end: int  # exclusive
    partial: bool


def _wanted(manifest: Manifest, headers: dict[str, str]) -> _Range | None:
    """The range of the object's one file a GET or HEAD answers with, or None: not modified (304). Raises
    412 when If-Match does not match, 416 when the range is unsatisfiable. Only the manifest is needed, so a
    miss answers these without fetching the object first."""
    item = manifest.files[0]
    etag = f'"{item.etag}"' if item.etag else None
    if etag and headers.get("if-match") and headers["if-match"].strip() not in (etag, "*"):
        raise S3Error(412, "PreconditionFailed", "If-Match does not match the object's ETag")
    if etag and headers.get("if-none-match") and headers["if-none-match"].strip() in (etag, "*"):
        return None
    return parse_range(headers.get("range"), item.size)


def parse_range(header: str | None, size: int) -> _Range:
    """One byte range as S3 accepts it (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``); 416 when unsatisfiable.
    A header S3 would ignore (several ranges, another unit) means the whole object, as S3 does."""
    if not header:
        return _Range(0, size, False)
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return _Range(0, size, False)
    first, dash, last = (part.strip() for part in spec.strip().partition("-"))
    # S3's syntax only (int() would also take "1_0" and "+1"); anything else means the header is ignored
    if not dash or not (first or last) or not all(_DIGITS.fullmatch(part) for part in (first, last)):
        return _Range(0, size, False)
    if first == "":
        count = int(last)
        if count <= 0 or size == 0:  # no byte of an empty object can be asked for
            raise S3Error(416, "InvalidRange", "the requested range is not satisfiable")
        return _Range(max(0, size - count), size, True)
    start = int(first)
    end = int(last) + 1 if last else size
    if start >= size or end <= start:
        raise S3Error(416, "InvalidRange", "the requested range is not satisfiable")
    return _Range(start, min(end, size), True)


class _Flight:
    """One fetch of one object through the store, watched so that requests can stream it as it lands."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.tier: str | None = None  # the tier the fetch writes into
        self.files_dir: Path | None = None
        self.manifest: Manifest | None = None
        self.marks: dict[str, Watermark] = {}
        self.pin: Pin | None = None
        self.error: BaseException | None = None
        self.finished = False
        # Counts the fills after the first (the next tier down, after one filled up): a request reading the
        # file of an earlier one stops (``_send_file``), since that file was discarded.
        self.generation = 0
        # requests waiting on the event loop: for bytes of a file to land (file, end, loop, future), or for the
        # fetch to start (None, 0, loop, future)
        self._waiters: list[tuple[str | None, int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    # FetchWatch
    def started(self, tier: str, files_dir: Path, manifest: Manifest) -> None:
        with self.cond:
            if self.manifest is not None:
                self.generation += 1  # before the marks change: a request that sees the new marks sees this
            self.tier, self.files_dir, self.manifest = tier, files_dir, manifest
            self.marks = {item.name: Watermark() for item in manifest.files}
            self.cond.notify_all()
        self._wake(None, 0)  # requests waiting for the start, and any waiting on a discarded file's marks

    def range_done(self, name: str, start: int, end: int) -> None:
        mark = self.marks.get(name)
        if mark is not None:
            mark.complete(start, end)
            self._wake(name, mark.position)

    def _wake(self, name: str | None, position: int) -> None:
        """Wake the requests waiting for bytes of ``name`` below ``position`` (all of them when ``name`` is
        None: the fetch is over). Called from the download's threads: the loop is told thread-safely."""
        with self.cond:
            if name is None:
                due, self._waiters = self._waiters, []
            else:
                due = [w for w in self._waiters if w[0] == name and w[1] <= position]
                if due:
                    self._waiters = [w for w in self._waiters if not (w[0] == name and w[1] <= position)]
        for _, _, loop, future in due:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
                loop.call_soon_threadsafe(_set_done, future)

    async def until_landed(self, name: str, end: int) -> None:
        """Wait until the first ``end`` bytes of ``name`` have landed, or the fetch is over (its error is raised
        if it failed). Waits on the event loop, not in a thread: a parallel reader's requests all wait here at
        once, and the loop's default executor has only a handful of threads (cpu count + 4), so waiting in
        them queued requests whose bytes had landed behind requests whose bytes had not."""
        # the current fill's marks (``started``)
        if not await self._until(name, end, lambda: self.marks[name].position >= end) and self.pin is None:
            raise _as_s3_error(self.error or RuntimeError("fetch failed"))
        # landed, or published: every byte is there

    def landed(self, name: str, end: int) -> bool:
        """Whether the first ``end`` bytes of ``name`` are there already (no need to wait)."""
        mark = self.marks.get(name)
        return mark is not None and mark.position >= end

    def run(self, store: TieredStore, uri: str, tier: str, manifest: Manifest | None = None) -> None:
        try:
            self.pin = store.pin(uri, tier=tier, watch=self, manifest=manifest)
        except BaseException as exc:  # handed to every waiting request
            self.error = exc
        finally:
            with self.cond:
                self.finished = True
                self.cond.notify_all()
            self._wake(None, 0)

    async def until_finished(self) -> None:
        """Wait, on the event loop, until the fetch is over (published: ``pin``; or failed: ``error``)."""
        await self._until(None, 0, lambda: False)

    async def until_started(self) -> None:
        """Wait, on the event loop, until the fetch writes into a tier or is over. Not in an executor thread:
        while another process on this node fills the same entry, every request for it waits here, and the
        loop's few executor threads are what every other request needs (``until_landed`` says more)."""
        await self._until(None, 0, lambda: self.manifest is not None)

    async def _until(self, name: str | None, end: int, ready: Callable[[], bool]) -> bool:
        """Wait on the event loop until ``ready()`` (True) or the fetch is over (False). ``_wake`` releases the
        wait when bytes of ``name`` up to ``end`` land (``name`` None: when the fetch starts or ends)."""
        loop = asyncio.get_running_loop()
        while True:
            future: asyncio.Future[None] = loop.create_future()
            with self.cond:
                if ready():
                    return True
                if self.finished:
                    return False
                self._waiters.append((name, end, loop, future))
            await future


@dataclass
class _Resolved:
    manifest: Manifest
    expires: float


@dataclass
class ServeApp:
    """``store``: the node's tiers and origins; ``tier``: where misses are fetched into (the RAM tier)."""

    store: TieredStore
    credentials: ServeCredentials
    tier: str
    resolve_ttl: float = 5.0
    on_filled: Callable[[], None] | None = None  # told after a miss was published (re-advertise)
    uploads: UploadLimit = field(default_factory=UploadLimit)
    _resolved: dict[str, _Resolved] = field(default_factory=dict)
    _resolving: dict[str, Future[Manifest]] = field(default_factory=dict)  # HEADs in flight, by URI
    _flights: dict[str, _Flight] = field(default_factory=dict)
    # published entries whose blocks passed ``store.verify``, oldest first: (tier, slug, version, created)
    _verified: dict[tuple[str, str, str, float], None] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method = scope["method"]
        started = time.monotonic()
        outcome = _Outcome()
        watcher = asyncio.ensure_future(_watch_disconnect(receive, outcome.gone))
        try:
            await self._handle(scope, method, send, outcome)
        except _ClientGone:
            outcome.source = "gone"
        except asyncio.CancelledError:  # not raised on: uvicorn would log it as the app's crash, with a traceback
            outcome.source = "cut"
            log.warning("%s %s cut after %d bytes: the server is stopping and --drain-timeout ran out", method,
                        scope.get("path"), outcome.nbytes)
        except S3Error as exc:
            outcome.source = outcome.source if exc.status in (404, 412, 416) or outcome.source == "busy" else \
                ("denied" if exc.status == 403 else "error")
            if outcome.sent_headers:
                raise  # mid-body: the connection is cut, the client sees a short body and retries
            await self._error(send, method, exc, outcome)
        except Exception as exc:
            log.warning("%s %s failed: %s: %s", method, scope.get("path"), type(exc).__name__, exc)
            outcome.source = "error"
            if outcome.sent_headers:
                raise
            await self._error(send, method, S3Error(500, "InternalError", "fastload serve failed; see its log"),
                              outcome)
        finally:
            watcher.cancel()
            log.debug("%s %s %s %d bytes %s %.3fs", method, scope.get("raw_path", b"").decode("latin-1"),
                      outcome.status, outcome.nbytes, outcome.source, time.monotonic() - started)
            notify("on_serve_request", method=method, status=outcome.status, nbytes=outcome.nbytes,
                   source=outcome.source)

    async def _handle(self, scope: Scope, method: str, send: Send, outcome: _Outcome) -> None:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        raw_path = scope.get("raw_path") or scope["path"].encode()
        raw = raw_path.decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        try:
            self.credentials.check(method, raw, query, headers)
        except Denied as exc:
            log.debug("denied %s %s: %s", method, raw, exc)
            raise S3Error(403, exc.code, "the request is not signed with this server's credentials") from None
        if method not in ("GET", "HEAD"):
            raise S3Error(405, "MethodNotAllowed", "fastload serve is read-only: GET and HEAD only")
        bucket, key = split_path(raw)
        if not bucket:
            raise S3Error(400, "InvalidRequest", "name a bucket: path-style /<bucket>/<key>")
        if bucket == PEER_BUCKET:
            outcome.source = "peer"
            fill = headers.get(FILL_HEADER)
            if fill is not None and headers.get(FILL_END_HEADER):
                self.uploads.end(fill)
                fill = None
            if fill is None:
                await self._peer(method, key, headers, send, outcome)
                return
            if not self.uploads.enter(fill):
                outcome.source = "busy"
                raise S3Error(503, "SlowDown", f"this node already serves {self.uploads.limit} peer fills; "
                                               "try another holder or again later",
                              headers=((b"retry-after", b"1"),))
            outcome.send_limit = self.uploads.idle
            try:
                await self._peer(method, key, headers, send, outcome)
            finally:
                self.uploads.leave(fill)
        elif not key:
            params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
            if params.get("list-type") != "2":
                raise S3Error(400, "InvalidRequest", "only ListObjectsV2 (list-type=2) is supported")
            outcome.source = "list"
            await self._list(bucket, params, send, outcome)
        else:
            await self._object(method, bucket, key, headers, send, outcome)

    # --- objects ---------------------------------------------------------------------------------
    async def _object(self, method: str, bucket: str, key: str, headers: dict[str, str], send: Send,
                      outcome: _Outcome) -> None:
        if key.endswith("/"):
            raise S3Error(404, "NoSuchKey", "a prefix is not an object; list it with ListObjectsV2")
        try:
            parsed = parse_uri(f"s3://{bucket}/{key}")
        except StorageError as exc:
            raise S3Error(400, "InvalidURI", str(exc)) from None
        manifest = await self._manifest(parsed)
        pin = await asyncio.to_thread(self._held, parsed.slug, manifest.version)
        if pin is not None:
            outcome.source = "hit"
            await self._send_pinned(method, pin, manifest, headers, send, outcome)
            return
        if method == "HEAD":  # never start a download for a HEAD: it may be an existence check
            outcome.source = "miss"
            await self._send_file(method, None, manifest, headers, send, outcome)
            return
        outcome.source = "miss"
        if _wanted(manifest, headers) is None:  # 304, or 412/416 raised: no need for the object's bytes
            await self._send_file(method, None, manifest, headers, send, outcome)
            return
        flight = self._flight(str(parsed), manifest)
        await flight.until_started()
        if flight.finished and flight.pin is not None:
            # Published already: read under a pin of this request's own (the flight lets go of its pin when it
            # ends, and eviction may then remove an entry nobody pins)
            pin = await asyncio.to_thread(self._held, parsed.slug, manifest.version)
            if pin is None:
                raise S3Error(503, "SlowDown", "the object was evicted as it was fetched; ask again",
                              headers=((b"retry-after", b"1"),))
            await self._send_pinned(method, pin, _manifest_of(pin, manifest), headers, send, outcome)
            return
        if flight.error is not None:
            raise _as_s3_error(flight.error)
        with flight.cond:  # one fill's file, manifest and generation together
            generation, files_dir, landing = flight.generation, flight.files_dir, flight.manifest
        assert landing is not None and files_dir is not None
        await self._send_file(method, files_dir / landing.files[0].name, landing, headers, send, outcome,
                              flight=flight, generation=generation)

    async def _manifest(self, parsed: ModelURI) -> Manifest:
        """The object's current manifest, from the origin at most once per ``resolve_ttl`` (one request asks,
        the ones arriving meanwhile wait for its answer, or its error); when the origin cannot be reached,
        the newest cached version (as ``fetch`` does). Only the request that asks takes an executor thread;
        the others wait on the loop: a burst of requests for one key behind a slow HEAD took every thread of
        the loop's few (cpu count + 4), and every other request, hits included, queued behind them."""
        uri = str(parsed)
        with self._lock:
            known = self._resolved.get(uri)
            if known is not None and known.expires > time.monotonic():
                return known.manifest
            pending = self._resolving.get(uri)
            asking = pending is None
            if pending is None:
                pending = self._resolving[uri] = Future()
        if asking:  # the thread answers ``pending`` even if this request is cancelled meanwhile
            return await asyncio.to_thread(self._resolve, parsed, pending)
        # shielded: a waiting request that is cancelled must not cancel the answer the others wait for
        return await asyncio.shield(asyncio.wrap_future(pending))

    def _resolve(self, parsed: ModelURI, pending: Future[Manifest]) -> Manifest:
        """Ask the origin for the requests waiting on ``pending`` (``_manifest``)."""
        uri = str(parsed)
        try:
            manifest = self._ask_origin(parsed)
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        else:
            pending.set_result(manifest)
            return manifest
        finally:
            with self._lock:
                self._resolving.pop(uri, None)

    def _ask_origin(self, parsed: ModelURI) -> Manifest:
        uri = str(parsed)
        now = time.monotonic()
        origin = self.store.origin(parsed.scheme, uri=uri)
        try:
            manifest = origin.resolve(parsed, None)
        except OriginError as exc:
            cached = [e for t in self.store.tiers for e in t.entries(parsed.slug)] \
                if exc.code == "Unreachable" else []
            if not cached:
                raise _origin_status(exc) from None
            manifest = max(cached, key=lambda e: e.meta.created).meta.as_manifest()
        if not manifest.single:  # the key named a "directory": S3 has no such object
            raise S3Error(404, "NoSuchKey", "no such key (it is a prefix)")
        with self._lock:
            if len(self._resolved) > 10_000:
                self._resolved.clear()
            self._resolved[uri] = _Resolved(manifest, now + self.resolve_ttl)
        return manifest

    def _held(self, slug: str, version: str) -> Pin | None:
        for tier in self.store.tiers:
            try:
                pinned = pin_entry(tier, slug, version, verify=functools.partial(self._verify_level, tier))
            except UnsafeKeyError as exc:
                log.warning("refusing to serve %s/%s from %s: %s", slug, version, tier.name, exc)
                raise S3Error(403, "AccessDenied", "the cached entry is unsafe (a link?) and is not served") \
                    from None
            if pinned is not None:
                if pinned.entry is not None and self.store.verify != "size":
                    self._verified_now(tier, pinned.entry)
                notify("on_tier_hit", uri=pinned.entry.meta.uri if pinned.entry else slug, tier=tier.name,
                       path=str(pinned.path))
                return pinned
        return None

    def _verify_level(self, tier: Tier, entry: Entry) -> str:
        """``store.verify`` (``sample``/``full``) for a published entry's first request, sizes only after it
        passed: a peer fill of a 10 GiB entry in 64 MiB ranges re-hashed all of it 160 times. Its creation
        stamp tells a republished entry apart (it is checked again). Requests that find it unchecked at once
        each check it (a fill asks for the metadata first, alone)."""
        with self._lock:
            return "size" if _verified_key(tier, entry) in self._verified else self.store.verify

    def _verified_now(self, tier: Tier, entry: Entry) -> None:
        with self._lock:
            self._verified[_verified_key(tier, entry)] = None
            while len(self._verified) > _MAX_VERIFIED:
                del self._verified[next(iter(self._verified))]

    def _flight(self, uri: str, manifest: Manifest) -> _Flight:
        with self._lock:
            flight = self._flights.get(uri)
            if flight is not None and not flight.finished:
                return flight
            flight = self._flights[uri] = _Flight()

        def run() -> None:
            flight.run(self.store, uri, self.tier, manifest)
            with self._lock:
                if self._flights.get(uri) is flight:
                    del self._flights[uri]
            if flight.pin is not None:
                flight.pin.release()  # requests that still read it hold their own fd
                if self.on_filled is not None:
                    self.on_filled()

        threading.Thread(target=run, name="fastload-serve-fetch", daemon=True).start()
        return flight

    # --- peers -----------------------------------------------------------------------------------
    async def _peer(self, method: str, key: str, headers: dict[str, str], send: Send, outcome: _Outcome) -> None:
        parts = key.split("/", 3)
        try:
            slug, version = check_segment(parts[0], "model slug"), check_segment(parts[1], "version")
        except (IndexError, UnsafeKeyError):
            raise S3Error(400, "InvalidURI", "a peer key is <slug>/<version>/meta.json or .../files/<name>") \
                from None
        pin = await asyncio.to_thread(self._held, slug, version)
        if pin is None or pin.entry is None:
            if pin is not None:
                pin.release()
            raise S3Error(404, "NoSuchKey", "this node does not hold that entry (any more)")
        try:
            meta = pin.entry.meta
            if parts[2:] == ["meta.json"]:
                body = meta.to_json().encode()
                await self._start(send, 200, [(b"content-length", str(len(body)).encode()),
                                              (b"content-type", b"application/json")], outcome)
                await self._body(send, b"" if method == "HEAD" else body, outcome, more=False)
                return
            files = {item.name: item for item in meta.as_manifest().files}
            if len(parts) != 4 or parts[2] != "files" or parts[3] not in files:
                raise S3Error(404, "NoSuchKey", "no such file in that entry")
            name = parts[3]
            manifest = Manifest(meta.uri, (files[name],), single=True, pinned_version=version)
            await self._send_file(method, pin.entry.path / FILES_DIR / name, manifest, headers, send, outcome,
                                  tier=pin.tier)
        finally:
            pin.release()

    # --- listing ---------------------------------------------------------------------------------
    async def _list(self, bucket: str, params: dict[str, str], send: Send, outcome: _Outcome) -> None:
        try:
            parse_uri(f"s3://{bucket}/")
        except StorageError as exc:
            raise S3Error(400, "InvalidBucketName", str(exc)) from None
        origin = self.store.origin("s3")
        client = getattr(origin, "client", None)
        if client is None:
            raise S3Error(501, "NotImplemented", "the s3 origin of this node cannot list")
        args: dict[str, Any] = {"Bucket": bucket}
        for name, arg in (("prefix", "Prefix"), ("delimiter", "Delimiter"), ("continuation-token",
                          "ContinuationToken"), ("start-after", "StartAfter")):
            if params.get(name):
                args[arg] = params[name]
        try:
            args["MaxKeys"] = max(0, min(int(params.get("max-keys") or _MAX_LIST_KEYS), _MAX_LIST_KEYS))
        except ValueError:
            raise S3Error(400, "InvalidArgument", "max-keys must be an integer") from None
        try:
            page = await asyncio.to_thread(lambda: client.list_objects_v2(**args))
        except Exception as exc:
            from ..storage.s3 import client_error

            error = client_error(f"s3://{bucket}/", exc)
            raise (_origin_status(error) if isinstance(error, OriginError) else
                   S3Error(502, "BadGateway", str(error))) from None
        body = render_list(page, url_encode=params.get("encoding-type") == "url").encode()
        await self._start(send, 200, [(b"content-length", str(len(body)).encode()),
                                      (b"content-type", b"application/xml")], outcome)
        await self._body(send, body, outcome, more=False)

    # --- responses -------------------------------------------------------------------------------
    async def _send_pinned(self, method: str, pin: Pin, manifest: Manifest, headers: dict[str, str], send: Send,
                           outcome: _Outcome) -> None:
        """Send a published file, holding its pin until the last byte is out."""
        try:
            await self._send_file(method, pin.path, manifest, headers, send, outcome, tier=pin.tier)
        finally:
            pin.release()

    async def _send_file(self, method: str, path: Path | None, manifest: Manifest, headers: dict[str, str],
                         send: Send, outcome: _Outcome, *, tier: str | None = None,
                         flight: _Flight | None = None, generation: int = 0) -> None:
        """``flight``: the fetch ``path`` is landing from, whose ``generation`` named that file."""
        item = manifest.files[0]
        etag = f'"{item.etag}"' if item.etag else None
        wanted = _wanted(manifest, headers)
        if wanted is None:
            assert etag is not None  # "not modified" is only ever said against an ETag
            await self._start(send, 304, [(b"etag", etag.encode())], outcome)
            await self._body(send, b"", outcome, more=False)
            return
        response = [(b"content-length", str(wanted.end - wanted.start).encode()),
                    (b"content-type", b"application/octet-stream"), (b"accept-ranges", b"bytes")]
        if etag:
            response.append((b"etag", etag.encode()))
        if wanted.partial:
            response.append((b"content-range", f"bytes {wanted.start}-{wanted.end - 1}/{item.size}".encode()))
        if method == "HEAD" or path is None or wanted.end == wanted.start:
            await self._start(send, 206 if wanted.partial else 200, response, outcome)
            await self._body(send, b"", outcome, more=False)
            return
        try:
            fd = await asyncio.to_thread(_open, path)
        except FileNotFoundError:
            if flight is None:
                raise
            # The partial file was published (renamed) or discarded meanwhile: the published copy once the
            # fetch is over, which holds every byte. Waited for on the loop, not in an executor thread
            # (``_Flight.until_landed`` says why).
            await _unless_gone(flight.until_finished(), outcome.gone)
            if flight.pin is None:
                raise _as_s3_error(flight.error or RuntimeError("fetch failed")) from None
            fd, flight = await asyncio.to_thread(_open, flight.pin.path), None
        try:
            await self._start(send, 206 if wanted.partial else 200, response, outcome)
            position = wanted.start
            # tmpfs reads never wait for a disk: no thread hop for them, also while a miss lands there (two
            # hops per chunk were a measurable share of a miss's CPU on a 2-core node); nor for bytes that
            # have landed already
            blocking = (flight.tier if flight is not None else tier) != "shm"
            while position < wanted.end:
                count = min(CHUNK, wanted.end - position)
                if flight is not None and not flight.landed(item.name, position + count):
                    await _unless_gone(flight.until_landed(item.name, position + count), outcome.gone)
                if outcome.gone.is_set():
                    raise _ClientGone
                data = await asyncio.to_thread(os.pread, fd, count, position) if blocking else \
                    os.pread(fd, count, position)
                if len(data) != count:
                    raise S3Error(500, "InternalError", f"short read at byte {position} of {path}")
                if flight is not None and flight.generation != generation:
                    # The fill restarted in the next tier: this file was discarded, and what was read may be a
                    # hole. Before the headers the client is told to ask again; after them the connection is cut.
                    raise S3Error(503, "SlowDown", "the fetch moved to another tier; ask again",
                                  headers=((b"retry-after", b"1"),))
                position += count
                await self._body(send, data, outcome, more=position < wanted.end)
        finally:
            os.close(fd)

    @staticmethod
    async def _start(send: Send, status: int, headers: list[tuple[bytes, bytes]], outcome: _Outcome) -> None:
        outcome.status = status
        outcome.sent_headers = True
        await send({"type": "http.response.start", "status": status, "headers": headers})

    @staticmethod
    async def _body(send: Send, body: bytes, outcome: _Outcome, *, more: bool) -> None:
        outcome.nbytes += len(body)
        message = {"type": "http.response.body", "body": body, "more_body": more}
        if outcome.send_limit is None:
            await send(message)
            return
        try:
            await asyncio.wait_for(send(message), outcome.send_limit)
        except asyncio.TimeoutError:
            raise _ClientGone from None

    async def _error(self, send: Send, method: str, exc: S3Error, outcome: _Outcome) -> None:
        body = b"" if method == "HEAD" else (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(exc.code)}</Code>'
            f"<Message>{escape(str(exc))}</Message></Error>").encode()
        outcome.nbytes = 0
        await self._start(send, exc.status, [(b"content-type", b"application/xml"),
                                             (b"content-length", str(len(body)).encode()), *exc.headers],
                          outcome)
        await self._body(send, body, outcome, more=False)
        outcome.nbytes = 0


@dataclass
class _Outcome:
    status: int = 500
    nbytes: int = 0
    source: str = "error"
    sent_headers: bool = False
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # the client disconnected
    # Seconds a send of the body may wait for the client to read (None: no limit). A peer fill's: its client
    # may stop reading without a disconnect (a frozen process, a host gone without a RST), and its upload slot
    # would be held until TCP gives up (or forever); past this it is gone, and its slot frees (UploadLimit).
    send_limit: float | None = None


class _ClientGone(Exception):
    """The client went away mid-response: stop reading for it (uvicorn's ``send`` then drops what it is given
    without a word), so a peer fill's upload slot and a miss's wait for its bytes end now."""


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a server whose receive fails once the connection is gone
        pass
    gone.set()


async def _unless_gone(waiting: Awaitable[None], gone: asyncio.Event) -> None:
    """``waiting``, or ``_ClientGone`` as soon as the client disconnects."""
    task = asyncio.ensure_future(waiting)
    if gone.is_set():
        task.cancel()
        raise _ClientGone
    watcher = asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise _ClientGone
    task.result()


def _manifest_of(pin: Pin, fallback: Manifest) -> Manifest:
    return pin.entry.meta.as_manifest() if pin.entry is not None else fallback


def _as_s3_error(exc: BaseException) -> S3Error:
    if isinstance(exc, OriginError):
        return _origin_status(exc)
    if isinstance(exc, FastloadError):
        log.warning("fetch failed: %s", exc)
        return S3Error(503, "ServiceUnavailable", "fetching the object failed; see the server's log")
    return S3Error(500, "InternalError", f"fetching the object failed: {type(exc).__name__}")


def _verified_key(tier: Tier, entry: Entry) -> tuple[str, str, str, float]:
    return tier.name, entry.slug, entry.version, entry.meta.created


def _open(path: Path) -> int:
    """Open a file served from a tier, or from a fetch in flight (``FileNotFoundError`` when that partial file
    was published or discarded meanwhile: ``_send_file`` then waits for the fetch to end)."""
    try:
        return open_file(path, os.O_RDONLY)
    except UnsafePath as exc:
        log.warning("refusing to serve %s: %s", exc.path, exc.problem)
        raise S3Error(403, "AccessDenied", "the cached file is unsafe (a link?) and is not served") from None


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():  # a request whose client went away was cancelled meanwhile
        future.set_result(None)


def render_list(page: dict[str, Any], *, url_encode: bool) -> str:
    """A ListObjectsV2 response body from botocore's parsed page (keys decoded), as S3 writes it."""
    def text(value: object) -> str:
        value = str(value)
        return escape(urllib.parse.quote(value, safe="/~") if url_encode else value)

    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
           f"<Name>{escape(str(page.get('Name', '')))}</Name>", f"<Prefix>{text(page.get('Prefix', ''))}</Prefix>",
           f"<KeyCount>{int(page.get('KeyCount', 0))}</KeyCount>", f"<MaxKeys>{int(page.get('MaxKeys', 0))}</MaxKeys>",
           f"<IsTruncated>{'true' if page.get('IsTruncated') else 'false'}</IsTruncated>"]
    if page.get("Delimiter"):
        out.append(f"<Delimiter>{text(page['Delimiter'])}</Delimiter>")
    if url_encode:
        out.append("<EncodingType>url</EncodingType>")
    for name in ("ContinuationToken", "NextContinuationToken"):
        if page.get(name):
            out.append(f"<{name}>{escape(str(page[name]))}</{name}>")
    if page.get("StartAfter"):
        out.append(f"<StartAfter>{text(page['StartAfter'])}</StartAfter>")
    for obj in page.get("Contents", []):
        modified = obj.get("LastModified")
        stamp = modified.strftime("%Y-%m-%dT%H:%M:%S.000Z") if modified is not None else ""
        out.append(f"<Contents><Key>{text(obj['Key'])}</Key><LastModified>{stamp}</LastModified>"
                   f"<ETag>{escape(str(obj.get('ETag', '')))}</ETag><Size>{int(obj.get('Size', 0))}</Size>"
                   f"<StorageClass>{escape(str(obj.get('StorageClass', 'STANDARD')))}</StorageClass></Contents>")
    for prefix in page.get("CommonPrefixes", []):
        out.append(f"<CommonPrefixes><Prefix>{text(prefix['Prefix'])}</Prefix></CommonPrefixes>")
    out.append("</ListBucketResult>")
    return "".join(out)
