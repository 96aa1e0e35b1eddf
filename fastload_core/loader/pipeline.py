"""The staged copy pipeline behind device loading, independent of any device API.

Reader threads take chunks of the files in order, each reads its chunk into a free buffer of a
shared pool of (pinned) host buffers and starts an asynchronous copy out of it to the device; the
buffer goes back to the pool together with that copy's completion, and whoever takes it next waits
for the copy to land before reading into it. So reads keep every reader busy, copies overlap the
reads, no tensor ever aliases memory that is being overwritten, and a slow chunk holds up only its
own reader (no head-of-line wait). Chunks of several files share the readers and the pool, so the
small last shard of a checkpoint loads beside the others instead of after them.

Keeping the device side behind ``CopyEngine`` and the host buffers behind an ``allocate`` function
lets the ordering, the chunk planning and the sizing be tested on a CPU, with an engine that defers
its copies until they are waited for.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import torch

from ..errors import LoaderSettingError, TruncatedFileError
from .pagecache import PAGE, file_resident_fraction

MIB = 1 << 20
# O_DIRECT needs offsets, lengths and buffer addresses aligned to the logical block size; a page is
# a multiple of every block size in use (512, 4096), and pinned buffers are page-aligned.
DIRECT_ALIGN = PAGE


@dataclass(frozen=True)
class Chunk:
    """One read and one copy: file bytes ``[file_offset, file_offset + read_length)`` land at the start
    of a buffer; ``length`` of them, from ``skip`` on, are copied to ``dest_offset`` of destination
    ``target``. ``skip`` and a ``read_length`` beyond ``skip + length`` exist only for aligned reads."""

    file_offset: int
    length: int
    dest_offset: int
    skip: int = 0
    read_length: int = -1  # -1: the same as ``length``
    target: int = 0

    @property
    def read_bytes(self) -> int:
        return self.length if self.read_length < 0 else self.read_length


def plan_chunks(start: int, end: int, chunk_bytes: int, *, align: int = 1, target: int = 0) -> list[Chunk]:
    """Split the file span ``[start, end)`` into reads of at most ``chunk_bytes``; ``dest_offset`` is
    relative to ``start``.

    With ``align`` > 1 every read starts and ends on a multiple of ``align`` (the first read starts
    below ``start``, the last may run past ``end`` and past the end of the file), as O_DIRECT needs;
    ``chunk_bytes`` must then be a multiple of ``align``.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    if align < 1 or chunk_bytes % align:
        raise ValueError(f"chunk_bytes ({chunk_bytes}) must be a positive multiple of align ({align})")
    if end <= start:
        return []
    if align == 1:
        return [
            Chunk(offset, min(chunk_bytes, end - offset), offset - start, target=target)
            for offset in range(start, end, chunk_bytes)
        ]
    first = start - start % align
    last = -(-end // align) * align
    chunks = []
    for offset in range(first, last, chunk_bytes):
        read_end = min(offset + chunk_bytes, last)
        wanted_start, wanted_end = max(offset, start), min(read_end, end)
        chunks.append(Chunk(offset, wanted_end - wanted_start, wanted_start - start,
                            skip=wanted_start - offset, read_length=read_end - offset, target=target))
    return chunks


@dataclass(frozen=True)
class StagingPlan:
    """How many reader threads, how many host buffers, and how large each read is."""

    readers: int
    slots: int
    chunk_bytes: int


def plan_staging(total_bytes: int, readers: int, *, slot_bytes: int = 16 * MIB, min_chunk: int = MIB) -> StagingPlan:
    """Size the pipeline from the machine (``readers``: ``cpu.io_threads()``) and the data.

    Reads are ``slot_bytes`` long, but a small load is split so that every reader gets a share (in
    whole ``min_chunk``s), and there are never more readers than reads. Buffers: one per reader plus
    two, so a reader never waits for a copy: a buffer is busy for one read (~8 ms for 16 MiB at
    2 GB/s per thread) plus one copy (~0.3 ms at 50 GB/s); 16 readers hold 18 × 16 MiB = 288 MiB.
    """
    if readers < 1:
        raise ValueError(f"readers must be at least 1, got {readers}")
    if slot_bytes < min_chunk or slot_bytes % min_chunk:
        raise ValueError(f"slot_bytes ({slot_bytes}) must be a positive multiple of {min_chunk}")
    share = -(-max(total_bytes, 1) // readers)
    chunk = min(slot_bytes, max(min_chunk, -(-share // min_chunk) * min_chunk))
    readers = min(readers, max(1, -(-total_bytes // chunk)))
    return StagingPlan(readers=readers, slots=readers + 2, chunk_bytes=chunk)


@dataclass
class PipelineTimings:
    """Where a pipeline's readers spent their time, in seconds summed over the readers (``first_copy``:
    wall time from the start to the first copy started).

    A fresh process's first load pays set-up that a repeat load does not; these say which part of a
    slow load was pinning, reading, or waiting for the copy engine, so a GPU run that is rare and
    short yields a diagnosis and not just a total.
    """

    allocate: float = 0.0  # pinning staging buffers (first use of each slot)
    wait: float = 0.0  # waiting for a free slot or for the last copy out of it
    read: float = 0.0  # file reads into the buffers
    launch: float = 0.0  # starting the asynchronous copies
    first_copy: float = 0.0

    def add(self, other: PipelineTimings) -> None:
        for field in fields(self):
            if field.name != "first_copy":
                setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def stages(self) -> dict[str, float]:
        """Named as ``LoadReport`` stages; the ``thread-s`` ones are summed over the readers, not wall time."""
        return {"pin (thread-s)": self.allocate, "slot wait (thread-s)": self.wait,
                "read (thread-s)": self.read, "copy launch (thread-s)": self.launch,
                "to first copy": self.first_copy}


class Completion(Protocol):
    def synchronize(self) -> None: ...


class CopyEngine(Protocol):
    def copy(self, destination: torch.Tensor, source: torch.Tensor, index: int) -> Completion:
        """Start copying ``source`` into ``destination``; the returned handle waits for the end."""
        ...


class _Slot:
    __slots__ = ("buffer", "pending")

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.pending: Completion | None = None


class BufferPool:
    """Host buffers of ``slot_bytes`` each, handed to one reader at a time, reused across loads.

    A buffer is allocated by the first reader that takes its slot, so a fresh process starts reading
    after one allocation instead of after all of them: pinning host memory is the slowest part of a
    pipeline's set-up, and here it overlaps the first reads. A slot comes back with the completion of
    the copy out of it; taking it waits for that copy first. Slots are handed out oldest-first, so the
    copy waited for is almost always done already.
    """

    def __init__(self, slot_bytes: int, allocate: Callable[[int], torch.Tensor]) -> None:
        self.slot_bytes = slot_bytes
        self._allocate = allocate
        self._free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self._count = 0
        self._lock = threading.Lock()
        self._all: list[_Slot] = []

    @property
    def count(self) -> int:
        return self._count

    @property
    def allocated_bytes(self) -> int:
        return sum(slot.buffer.numel() for slot in self._all if slot.buffer is not None)

    def ensure(self, slots: int) -> None:
        """Grow to at least ``slots`` slots (buffers come later, when first taken)."""
        with self._lock:
            while self._count < slots:
                slot = _Slot()
                self._all.append(slot)
                self._free.put(slot)
                self._count += 1

    def take(self, timings: PipelineTimings | None = None) -> _Slot:
        """A free slot, its buffer allocated and its last copy landed; ``timings`` gets the waits."""
        started = time.perf_counter()
        slot = self._free.get()
        try:
            if slot.pending is not None:
                slot.pending.synchronize()  # the buffer is free only once its last copy has landed
                slot.pending = None
            waited = time.perf_counter()
            if slot.buffer is None:
                slot.buffer = self._allocate(self.slot_bytes)
            if timings is not None:
                timings.wait += waited - started
                timings.allocate += time.perf_counter() - waited
        except BaseException:
            self._free.put(slot)
            raise
        return slot

    def give_back(self, slot: _Slot, pending: Completion | None) -> None:
        slot.pending = pending
        self._free.put(slot)

    def drain(self) -> list[torch.Tensor]:
        """Wait for every copy out of the pool; return its buffers and forget them (for release)."""
        with self._lock:
            buffers = []
            for slot in self._all:
                if slot.pending is not None:
                    slot.pending.synchronize()
                    slot.pending = None
                if slot.buffer is not None:
                    buffers.append(slot.buffer)
                    slot.buffer = None
            return buffers


def run_pipeline(
    chunks: Sequence[Chunk],
    pool: BufferPool,
    destinations: Sequence[torch.Tensor],
    read: Callable[[torch.Tensor, Chunk], None],
    engine: CopyEngine,
    readers: int,
    timings: PipelineTimings | None = None,
) -> None:
    """Stream ``chunks`` through ``pool`` into ``destinations`` (all bytes, ``uint8``) with ``readers``
    threads; returns once every copy has landed. The first error of any reader is raised, after the
    copies already started have landed (so nothing writes into memory the caller may free).
    ``timings``, when given, receives where the readers' time went."""
    if readers < 1:
        raise ValueError(f"the pipeline needs at least one reader, got {readers}")
    if not chunks:
        return
    for chunk in chunks:
        if chunk.skip + chunk.length > chunk.read_bytes or chunk.read_bytes > pool.slot_bytes:
            raise ValueError(f"{chunk} does not fit a {pool.slot_bytes}-byte buffer")
    pool.ensure(1)
    next_index = iter(range(len(chunks)))
    lock = threading.Lock()
    started: list[Completion] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    began = time.perf_counter()
    first_copy: list[float] = []

    def reader() -> None:
        own = PipelineTimings()
        try:
            while not stop.is_set():
                with lock:
                    index = next(next_index, None)
                if index is None:
                    return
                chunk = chunks[index]
                slot = pool.take(own)
                done: Completion | None = None
                try:
                    assert slot.buffer is not None
                    read_at = time.perf_counter()
                    read(slot.buffer, chunk)
                    launch_at = time.perf_counter()
                    target = destinations[chunk.target][chunk.dest_offset : chunk.dest_offset + chunk.length]
                    done = engine.copy(target, slot.buffer[chunk.skip : chunk.skip + chunk.length], index)
                    launched_at = time.perf_counter()
                    own.read += launch_at - read_at
                    own.launch += launched_at - launch_at
                    with lock:
                        started.append(done)
                        first_copy.append(launched_at - began)
                finally:
                    pool.give_back(slot, done)
        except BaseException as exc:  # handed to the caller's thread below
            with lock:
                errors.append(exc)
            stop.set()
        finally:
            if timings is not None:
                with lock:
                    timings.add(own)

    threads = [threading.Thread(target=reader, name=f"fastload-read-{i}", daemon=True)
               for i in range(min(readers, len(chunks)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for completion in started:
        completion.synchronize()
    if timings is not None and first_copy:
        timings.first_copy = min(first_copy)
    if errors:
        raise errors[0]


def direct_reopen(fd: int, path: str) -> int | None:
    """An O_DIRECT descriptor of the file open as ``fd`` when most of it is not in the page cache and
    the file system supports direct I/O; else None (read through the page cache).

    A cold load then reads the disk once, in large aligned requests, straight into the pinned
    buffers: no page-cache copy, and no readahead defeated by parallel streams. A cached file (and
    /dev/shm, where direct I/O is refused on older kernels) is read through the page cache, which
    is a memcpy. Returns None as well if ``path`` no longer names the file behind ``fd``, and always
    with ``FASTLOAD_DIRECT_IO=never``: direct reads leave nothing in the page cache, so several
    processes that load the same local file at once each read the disk.
    """
    setting = os.environ.get("FASTLOAD_DIRECT_IO", "auto")
    if setting not in ("auto", "never"):
        raise LoaderSettingError(f"FASTLOAD_DIRECT_IO={setting!r}: expected auto (default) or never")
    if setting == "never" or not hasattr(os, "O_DIRECT") or file_resident_fraction(fd) >= 0.5:
        return None
    try:
        direct = os.open(path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
    except OSError:  # EINVAL: no direct I/O on this file system
        return None
    if os.fstat(direct).st_ino != os.fstat(fd).st_ino or os.fstat(direct).st_dev != os.fstat(fd).st_dev:
        os.close(direct)  # replaced since it was opened: read the version whose header was checked
        return None
    return direct


def read_chunk(fd: int, buffer: torch.Tensor, chunk: Chunk, path: str) -> None:
    """Read ``chunk`` into the start of ``buffer`` (a uint8 CPU tensor). A short read is fine past the
    bytes the chunk wants (an aligned read that runs over the end of the file), an error before."""
    view = buffer.numpy().data[: chunk.read_bytes]
    need = chunk.skip + chunk.length
    done = 0
    while done < need:
        asked = len(view) - done
        count = os.preadv(fd, [view[done:]], chunk.file_offset + done)
        done += count
        if count < asked and done < need:  # a short read of a regular file is its end
            raise TruncatedFileError(
                path, f"file ended at byte {chunk.file_offset + done} while reading; it was truncated")
