"""Listing, removing and checking compile-cache entries, for ``fastload cache`` and ``fastload doctor``."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import blob as blobfmt
from .cache import default_url
from .errors import CacheURLError, CorruptEntryError
from .registry import open_backend


@dataclass(frozen=True)
class Entry:
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


def list_entries(url: str | None = None) -> list[Entry]:
    """Every entry at ``url`` (default: the configured compile cache), with what each was built for."""
    backend = open_backend(url or default_url())
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
            found.append(Entry(backend.url, stored.key, stored.size, stored_at, fields, problem))
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
