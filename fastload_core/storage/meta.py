"""Metadata: what an origin says a model is (``Manifest``) and what a tier entry holds (``EntryMeta``).

An entry's sidecar (``meta.json`` beside its ``files/`` directory) records each file's size and the
origin's identity for it (ETag, VersionId) plus an MD5 when one was computed, so a copy into another
tier can be verified against it before it is published.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeAlias

META_NAME = "meta.json"
# file name -> (checksum in one of checksum.py's forms: S3 CRC or ETag-form MD5, part size it was computed with)
Checksums: TypeAlias = dict[str, tuple[str, int | None]]
FILES_DIR = "files"


@dataclass(frozen=True)
class RemoteFile:
    """One file of a model as its origin lists it. ``locator`` is origin-specific (an S3 key, a path)."""

    name: str
    size: int
    locator: str
    etag: str | None = None
    version_id: str | None = None
    identity: str | None = None  # anything else that changes when the file does (mtime for file origins)
    # An additional checksum the origin stores for the file (checksum.CRC's form), when it said so; it is
    # not part of the identity (the ETag already changes with the bytes).
    checksum: str | None = None


@dataclass(frozen=True)
class Manifest:
    """A model at one version: its files and whether the URI named a single object or a prefix."""

    uri: str
    files: tuple[RemoteFile, ...]
    single: bool
    pinned_version: str | None = None  # set when the manifest comes from a cached entry

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def in_download_order(self) -> list[RemoteFile]:
        """The files in the order an origin should fetch them: the small ones that say how to read the rest
        (a shard index, a config) first, then the tensor files by name. A streamed load chooses its shards
        from the index: fetched last (``-00001-`` sorts before ``.index``), it would hold back every tensor
        until the download had finished."""
        return sorted(self.files, key=lambda f: (f.name.endswith(".safetensors"), f.name))

    @property
    def version(self) -> str:
        """Digest of every file's name, size and remote identity: a changed object is a new version, so it
        lands in a new entry instead of being mixed with the old one."""
        if self.pinned_version:
            return self.pinned_version
        return version_digest(
            [(f.name, f.size, f.etag or "", f.version_id or "", f.identity or "") for f in self.files]
        )


def is_version_digest(text: str) -> bool:
    """Whether ``text`` has the form of a fastload version (rather than an origin's own revision, such as an
    S3 VersionId)."""
    return len(text) == 20 and all(c in "0123456789abcdef" for c in text)


def version_digest(items: list[tuple[str, int, str, str, str]]) -> str:
    payload = json.dumps(sorted(items), separators=(",", ":")).encode()
    return hashlib.sha256(payload).hexdigest()[:20]


@dataclass(frozen=True)
class FileMeta:
    name: str
    size: int
    etag: str | None = None
    version_id: str | None = None
    # What the download was verified with (see checksum.py): S3's CRC ("crc64nvme:<base64>", composite with
    # "-N") when the object carries one, else the ETag form (plain MD5, or MD5-of-part-MD5s "-N").
    checksum: str | None = None
    part_size: int | None = None  # the part size ``checksum`` was computed with (None: of the whole file)
    block_size: int | None = None  # the block size ``digests`` were computed with (see verify.py)
    digests: str | None = None  # XXH3-64 of every block, hex, concatenated: what hits and promotions check


@dataclass(frozen=True)
class EntryMeta:
    uri: str
    version: str
    single: bool
    files: tuple[FileMeta, ...]
    created: float = field(default_factory=time.time)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        data: dict[str, Any] = asdict(self)
        data["format"] = 1
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EntryMeta:
        data = json.loads(text)
        # Fields a newer fastload added are skipped: a mixed fleet shares one mount, and an entry an older
        # reader cannot list is one it can neither use nor evict, yet its budget pays for it.
        known = {f.name for f in fields(FileMeta)}
        files = tuple(FileMeta(**{k: v for k, v in item.items() if k in known}) for item in data["files"])
        return cls(uri=data["uri"], version=data["version"], single=bool(data["single"]),
                   files=files, created=float(data["created"]))

    @classmethod
    def read(cls, entry_dir: Path) -> EntryMeta:
        return cls.from_json((entry_dir / META_NAME).read_text())

    def write(self, entry_dir: Path, *, fsync: bool = True) -> None:
        """Write the sidecar (durably, with ``fsync``); it is written last, so its presence means the files
        are complete."""
        path = entry_dir / META_NAME
        path.unlink(missing_ok=True)  # never write through whatever stood there (a planted link)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.to_json())
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())

    @classmethod
    def from_manifest(cls, manifest: Manifest, checksums: Checksums, *,
                      digests: dict[str, tuple[int, str]] | None = None) -> EntryMeta:
        """``digests``: block size and block digests by file name (see verify.py)."""
        files = []
        for f in manifest.files:
            checksum, part_size = checksums.get(f.name, (None, None))
            block_size, digest = (digests or {}).get(f.name, (None, None))
            files.append(FileMeta(f.name, f.size, f.etag, f.version_id, checksum, part_size, block_size, digest))
        return cls(uri=manifest.uri, version=manifest.version, single=manifest.single, files=tuple(files))

    def checksums(self) -> Checksums:
        return {f.name: (f.checksum, f.part_size) for f in self.files if f.checksum}

    def digests(self) -> dict[str, tuple[int, str]]:
        """Block size and block digests of every file that has them (entries written before they existed
        have none)."""
        return {f.name: (f.block_size, f.digests) for f in self.files if f.digests and f.block_size}

    def as_manifest(self) -> Manifest:
        """The manifest a lower tier's entry offers when it is the source of a promotion."""
        return Manifest(
            uri=self.uri,
            files=tuple(RemoteFile(f.name, f.size, f.name, f.etag, f.version_id) for f in self.files),
            single=self.single,
            pinned_version=self.version,
        )
