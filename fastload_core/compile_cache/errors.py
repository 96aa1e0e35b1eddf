"""Errors the compile cache raises to its caller.

Almost nothing here reaches a serving replica: a cache that is down, slow or corrupt degrades to a
normal compile with a warning. What does raise is a mistake in configuration (a URL nobody can
serve), which should fail loudly at start-up rather than silently never cache.

A URL in an error is redacted (``redis://:password@host`` shows as ``redis://***@host``): these messages
end up in logs and in tracebacks of failed deployments.
"""

from __future__ import annotations

from ..errors import FastloadError, UnsafeKeyError
from ..storage.uri import redact


class CompileCacheError(FastloadError):
    """Base class of compile-cache errors."""


class CacheURLError(CompileCacheError):
    """A compile-cache URL is malformed or names a scheme no backend serves; ``url`` names it (redacted)."""

    def __init__(self, url: str, problem: str, schemes: list[str] | None = None) -> None:
        self.url = redact(url)
        self.problem = problem
        self.schemes = sorted(schemes or [])
        hint = f" (supported schemes: {', '.join(s + '://' for s in self.schemes)})" if self.schemes else ""
        super().__init__(f"compile cache URL {self.url!r}: {problem}{hint}")


class CorruptEntryError(CompileCacheError):
    """A stored entry failed verification (bad magic, truncated, checksum mismatch, unsafe member)."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"compile cache entry {key}: {problem}")


class EntryTooLargeError(CompileCacheError):
    """A packed entry exceeds what the backend may hold inline and no blob backend is configured."""

    def __init__(self, url: str, size: int, limit: int) -> None:
        self.url = redact(url)
        self.size = size
        self.limit = limit
        super().__init__(
            f"{self.url}: entry of {size} bytes exceeds the inline limit of {limit} bytes; add "
            "?blob=<file:// or s3:// URL> to the cache URL so large entries go to a blob store"
        )


class UnsafeCacheKeyError(CompileCacheError, UnsafeKeyError, ValueError):
    """A compile-cache key that cannot name an entry safely (empty, a path separator, a leading dot).
    Still a ``ValueError``, as it was before it joined the error tree."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"refusing unsafe compile-cache key {key!r}: {problem}; keys are the digests "
                         "`fastload cache ls` shows")
