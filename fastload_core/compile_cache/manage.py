"""Listing, removing and checking compile-cache entries, for ``fastload cache`` and ``fastload doctor``."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..storage.uri import redact
from . import blob as blobfmt
from .cache import default_url, local_root
from .errors import CacheURLError, CorruptEntryError
from .registry import open_backend


@dataclass(frozen=True)
class CompileEntry:
    """A stored compile entry, described from its header (``problem`` says why it could not be read)."""

    url: str
    key: str
    size: int
    stored_at: float | None
    fields: Mapping[str, str] = field(default_factory=dict)
    problem: str | None = None

    def describe(self) -> str:
        if self.problem:
            return f"unreadable: {self.problem}"
        f = self.fields
        device = f.get("device_name") or f"{f.get('cpu_isa', '?')} x{f.get('threads', '?')}"
        return f"{f.get('model', '?')} | torch {f.get('torch', '?')} | {f.get('device', '?')} {device}"


def list_entries(url: str | None = None) -> list[CompileEntry]:
    """Every entry at ``url`` (default: the configured compile cache), with what each was built for."""
    backend = open_backend(url or default_url())
    shown = redact(backend.url)  # what `cache ls` prints: no redis://:password@
    try:
        found = []
        for stored in backend.entries():
            fields: dict[str, str] = {}
            problem = None
            stored_at = stored.stored_at
            try:
                head = backend.get_prefix(stored.key, blobfmt.HEADER_PROBE_BYTES)
                if head is None:
                    continue  # removed while listing
                header = blobfmt.read_header(head, stored.key)
                fields = dict(header.get("fields") or {})
                stored_at = stored_at or header.get("created")
            except CorruptEntryError as exc:
                problem = exc.problem
            except Exception as exc:  # one entry the backend cannot read must not hide the others
                problem = f"could not read it ({type(exc).__name__}: {exc})"
            found.append(CompileEntry(shown, stored.key, stored.size, stored_at, fields, problem))
        return found
    finally:
        backend.close()


def remove_entry(url: str | None, key: str) -> bool:
    """Remove one entry; False when there was none."""
    backend = open_backend(url or default_url())
    try:
        return backend.delete(key)
    finally:
        backend.close()


def check_backend(url: str | None = None) -> tuple[bool, str]:
    """Can this process use the cache at ``url``? A write, read and delete of a probe entry, timed.
    The message does not repeat the URL: the caller shows it once."""
    try:
        backend = open_backend(url or default_url())
    except CacheURLError as exc:
        hint = f" (supported schemes: {', '.join(s + '://' for s in exc.schemes)})" if exc.schemes else ""
        return False, f"{exc.problem}{hint}"
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    probe = f"doctor-probe-{os.getpid()}"
    payload = os.urandom(64)
    started = time.perf_counter()
    try:
        description = backend.check()
        backend.put(probe, payload, overwrite=True)
        if backend.get(probe) != payload:
            return False, "a probe entry did not read back intact"
        backend.delete(probe)
        elapsed_ms = 1000 * (time.perf_counter() - started)
        return True, f"{description}; round trip {elapsed_ms:.0f} ms"
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        backend.close()


#: A temp file or staging directory untouched for this long belongs to a store or restore that died
#: (a live one rewrites its file within seconds, and holds a lock on it besides).
STALE_AFTER_S = 3600.0


@dataclass(frozen=True)
class Garbage:
    """What ``collect_garbage`` removed."""

    url: str
    temp_files: int
    temp_bytes: int
    staging_dirs: int

    def describe(self) -> str:
        return (f"compile cache {self.url}: removed {self.temp_files} stale temp file(s) "
                f"({self.temp_bytes} bytes), {self.staging_dirs} stale restore director(ies)")


def collect_garbage(url: str | None = None, *, older_than: float = STALE_AFTER_S) -> Garbage:
    """Remove what killed stores and restores left behind (issue 11.9), for ``fastload cache gc``.

    In the backend at ``url``: ``.<key>.*.tmp`` files older than ``older_than`` seconds whose writer no
    longer holds their lock. On this node: ``.restore-*`` staging directories under the per-key inductor
    directories' root that nobody has touched for as long (a restore renames its files out of its
    staging directory within seconds).
    """
    backend = open_backend(url or default_url())
    try:
        files, nbytes = backend.collect_garbage(older_than=older_than)
        resolved = redact(backend.url)  # printed by `fastload cache gc`
    finally:
        backend.close()
    return Garbage(resolved, files, nbytes, _collect_staging(local_root(), older_than))


def _collect_staging(root: Path, older_than: float) -> int:
    removed = 0
    now = time.time()
    try:
        candidates = list(root.glob(".restore-*"))
    except OSError:
        return 0
    for path in candidates:
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        if path.is_symlink() or not path.is_dir() or now - info.st_mtime < older_than:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed
