"""Checksums in S3's forms, so one value verifies a download against S3 and later copies against it.

A single-part upload's ETag is the MD5 of the object; a multipart upload's is the MD5 of the concatenated
part MD5s plus ``-<parts>``. Knowing the part size, both can be recomputed from the bytes. (Objects
encrypted with SSE-KMS or SSE-C have ETags that are not MD5s.) Where an object also carries one of S3's
additional CRC checksums, that is what a download is verified with (``CRC``, below): far cheaper than MD5,
and it works for encrypted objects too.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

Buffer: TypeAlias = bytes | bytearray | memoryview

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


# --- S3's additional checksums ------------------------------------------------------------------------------
# An object uploaded with a checksum (boto3 adds CRC32 by default since 1.36; CRC32C and CRC64NVME on request)
# carries it as ``x-amz-checksum-<algorithm>``, returned with ``ChecksumMode=ENABLED``. A FULL_OBJECT checksum
# is the CRC of the whole object; a COMPOSITE one (multipart uploads) is the CRC of the concatenated big-endian
# part CRCs, written with a ``-<parts>`` suffix like a multipart ETag. Hardware CRCs cost a few hundredths of a
# CPU second per GiB where MD5 costs 1.5-2 (docs/storage.md), and a full-object CRC joins from the CRCs of any
# ranges (``combine``), so verification no longer ties the download's ranges to the upload's parts.

CRC_WIDTHS = {"crc32": 4, "crc32c": 4, "crc64nvme": 8}
# The response fields botocore fills from the x-amz-checksum-* headers, strongest first.
_CRC_FIELDS = (("ChecksumCRC64NVME", "crc64nvme"), ("ChecksumCRC32C", "crc32c"), ("ChecksumCRC32", "crc32"))
_CRC_TEXT = re.compile(r"^(crc32|crc32c|crc64nvme):([A-Za-z0-9+/=]+)(?:-([0-9]+))?$")


def crc_function(algorithm: str) -> Callable[[Buffer, int], int]:
    """The CRC for ``algorithm``: ``fn(data, previous) -> crc``. Each releases the GIL on large buffers, so
    the download threads compute it in parallel.

    CRC32 is ISA-L's (``isal``, in the ``s3`` extra) where it is installed, else zlib's (the standard
    library's). Measured on the 2-core VM (1 MiB buffers, one thread): ISA-L 0.02 CPU s per GiB (carry-less
    multiply), zlib 0.35 (table-driven), awscrt 0.33 (not hardware-accelerated on x86-64). On a small
    machine that difference is a fifth of a verified fetch's CPU per byte (docs/benchmarks.md, "S3 speed").
    Both release the GIL on large buffers. CRC32C and CRC64NVME stay awscrt's (0.02 CPU s per GiB: it uses
    the CPU's carry-less multiply for those)."""
    if algorithm == "crc32":
        return _crc32()
    from awscrt import checksums

    return {"crc32c": checksums.crc32c, "crc64nvme": checksums.crc64nvme}[algorithm]


@functools.cache
def _crc32() -> Callable[[Buffer, int], int]:
    try:
        from isal.isal_zlib import crc32
    except ImportError:  # no s3 extra, or a machine it leaves isal out on (no wheel there): zlib's is the same CRC
        return zlib.crc32
    return cast("Callable[[Buffer, int], int]", crc32)


def crc_combine(algorithm: str, first: int, second: int, second_length: int) -> int:
    """The CRC of ``A || B`` from ``crc(A)``, ``crc(B)`` and ``len(B)`` (zlib's crc32_combine, in awscrt)."""
    from awscrt import checksums

    combine_fn = {"crc32": checksums.combine_crc32, "crc32c": checksums.combine_crc32c,
                  "crc64nvme": checksums.combine_crc64nvme}[algorithm]
    return int(combine_fn(first, second, second_length))


@dataclass(frozen=True)
class CRC:
    """An S3 additional checksum: the algorithm, its value, and the part count of a composite checksum
    (``None``: a full-object checksum)."""

    algorithm: str
    value: int
    parts: int | None = None

    def __str__(self) -> str:
        """The recorded form, e.g. ``crc64nvme:AXqDKoKNJNY=`` or ``crc32c:IaltCg==-3`` (S3's base64 value)."""
        encoded = base64.b64encode(self.value.to_bytes(CRC_WIDTHS[self.algorithm], "big")).decode()
        return f"{self.algorithm}:{encoded}" + (f"-{self.parts}" if self.parts is not None else "")

    @classmethod
    def parse(cls, text: str | None) -> CRC | None:
        """The checksum ``str(crc)`` wrote; None for anything else (an ETag-form MD5)."""
        match = _CRC_TEXT.match(text or "")
        if not match:
            return None
        value = _decode(match.group(2), CRC_WIDTHS[match.group(1)])
        if value is None:
            return None
        return cls(match.group(1), value, int(match.group(3)) if match.group(3) else None)

    @classmethod
    def from_s3(cls, response: Mapping[str, Any], etag: str | None) -> CRC | None:
        """The CRC a HeadObject/GetObject reply (``ChecksumMode=ENABLED``) carries for the object with
        ``etag``, or None when it carries none this code can use.

        The type comes from ``ChecksumType`` or the ``-N`` suffix. Without either, a single-part object's
        checksum is of the full object, and so is any CRC64NVME (S3 has no composite CRC64NVME); a
        multipart object's CRC32/CRC32C is then ambiguous, and is not used (moto's HEAD drops both the
        type and the suffix). SHA-1/SHA-256 checksums are not CRCs and are not used either."""
        found = next(((response[name], algorithm) for name, algorithm in _CRC_FIELDS if response.get(name)), None)
        if found is None:
            return None
        raw, algorithm = found
        text, _, suffix = str(raw).partition("-")
        value = _decode(text, CRC_WIDTHS[algorithm])
        kind = str(response.get("ChecksumType") or "").upper()
        upload_parts = etag_parts(etag)
        if value is None or (suffix and not suffix.isdigit()):
            return None
        if suffix:
            return cls(algorithm, value, int(suffix)) if kind != "FULL_OBJECT" else None
        if kind == "FULL_OBJECT" or (not kind and (algorithm == "crc64nvme" or upload_parts == 0)):
            return cls(algorithm, value)
        if kind == "COMPOSITE" and upload_parts:
            return cls(algorithm, value, upload_parts)
        return None


def _decode(text: str, width: int) -> int | None:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return int.from_bytes(raw, "big") if len(raw) == width else None


def composite(algorithm: str, part_crcs: list[int]) -> CRC:
    """The composite checksum of an object whose parts have these CRCs, in order."""
    width = CRC_WIDTHS[algorithm]
    joined = b"".join(crc.to_bytes(width, "big") for crc in part_crcs)
    return CRC(algorithm, crc_function(algorithm)(joined, 0), len(part_crcs))


class CRCHasher:
    """Feed bytes in order; ``hexdigest()`` is ``str()`` of their CRC in the form of ``expected``: full-object,
    or composite over parts of ``part_size`` bytes. The sequential counterpart of the per-range CRCs the
    download threads compute, for copies and checks of files whose entry has no block digests."""

    def __init__(self, expected: CRC, part_size: int | None) -> None:
        if expected.parts is not None and not part_size:
            raise ValueError("a composite checksum needs the part size it was computed with")
        self.algorithm = expected.algorithm
        self.part_size = part_size if expected.parts is not None else None
        self._fn = crc_function(expected.algorithm)
        self._current = 0
        self._in_part = 0
        self._parts: list[int] = []

    def update(self, data: Buffer) -> None:
        if self.part_size is None:
            self._current = self._fn(data, self._current)
            return
        view = memoryview(data)
        while len(view):
            take = min(len(view), self.part_size - self._in_part)
            self._current = self._fn(view[:take], self._current)
            self._in_part += take
            view = view[take:]
            if self._in_part == self.part_size:
                self._parts.append(self._current)
                self._current, self._in_part = 0, 0

    def hexdigest(self) -> str:
        if self.part_size is None:
            return str(CRC(self.algorithm, self._current))
        parts = self._parts + ([self._current] if self._in_part or not self._parts else [])
        return str(composite(self.algorithm, parts))


def hasher_for(checksum: str | None, part_size: int | None) -> ETagHasher | CRCHasher:
    """What recomputes a recorded checksum: a CRC when it is one, else the ETag-form MD5."""
    crc = CRC.parse(checksum)
    return CRCHasher(crc, part_size) if crc is not None else ETagHasher(part_size)
