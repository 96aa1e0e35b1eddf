"""Tiered model storage: S3 → shared filesystem → local disk → /dev/shm, one fetch per node, nothing torn.

``fetch(uri)`` returns a local path for a model URI; ``pin(uri)`` does the same and keeps the entry from
being evicted while it is used; ``prefetch`` warms models ahead of a deployment. ``TieredStore`` composes
tiers explicitly for callers that want their own chain.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the lazy names, for type checkers and IDEs
    from .base import Entry, Journal, Origin, Source, Tier
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

# Imported on first use (PEP 562), like fastload_core's own names: deciding that a local path is not a
# URI must not import the store, its file locks and its clients.
_LAZY = {
    **dict.fromkeys(("Entry", "Journal", "Origin", "Source", "Tier"), ".base"),
    **dict.fromkeys(("BadURIError", "FetchTimeoutError", "IntegrityError", "NotCachedError", "ObjectChangedError",
                     "OriginError", "StorageError", "TierFullError", "UnsafeKeyError"), ".errors"),
    "Pin": ".eviction",
    "LocalDiskTier": ".local_disk",
    **dict.fromkeys(("EntryMeta", "FileMeta", "Manifest", "RemoteFile"), ".meta"),
    "StorageSettings": ".settings",
    "SharedFsTier": ".shared_fs",
    "ShmTier": ".shm",
    **dict.fromkeys(("TieredStore", "default_store"), ".store"),
    **dict.fromkeys(("ModelURI", "is_uri", "parse_uri", "redact"), ".uri"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def fetch(uri: str | os.PathLike[str], *, tier: str | None = None, revision: str | None = None) -> Path:
    """Local path of the model ``uri`` in the fastest tier that holds it, or in ``tier`` (``"shm"``,
    ``"local_disk"``, ``"shared_fs"``), fetching and promoting as needed. A prefix URI gives a directory
    of its files under their relative names; a single object gives the file. ``revision`` pins an S3
    VersionId, or a cached version digest shown by ``fastload cache ls``."""
    from .store import default_store

    return default_store().fetch(uri, tier=tier, revision=revision)


def pin(uri: str | os.PathLike[str], *, tier: str | None = None, revision: str | None = None) -> Pin:
    """``fetch``, holding the entry in use until ``release()`` (or the end of a ``with`` block)."""
    from .store import default_store

    return default_store().pin(uri, tier=tier, revision=revision)


def pin_path(path: str | os.PathLike[str]) -> Pin:
    """Hold a path returned by ``fetch`` in use (a no-op pin for paths outside every tier)."""
    from .store import default_store

    return default_store().pin_path(path)


def prefetch(uris: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *, tier: str | None = None,
             revision: str | None = None, background: bool = False) -> list[Path] | Future[list[Path]]:
    """Warm models ahead of need; ``background=True`` returns a ``Future`` immediately."""
    from .store import default_store

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
]
