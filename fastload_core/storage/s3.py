"""The S3 origin: parallel ranged GETs written straight into the destination file at their offsets.

Why not s3transfer's ``download_file``: it restarts a failed part from its first byte, keeps no record a
later process could resume from, and does not say which byte ranges have landed (the streaming loader
needs that). What it does well is reused: botocore's client (credentials, endpoint and region from the
standard AWS configuration, so Ceph RGW and MinIO work), its retry modes for throttling, 5xx and
connection errors, its content-length checks, and the list paginator. ``tenacity`` resumes a part whose
body broke mid-stream from the byte it reached.

Every GET is pinned to the identity seen when the model was resolved (``If-Match`` on the ETag, plus the
VersionId where there is one), so an overwrite during the download fails the fetch (``ObjectChangedError``)
instead of mixing versions. Each file is verified before the store publishes it, by the worker that fetched
each range, as the bytes arrive: against S3's additional CRC checksum when the object carries one (a
full-object CRC joins from the ranges' CRCs, a composite one from its parts'), else against its ETag (for a
multipart upload the ranges then follow the upload's parts, so each worker MD5s its own part). The same
worker computes the range's block digests (verify.py) and records them in the journal, so the entry gets
its digests without reading the files back.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tenacity

from .base import Journal, Origin, pwrite_all
from .checksum import (
    CRC,
    ETagHasher,
    combine,
    composite,
    crc_combine,
    crc_function,
    etag_parts,
    hasher_for,
    normalize_etag,
)
from .errors import OUT_OF_SPACE, IntegrityError, ObjectChangedError, OriginError, StorageError, UnsafeKeyError
from .meta import Checksums, Manifest, RemoteFile
from .progress import Progress, Watermark
from .settings import S3Settings
from .uri import ModelURI, confine, parse_uri, safe_relpath
from .verify import BLOCK_SIZE, BlockDigests

log = logging.getLogger("fastload.storage.s3")

_CHUNK = 1024 * 1024
# Beyond this an upload's parts are too coarse to be download ranges; such files hash sequentially.
_MAX_ALIGNED_PART = 256 * 1024 * 1024
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_MIN_BLOCK = 64 * 1024


def block_size_for(step: int) -> int:
    """The digest block size for ranges of ``step`` bytes: the largest power of two up to ``BLOCK_SIZE``
    that divides it, so every range starts on a block boundary and its digests join into the file's. An odd
    step (nothing from 64 KiB up divides it) makes each range one block."""
    block = min(step & -step, BLOCK_SIZE)
    return block if block >= _MIN_BLOCK else step


class _RangeHasher(ETagHasher):
    """What ``_get_into`` feeds a range's bytes to as they arrive: the range's CRC when ``crc`` names the
    object's checksum algorithm, else its MD5 (one part of a multipart ETag) when ``md5``, and always its
    block digests. One pass over bytes still in the CPU cache, in the thread that downloaded them (the CRCs
    and MD5 release the GIL on large buffers; the CRCs (CRC32 by ISA-L, zlib's 0.35 without it) and XXH3 cost
    a few hundredths of a CPU second per GiB, MD5 1.5-2)."""

    def __init__(self, *, md5: bool, crc: str | None, block_size: int) -> None:
        super().__init__(None)
        self.md5 = md5 and crc is None
        self.crc_algorithm = crc
        self._crc = crc_function(crc) if crc else None
        self.crc = 0
        self.blocks = BlockDigests(block_size)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._crc is not None:
            self.crc = self._crc(data, self.crc)
        elif self.md5:
            super().update(data)
        self.blocks.update(data)

    def journal_digest(self) -> str | None:
        """What the journal records for the range: ``<algorithm>:<crc hex>``, the MD5's hex, or None."""
        if self.crc_algorithm:
            return f"{self.crc_algorithm}:{self.crc:x}"
        return self.hexdigest() if self.md5 else None


_local = threading.local()


def _buffer() -> memoryview:
    """This thread's receive buffer, allocated (and its pages faulted in) once, not per chunk."""
    view: memoryview | None = getattr(_local, "buffer", None)
    if view is None:
        view = _local.buffer = memoryview(bytearray(_CHUNK))
    return view


def _socket_stream(body: Any) -> Any | None:
    """The ``http.client`` response under botocore's ``StreamingBody`` and urllib3's response, or None.

    Its ``readinto`` receives straight from the socket into our buffer. urllib3's own ``readinto`` reads a
    new ``bytes`` object and copies it (and botocore's ``read`` another), so going through them costs two
    allocations and two copies per chunk: small next to MD5 (docs/benchmarks.md, "S3 speed"), but work
    that buys nothing, on cores a small machine shares with the server. The length checks they add are
    kept by ``http.client`` itself: a body that ends early reads 0 bytes (``_ShortRead``), a broken chunked
    body raises ``IncompleteRead``. Anything unexpected in the layering (another HTTP stack, a decoder in
    the way) falls back to ``body.read``.
    """
    raw = getattr(body, "_raw_stream", None)
    stream = getattr(raw, "_fp", None)
    if stream is None or not hasattr(raw, "release_conn") or getattr(raw, "_decoder", None) is not None:
        return None
    if not (hasattr(stream, "readinto") and hasattr(stream, "isclosed")):
        return None
    return stream


def _read_into(body: Any, view: memoryview) -> int:
    chunk = body.read(len(view))
    view[:len(chunk)] = chunk
    return len(chunk)


def _defers(plan: _Plan) -> bool:
    """Whether a range of ``plan``'s file received into a mirror may skip the file until the store writes it
    from the mirror: every mode but ``sequential``, whose hasher reads the file as its prefix grows."""
    return plan.mode != "sequential"


@dataclass
class _Cursor:
    """How far a range has been received, written and hashed; it survives a failed attempt."""

    position: int


class _ShortRead(Exception):
    """The body ended before the range did (a proxy or server cut it); the rest is requested again."""


class _Aborted(Exception):
    pass


class NotS3Error(Exception):
    """The endpoint answered like a web server, not like S3 (an HTML page, a redirect S3 never sends)."""


def _check_s3_reply(response_dict: dict[str, Any], **_: Any) -> None:
    """Refuse a reply no S3 server sends, before botocore parses it: an nginx 301 for a bucket URL sent
    botocore's region redirector into endless recursion, and an HTML page served with 200 would be stored
    as the model. S3's own redirects (PermanentRedirect, TemporaryRedirect) always name the bucket's region;
    an HTML reply is S3's only when it carries S3's headers (an object uploaded as text/html; moto's HEAD
    errors), which AWS, MinIO, Ceph RGW, SeaweedFS and moto all send (x-amz-request-id, x-amzn-requestid)."""
    headers = response_dict.get("headers", {})
    status = int(response_dict.get("status_code", 0))
    content_type = str(headers.get("content-type", "")).lower()
    s3ish = any(str(name).lower().startswith(("x-amz", "x-goog")) for name in headers)
    if content_type.startswith("text/html") and not s3ish:
        raise NotS3Error(f"it answered HTTP {status} with an HTML page")
    if 300 <= status < 400 and status != 304 and "x-amz-bucket-region" not in headers:
        location = headers.get("location")
        raise NotS3Error(f"it answered HTTP {status} redirecting to {location!r}" if location else
                         f"it answered HTTP {status}, a redirect without a bucket region")


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, (_ShortRead, http.client.HTTPException)):  # IncompleteRead: a chunked body cut short
        return True
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = exc.response.get("Error", {}).get("Code", "")
        return status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling", "ThrottlingException")
    from urllib3.exceptions import HTTPError as Urllib3Error  # botocore's own HTTP layer

    return isinstance(exc, (ResponseStreamingError, IncompleteReadError, ReadTimeoutError,
                            ConnectionClosedError, EndpointConnectionError, BotoConnectionError, Urllib3Error,
                            ConnectionError, TimeoutError))


def client_error(uri: str, exc: Exception, *, name: str | None = None) -> StorageError:
    """Turn a botocore failure into a storage error with advice; botocore's messages carry no secrets."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NotS3Error):
        return OriginError(uri, f"not an S3 endpoint: {exc}; check AWS_ENDPOINT_URL_S3 (the S3 API's URL, not "
                                "a web page or a bucket's website URL)", code="NotS3")
    if isinstance(exc, NoCredentialsError):
        return OriginError(uri, "no AWS credentials found; configure them the standard way "
                                "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws, "
                                "an instance role)",
                           code="NoCredentials")
    if isinstance(exc, EndpointConnectionError):
        return OriginError(uri, f"cannot reach the S3 endpoint ({exc}); check AWS_ENDPOINT_URL_S3 and the "
                                "network", code="Unreachable")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("PreconditionFailed",) or status == 412:
            return ObjectChangedError(uri, name or "?", "the object was overwritten during the download "
                                                        "(its ETag changed); fetch again for the new version")
        if code in ("NoSuchBucket",):
            return OriginError(uri, "the bucket does not exist", code=code)
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return OriginError(uri, "no such object or prefix", code="NotFound")
        if code in ("AccessDenied", "403", "Forbidden") or status == 403:
            return OriginError(uri, "access denied; check the credentials' permissions and the bucket policy",
                               code="AccessDenied")
        return OriginError(uri, f"S3 request failed: {code or status}", code=code or str(status))
    if _retryable(exc):
        return OriginError(uri, f"S3 transfer failed after retries: {type(exc).__name__}", code="Unreachable")
    return OriginError(uri, f"S3 request failed: {type(exc).__name__}: {exc}")


# How a file is verified: "crc": S3's full-object CRC, joined from the CRCs of any ranges; "crc-parts": S3's
# composite CRC, the ranges being the upload's parts; "parts": the multipart ETag, each part MD5ed by the
# worker that fetched it; "sequential": hashed in order as its contiguous prefix grows (a plain-MD5 ETag, or
# parts too large to be ranges); "none": size only (no usable checksum or ETag).
_HashMode = Literal["crc", "crc-parts", "parts", "sequential", "none"]


@dataclass
class _Plan:
    item: RemoteFile
    path: Path
    ranges: list[tuple[int, int]]
    mode: _HashMode
    part_size: int | None
    block_size: int = BLOCK_SIZE
    fd: int = -1
    crc: CRC | None = None  # S3's additional checksum, when the object carries one this code can check
    part_md5s: dict[int, bytes] = field(default_factory=dict)
    part_crcs: dict[int, int] = field(default_factory=dict)
    tracker: Watermark = field(default_factory=Watermark)
    unverifiable: bool = False  # SSE-KMS / SSE-C: the ETag is not an MD5 (a CRC still verifies)

    @property
    def expected(self) -> str | None:
        """The checksum the file must hash to, in checksum.py's form."""
        return str(self.crc) if self.crc is not None else self.item.etag

    def resume(self, index: int, recorded: str | None) -> bool:
        """Take a range a journal records as done, with the digest it recorded; False when that digest is not
        what this plan verifies with (a journal from an older fastload), so the range is fetched again."""
        if self.mode in ("crc", "crc-parts"):
            assert self.crc is not None
            algorithm, _, value = (recorded or "").partition(":")
            if algorithm != self.crc.algorithm or not value:
                return False
            try:
                self.part_crcs[index] = int(value, 16)
            except ValueError:
                return False
        elif self.mode == "parts":
            if not recorded or len(recorded) != 32:
                return False
            try:
                self.part_md5s[index] = bytes.fromhex(recorded)
            except ValueError:
                return False
        return True


class S3Origin(Origin):
    scheme = "s3"

    def __init__(self, settings: S3Settings | None = None, *, client: Any = None) -> None:
        self.settings = settings or S3Settings.from_env()
        self._client = client
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                from botocore.config import Config

                from .aws import new_session

                self._client = new_session().client(
                    "s3",
                    config=Config(
                        retries={"mode": self.settings.retry_mode,
                                 "max_attempts": self.settings.max_attempts},
                        max_pool_connections=self.settings.concurrency + 4,
                        connect_timeout=10,
                        read_timeout=60,
                        tcp_keepalive=True,
                    ),
                )
                self._client.meta.events.register("before-parse.s3", _check_s3_reply)
            return self._client

    # --- resolve ---------------------------------------------------------------------------------
    def resolve(self, uri: ModelURI, revision: str | None) -> Manifest:
        shown = str(uri)
        if uri.is_prefix:
            if revision:  # each object has its own VersionIds: listing the current ones would ignore it silently
                raise OriginError(shown, f"revision {revision!r} is an object's VersionId, and a prefix names many "
                                  "objects; name the object, or fetch the prefix without a revision",
                                  code="NoSuchVersion")
            return self._list(uri)
        extra = {"VersionId": revision} if revision else {}
        try:
            # ChecksumMode: the reply carries the object's additional checksum, if it has one (x-amz-checksum-*)
            head = self.client.head_object(Bucket=uri.netloc, Key=uri.path, ChecksumMode="ENABLED", **extra)
        except Exception as exc:
            error = client_error(shown, exc)
            if isinstance(error, OriginError) and error.code == "NotFound" and not revision:
                return self._list(uri.as_prefix(), shown=shown)
            raise error from None
        name = safe_relpath(uri.path.rsplit("/", 1)[-1], uri=shown)
        etag = normalize_etag(head.get("ETag"))
        crc = CRC.from_s3(head, etag)
        item = RemoteFile(name, int(head["ContentLength"]), uri.path, etag, head.get("VersionId"),
                          checksum=str(crc) if crc else None)
        return Manifest(shown, (item,), single=True)

    def _list(self, uri: ModelURI, *, shown: str | None = None) -> Manifest:
        shown = shown or str(uri)
        files: list[RemoteFile] = []
        names: set[str] = set()
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=uri.netloc, Prefix=uri.path):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    relative = key[len(uri.path):]
                    if key.endswith("/") and int(obj.get("Size", 0)) == 0:
                        continue  # a "folder" marker some tools create
                    safe_relpath(relative, uri=shown)
                    names.add(relative)
                    files.append(RemoteFile(relative, int(obj["Size"]), key, normalize_etag(obj.get("ETag"))))
        except UnsafeKeyError:
            raise
        except Exception as exc:
            raise client_error(shown, exc) from None
        for name in names:  # "a" and "a/b" cannot both be files on disk
            parent = name.rsplit("/", 1)[0] if "/" in name else None
            while parent:
                if parent in names:
                    raise UnsafeKeyError(name, f"{parent!r} is both a file and a directory in the listing",
                                         uri=shown)
                parent = parent.rsplit("/", 1)[0] if "/" in parent else None
        if not files:
            raise OriginError(shown, "no such object, and no objects under this prefix", code="NotFound")
        return Manifest(str(uri), tuple(sorted(files, key=lambda f: f.name)), single=False)

    # --- download --------------------------------------------------------------------------------
    def download(self, manifest: Manifest, dest: Path, *, journal: Journal, progress: Progress) -> Checksums:
        bucket = parse_uri(manifest.uri).netloc
        client = self.client
        abort = threading.Event()
        with ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="fastload-s3") as pool:
            # A listing does not give checksum values: each file's plan asks for it (one HEAD each, in parallel)
            plans = list(pool.map(lambda item: self._plan(client, bucket, item, dest, manifest.uri,
                                                          lookup=not manifest.single), manifest.in_download_order()))
            futures: list[Future[Any]] = []
            try:
                for plan in plans:
                    plan.fd = os.open(plan.path, os.O_RDWR | os.O_NOFOLLOW)  # prepare() checked the path
                with ThreadPoolExecutor(2, thread_name_prefix="fastload-hash") as hashers:
                    hash_futures = {plan.item.name: hashers.submit(self._hash_sequential, plan, abort)
                                    for plan in plans if plan.mode == "sequential"}
                    try:
                        for plan in plans:  # in file order, so contiguous prefixes (and hashing) advance early
                            for index, (start, end) in enumerate(plan.ranges):
                                resumed = journal.has(plan.item.name, start, end)
                                futures.append(pool.submit(self._resume_range if resumed else self._fetch_range,
                                                           client, bucket, plan, index, start, end, manifest.uri,
                                                           journal, progress, abort))
                        done, _ = wait(futures + list(hash_futures.values()), return_when=FIRST_EXCEPTION)
                        failed = [f for f in done if f.exception() is not None]
                        if failed:
                            errors = [f.exception() for f in failed]
                            real = [e for e in errors if not isinstance(e, _Aborted)]
                            raise (real or errors)[0]  # type: ignore[misc]
                        return {plan.item.name: self._verify(plan, hash_futures, manifest.uri) for plan in plans
                                if plan.mode != "none" and (plan.crc is not None or not plan.unverifiable)}
                    finally:
                        abort.set()  # however this ends, before the hashers' pool waits for them
            finally:
                # Every range stops (the abort is set above) before the descriptors close: a worker still writing
                # after that would write into whatever file this process opens next under the same number
                for future in futures:
                    future.cancel()
                wait(futures)
                for plan in plans:
                    if plan.fd >= 0:
                        os.close(plan.fd)

    def _plan(self, client: Any, bucket: str, item: RemoteFile, dest: Path, uri: str, *, lookup: bool) -> _Plan:
        """How ``item`` is fetched and verified. A full-object CRC leaves the ranges free (no part layout to
        learn: no second HEAD); a composite CRC or a multipart ETag needs the upload's part size."""
        path = confine(dest, item.name, uri=uri)
        crc = CRC.parse(item.checksum)
        if crc is None and lookup and item.etag and item.checksum is None:
            crc = self._head_checksum(client, bucket, item, uri)
        parts = etag_parts(item.etag) if crc is None else crc.parts
        part_size: int | None = None
        mode: _HashMode = "none"
        if crc is not None and crc.parts is None:
            mode = "crc"
        elif parts == 0:
            mode = "sequential"
        elif parts:
            first = item.size if parts == 1 else self._first_part_size(client, bucket, item)
            if first and (parts - 1) * first < item.size <= parts * first:
                part_size = first
                aligned: _HashMode = "crc-parts" if crc is not None else "parts"
                mode = aligned if first <= _MAX_ALIGNED_PART else "sequential"
            else:
                log.debug("%s: cannot recover the part layout of %s; verifying size only", uri, item.name)
        step = part_size if mode in ("parts", "crc-parts") and part_size else self.settings.part_size
        ranges = [(start, min(start + step, item.size)) for start in range(0, item.size, step)]
        block = block_size_for(step) if len(ranges) > 1 else BLOCK_SIZE  # one range: any block size joins
        return _Plan(item, path, ranges, mode, part_size, block, crc=crc if mode != "none" else None)

    def _head_checksum(self, client: Any, bucket: str, item: RemoteFile, uri: str) -> CRC | None:
        """The additional checksum of a listed object (listings give at most its algorithm), or None. Pinned
        to the listed ETag: an object overwritten since the listing fails here as it would in its GETs."""
        extra: dict[str, Any] = {"VersionId": item.version_id} if item.version_id else {}
        try:
            head = client.head_object(Bucket=bucket, Key=item.locator, ChecksumMode="ENABLED",
                                      IfMatch=f'"{item.etag}"', **extra)
        except Exception as exc:
            error = client_error(uri, exc, name=item.name)
            if isinstance(error, ObjectChangedError):
                raise error from None
            log.debug("HEAD (checksum) of %s failed: %r; verifying with the ETag", item.name, exc)
            return None
        return CRC.from_s3(head, item.etag)

    def _first_part_size(self, client: Any, bucket: str, item: RemoteFile) -> int | None:
        extra: dict[str, Any] = {"VersionId": item.version_id} if item.version_id else {}
        try:
            head = client.head_object(Bucket=bucket, Key=item.locator, PartNumber=1, **extra)
        except Exception as exc:
            log.debug("HEAD partNumber=1 of %s failed: %r", item.name, exc)
            return None
        return int(head["ContentLength"])

    def _resume_range(self, client: Any, bucket: str, plan: _Plan, index: int, start: int, end: int, uri: str,
                      journal: Journal, progress: Progress, abort: threading.Event) -> None:
        """Keep a range the journal records as done if the file still holds what was recorded for it, else
        fetch it again. The journal line is appended right after the bytes are written, without an fsync (one
        per range would stall the disk tiers' writeback), so after a power loss a line can outlive its bytes;
        the checksum verification joins the recorded CRCs or MD5s and never reads the file, so the bytes are
        hashed here, once, on the rare resume, instead of on every download."""
        key = (plan.item.name, start, end)
        recorded = journal.done[key]
        if plan.resume(index, recorded):
            hasher = self._range_hasher(plan)
            position = start
            while position < end:
                if abort.is_set():
                    raise _Aborted
                data = os.pread(plan.fd, min(8 * _CHUNK, end - position), position)
                if not data:
                    break
                hasher.update(data)
                position += len(data)
            blocks = journal.digests.get(key)
            if position == end and hasher.journal_digest() == recorded and \
                    (blocks is None or blocks[0] != plan.block_size or blocks[1] == hasher.blocks.hexdigest()):
                progress.add(end - start)
                plan.tracker.complete(start, end)
                return
            log.warning("%s: part %s bytes %d-%d of the interrupted download does not hold what its journal "
                        "records (a crash before the bytes reached the disk?); fetching it again", uri,
                        plan.item.name, start, end)
        self._fetch_range(client, bucket, plan, index, start, end, uri, journal, progress, abort)

    @staticmethod
    def _range_hasher(plan: _Plan) -> _RangeHasher:
        return _RangeHasher(md5=plan.mode == "parts",
                            crc=plan.crc.algorithm if plan.crc is not None and plan.mode != "sequential" else None,
                            block_size=plan.block_size)

    def _fetch_range(self, client: Any, bucket: str, plan: _Plan, index: int, start: int, end: int, uri: str,
                     journal: Journal, progress: Progress, abort: threading.Event) -> None:
        item = plan.item
        hasher = self._range_hasher(plan)
        cursor = _Cursor(start)
        extra: dict[str, Any] = {}
        if item.etag:
            extra["IfMatch"] = f'"{item.etag}"'
        if item.version_id:
            extra["VersionId"] = item.version_id
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_retryable),
            stop=tenacity.stop_after_attempt(self.settings.max_attempts),
            wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=10, jitter=0.2),
            before_sleep=lambda state: log.warning(
                "%s: part %s bytes %d-%d failed (%r); resuming at byte %d", uri, item.name, start, end,
                state.outcome.exception() if state.outcome else None, cursor.position),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    if abort.is_set():
                        raise _Aborted
                    self._get_into(client, bucket, plan, cursor, end, extra, hasher, progress, uri, abort)
        except (_Aborted, StorageError):
            raise
        except OSError as exc:
            if exc.errno in OUT_OF_SPACE:  # the tier's filesystem is full: the store falls through
                raise
            raise client_error(uri, exc, name=item.name) from exc
        except Exception as exc:
            raise client_error(uri, exc, name=item.name) from exc
        if hasher.crc_algorithm:
            plan.part_crcs[index] = hasher.crc
        elif hasher.md5:
            plan.part_md5s[index] = bytes.fromhex(hasher.hexdigest())
        blocks = (plan.block_size, hasher.blocks.hexdigest())
        mirror = progress.mirrors.get(item.name)
        if mirror is not None and _defers(plan):  # in the mirror only: journalled once the store writes it
            mirror.defer(start, end, hasher.journal_digest(), blocks)
        else:
            journal.record(item.name, start, end, hasher.journal_digest(), blocks)
        if mirror is not None:  # every byte of the range was received into it (_get_into), before it is reported
            mirror.filled(start, end)
        plan.tracker.complete(start, end)
        progress.range_done(item.name, start, end)

    def _get_into(self, client: Any, bucket: str, plan: _Plan, cursor: _Cursor, end: int, extra: dict[str, Any],
                  hasher: ETagHasher | None, progress: Progress, uri: str, abort: threading.Event) -> None:
        """One GET of ``[cursor.position, end)``, advancing the cursor past every chunk kept (written and
        hashed). A body that ends early or breaks (``_ShortRead``, a reset) leaves the cursor where its bytes
        ended, so the retry asks only for the rest and the range's hash sees every byte once."""
        item = plan.item
        position = cursor.position
        response = client.get_object(Bucket=bucket, Key=item.locator, Range=f"bytes={position}-{end - 1}",
                                     **extra)
        body = response["Body"]
        try:
            got_etag = normalize_etag(response.get("ETag"))
            if item.etag and got_etag and got_etag != item.etag:
                raise ObjectChangedError(uri, item.name, f"ETag changed from {item.etag} to {got_etag} during"
                                                         " the download; fetch again for the new version")
            if item.version_id and response.get("VersionId") not in (None, item.version_id):
                raise ObjectChangedError(uri, item.name, "VersionId changed during the download")
            if response.get("ServerSideEncryption", "").startswith("aws:kms") or \
                    response.get("SSECustomerAlgorithm"):
                plan.unverifiable = True
            content_range = response.get("ContentRange")
            if content_range:
                match = _CONTENT_RANGE.match(content_range)
                if not match or int(match.group(1)) != position:
                    raise IntegrityError(uri, item.name, f"asked for bytes from {position}, server sent "
                                                         f"{content_range!r}")
            elif position != 0:
                raise IntegrityError(uri, item.name, "server ignored the Range header")
            raw = _socket_stream(body)
            mirror = progress.mirrors.get(item.name)
            # With a mirror (the streaming load's private copy of the file), the bytes are received straight
            # into it: the reader's tensors are views of it, no copy. The file is written from it later, by the
            # store, once the download verified (progress.Mirror), unless this file is hashed from the file.
            view = _buffer() if mirror is None else mirror.view
            write = mirror is None or not _defers(plan)
            while position < end:
                if abort.is_set():  # another range failed: the download is over, this range's bytes are not wanted
                    raise _Aborted
                if mirror is None:
                    want = view[:min(len(view), end - position)]
                else:
                    want = view[position:min(position + _CHUNK, end)]
                count = raw.readinto(want) if raw is not None else _read_into(body, want)
                if not count:
                    break
                chunk = want[:count]
                if hasher is not None:
                    hasher.update(chunk)  # while the bytes are still in the CPU's cache
                if write:
                    pwrite_all(plan.fd, chunk, position)
                position += count
                cursor.position = position
                progress.add(count)
            if raw is not None and raw.isclosed():  # the whole body was read: the connection can be reused
                body._raw_stream.release_conn()
        finally:
            body.close()
        if position < end:
            raise _ShortRead(f"body ended at byte {position} of {end}")

    def _hash_sequential(self, plan: _Plan, abort: threading.Event) -> str:
        """Hash a file in order as its contiguous prefix grows, overlapping the download (plain-MD5 ETags
        cannot be hashed per range)."""
        hasher = hasher_for(plan.expected, plan.part_size)
        position = 0
        size = plan.item.size
        while position < size:
            limit = plan.tracker.wait_until(position + 1, abort.is_set, 0.2)
            if abort.is_set():
                raise _Aborted
            while position < limit:
                data = os.pread(plan.fd, min(8 * _CHUNK, limit - position), position)
                if not data:
                    raise IntegrityError(plan.item.locator, plan.item.name,
                                         f"file ends at {position}, expected {size}")
                hasher.update(data)
                position += len(data)
        return hasher.hexdigest()

    def _verify(self, plan: _Plan, hash_futures: dict[str, Future[Any]], uri: str) -> tuple[str, int | None]:
        item = plan.item
        size = os.fstat(plan.fd).st_size
        if size != item.size:
            raise IntegrityError(uri, item.name, f"expected {item.size} bytes, have {size}")
        expected = plan.expected
        if plan.mode == "crc":
            assert plan.crc is not None
            value = 0
            for index, (start, end) in enumerate(plan.ranges):
                value = crc_combine(plan.crc.algorithm, value, plan.part_crcs[index], end - start)
            checksum = str(CRC(plan.crc.algorithm, value))
        elif plan.mode == "crc-parts":
            assert plan.crc is not None
            checksum = str(composite(plan.crc.algorithm, [plan.part_crcs[i] for i in range(len(plan.ranges))]))
        elif plan.mode == "parts":
            checksum = combine([plan.part_md5s[i] for i in range(len(plan.ranges))]) if plan.ranges else \
                ETagHasher(plan.part_size).hexdigest()
        else:
            checksum = hash_futures[item.name].result()
        if checksum != expected:
            what = "checksum" if plan.crc is not None else "ETag"
            raise IntegrityError(uri, item.name, f"content hashes to {what} {checksum}, S3 says {expected}")
        return checksum, plan.part_size if plan.mode != "crc" else None
