"""Storage errors. Each carries the URI (credentials redacted), tier or key it is about, so a caller can
act on it without parsing the message; messages say what to do next."""

from __future__ import annotations

import errno

from .. import errors
from ..errors import FastloadError

#: What a write into a tier fails with when its filesystem has no room left: blocks or inodes (ENOSPC), or a
#: quota (EDQUOT: a tmpfs with quotas, a user's disk quota). The store then falls through to the next tier.
OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class StorageError(FastloadError):
    """A model could not be fetched, cached or served from the tiered store."""

    def __init__(self, message: str, *, uri: str | None = None, tier: str | None = None) -> None:
        self.uri = uri
        self.tier = tier
        super().__init__(message)


class BadURIError(StorageError):
    """A model URI is malformed, uses an unknown scheme, or embeds credentials."""

    def __init__(self, uri: str, problem: str) -> None:
        self.problem = problem
        super().__init__(f"bad model URI {uri!r}: {problem}", uri=uri)


class UnsafeKeyError(StorageError, errors.UnsafeKeyError):
    """A key or file name would escape its tier's root (``..``, absolute, symlink out, odd characters)."""

    def __init__(self, key: str, problem: str, *, uri: str | None = None, tier: str | None = None) -> None:
        self.key = key
        self.problem = problem
        where = f" in {uri}" if uri else ""
        super().__init__(f"refusing unsafe key {key!r}{where}: {problem}", uri=uri, tier=tier)


class FetchTimeoutError(StorageError):
    """Another process held the fetch of this model longer than the wait allows."""

    def __init__(self, uri: str, tier: str, waited: float, holder: str) -> None:
        self.waited = waited
        self.holder = holder
        super().__init__(
            f"gave up after {waited:.0f}s waiting for {holder} to finish fetching {uri} into tier {tier!r}; "
            "raise FASTLOAD_FETCH_TIMEOUT if the model is large or the origin slow",
            uri=uri,
            tier=tier,
        )


class IntegrityError(StorageError):
    """Fetched bytes do not match the size or checksum the origin promised; nothing was published."""

    def __init__(self, uri: str, name: str, problem: str, *, tier: str | None = None) -> None:
        self.name = name
        self.problem = problem
        super().__init__(f"{uri}: file {name!r} failed verification: {problem}; nothing was cached, "
                         "fetch again", uri=uri, tier=tier)


class ObjectChangedError(IntegrityError):
    """The remote object was overwritten or deleted while it was being downloaded."""


class TierFullError(StorageError):
    """A tier cannot take a model even after evicting everything no process is using."""

    def __init__(self, tier: str, needed: int, available: int, *, uri: str | None = None,
                 filesystem_full: bool = False) -> None:
        """``filesystem_full``: the filesystem itself ran out of space (ENOSPC) while the model was written,
        whatever the tier's capacity allowed; ``available`` is then meaningless, and raising the capacity no
        remedy."""
        self.needed = needed
        self.available = available
        if filesystem_full:
            problem = (f"tier {tier!r} ran out of space writing {needed} bytes: its filesystem is full (other files, "
                       "or a capacity above what the filesystem holds); free space there or lower "
                       f"FASTLOAD_{tier.upper()}_CAPACITY")
        else:
            problem = (f"tier {tier!r} cannot take {needed} bytes (at most {available} bytes can be freed); "
                       f"raise its capacity (FASTLOAD_{tier.upper()}_CAPACITY) or release models in use")
        super().__init__(
            problem
            + (" (in a container /dev/shm is Docker's 64 MiB unless it runs with `docker run --shm-size=<size>`)"
               if tier == "shm" else ""),
            uri=uri,
            tier=tier,
        )


class OriginError(StorageError):
    """The origin refused or failed a request (missing object, access denied, unreachable endpoint)."""

    def __init__(self, uri: str, problem: str, *, code: str | None = None) -> None:
        self.code = code
        self.problem = problem
        super().__init__(f"{uri}: {problem}", uri=uri)


class NotCachedError(StorageError):
    """No tier holds the model (or the revision asked for), and the origin cannot give it: offline mode, an
    unreachable origin, or an origin that has only a newer version."""
