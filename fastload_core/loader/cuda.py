"""GPU loading: parallel reads into pinned buffers, overlapped with async copies on CUDA streams.

Each file becomes one device allocation; tensors are views into it, so the staging buffers can be
reused safely. Dtype conversion happens on the device, after the bytes have landed.
"""

from __future__ import annotations

import torch

from .cpu import pread_exact
from .header import Header
from .pipeline import Chunk, Completion, plan_chunks, run_pipeline

STAGING_BUFFERS = 4
STAGING_BYTES = 32 << 20


class CudaCopyEngine:
    """Round-robins copies over a few streams so consecutive chunks overlap on the copy engines."""

    def __init__(self, device: torch.device, streams: int = 2) -> None:
        self.streams = [torch.cuda.Stream(device=device) for _ in range(streams)]

    def copy(self, destination: torch.Tensor, source: torch.Tensor, index: int) -> Completion:
        stream = self.streams[index % len(self.streams)]
        with torch.cuda.stream(stream):
            destination.copy_(source, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return event


def allocate_ring(count: int, nbytes: int, pin: bool) -> list[torch.Tensor]:
    return [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(count)]


def load_to_device(
    fd: int, path: str, header: Header, device: torch.device, ring: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """Copy the tensor bytes of file ``fd`` into one new uint8 allocation on ``device``."""
    start, end = header.span
    destination = torch.empty(end - start, dtype=torch.uint8, device=device)
    if end == start:
        return destination
    ring = ring or allocate_ring(STAGING_BUFFERS, STAGING_BYTES, pin=True)

    def read(buffer: torch.Tensor, chunk: Chunk) -> None:
        pread_exact(fd, buffer.numpy().data[: chunk.length], chunk.file_offset, path)

    run_pipeline(plan_chunks(start, end, ring[0].numel()), ring, destination, read, CudaCopyEngine(device))
    return destination
