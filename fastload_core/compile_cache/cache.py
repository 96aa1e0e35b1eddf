"""``CompileCache``: a backend plus the rules that keep a bad cache from hurting a replica.

Every path that can fail here degrades: a backend that is down or slow is a miss (warned once per
process per URL, so a Redis outage does not flood the logs of a fleet); a corrupt, truncated or
mismatched entry is a miss that gets replaced after the compile (warned each time, because it means
something wrote garbage); an entry too large for its backend is simply not stored. Only a URL that no
backend can serve raises, at construction, because that is a configuration mistake worth failing on.

A cache that other machines can write (Redis, S3) is code those machines can run in this one: entries
hold compiled kernels and pickled data. Without ``FASTLOAD_COMPILE_CACHE_SECRET`` (entries signed and
checked, see ``blob``) that is said once per process, the first time such a cache is opened.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..config import cache_dir
from ..storage.uri import redact
from . import blob as blobfmt
from .base import CompileCacheBackend
from .blob import EntryMismatchError, Restored
from .errors import CorruptEntryError, EntryTooLargeError
from .keys import CompileKey
from .registry import open_backend

log = logging.getLogger("fastload.compile_cache")

#: Default cache URL when none is passed; a ``file://`` directory under the fastload cache otherwise.
URL_VARIABLE = "FASTLOAD_COMPILE_CACHE"
_MARKER = ".fastload-entry"

_warned_lock = threading.Lock()
# The cache-directory variables are process-wide, so first calls that swap them take turns. Dynamo
# serialises compiles anyway; this only keeps two threads from pointing inductor at each other's keys.
_env_lock = threading.RLock()
_warned_unavailable: set[str] = set()
#: Backends other machines write to; an unsigned entry from one of them is trusted only on a checksum.
SHARED_SCHEMES = frozenset({"redis", "s3"})
_unsigned_shared_warning = threading.Event()


def default_url() -> str:
    configured = os.environ.get(URL_VARIABLE)
    return configured if configured else (cache_dir() / "compile" / "entries").as_uri()


def local_root() -> Path:
    """Where per-key inductor cache directories live on this node (shared by its replicas)."""
    return cache_dir() / "compile" / "inductor"


@dataclass(frozen=True)
class RestoreOutcome:
    """How a lookup went: restored, local, miss, corrupt, mismatch, unavailable or error (local I/O)."""

    status: str
    restored: Restored | None = None
    entry_bytes: int = 0
    fetch_s: float = 0.0
    unpack_s: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class SaveOutcome:
    """How a store went: stored, exists, too_large, unavailable or error (local I/O)."""

    status: str
    entry_bytes: int = 0
    pack_s: float = 0.0
    store_s: float = 0.0
    message: str = ""


class CompileCache:
    """A compile cache at one URL (``file://``, ``redis://``, ``s3://`` or a plugin's scheme)."""

    def __init__(self, url: str | os.PathLike[str] | None = None, *,
                 backend: CompileCacheBackend | None = None) -> None:
        """``url``: ``file:///dir``, ``redis://...``, ``s3://...``, a plugin's scheme, or a directory path
        (``/srv/compile-cache`` means ``file:///srv/compile-cache``); None for ``default_url()``."""
        self.backend = backend if backend is not None else open_backend(url or default_url())
        # The URL as shown: logs, reports, the after_compile hook. A ``redis://:password@`` part would
        # otherwise reach every log aggregator; only the backend, which connects, keeps the URL as given.
        self.url = redact(self.backend.url)
        if self.backend.scheme in SHARED_SCHEMES and blobfmt.signing_secret() is None:
            _warn_unsigned_shared_once(self.url)

    def __repr__(self) -> str:
        return f"CompileCache({self.url!r})"

    def workdir(self, key: CompileKey) -> Path:
        """The inductor cache directory for one key on this node."""
        return local_root() / key.digest

    def restore(self, key: CompileKey, dest: Path) -> RestoreOutcome:
        """Put the stored entry for ``key`` into ``dest`` if there is a valid one; never raises."""
        if (dest / _MARKER).is_file():
            if _vouched(dest):
                # Another replica on this node already restored or built this key: inductor finds it there.
                return RestoreOutcome("local", message=f"{dest} already holds this key")
            # Restored before FASTLOAD_COMPILE_CACHE_SECRET was set (or under another one): fetch and check it.
            shutil.rmtree(dest, ignore_errors=True)
        started = time.perf_counter()
        try:
            data = self.backend.get(key.digest)
        except CorruptEntryError as exc:  # the backend found garbage under the key (e.g. a bad pointer)
            return self._corrupt(key, exc, fetch_s=time.perf_counter() - started)
        except Exception as exc:
            return RestoreOutcome("unavailable", fetch_s=time.perf_counter() - started,
                                  message=self._unavailable("read", exc))
        fetched = time.perf_counter()
        if data is None:
            return RestoreOutcome("miss", fetch_s=fetched - started)
        try:
            restored = blobfmt.unpack(data, key, dest)
        except OSError as exc:  # the entry may be fine; this node could not write it (disk full, ...)
            message = f"compile cache: could not unpack entry {key.digest} into {dest}: {exc!r}; compiling"
            log.warning("%s", message)
            return RestoreOutcome("error", entry_bytes=len(data), fetch_s=fetched - started,
                                  unpack_s=time.perf_counter() - fetched, message=message)
        except CorruptEntryError as exc:
            return self._corrupt(key, exc, entry_bytes=len(data), fetch_s=fetched - started,
                                 unpack_s=time.perf_counter() - fetched)
        except Exception as exc:  # any other failure on a stored entry: corrupt too, since restore never raises
            problem = CorruptEntryError(key.digest, f"could not unpack it ({type(exc).__name__}: {exc})")
            return self._corrupt(key, problem, entry_bytes=len(data), fetch_s=fetched - started,
                                 unpack_s=time.perf_counter() - fetched)
        _mark(dest, key, _restored_under())
        return RestoreOutcome("restored", restored=restored, entry_bytes=len(data), fetch_s=fetched - started,
                              unpack_s=time.perf_counter() - fetched)

    def save(
        self, key: CompileKey, source: Path, mega: bytes | None, *, overwrite: bool = False
    ) -> SaveOutcome:
        """Pack ``source`` (an inductor cache directory) and store it under ``key``; never raises."""
        started = time.perf_counter()
        try:
            data = blobfmt.pack(key, source, mega)
        except OSError as exc:
            message = f"compile cache: could not pack {source}: {exc!r}; not storing"
            log.warning("%s", message)
            return SaveOutcome("error", 0, time.perf_counter() - started, 0.0, message)
        packed = time.perf_counter()
        try:
            stored = self.backend.put(key.digest, data, overwrite=overwrite)
        except EntryTooLargeError as exc:
            log.warning("compile cache: not storing %s: %s", key.digest, exc)
            return SaveOutcome("too_large", len(data), packed - started, time.perf_counter() - packed,
                               str(exc))
        except Exception as exc:
            return SaveOutcome("unavailable", len(data), packed - started, time.perf_counter() - packed,
                               self._unavailable("write", exc))
        _mark(source, key, _BUILT_HERE)
        return SaveOutcome("stored" if stored else "exists", len(data), packed - started,
                           time.perf_counter() - packed)

    def _corrupt(self, key: CompileKey, exc: CorruptEntryError, *, entry_bytes: int = 0, fetch_s: float = 0.0,
                 unpack_s: float = 0.0) -> RestoreOutcome:
        """A miss that the store after the compile overwrites (warned every time: something wrote garbage)."""
        status = "mismatch" if isinstance(exc, EntryMismatchError) else "corrupt"
        message = (f"compile cache {self.url}: ignoring entry {key.digest}: {exc.problem}; "
                   "compiling and replacing it")
        log.warning("%s", message)
        return RestoreOutcome(status, entry_bytes=entry_bytes, fetch_s=fetch_s, unpack_s=unpack_s,
                              message=message)

    def _unavailable(self, action: str, exc: BaseException) -> str:
        message = (f"compile cache {self.url} could not {action} ({type(exc).__name__}: {exc}); "
                   "compiling without it")
        with _warned_lock:
            first = self.url not in _warned_unavailable
            _warned_unavailable.add(self.url)
        if first:
            log.warning("%s (further failures of this cache are logged at debug level)", message)
        else:
            log.debug("%s", message)
        return message


def _warn_unsigned_shared_once(url: str) -> None:
    with _warned_lock:
        if _unsigned_shared_warning.is_set():
            return
        _unsigned_shared_warning.set()
    log.warning("compile cache %s is shared and %s is not set: its entries (compiled kernels, pickled data) "
                "are trusted on a checksum, so anyone who can write to it can run code in this process; set "
                "the same secret on every replica to sign and check entries", url, blobfmt.SECRET_VARIABLE)


@contextmanager
def inductor_cache_dir(path: Path) -> Iterator[None]:
    """Point inductor (and Triton) at ``path`` for the duration, then put the previous values back."""
    names = {"TORCHINDUCTOR_CACHE_DIR": str(path), "TRITON_CACHE_DIR": str(path / "triton")}
    with _env_lock:
        previous = {name: os.environ.get(name) for name in names}
        path.mkdir(parents=True, exist_ok=True)
        os.environ.update(names)
        try:
            yield
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


_BUILT_HERE = "built"


def _restored_under() -> str:
    """What vouched for an entry restored now: the secret in force (named by an id derived from it, never the
    secret itself), or nothing."""
    secret = blobfmt.signing_secret()
    if secret is None:
        return "unsigned"
    return "signed:" + hmac.new(secret, b"fastload compile-cache marker", hashlib.sha256).hexdigest()[:16]


def _vouched(dest: Path) -> bool:
    """Whether a local entry may be used as it is: built on this node, or restored under the secret in force
    (any, when none is set). One restored unchecked stays a stranger's code once a secret is set."""
    if blobfmt.signing_secret() is None:
        return True
    try:
        lines = (dest / _MARKER).read_text().splitlines()
    except OSError:
        return False
    trust = lines[1] if len(lines) > 1 else "unsigned"  # a marker from before entries were signed
    return trust in (_BUILT_HERE, _restored_under())


def _mark(dest: Path, key: CompileKey, trust: str) -> None:
    try:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / _MARKER).write_text(f"{key.digest}\n{trust}\n")
    except OSError as exc:  # the marker only saves a fetch; losing it costs nothing else
        log.debug("could not mark %s: %r", dest, exc)
