"""The staged copy pipeline behind device loading, independent of any device API.

Reads fill a small ring of (pinned) host buffers in parallel while earlier buffers are copied to
the device asynchronously. A buffer is read into again only after the copy out of it has
finished, so no tensor ever aliases memory that is being overwritten. Keeping the device side
behind ``CopyEngine`` lets the ordering be tested on a CPU with an engine that defers its copies.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Chunk:
    file_offset: int
    length: int
    dest_offset: int


def plan_chunks(start: int, end: int, chunk_bytes: int) -> list[Chunk]:
    """Split the file span ``[start, end)`` into chunks; ``dest_offset`` is relative to ``start``."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    return [
        Chunk(offset, min(chunk_bytes, end - offset), offset - start) for offset in range(start, end, chunk_bytes)
    ]


class Completion(Protocol):
    def synchronize(self) -> None: ...


class CopyEngine(Protocol):
    def copy(self, destination: torch.Tensor, source: torch.Tensor, index: int) -> Completion:
        """Start copying ``source`` into ``destination``; the returned handle waits for the end."""
        ...


def run_pipeline(
    chunks: Sequence[Chunk],
    ring: Sequence[torch.Tensor],
    destination: torch.Tensor,
    read: Callable[[torch.Tensor, Chunk], None],
    engine: CopyEngine,
) -> None:
    """Stream ``chunks`` through ``ring`` into ``destination`` (all bytes, ``uint8``)."""
    slots = len(ring)
    if slots == 0:
        raise ValueError("the staging ring needs at least one buffer")
    pending_copy: list[Completion | None] = [None] * slots
    in_flight: deque[tuple[int, Future[None]]] = deque()

    def copy_out(index: int, read_done: Future[None]) -> None:
        read_done.result()
        chunk, slot = chunks[index], index % slots
        target = destination[chunk.dest_offset:chunk.dest_offset + chunk.length]
        pending_copy[slot] = engine.copy(target, ring[slot][:chunk.length], index)

    with ThreadPoolExecutor(slots) as readers:
        try:
            for index, chunk in enumerate(chunks):
                if len(in_flight) == slots:
                    copy_out(*in_flight.popleft())
                slot = index % slots
                previous = pending_copy[slot]
                if previous is not None:
                    previous.synchronize()  # the buffer is free only once its last copy has landed
                    pending_copy[slot] = None
                in_flight.append((index, readers.submit(read, ring[slot], chunk)))
            while in_flight:
                copy_out(*in_flight.popleft())
        finally:
            for _, read_done in in_flight:
                read_done.cancel()
    for completion in pending_copy:
        if completion is not None:
            completion.synchronize()
