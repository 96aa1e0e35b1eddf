"""The staged pipeline's ordering, tested on CPU with an engine that delays its copies."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from fastload_core.loader.pipeline import Chunk, plan_chunks, run_pipeline


def test_plan_covers_the_span_exactly() -> None:
    chunks = plan_chunks(100, 1100, 300)
    assert [(c.file_offset, c.length, c.dest_offset) for c in chunks] == [
        (100, 300, 0), (400, 300, 300), (700, 300, 600), (1000, 100, 900)
    ]
    assert plan_chunks(5, 5, 10) == []
    with pytest.raises(ValueError, match="positive"):
        plan_chunks(0, 10, 0)


class DeferredCopy:
    """Copies only when waited on — like a device that has not run the copy yet."""

    def __init__(self, engine: DeferredEngine, destination: torch.Tensor, source: torch.Tensor) -> None:
        self.engine, self.destination, self.source = engine, destination, source
        self.done = False

    def synchronize(self) -> None:
        if not self.done:
            self.destination.copy_(self.source)
            self.done = True


class DeferredEngine:
    def __init__(self) -> None:
        self.copies: list[DeferredCopy] = []

    def copy(self, destination: torch.Tensor, source: torch.Tensor, index: int) -> DeferredCopy:
        completion = DeferredCopy(self, destination, source)
        self.copies.append(completion)
        return completion


@pytest.mark.parametrize(
    ("size", "chunk", "slots"), [(10_000, 1000, 3), (10_001, 64, 1), (5, 1000, 4), (4096, 1024, 4)]
)
def test_no_buffer_is_reused_before_its_copy_lands(size: int, chunk: int, slots: int) -> None:
    """If a ring slot were refilled before its deferred copy ran, the destination would hold wrong bytes."""
    source = torch.randint(0, 256, (size,), dtype=torch.uint8)
    destination = torch.zeros(size, dtype=torch.uint8)
    ring = [torch.empty(chunk, dtype=torch.uint8) for _ in range(slots)]
    concurrent = 0
    peak = 0
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
    run_pipeline(plan_chunks(0, size, chunk), ring, destination, read, engine)
    assert torch.equal(destination, source)
    assert all(copy.done for copy in engine.copies)
    assert peak <= slots


def test_a_failed_read_propagates() -> None:
    def read(buffer: torch.Tensor, piece: Chunk) -> None:
        if piece.dest_offset == 200:
            raise OSError("disk gone")
        buffer[:piece.length] = 1

    with pytest.raises(OSError, match="disk gone"):
        run_pipeline(plan_chunks(0, 1000, 100), [torch.empty(100, dtype=torch.uint8)] * 2,
                     torch.empty(1000, dtype=torch.uint8), read, DeferredEngine())


def test_an_empty_ring_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        run_pipeline([], [], torch.empty(0, dtype=torch.uint8), lambda b, c: None, DeferredEngine())
