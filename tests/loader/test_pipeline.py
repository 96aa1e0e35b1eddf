"""The staged pipeline on CPU: chunk planning, sizing, and buffer-reuse ordering with an engine that
delays its copies (as a device that has not run them yet would)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from fastload_core.errors import LoaderSettingError, TruncatedFileError
from fastload_core.loader import cpu
from fastload_core.loader.pipeline import (
    DIRECT_ALIGN,
    MIB,
    BufferPool,
    Chunk,
    PipelineTimings,
    direct_reopen,
    plan_chunks,
    plan_staging,
    read_chunk,
    run_pipeline,
)


def test_plan_covers_the_span_exactly() -> None:
    chunks = plan_chunks(100, 1100, 300)
    assert [(c.file_offset, c.length, c.dest_offset, c.skip, c.read_bytes) for c in chunks] == [
        (100, 300, 0, 0, 300), (400, 300, 300, 0, 300), (700, 300, 600, 0, 300), (1000, 100, 900, 0, 100)
    ]
    assert plan_chunks(5, 5, 10) == []
    with pytest.raises(ValueError, match="positive"):
        plan_chunks(0, 10, 0)
    with pytest.raises(ValueError, match="multiple of align"):
        plan_chunks(0, 10, 300, align=256)


@pytest.mark.parametrize(("start", "end", "chunk"), [(100, 1100, 512), (8, 5000, 1024), (0, 4096, 4096),
                                                       (4095, 4097, 4096), (13, 14, 512)])
def test_aligned_plan_reads_aligned_and_copies_each_byte_once(start: int, end: int, chunk: int) -> None:
    align = 256
    chunks = plan_chunks(start, end, chunk, align=align, target=3)
    covered = []
    for c in chunks:
        assert c.file_offset % align == 0 and c.read_bytes % align == 0 and c.read_bytes <= chunk
        assert c.skip + c.length <= c.read_bytes and c.target == 3
        assert c.file_offset + c.skip == start + c.dest_offset  # the copied bytes are the file's bytes
        covered.extend(range(c.dest_offset, c.dest_offset + c.length))
    assert covered == list(range(end - start))


@pytest.mark.parametrize(
    ("total", "readers", "expected"),
    [
        (4 << 30, 16, (16, 18, 16 * MIB)),  # a 4 GiB file on 16 cores: 16 readers, 18 × 16 MiB
        (4 << 30, 4, (4, 6, 16 * MIB)),  # a 2-core machine
        (40 * MIB, 16, (14, 16, 3 * MIB)),  # small: every reader gets a share of whole MiB
        (100, 16, (1, 3, MIB)),  # tiny: one read
        (0, 8, (1, 3, MIB)),
    ],
)
def test_staging_is_sized_from_readers_and_data(total: int, readers: int, expected: tuple[int, int, int]) -> None:
    plan = plan_staging(total, readers)
    assert (plan.readers, plan.slots, plan.chunk_bytes) == expected
    assert plan.slots > plan.readers  # a reader never waits for a copy to free a buffer


def test_staging_plan_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="readers"):
        plan_staging(100, 0)
    with pytest.raises(ValueError, match="multiple"):
        plan_staging(100, 4, slot_bytes=MIB + 1)


@pytest.mark.parametrize(("cpus", "threads"), [(1, 4), (2, 4), (4, 8), (8, 16), (16, 16), (64, 16)])
def test_io_threads_scale_with_cores(cpus: int, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASTLOAD_IO_THREADS", raising=False)
    assert cpu.io_threads(cpus) == threads
    monkeypatch.setenv("FASTLOAD_IO_THREADS", "3")
    assert cpu.io_threads(cpus) == 3


class DeferredCopy:
    """Copies only when waited on — like a device that has not run the copy yet."""

    def __init__(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        self.destination, self.source = destination, source
        self.done = False

    def synchronize(self) -> None:
        if not self.done:
            self.destination.copy_(self.source)
            self.done = True


class DeferredEngine:
    def __init__(self) -> None:
        self.copies: list[DeferredCopy] = []
        self.lock = threading.Lock()

    def copy(self, destination: torch.Tensor, source: torch.Tensor, index: int) -> DeferredCopy:
        completion = DeferredCopy(destination, source)
        with self.lock:
            self.copies.append(completion)
        return completion


def _pool(nbytes: int) -> tuple[BufferPool, list[int]]:
    allocated: list[int] = []

    def allocate(size: int) -> torch.Tensor:
        allocated.append(size)
        return torch.empty(size, dtype=torch.uint8)

    return BufferPool(nbytes, allocate), allocated


@pytest.mark.parametrize(
    ("size", "chunk", "slots", "readers"),
    [(10_000, 1000, 3, 2), (10_001, 64, 1, 1), (5, 1000, 4, 4), (4096, 1024, 4, 3), (50_000, 512, 5, 4)],
)
def test_no_buffer_is_reused_before_its_copy_lands(size: int, chunk: int, slots: int, readers: int) -> None:
    """If a buffer were refilled before its deferred copy ran, the destination would hold wrong bytes."""
    source = torch.randint(0, 256, (size,), dtype=torch.uint8)
    destination = torch.zeros(size, dtype=torch.uint8)
    pool, allocated = _pool(chunk)
    pool.ensure(slots)
    concurrent = peak = 0
    lock = threading.Lock()

    def read(buffer: torch.Tensor, piece: Chunk) -> None:
        nonlocal concurrent, peak
        with lock:
            concurrent += 1
            peak = max(peak, concurrent)
        buffer[:piece.length].copy_(source[piece.file_offset:piece.file_offset + piece.length])
        with lock:
            concurrent -= 1

    engine = DeferredEngine()
    run_pipeline(plan_chunks(0, size, chunk), pool, [destination], read, engine, readers)
    assert torch.equal(destination, source)
    assert all(copy.done for copy in engine.copies)
    assert peak <= min(slots, readers)
    assert len(allocated) <= slots  # buffers are pinned on first use and reused after


def test_several_files_share_one_pipeline_and_a_reused_pool() -> None:
    sources = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in (7000, 300, 1, 4096)]
    pool, allocated = _pool(1024)
    pool.ensure(3)
    for _ in range(2):  # a second load reuses the buffers the first one pinned
        destinations = [torch.zeros_like(s) for s in sources]
        chunks = [c for i, s in enumerate(sources) for c in plan_chunks(0, s.numel(), 1024, target=i)]

        def read(buffer: torch.Tensor, piece: Chunk) -> None:
            data = sources[piece.target][piece.file_offset:piece.file_offset + piece.length]
            buffer[:piece.length].copy_(data)

        run_pipeline(chunks, pool, destinations, read, DeferredEngine(), 2)
        assert all(torch.equal(d, s) for d, s in zip(destinations, sources, strict=True))
    assert len(allocated) <= 3


def test_timings_say_where_the_readers_spent_their_time() -> None:
    """A short GPU lease must yield a diagnosis: pinning, reading and waiting are told apart."""
    pin_pause, read_pause = 0.02, 0.005
    allocations: list[int] = []

    def allocate(size: int) -> torch.Tensor:
        allocations.append(size)
        time.sleep(pin_pause)
        return torch.empty(size, dtype=torch.uint8)

    def read(buffer: torch.Tensor, piece: Chunk) -> None:
        time.sleep(read_pause)
        buffer[:piece.length] = 3

    pool = BufferPool(100, allocate)
    pool.ensure(2)
    destination = torch.zeros(1000, dtype=torch.uint8)
    timings = PipelineTimings()
    run_pipeline(plan_chunks(0, 1000, 100), pool, [destination], read, DeferredEngine(), 2, timings)
    assert bool((destination == 3).all())
    assert len(allocations) == 2 and timings.allocate >= 2 * pin_pause  # each of the two buffers pinned once
    assert timings.read >= 10 * read_pause  # ten chunks
    assert timings.first_copy >= pin_pause + read_pause  # the first copy waited for a pin and a read
    stages = timings.stages()
    assert stages["pin (thread-s)"] == timings.allocate and stages["to first copy"] == timings.first_copy
    repeat = PipelineTimings()  # a second load finds the buffers pinned
    run_pipeline(plan_chunks(0, 1000, 100), pool, [destination], read, DeferredEngine(), 2, repeat)
    assert len(allocations) == 2 and repeat.read >= 10 * read_pause


def test_a_failed_read_propagates_after_started_copies_land() -> None:
    engine = DeferredEngine()

    def read(buffer: torch.Tensor, piece: Chunk) -> None:
        if piece.dest_offset == 500:
            raise OSError("disk gone")
        buffer[:piece.length] = 1

    pool, _ = _pool(100)
    pool.ensure(2)
    with pytest.raises(OSError, match="disk gone"):
        run_pipeline(plan_chunks(0, 1000, 100), pool, [torch.empty(1000, dtype=torch.uint8)], read, engine, 2)
    assert engine.copies and all(copy.done for copy in engine.copies)
    # the pool is whole again: a later load gets every buffer back
    destination = torch.zeros(300, dtype=torch.uint8)
    run_pipeline(plan_chunks(0, 300, 100), pool, [destination], lambda b, c: b.fill_(7), DeferredEngine(), 2)
    assert bool((destination == 7).all())


def test_bad_arguments_are_rejected() -> None:
    pool, _ = _pool(100)
    with pytest.raises(ValueError, match="at least one reader"):
        run_pipeline([], pool, [], lambda b, c: None, DeferredEngine(), 0)
    with pytest.raises(ValueError, match="does not fit"):
        run_pipeline(plan_chunks(0, 1000, 200), pool, [torch.empty(1000, dtype=torch.uint8)],
                     lambda b, c: None, DeferredEngine(), 1)
    run_pipeline([], pool, [], lambda b, c: None, DeferredEngine(), 1)  # nothing to do is fine


def _file(path: Path, size: int) -> torch.Tensor:
    data = torch.randint(0, 256, (size,), dtype=torch.uint8)
    path.write_bytes(data.numpy().tobytes())
    return data


@pytest.mark.parametrize("direct", [False, True])
def test_file_reads_through_the_pipeline(tmp_path: Path, direct: bool) -> None:
    """The same planning and reads the GPU path runs, into CPU memory: O_DIRECT where the file system
    allows it (aligned reads that start before the span and run past the end of the file)."""
    size, start = 3 * MIB + 12345, 8 + 1001  # an odd span, as after a safetensors header
    data = _file(tmp_path / "f.bin", size)
    fd = os.open(tmp_path / "f.bin", os.O_RDONLY)
    try:
        read_fd = fd
        if direct:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            opened = direct_reopen(fd, str(tmp_path / "f.bin"))  # None only where the FS has no O_DIRECT
            read_fd = opened if opened is not None else fd  # the aligned reads are the same either way
        align = DIRECT_ALIGN if direct else 1
        chunks = plan_chunks(start, size, MIB, align=align)
        pool = BufferPool(MIB, cpu.allocate_private)  # page-aligned, as O_DIRECT needs
        destination = torch.zeros(size - start, dtype=torch.uint8)
        run_pipeline(chunks, pool, [destination], lambda b, c: read_chunk(read_fd, b, c, "f.bin"),
                     DeferredEngine(), 4)
        assert torch.equal(destination, data[start:])
    finally:
        if read_fd != fd:
            os.close(read_fd)
        os.close(fd)


def test_a_cached_file_is_not_reopened_direct(tmp_path: Path) -> None:
    _file(tmp_path / "f.bin", MIB)
    (tmp_path / "f.bin").read_bytes()
    fd = os.open(tmp_path / "f.bin", os.O_RDONLY)
    try:
        assert direct_reopen(fd, str(tmp_path / "f.bin")) is None
    finally:
        os.close(fd)


def test_direct_io_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _file(tmp_path / "f.bin", MIB)
    fd = os.open(tmp_path / "f.bin", os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        monkeypatch.setenv("FASTLOAD_DIRECT_IO", "never")
        assert direct_reopen(fd, str(tmp_path / "f.bin")) is None
        monkeypatch.setenv("FASTLOAD_DIRECT_IO", "always")
        with pytest.raises(LoaderSettingError, match="FASTLOAD_DIRECT_IO='always'"):
            direct_reopen(fd, str(tmp_path / "f.bin"))
    finally:
        os.close(fd)


def test_a_truncated_file_is_named(tmp_path: Path) -> None:
    _file(tmp_path / "f.bin", 1000)
    fd = os.open(tmp_path / "f.bin", os.O_RDONLY)
    try:
        chunk = plan_chunks(900, 1100, 4096)[0]  # the header promised 200 bytes, the file has 100
        with pytest.raises(TruncatedFileError, match="truncated"):
            read_chunk(fd, torch.empty(4096, dtype=torch.uint8), chunk, "f.bin")
        past_end = plan_chunks(900, 1000, 512, align=512)[0]  # an aligned read past the end is fine
        buffer = torch.empty(512, dtype=torch.uint8)
        read_chunk(fd, buffer, past_end, "f.bin")
    finally:
        os.close(fd)
