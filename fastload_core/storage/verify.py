"""What a cache hit is checked against before it is served (``FASTLOAD_VERIFY``).

A published entry never changes, but the medium under it can: a flipped bit in /dev/shm, a file truncated
by a full disk or a careless ``cp``, a shared mount that lost a write. Every hit therefore compares each
file's size with the entry's metadata (``size``, the default: one ``fstatat`` per file, so zero-copy loads
stay zero-copy). ``sample`` also checks the first, the last and two random blocks of every file against the
per-block digests recorded when the entry was written; ``full`` checks every block. A damaged entry is
dropped and fetched again from the next tier down or the origin.

Digests are xxHash's XXH3-64 of every 4 MiB block (the ``xxhash`` package): fast enough that ``full`` costs
about one read of the entry, and recorded once at download, so a promotion into a faster tier verifies
against them in the copy pass instead of hashing the origin's way (MD5) again.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import xxhash

from .._safefs import UnsafePath, open_file
from .checksum import hasher_for
from .meta import FileMeta

BLOCK_SIZE = 4 * 1024 * 1024
DIGEST_CHARS = 16  # hex characters of one XXH3-64 digest
MODES = ("size", "sample", "full")
_SAMPLE_RANDOM = 2


class BlockDigests:
    """Feed a file's bytes in order; ``hexdigest()`` is the XXH3-64 of each ``block_size`` block, concatenated."""

    def __init__(self, block_size: int = BLOCK_SIZE) -> None:
        self.block_size = block_size
        self._current = xxhash.xxh3_64()
        self._in_block = 0
        self._done: list[str] = []

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            take = min(len(view), self.block_size - self._in_block)
            self._current.update(view[:take])
            self._in_block += take
            view = view[take:]
            if self._in_block == self.block_size:
                self._done.append(self._current.hexdigest())
                self._current = xxhash.xxh3_64()
                self._in_block = 0

    def hexdigest(self) -> str:
        tail = [self._current.hexdigest()] if self._in_block else []
        return "".join(self._done + tail)


def file_digests(path: Path, block_size: int = BLOCK_SIZE) -> str:
    """The block digests of the file at ``path`` (opened without following links)."""
    digests = BlockDigests(block_size)
    buffer = bytearray(block_size)
    fd = open_file(path, os.O_RDONLY)
    with os.fdopen(fd, "rb", buffering=0) as reader:
        while count := reader.readinto(buffer):
            digests.update(memoryview(buffer)[:count])
    return digests.hexdigest()


def _blocks_to_check(count: int, mode: str) -> list[int]:
    if mode == "full" or count <= 2 + _SAMPLE_RANDOM:
        return list(range(count))
    middle = random.sample(range(1, count - 1), _SAMPLE_RANDOM)
    return [0, *sorted(middle), count - 1]


def check_blocks(path: Path, item: FileMeta, mode: str) -> str | None:
    """Compare the blocks ``mode`` selects with the recorded digests; the problem, or None when they match.
    An entry written before digests existed has only its checksum: ``full`` recomputes that instead."""
    if not item.digests or not item.block_size:
        return _check_checksum(path, item) if mode == "full" and item.checksum else None
    block = item.block_size
    count = len(item.digests) // DIGEST_CHARS
    try:
        fd = open_file(path, os.O_RDONLY)
    except (OSError, UnsafePath) as exc:
        return f"{item.name!r} cannot be read ({exc})"
    try:
        for index in _blocks_to_check(count, mode):
            data = os.pread(fd, block, index * block)
            expected = item.digests[index * DIGEST_CHARS:(index + 1) * DIGEST_CHARS]
            if xxhash.xxh3_64_hexdigest(data) != expected:
                return f"block {index} of {item.name!r} (bytes {index * block}-{index * block + len(data)}) " \
                       "does not match the digest recorded when it was written"
    finally:
        os.close(fd)
    return None


def _check_checksum(path: Path, item: FileMeta) -> str | None:
    hasher = hasher_for(item.checksum, item.part_size)
    try:
        fd = open_file(path, os.O_RDONLY)
    except (OSError, UnsafePath) as exc:
        return f"{item.name!r} cannot be read ({exc})"
    with os.fdopen(fd, "rb", buffering=0) as reader:
        while chunk := reader.read(BLOCK_SIZE):
            hasher.update(chunk)
    if hasher.hexdigest() != item.checksum:
        return f"{item.name!r} hashes to {hasher.hexdigest()}, its metadata records {item.checksum}"
    return None


def check_sizes(files: tuple[FileMeta, ...], sizes: dict[str, int]) -> str | None:
    """Whether every file is there at the size its metadata records."""
    for item in files:
        if item.name not in sizes:
            return f"{item.name!r} is missing"
        if sizes[item.name] != item.size:
            return f"{item.name!r} has {sizes[item.name]} bytes, its metadata says {item.size}"
    return None
