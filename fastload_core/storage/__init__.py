"""Tiered model storage: S3 → shared filesystem → local disk → /dev/shm, one fetch per node, nothing torn.

``fetch(uri)`` returns a local path for a model URI; ``pin(uri)`` does the same and keeps the entry from
being evicted while it is used; ``prefetch`` warms models ahead of a deployment. ``TieredStore`` composes
tiers explicitly for callers that want their own chain.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path

from .base import Entry, Journal, Origin, Source, Tier, tier_for_path
from .errors import (
    BadURIError,
    FetchTimeoutError,
    IntegrityError,
    NotCachedError,
    ObjectChangedError,
    OriginError,
    StorageError,
    TierFullError,
    UnsafeKeyError,
)
from .eviction import Pin
from .local_disk import LocalDiskTier
from .meta import EntryMeta, FileMeta, Manifest, RemoteFile
from .settings import StorageSettings
from .shared_fs import SharedFsTier
from .shm import ShmTier
from .store import TieredStore, default_store
from .uri import ModelURI, is_uri, parse_uri, redact


def fetch(uri: str | os.PathLike[str], *, tier: str | None = None, revision: str | None = None) -> Path:
    """Local path of the model ``uri`` in the fastest tier that holds it, or in ``tier`` (``"shm"``,
    ``"local_disk"``, ``"shared_fs"``), fetching and promoting as needed. A prefix URI gives a directory
    of its files under their relative names; a single object gives the file. ``revision`` pins an S3
    VersionId, or a cached version digest shown by ``fastload cache ls``."""
    return default_store().fetch(uri, tier=tier, revision=revision)


def pin(uri: str | os.PathLike[str], *, tier: str | None = None, revision: str | None = None) -> Pin:
    """``fetch``, holding the entry in use until ``release()`` (or the end of a ``with`` block)."""
    return default_store().pin(uri, tier=tier, revision=revision)


def pin_path(path: str | os.PathLike[str]) -> Pin:
    """Hold a path returned by ``fetch`` in use (a no-op pin for paths outside every tier)."""
    return default_store().pin_path(path)


def tier_of(path: str | os.PathLike[str]) -> str:
    """Name of the tier whose entry holds ``path`` (as ``fetch`` handed it out), "" for a path outside every
    tier: what a load report says about where its bytes came from."""
    try:
        store = default_store()
    except StorageError:  # a bad FASTLOAD_* setting must not break loading a plain local file
        return ""
    found = tier_for_path(store.tiers, Path(path))
    return found[0].name if found else ""


def prefetch(uris: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *, tier: str | None = None,
             revision: str | None = None, background: bool = False) -> list[Path] | Future[list[Path]]:
    """Warm models ahead of need; ``background=True`` returns a ``Future`` immediately."""
    return default_store().prefetch(uris, tier=tier, revision=revision, background=background)


__all__ = [
    "BadURIError",
    "Entry",
    "EntryMeta",
    "FetchTimeoutError",
    "FileMeta",
    "IntegrityError",
    "Journal",
    "LocalDiskTier",
    "Manifest",
    "ModelURI",
    "NotCachedError",
    "ObjectChangedError",
    "Origin",
    "OriginError",
    "Pin",
    "RemoteFile",
    "SharedFsTier",
    "ShmTier",
    "Source",
    "StorageError",
    "StorageSettings",
    "Tier",
    "TierFullError",
    "TieredStore",
    "UnsafeKeyError",
    "default_store",
    "fetch",
    "is_uri",
    "parse_uri",
    "pin",
    "pin_path",
    "prefetch",
    "redact",
    "tier_of",
]
