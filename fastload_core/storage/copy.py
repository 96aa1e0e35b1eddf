"""Verified local copies: promotion between tiers and fetches from a mounted origin (``file://``).

Each file is read once, hashed and written in the same pass; a copy whose MD5 differs from what the source
entry recorded is an ``IntegrityError`` and is never published. Files are copied in parallel (hashlib
releases the GIL), which matters for sharded checkpoints.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .base import Journal, Source
from .checksum import ETagHasher
from .errors import IntegrityError
from .meta import Checksums, Manifest
from .progress import Progress
from .uri import confine, safe_relpath

_CHUNK = 8 * 1024 * 1024


def copy_file(src: Path, dst: Path, *, size: int, expected: tuple[str, int | None] | None, uri: str,
              name: str, progress: Progress | None = None) -> tuple[str, int | None]:
    """Copy ``src`` into the preallocated ``dst``; return the checksum of what was copied, in the same form
    (part size) as ``expected`` so the two compare."""
    part_size = expected[1] if expected else None
    digest = ETagHasher(part_size)
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    copied = 0
    with open(src, "rb", buffering=0) as reader, open(dst, "r+b", buffering=0) as writer:
        while True:
            count = reader.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
            writer.write(view[:count])
            copied += count
            if progress is not None:
                progress.add(count)
                progress.range_done(name, copied - count, copied)
        writer.truncate(copied)
    if copied != size:
        raise IntegrityError(uri, name, f"expected {size} bytes, copied {copied} (did the source change?)")
    checksum = digest.hexdigest()
    if expected is not None and checksum != expected[0]:
        raise IntegrityError(uri, name, f"checksum {checksum} does not match the recorded {expected[0]}")
    return checksum, part_size


def copy_manifest(manifest: Manifest, source_root: Path, dest: Path, *, expected: Checksums,
                  progress: Progress, by_name: bool = False) -> Checksums:
    """Copy every file of ``manifest`` from ``source_root`` (at its locator, or at its name when the source
    is a tier entry) into ``dest``."""
    def one(name: str, locator: str, size: int) -> tuple[str, tuple[str, int | None]]:
        # The source was validated when it was listed (its own symlink rules apply); only the destination
        # is confined here.
        src = source_root
        if locator:
            src = source_root.joinpath(*safe_relpath(locator, uri=manifest.uri).split("/"))
        return name, copy_file(src, confine(dest, name, uri=manifest.uri), size=size,
                               expected=expected.get(name), uri=manifest.uri, name=name, progress=progress)

    workers = max(1, min(4, len(manifest.files), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="fastload-copy") as pool:
        futures = [pool.submit(one, f.name, f.name if by_name else f.locator, f.size) for f in manifest.files]
        return dict(future.result() for future in futures)


class EntrySource(Source):
    """A lower tier's published entry, as the source of a promotion into a faster tier."""

    def __init__(self, files_dir: Path, expected: Checksums) -> None:
        self.files_dir = files_dir
        self.expected = expected

    def download(self, manifest: Manifest, dest: Path, *, journal: Journal, progress: Progress) -> Checksums:
        return copy_manifest(manifest, self.files_dir, dest, expected=self.expected, progress=progress,
                             by_name=True)
