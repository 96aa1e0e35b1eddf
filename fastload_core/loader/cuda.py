"""GPU loading: parallel reads into pinned buffers, overlapped with async copies on CUDA streams.

Each file becomes one device allocation; tensors are views into it, so the staging buffers can be
reused safely. All files of a checkpoint go through one pipeline (shared readers, one buffer pool),
so shards load concurrently. Dtype conversion happens on the device, after the bytes have landed.

What a fresh process pays once is kept small or overlapped: the pool of pinned buffers is
process-wide and reused by every later load (``release_staging`` frees it), each buffer is pinned by
the reader that first needs it while the others already read, and the copy streams are made once per
device. How buffers are pinned is ``FASTLOAD_PINNED``: ``register`` (the default: an anonymous
huge-page mapping, faulted in by the reader, then ``cudaHostRegister``; no allocator lock, fewer pages
to pin: 0.226 s against 0.360 s for a fresh process's 4 GiB load on an H200, 0.300 s against 0.394 s
on an H100, docs/benchmarks.md) or ``alloc`` (``cudaHostAlloc`` through torch's pinned allocator).
Where registration is refused (a locked-memory limit, a platform without it), the process falls back
to ``alloc`` for good, with a debug log line. 16 MiB buffers and 16 readers were the fastest warm of
the settings tried on the H200 (8 and 32 MiB within noise; 4 MiB, 24 and 32 readers clearly slower);
cold, 32 MiB reads were 4% faster, also within noise.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections.abc import Sequence

import torch

from ..errors import LoaderSettingError
from ..report import LoadReport
from .cpu import io_threads
from .header import Header
from .pipeline import (
    DIRECT_ALIGN,
    MIB,
    BufferPool,
    Chunk,
    Completion,
    PipelineTimings,
    direct_reopen,
    plan_chunks,
    plan_staging,
    read_chunk,
    run_pipeline,
)

log = logging.getLogger("fastload")

COPY_STREAMS = 4
PINNED_MODES = ("alloc", "register")


def slot_bytes() -> int:
    """Size of one pinned staging buffer: ``FASTLOAD_GPU_BUFFER_MB`` MiB (default 16)."""
    configured = os.environ.get("FASTLOAD_GPU_BUFFER_MB", "16")
    try:
        value = int(configured)
    except ValueError:
        value = 0
    if not 1 <= value <= 1024:
        raise LoaderSettingError(f"FASTLOAD_GPU_BUFFER_MB={configured!r}: expected a whole number of MiB from 1 "
                                 "to 1024 (default 16)")
    return value * MIB


def pinned_mode() -> str:
    mode = os.environ.get("FASTLOAD_PINNED", "register")
    if mode not in PINNED_MODES:
        raise LoaderSettingError(f"FASTLOAD_PINNED={mode!r}: expected one of {', '.join(PINNED_MODES)} "
                                 "(default register)")
    return mode


class CudaCopyEngine:
    """Round-robins copies over a few streams so consecutive chunks overlap on the copy engines."""

    def __init__(self, streams: Sequence[torch.cuda.Stream]) -> None:
        self.streams = list(streams)

    def copy(self, destination: torch.Tensor, source: torch.Tensor, index: int) -> Completion:
        stream = self.streams[index % len(self.streams)]
        with torch.cuda.stream(stream):
            destination.copy_(source, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return event


_lock = threading.Lock()
_pools: dict[tuple[int, str], BufferPool] = {}
_streams: dict[int, list[torch.cuda.Stream]] = {}
_registered: list[tuple[int, mmap.mmap]] = []
_registration_refused = False  # once cudaHostRegister failed, every later buffer is allocated pinned
# Readers fault their buffers in side by side but register them one at a time. On an H200 (gpu_probe.py,
# docs/benchmarks.md), 16 registrations of 16 MiB took 7 ms one after another and 17 ms when 16 threads
# issued them at once (6.4 ms each instead of 0.6): the driver serialises them and the overlap only adds
# contention, which a fresh process's readers pay before their first copy.
_registering = threading.Lock()


def _pin_by_allocation(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def faulted_mapping(nbytes: int) -> tuple[mmap.mmap, torch.Tensor]:
    """An anonymous huge-page mapping of ``nbytes`` with every page faulted in, and a uint8 tensor over it:
    what ``register`` pinning hands the driver (benchmarks/gpu_probe.py times the same thing). Faulted in
    here, in the calling reader's thread, so that the driver's registration, which readers take turns at,
    only pins pages that exist."""
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    tensor = torch.frombuffer(buffer, dtype=torch.uint8)
    tensor[::mmap.PAGESIZE] = 0
    return buffer, tensor


def _pin_by_registration(nbytes: int) -> torch.Tensor:
    global _registration_refused
    if _registration_refused:
        return _pin_by_allocation(nbytes)
    buffer, tensor = faulted_mapping(nbytes)
    with _registering:  # one at a time: the driver serialises them anyway, and contends when they overlap
        if _registration_refused:  # refused while this reader waited: do not ask again
            del tensor, buffer
            return _pin_by_allocation(nbytes)
        error = _host_register(tensor.data_ptr(), nbytes)
    if error != 0:
        # A locked-memory limit, or a platform without registration: pin the usual way from now on, instead
        # of failing the load (or faulting in and refusing every buffer). The runtime's "last error" this
        # leaves is the reader thread's own, and reader threads end with the load.
        _registration_refused = True
        log.debug("fastload: cudaHostRegister of a %d-byte staging buffer failed (CUDA error %d); pinning "
                  "with cudaHostAlloc instead (FASTLOAD_PINNED=alloc)", nbytes, error)
        del tensor, buffer  # unmapped once unreferenced
        return _pin_by_allocation(nbytes)
    with _lock:
        _registered.append((tensor.data_ptr(), buffer))
    return tensor


def _host_register(address: int, nbytes: int) -> int:
    """``cudaHostRegister``; its error code (0: success)."""
    return int(torch.cuda.cudart().cudaHostRegister(address, nbytes, 0))


def _host_unregister(address: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(address)


def staging_pool(nbytes: int | None = None, mode: str | None = None) -> BufferPool:
    """The process-wide pool of pinned buffers of ``nbytes`` each (created empty on first use)."""
    key = (nbytes or slot_bytes(), mode or pinned_mode())
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            allocate = _pin_by_registration if key[1] == "register" else _pin_by_allocation
            pool = _pools[key] = BufferPool(key[0], allocate)
        return pool


def release_staging() -> None:
    """Free the process-wide pinned buffers (after waiting for copies out of them); a later load
    pins new ones. For a process that loads once and wants the pinned host memory back."""
    with _lock:
        pools = list(_pools.values())
        _pools.clear()
    buffers = [buffer for pool in pools for buffer in pool.drain()]  # alive until unregistered below
    with _lock:
        registered = list(_registered)
        _registered.clear()
    for address, _mapping in registered:
        _host_unregister(address)
    del buffers, registered  # the mappings are unmapped once the last tensor over them is gone


def copy_streams(device: torch.device) -> list[torch.cuda.Stream]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        streams = _streams.get(index)
        if streams is None:
            streams = _streams[index] = [torch.cuda.Stream(device=index) for _ in range(COPY_STREAMS)]
        return streams


def load_files(files: Sequence[tuple[int, str, Header]], device: torch.device,
               report: LoadReport | None = None) -> list[torch.Tensor]:
    """Copy the tensor bytes of each open file ``(fd, path, header)`` into one new uint8 allocation per
    file on ``device``; byte 0 of each is its file's ``header.span[0]``. ``report`` gets the stages."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    spans = [header.span for _, _, header in files]
    allocating = time.perf_counter()
    destinations = [torch.empty(end - start, dtype=torch.uint8, device=device) for start, end in spans]
    preparing = time.perf_counter()
    if report is not None:
        report.add_stage("device alloc", preparing - allocating)
    total = sum(end - start for start, end in spans)
    if total == 0:
        return destinations
    pool = staging_pool()
    plan = plan_staging(total, io_threads(), slot_bytes=pool.slot_bytes)
    streams = copy_streams(device)
    current = torch.cuda.current_stream(device)
    for stream in streams:  # the new allocations may reuse memory that queued work on it still uses
        stream.wait_stream(current)
    pool.ensure(plan.slots)
    chunks: list[Chunk] = []
    descriptors: list[tuple[int, str]] = []
    opened: list[int] = []
    try:
        for target, ((fd, path, _), (start, end)) in enumerate(zip(files, spans, strict=True)):
            direct = direct_reopen(fd, path) if end > start else None
            if direct is not None:
                opened.append(direct)
            descriptors.append((direct if direct is not None else fd, path))
            align = DIRECT_ALIGN if direct is not None else 1
            chunks += plan_chunks(start, end, plan.chunk_bytes, align=align, target=target)

        def read(buffer: torch.Tensor, chunk: Chunk) -> None:
            fd, path = descriptors[chunk.target]
            read_chunk(fd, buffer, chunk, path)

        timings = PipelineTimings()
        if report is not None:  # the streams (made once), and the residency check and O_DIRECT reopen
            report.add_stage("prepare", time.perf_counter() - preparing)
        run_pipeline(chunks, pool, destinations, read, CudaCopyEngine(streams), plan.readers, timings)
        if report is not None:
            for stage, seconds in timings.stages().items():
                report.add_stage(stage, seconds)
    finally:
        for fd in opened:
            os.close(fd)
    return destinations
