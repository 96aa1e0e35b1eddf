"""``redis://host:port/db``: entries as Redis strings, large ones in a blob store behind a pointer.

Query parameters (all optional), stripped before the URL reaches redis-py:

- ``timeout`` (seconds, default 5) and ``connect_timeout`` (default 1): a slow or dead Redis costs at
  most this per operation, then the replica compiles normally. Retries are off for the same reason.
- ``max_inline`` (bytes, default 32 MiB): entries above it go to ``blob``; Redis strings top out at
  512 MB and multi-megabyte values stall every other client of a single-threaded server.
- ``blob``: a URL-encoded ``file://`` or ``s3://`` URL for large entries. Redis then holds a small
  pointer record; without ``blob`` a large entry is not stored (with a warning).
- ``prefix`` (default ``fastload:compile:``): key namespace.

``SET NX`` makes racing replicas leave one entry; a large entry's blob is written before its pointer,
so a pointer never names a blob that is not there yet, and a replica whose blob lost the race points
at the blob that won (its real size), so whichever pointer wins agrees with the stored blob.

A pointer is followed only into the blob store this URL configures, however another replica spells
that store's URL (a trailing slash, ``file://localhost``, other client parameters). Anything else under
a key that looks like a pointer (not JSON, no URL, another store's URL — ``file:///etc``, ``bogus://``, a host
that is gone — a blob that is missing or of another size) is a corrupt entry: the replica compiles
and overwrites it, exactly as for any other garbage, instead of reading wherever a stranger pointed
or reporting the cache unavailable forever.
"""

from __future__ import annotations

import contextlib
import json
import os
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from ..storage.uri import redact
from .base import CompileCacheBackend, StoredEntry, float_param, query_params
from .errors import CacheURLError, CompileCacheError, CorruptEntryError, EntryTooLargeError

_POINTER_MAGIC = b"FLCCPTR1"
_OWN_PARAMS = ("timeout", "connect_timeout", "max_inline", "blob", "prefix")
DEFAULT_MAX_INLINE = 32 * 1024 * 1024


class RedisBackend(CompileCacheBackend):
    scheme = "redis"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise CompileCacheError(
                f"{redact(url)}: the redis backend needs redis-py: pip install 'fastload[redis]'"
            ) from None
        params = query_params(url)
        self.prefix = params.get("prefix", "fastload:compile:")
        self.max_inline = int(float_param(url, "max_inline", DEFAULT_MAX_INLINE))
        self._blob_url = params.get("blob")
        self._blob: CompileCacheBackend | None = None
        parts = urlsplit(url)
        if not parts.hostname and not parts.path.endswith(".sock"):
            raise CacheURLError(url, "expected redis://host:port/db")
        client_query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in _OWN_PARAMS])
        self._client = redis.Redis.from_url(
            urlunsplit(parts._replace(query=client_query)),
            socket_timeout=float_param(url, "timeout", 5.0),
            socket_connect_timeout=float_param(url, "connect_timeout", 1.0),
            retry=Retry(NoBackoff(), 0),
        )

    @property
    def blob_backend(self) -> CompileCacheBackend | None:
        if self._blob is None and self._blob_url:
            from .registry import open_backend

            self._blob = open_backend(self._blob_url)
        return self._blob

    @staticmethod
    def _bytes(value: object) -> bytes | None:
        # decode_responses is off, so redis-py hands back bytes; its stubs also allow str.
        return value.encode() if isinstance(value, str) else value if isinstance(value, bytes) else None

    def _name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    @staticmethod
    def _is_pointer(value: bytes | None) -> bool:
        return value is not None and value.startswith(_POINTER_MAGIC)

    def _pointer(self, key: str, value: bytes) -> tuple[CompileCacheBackend, int]:
        """The blob store and size a pointer names; ``CorruptEntryError`` unless it names ours."""
        try:
            pointer = json.loads(value[len(_POINTER_MAGIC):])
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python can parse
            raise CorruptEntryError(key, "a blob pointer that is not JSON") from None
        if not isinstance(pointer, dict) or not isinstance(pointer.get("url"), str):
            raise CorruptEntryError(key, f"a blob pointer without a URL: {value[:200]!r}")
        size = pointer.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CorruptEntryError(key, f"a blob pointer without a valid size: {value[:200]!r}")
        blob_backend = self.blob_backend
        if blob_backend is None:
            raise CorruptEntryError(key, f"a blob pointer to {pointer['url']!r}, but this cache URL configures "
                                         "no blob store (?blob=); not following it")
        if _store_identity(pointer["url"]) != _store_identity(blob_backend.url):
            raise CorruptEntryError(key, f"a blob pointer to {pointer['url']!r}, outside the configured blob "
                                         f"store {blob_backend.url}; not following it")
        return blob_backend, size

    def get(self, key: str) -> bytes | None:
        value = self._bytes(self._client.get(self._name(key)))
        if value is None or not self._is_pointer(value):
            return value
        blob_backend, size = self._pointer(key, value)
        data = blob_backend.get(key)
        if data is None:
            raise CorruptEntryError(key, f"the blob pointer names {blob_backend.url}, which has no such blob")
        if len(data) != size:
            raise CorruptEntryError(key, f"the blob in {blob_backend.url} is {len(data)} bytes, the pointer "
                                         f"says {size}")
        return data

    def get_prefix(self, key: str, nbytes: int) -> bytes | None:
        value = self._bytes(self._client.getrange(self._name(key), 0, max(nbytes, 4096) - 1))
        if not value:
            return None
        if not self._is_pointer(value):
            return value[:nbytes]
        blob_backend, _ = self._pointer(key, value)
        return blob_backend.get_prefix(key, nbytes)

    def put(self, key: str, blob: bytes, *, overwrite: bool = False) -> bool:
        if len(blob) <= self.max_inline:
            return bool(self._client.set(self._name(key), blob, nx=not overwrite))
        if self.blob_backend is None:
            raise EntryTooLargeError(self.url, len(blob), self.max_inline)
        if not overwrite and self._client.exists(self._name(key)):
            return False  # skip uploading a large blob that would lose the race anyway
        size = len(blob)
        if not self.blob_backend.put(key, blob, overwrite=overwrite):
            # Another replica's blob is there and its pointer may not be yet. The pointer must describe the
            # blob that is stored, not ours, or whichever pointer wins names a size the blob does not have
            # and every replica reads a corrupt entry. (Returning False instead would leave a blob whose
            # writer died before its pointer unreachable for good: every later store would lose to it.)
            stored = self.blob_backend.get(key)
            if stored is None:
                return False  # removed meanwhile: no pointer rather than one to nothing
            size = len(stored)
        pointer = _POINTER_MAGIC + json.dumps({"url": self.blob_backend.url, "size": size}).encode()
        return bool(self._client.set(self._name(key), pointer, nx=not overwrite))

    def delete(self, key: str) -> bool:
        value = self._bytes(self._client.get(self._name(key)))
        if self._is_pointer(value):
            assert value is not None
            try:
                blob_backend, _ = self._pointer(key, value)
            except CorruptEntryError:
                pass  # a pointer we would not follow: drop it, and touch nothing it names
            else:
                blob_backend.delete(key)
        return bool(self._client.delete(self._name(key)))

    def entries(self) -> list[StoredEntry]:
        names = sorted(self._client.scan_iter(match=f"{self.prefix}*", count=1000))
        if not names:
            return []
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.strlen(name)
            pipe.getrange(name, 0, 4095)
        results = pipe.execute()
        found = []
        for index, name in enumerate(names):
            size, head = results[2 * index], results[2 * index + 1]
            if self._is_pointer(head):
                with contextlib.suppress(CorruptEntryError):  # listed as it is; `ls` reports the problem
                    size = self._pointer(name.decode(), head)[1]
            found.append(StoredEntry(key=name.decode()[len(self.prefix):], size=size, stored_at=None))
        return found

    def check(self) -> str:
        self._client.ping()
        info = self._client.info("server")
        memory = self._client.info("memory")
        message = (f"redis {info.get('redis_version', '?')}, maxmemory-policy "
                   f"{memory.get('maxmemory_policy', '?')}, {len(self.entries())} entries")
        if self.blob_backend is not None:
            message += f"; blob store {self.blob_backend.url}: {self.blob_backend.check()}"
        return message

    def close(self) -> None:
        self._client.close()
        if self._blob is not None:
            self._blob.close()


def _store_identity(url: str) -> tuple[str, ...]:
    """What a blob store URL addresses, so that replicas configured with different spellings of one store
    (``file:///x/blobs``, ``file:///x/blobs/``, ``file://localhost/x/blobs``; an ``s3://`` URL with other
    ``?timeout=``) follow each other's pointers instead of calling them corrupt and overwriting them.

    ``file``: the resolved directory, as ``DirectoryBackend`` reads it. ``s3``: bucket and prefix, as
    ``S3Backend`` addresses objects. Query parameters tune the client, never the place, so both ignore
    them. Any other scheme (a plugin's) is compared as written: fastload cannot know what its parts mean.
    """
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme == "file" and parts.netloc in ("", "localhost") and parts.path:
            return scheme, os.path.realpath(unquote(parts.path))
        if scheme == "s3" and parts.netloc:
            return scheme, parts.netloc, parts.path.strip("/")
    except ValueError:  # a pointer's URL comes from Redis: "file://[x", a NUL in the path
        pass
    return "as-written", url
