"""Checksums in S3's ETag form, so one value verifies a download against S3 and later copies against it.

A single-part upload's ETag is the MD5 of the object; a multipart upload's is the MD5 of the concatenated
part MD5s plus ``-<parts>``. Knowing the part size, both can be recomputed from the bytes. (Objects
encrypted with SSE-KMS or SSE-C have ETags that are not MD5s; those are verified by size only.)
"""

from __future__ import annotations

import hashlib
import re

_MD5 = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART = re.compile(r"^[0-9a-f]{32}-([0-9]+)$")


def normalize_etag(etag: str | None) -> str | None:
    return etag.strip().strip('"').lower() if etag else None


def etag_parts(etag: str | None) -> int | None:
    """0 for a plain MD5 ETag, the part count for a multipart ETag, None when it is not an MD5 at all."""
    etag = normalize_etag(etag)
    if etag is None:
        return None
    if _MD5.match(etag):
        return 0
    match = _MULTIPART.match(etag)
    return int(match.group(1)) if match else None


def combine(part_md5s: list[bytes]) -> str:
    return hashlib.md5(b"".join(part_md5s), usedforsecurity=False).hexdigest() + f"-{len(part_md5s)}"


class ETagHasher:
    """Feed bytes in order; ``hexdigest()`` is the ETag S3 would give them uploaded with ``part_size``
    (``None``: a single-part upload, i.e. the plain MD5)."""

    def __init__(self, part_size: int | None = None) -> None:
        self.part_size = part_size
        self._current = hashlib.md5(usedforsecurity=False)
        self._in_part = 0
        self._parts: list[bytes] = []

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self.part_size is None:
            self._current.update(data)
            return
        view = memoryview(data)
        while len(view):
            take = min(len(view), self.part_size - self._in_part)
            self._current.update(view[:take])
            self._in_part += take
            view = view[take:]
            if self._in_part == self.part_size:
                self._parts.append(self._current.digest())
                self._current = hashlib.md5(usedforsecurity=False)
                self._in_part = 0

    def hexdigest(self) -> str:
        if self.part_size is None:
            return self._current.hexdigest()
        parts = self._parts + ([self._current.digest()] if self._in_part or not self._parts else [])
        return combine(parts)
