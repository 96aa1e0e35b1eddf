"""Verified local copies: promotion between tiers and fetches from a mounted origin (``file://``).

Each file is read once, hashed and written in the same pass. A promotion checks the block digests the
source entry recorded at download (XXH3, see verify.py), or its checksum (MD5 or S3's CRC) for entries
written before digests existed; a mismatch is an ``IntegrityError`` and is never published. Files are copied
in parallel (the hashes release the GIL), which matters for sharded checkpoints. A copy keeps a private
source private: a file keeps the source's read permissions for group and others, never more (0600 stays 0600).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .._atomic import readable_like_mode
from .._safefs import UnsafePath, open_file
from .base import Entry, Journal, Source
from .checksum import hasher_for
from .errors import IntegrityError, UnsafeKeyError
from .meta import FILES_DIR, Checksums, Manifest
from .progress import Progress
from .uri import confine, safe_relpath
from .verify import BlockDigests

_CHUNK = 8 * 1024 * 1024


def copy_file(src: Path, dst: Path, *, size: int, expected: tuple[str, int | None] | None, uri: str,
              name: str, progress: Progress | None = None, digests: tuple[int, str] | None = None,
              from_tier: bool = False) -> tuple[str, int | None] | None:
    """Copy ``src`` into the preallocated ``dst``. With ``digests`` (block size, recorded block digests) the
    copy is verified against them and ``expected`` is returned as is (same bytes, same checksum); otherwise
    return the checksum of what was copied, in the same form (part size) as ``expected`` so the two compare.
    ``from_tier``: the source is a tier entry, opened without following links."""
    part_size = expected[1] if expected else None
    digest = hasher_for(expected[0] if expected else None, part_size) if digests is None else None
    blocks = BlockDigests(digests[0]) if digests is not None else None
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    copied = 0
    try:
        src_fd = open_file(src, os.O_RDONLY) if from_tier else os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            dst_fd = open_file(dst, os.O_RDWR)
        except BaseException:
            os.close(src_fd)
            raise
    except UnsafePath as exc:
        raise UnsafeKeyError(exc.path, exc.problem, uri=uri) from None
    with open(src_fd, "rb", buffering=0) as reader, open(dst_fd, "r+b", buffering=0) as writer:
        os.fchmod(writer.fileno(), readable_like_mode(os.fstat(reader.fileno()).st_mode))
        while True:
            count = reader.readinto(buffer)
            if not count:
                break
            if digest is not None:
                digest.update(view[:count])
            if blocks is not None:
                blocks.update(view[:count])
            writer.write(view[:count])
            copied += count
            if progress is not None:
                progress.add(count)
                progress.range_done(name, copied - count, copied)
        writer.truncate(copied)
    if copied != size:
        raise IntegrityError(uri, name, f"expected {size} bytes, copied {copied} (did the source change?)")
    if blocks is not None and digests is not None:
        if blocks.hexdigest() != digests[1]:
            raise IntegrityError(uri, name, "its bytes do not match the block digests recorded when the source "
                                            "entry was written (the source is damaged)")
        return expected
    assert digest is not None
    checksum = digest.hexdigest()
    if expected is not None and checksum != expected[0]:
        raise IntegrityError(uri, name, f"checksum {checksum} does not match the recorded {expected[0]}")
    return checksum, part_size


def copy_manifest(manifest: Manifest, source_root: Path, dest: Path, *, expected: Checksums,
                  progress: Progress, by_name: bool = False,
                  digests: dict[str, tuple[int, str]] | None = None) -> Checksums:
    """Copy every file of ``manifest`` from ``source_root`` (at its locator, or at its name when the source
    is a tier entry) into ``dest``."""
    digests = digests or {}

    def one(name: str, locator: str, size: int) -> tuple[str, tuple[str, int | None] | None]:
        # The source was validated when it was listed (its own symlink rules apply); only the destination
        # is confined here.
        src = source_root
        if locator:
            src = source_root.joinpath(*safe_relpath(locator, uri=manifest.uri).split("/"))
        return name, copy_file(src, confine(dest, name, uri=manifest.uri), size=size,
                               expected=expected.get(name), uri=manifest.uri, name=name, progress=progress,
                               digests=digests.get(name), from_tier=by_name)

    workers = max(1, min(4, len(manifest.files), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="fastload-copy") as pool:
        futures = [pool.submit(one, f.name, f.name if by_name else f.locator, f.size)
                   for f in manifest.in_download_order()]
        results = (future.result() for future in futures)
        return {name: checksum for name, checksum in results if checksum is not None}


class EntrySource(Source):
    """A lower tier's published entry, as the source of a promotion into a faster tier."""

    def __init__(self, files_dir: Path, expected: Checksums,
                 digests: dict[str, tuple[int, str]] | None = None) -> None:
        self.files_dir = files_dir
        self.expected = expected
        self.digests = digests or {}

    @classmethod
    def of(cls, entry: Entry) -> EntrySource:
        """The entry's files, with the checksums and block digests it was published with."""
        return cls(entry.path / FILES_DIR, entry.meta.checksums(), entry.meta.digests())

    def download(self, manifest: Manifest, dest: Path, *, journal: Journal, progress: Progress) -> Checksums:
        return copy_manifest(manifest, self.files_dir, dest, expected=self.expected, progress=progress,
                             by_name=True, digests=self.digests)
