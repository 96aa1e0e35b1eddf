"""The one small interface every compile-cache backend implements.

A backend moves opaque bytes under a key; it knows nothing about torch. Packing, verification and the
decision to degrade live above it, so a plugin backend only has to get storage right: ``put`` with
``overwrite=False`` must leave exactly one complete entry when replicas race (``SET NX``, an atomic
rename, a conditional put), and ``get`` must never return a half-written entry as if it were whole.
Backends raise whatever their client raises; the caller turns any exception into a warning and a
normal compile.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from ..storage.uri import redact
from .errors import CacheURLError


@dataclass(frozen=True)
class StoredEntry:
    """An entry as a backend sees it, without reading it."""

    key: str
    size: int
    stored_at: float | None  # seconds since the epoch, where the backend knows it


class CompileCacheBackend(ABC):
    """Bytes under keys at one URL. Subclasses set ``scheme`` and take the URL in ``__init__``."""

    scheme: str = ""

    def __init__(self, url: str) -> None:
        self.url = url

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The entry's bytes, or None if there is none."""

    @abstractmethod
    def put(self, key: str, blob: bytes, *, overwrite: bool = False) -> bool:
        """Store an entry; False when ``overwrite`` is off and an entry already exists (it is kept)."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove an entry; False when there was none."""

    @abstractmethod
    def entries(self) -> list[StoredEntry]:
        """Every entry this backend holds."""

    def get_prefix(self, key: str, nbytes: int) -> bytes | None:
        """The first ``nbytes`` of an entry (for listings); backends that can read a range override it."""
        blob = self.get(key)
        return None if blob is None else blob[:nbytes]

    def check(self) -> str:
        """Reach the backend and say what is there; raise if it cannot be used."""
        return f"{len(self.entries())} entries"

    def collect_garbage(self, *, older_than: float) -> tuple[int, int]:
        """Remove what interrupted stores left behind, older than ``older_than`` seconds and no longer in
        use; returns (files, bytes). Backends whose writes are atomic on the server keep nothing."""
        return 0, 0

    def close(self) -> None:  # noqa: B027  (most backends hold nothing to release)
        """Release connections."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact(self.url)!r})"  # reprs end up in logs and tracebacks


BackendFactory = Callable[[str], CompileCacheBackend]


def query_params(url: str) -> dict[str, str]:
    """Query parameters of a cache URL, last value wins."""
    return {name: values[-1] for name, values in parse_qs(urlsplit(url).query).items()}


def float_param(url: str, name: str, default: float) -> float:
    value = query_params(url).get(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise CacheURLError(url, f"{name}={value!r} is not a number") from None
