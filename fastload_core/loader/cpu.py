"""CPU loading: zero-copy views of a file mapping, or a parallel read into private memory.

The mapping is ``MAP_PRIVATE``: every worker process that maps the same cached file shares the
same physical pages (from /dev/shm or the page cache), and a write to a tensor copies only the
touched page into the writer's private memory (copy-on-write) — the cached file and the other
workers never see it. Pages are faulted in up front, so a load ends with the weights resident
instead of paying page faults on the first request.

How they are faulted in was measured (2 GiB, 2-core VM, docs/benchmarks.md): touching one byte per
page beats ``MAP_POPULATE`` and ``MADV_POPULATE_READ`` both warm and cold. Cold, a single
sequential stream lets the kernel's readahead run at the disk's speed (3.5 GB/s here, above an
O_DIRECT read); several streams over one file defeat readahead and halve that. Warm, there is no
I/O and several threads divide the page-table work.
"""

from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import LoaderSettingError, TruncatedFileError
from .header import Header, TensorEntry
from .pagecache import PAGE, resident_fraction_at

# Reads this size or larger are issued as one preadv per thread task.
READ_CHUNK_BYTES = 16 << 20


def io_threads(cpus: int | None = None) -> int:
    """Parallel reads keep a disk's queue full and, from the page cache, spread the memcpy over the
    cores: two per core, 4 to 16 (more only add contention). ``FASTLOAD_IO_THREADS`` overrides."""
    configured = os.environ.get("FASTLOAD_IO_THREADS")
    if configured:
        try:
            threads = int(configured)
        except ValueError:
            threads = 0
        if not 1 <= threads <= 256:
            raise LoaderSettingError(f"FASTLOAD_IO_THREADS={configured!r}: expected a number of threads from 1 to 256")
        return threads
    return max(4, min(16, 2 * (cpus if cpus is not None else usable_cpus())))


def usable_cpus() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Mapping(mmap.mmap):
    """A mapping that carries what must live as long as any tensor views it (a storage tier's pin)."""

    keepalive: object = None


def map_file(fd: int, populate: bool = True, keepalive: object = None) -> torch.Tensor:
    """Map the open file ``fd`` copy-on-write as one uint8 tensor (which keeps the mapping alive)."""
    size = os.fstat(fd).st_size
    mapping = _Mapping(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    mapping.keepalive = keepalive
    base = torch.frombuffer(mapping, dtype=torch.uint8)
    if populate and not _populate_in_kernel(mapping, size):
        populate_pages(base)
    return base


# madvise(MADV_POPULATE_READ), Linux 5.14+: the kernel maps every page of the range in one call, as read
# faults (copy-on-write stays lazy), without a trap per 4 KiB page: ~25% less time than touching them.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def _populate_in_kernel(mapping: mmap.mmap, size: int) -> bool:
    """Fault in the whole mapping with one madvise; False where the kernel or platform cannot."""
    if not size or not sys.platform.startswith("linux") or not hasattr(mapping, "madvise"):
        return False
    try:
        mapping.madvise(_MADV_POPULATE_READ)
    except OSError:  # EINVAL: a kernel before 5.14; anything else: let the page-touching path say it
        return False
    return True


def populate_pages(base: torch.Tensor) -> None:
    """Fault in every page of a mapping: in parallel where the file is cached, in one sequential
    stream where it must come from disk. torch releases the GIL inside ``sum``."""
    size = base.numel()
    streams = (os.cpu_count() or 1) if resident_fraction(base) > 0.5 else 1
    step = -(-size // streams // PAGE) * PAGE or PAGE
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(lambda start: base[start : start + step : PAGE].sum(), range(0, size, step)))


def resident_fraction(base: torch.Tensor, windows: int = 64, window_pages: int = 64) -> float:
    """The share of a mapping's pages already in memory, from ``mincore`` on evenly spread windows
    (a whole-file vector costs ~50 ms per 2 GiB; a sample answers "cached or not" in microseconds)."""
    return resident_fraction_at(base.data_ptr(), base.numel(), windows, window_pages)


def allocate_private(nbytes: int, *, huge_pages: bool = True) -> torch.Tensor:
    """An anonymous buffer backed by transparent huge pages where the kernel allows them.

    First touch of 4 KiB pages runs at ~1 GB/s on small machines; 2 MiB pages at ~6 GB/s, so a
    private copy of the weights costs little more than the read itself. Not everywhere: on the 2-core
    Firecracker VM (2026-11-27), whose host backs guest memory lazily, first touch of a huge-page GiB cost
    2.4 s of system time against 0.7 s in 4 KiB pages (recently freed, already backed); ``huge_pages=False``
    is for a caller that copies on the same cores as other CPU-bound work (the streaming load).
    """
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buffer, dtype=torch.uint8)


def read_into(fd: int, path: str, destination: torch.Tensor, file_offset: int) -> None:
    """Fill ``destination`` from file ``fd`` starting at ``file_offset``, with parallel preadv calls."""
    view = destination.numpy().data
    size = len(view)
    spans = [(start, min(READ_CHUNK_BYTES, size - start)) for start in range(0, size, READ_CHUNK_BYTES)]
    with ThreadPoolExecutor(min(io_threads(), len(spans)) or 1) as pool:
        list(pool.map(lambda span: pread_exact(fd, view[span[0] : span[0] + span[1]], file_offset + span[0], path),
                      spans))


def pread_exact(fd: int, target: memoryview, offset: int, path: str) -> None:
    """preadv until ``target`` is full; a short file means it changed or was truncated under us."""
    done = 0
    while done < len(target):
        count = os.preadv(fd, [target[done:]], offset + done)
        if count == 0:
            raise TruncatedFileError(path, f"file ended at byte {offset + done} while reading; it was truncated")
        done += count


def tensor_views(base: torch.Tensor, header: Header, base_offset: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Typed views of each tensor in ``base``, whose byte 0 is file offset ``base_offset``.

    Each is one ``as_strided`` of a view of ``base`` per dtype: a slice, a dtype view and a reshape per
    tensor cost about six times as much (~7 ms of a fresh process's warm load of 600 tensors, on top of
    a load that safetensors finishes in 10 ms)."""
    if base.data_ptr() % _MAX_ITEMSIZE or base.storage_offset() % _MAX_ITEMSIZE:  # not from this module
        for entry in header.tensors:
            yield entry.name, typed_view(base, entry, entry.start - base_offset)
        return
    size = base.numel()
    typed: dict[torch.dtype, torch.Tensor] = {}
    for entry in header.tensors:
        offset, itemsize = entry.start - base_offset, entry.dtype.itemsize
        if offset % itemsize:
            yield entry.name, typed_view(base, entry, offset)
            continue
        whole = typed.get(entry.dtype)
        if whole is None:
            whole = typed[entry.dtype] = base[: size - size % itemsize].view(entry.dtype)
        yield entry.name, whole.as_strided(entry.shape, _contiguous_strides(entry.shape),
                                           whole.storage_offset() + offset // itemsize)


_MAX_ITEMSIZE = 16  # a multiple of every dtype's size: a base aligned to it aligns every dtype view of it


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)  # as torch strides a tensor with a zero-sized dimension
    return tuple(reversed(strides))


def typed_view(base: torch.Tensor, entry: TensorEntry, offset: int) -> torch.Tensor:
    raw = base[offset:offset + entry.nbytes]
    if (base.data_ptr() + offset) % entry.dtype.itemsize:
        raw = raw.clone()  # safetensors does not align tensors; torch cannot view misaligned data
    return raw.view(entry.dtype).reshape(entry.shape)
