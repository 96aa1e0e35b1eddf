"""Tiered model storage: S3 → shared filesystem → local disk → /dev/shm, one fetch per node, nothing torn.

``fetch(uri)`` returns a local path for a model URI; ``pin(uri)`` does the same and keeps the entry from
being evicted while it is used; ``prefetch`` warms models ahead of a deployment. ``TieredStore`` composes
tiers explicitly for callers that want their own chain.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the lazy names, for type checkers and IDEs ("x as x": reachable, not in __all__)
    from .base import Entry as Entry
    from .base import Journal, Origin, Tier
    from .base import Source as Source
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
    from .meta import Checksums, Manifest, RemoteFile
    from .meta import EntryMeta as EntryMeta
    from .meta import FileMeta as FileMeta
    from .progress import Progress
    from .settings import StorageSettings
    from .shared_fs import SharedFsTier
    from .shm import ShmTier
    from .store import TieredStore
    from .store import default_store as default_store
    from .uri import ModelURI
    from .uri import is_uri as is_uri
    from .uri import parse_uri as parse_uri
    from .uri import redact as redact

# Imported on first use (PEP 562), like fastload_core's own names: deciding that a local path is not a
# URI must not import the store, its file locks and its clients.
_LAZY = {
    **dict.fromkeys(("Entry", "Journal", "Origin", "Source", "Tier"), ".base"),
    **dict.fromkeys(("BadURIError", "FetchTimeoutError", "IntegrityError", "NotCachedError", "ObjectChangedError",
                     "OriginError", "StorageError", "TierFullError", "UnsafeKeyError"), ".errors"),
    "Pin": ".eviction",
    "LocalDiskTier": ".local_disk",
    **dict.fromkeys(("Checksums", "EntryMeta", "FileMeta", "Manifest", "RemoteFile"), ".meta"),
    "Progress": ".progress",
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


def tier_of(path: str | os.PathLike[str]) -> str:
    """Name of the tier whose entry holds ``path`` (as ``fetch`` handed it out), "" for a path outside every
    tier: what a load report says about where its bytes came from. A process that never fetched has not
    imported the store and holds no tier path of its own: its plain local loads stay as cheap as they are."""
    if f"{__name__}.store" not in sys.modules:
        return ""
    from .base import tier_for_path
    from .errors import StorageError
    from .store import default_store

    try:
        store = default_store()
    except StorageError:  # a bad FASTLOAD_* setting must not break loading a plain local file
        return ""
    found = tier_for_path(store.tiers, Path(path))
    return found[0].name if found else ""


def prefetch(uris: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *, tier: str | None = None,
             revision: str | None = None, background: bool = False) -> list[Path] | Future[list[Path]]:
    """Warm models ahead of need; ``background=True`` returns a ``Future`` immediately."""
    from .store import default_store

    return default_store().prefetch(uris, tier=tier, revision=revision, background=background)


# The public surface (docs/api.md): the verbs, what composes a store, what a URI-scheme plugin's Origin
# works with, and the errors. The other names above stay importable for fastload's own modules, but are
# private, as is every submodule.
__all__ = [
    "BadURIError",
    "Checksums",
    "FetchTimeoutError",
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
    "Progress",
    "RemoteFile",
    "SharedFsTier",
    "ShmTier",
    "StorageError",
    "StorageSettings",
    "Tier",
    "TierFullError",
    "TieredStore",
    "UnsafeKeyError",
    "fetch",
    "pin",
    "pin_path",
    "prefetch",
    "tier_of",
]
