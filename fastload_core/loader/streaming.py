"""Streaming load: tensors are read out of a model's files while they are still downloading.

A cold start from S3 normally costs a download and then a load. Here the fetch runs as usual, watched
by storage (``storage.streaming.watch_fetch``: which byte ranges of each file have landed), and this
module turns the landed bytes into tensors: each safetensors header is parsed as soon as its first bytes
are in, and each tensor is handed on (as private memory, or copied onto the device) as soon as the
contiguous prefix of its file covers it. The S3 origin receives the bytes into the private memory the
tensors are views of (a ``Mirror``), so on CPU there is no copy left to trail the download; the cache file
is written from that memory after the download verified and the tensors were handed out (storage's
``Mirror`` says why), so the cold start costs about one fetch. Bytes that arrive another way are copied
out of the landed file while they are hot in the page cache. The cache entry is published as usual (its
pin, a ``PendingPin``, follows the tensors), so the next start is a hit.

The tensors are returned only after the whole download verified: a corrupt or changed object raises
before any weight is handed out, exactly as a plain fetch would.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future

import torch

from ..storage import Pin, TieredStore, writethrough
from ..storage.meta import Manifest
from ..storage.progress import Mirror
from ..storage.streaming import PendingPin, RangeWatch, watch_fetch
from . import cpu
from .checkpoint_files import INDEX_NAME, choose_files, indexed_part
from .header import header_length, parse_header

log = logging.getLogger("fastload")

# The most one copy step takes: tensors are handed on (to the device, or to the caller's stats) as each
# step ends, so a prefix that jumps by a gigabyte at once is still copied in steps.
_STEP = 64 * 1024 * 1024


def stream_tensors(uri: str, device: torch.device, *, tier: str | None = None,
                   store: TieredStore | None = None,
                   stats: dict[str, float] | None = None) -> tuple[dict[str, torch.Tensor] | None, Pin]:
    """Fetch ``uri`` and copy out every tensor of its safetensors files as their bytes land.

    Returns the tensors and the pin of the cached entry; the tensors are None when nothing was
    downloaded (a cache hit: load the pinned files the usual way). After a download into mirrors the pin
    is a ``PendingPin``: the entry is still being written from the tensors' memory and published (a
    pending write-through until then; its failure is logged, the tensors stay good). ``stats`` receives
    monotonic times: ``started``, ``first_tensor``, ``last_tensor``, ``verified`` (the download verified,
    when it went into mirrors) and ``fetch_done`` (the entry published: possibly after this returns).
    """
    stats = stats if stats is not None else {}
    stats["started"] = time.monotonic()
    watch, future = watch_fetch(uri, tier=tier, store=store, stats=stats, mirror=True, wanted=_may_be_loaded)
    watch.started_event.wait()
    try:
        manifest = watch.manifest
        if manifest is None:  # a hit (or a failure before any download began)
            return None, future.result()
        chosen = _chosen_files(uri, watch, manifest)
        if chosen is None:  # the names cannot tell (a legacy file, say): the local loader decides once all landed
            return None, future.result()
        tensors: dict[str, torch.Tensor] = {}
        for name, expected in chosen:
            fd = watch.fds[name]
            for tensor_name, tensor in _copy_as_it_lands(watch, name, fd, watch.sizes[name], expected):
                tensors[tensor_name] = tensor.to(device) if device.type != "cpu" else tensor
                stats.setdefault("first_tensor", time.monotonic())
                stats["last_tensor"] = time.monotonic()
        # Only once the whole download verified are the weights handed out. Into mirrors, that is before the
        # RAM tier's files are written from them and published, on the fetch's thread (progress.Mirror says
        # why); the pin then follows (PendingPin), and the copy counts as a pending write-through.
        watch.settled.wait()
        if not watch.is_verified:
            return tensors, future.result()
        if future.done() and future.exception() is None:
            return tensors, future.result()
        # Verified: the tensors are handed out even when the publication has already failed (whether it did by
        # now is a race), so a failure after verification is always logged, never raised here.
        tier = watch.tier
        writethrough.track(uri, (tier,) if tier else (), future)
        future.add_done_callback(lambda done: _report_unpublished(uri, tier, done))
        return tensors, PendingPin(future, tier)
    finally:
        watch.close()


def _may_be_loaded(name: str) -> bool:
    """The files of a download worth watching: those ``choose_files`` may pick, and the index it reads.
    Only the top level counts, as for a local directory."""
    return "/" not in name and (name.endswith(".safetensors") or name == INDEX_NAME)


def _chosen_files(uri: str, watch: RangeWatch, manifest: Manifest) -> list[tuple[str, set[str] | None]] | None:
    """The files the local loader would take from the finished download, chosen from its manifest by the
    same rules (``checkpoint_files.choose_files``), each with the tensor names to take from it; None when
    only the files' contents can tell. So the first, streamed, load of a URI and every later one from the
    cache agree."""
    if manifest.single:  # the URI names one file: safetensors by its name, else the local loader decides
        name = manifest.files[0].name
        return [(name, None)] if name in watch.fds and name.endswith(".safetensors") else None

    def read_index() -> bytes:
        fd = watch.fds[INDEX_NAME]
        return _landed(watch, INDEX_NAME, watch.mirrors.get(INDEX_NAME), fd, 0, watch.sizes[INDEX_NAME])

    top_level = {item.name for item in manifest.files if "/" not in item.name}
    return choose_files(uri, top_level, read_index)


def _report_unpublished(uri: str, tier: str | None, future: Future[Pin]) -> None:
    """The tensors were handed out, verified; a publication that failed after that costs only the cache entry
    (the next start downloads again), so it is logged, as a failed write-through is, not raised."""
    error = future.exception()
    if error is not None:
        log.warning("%s: the streamed tensors are loaded, but their cache copy in %s was not published: %s",
                    uri, tier, error)


def _copy_as_it_lands(watch: RangeWatch, name: str, fd: int, size: int,
                      expected: set[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Make sure one file's tensor bytes are in one private buffer as its landed prefix grows, and yield
    each tensor as soon as its bytes are there: those an index maps to the file (``expected``), or all.

    The buffer is the file's ``Mirror`` (storage.progress) where the watch has one: the origin receives the
    bytes straight into it, so the ranges it filled need no copy at all and a tensor is ready when its range
    lands. Whatever it did not fill (an origin that cannot, ranges resumed from an earlier attempt's
    journal) is copied from the landed file, one ``preadv`` per step, while the bytes are fresh in the page
    cache. Without a mirror the buffer is the local loader's (``cpu.allocate_private``, page-aligned with the
    file) and everything is copied that way. Either way the tensors are views of one buffer per file, as a
    local ``copy=True`` load gives them.
    """
    mirror = watch.mirrors.get(name)
    header_len = header_length(name, _landed(watch, name, mirror, fd, 0, 8), size)
    header = indexed_part(name, parse_header(name, _landed(watch, name, mirror, fd, 8, header_len), size), expected)
    start, end = header.span
    start -= start % cpu.PAGE  # whole pages, as the local loader copies
    if mirror is not None:  # the whole file, from byte 0: offsets in it are file offsets
        base = torch.frombuffer(mirror.memory, dtype=torch.uint8) if end > start else torch.empty(0, dtype=torch.uint8)
        base_offset = 0
        view = mirror.view
    else:
        # 4 KiB pages: this copy runs in one thread beside a CPU-bound download (MD5, the server on small
        # machines). With huge pages it fell 3 s behind a 1 GiB download on the 2-core VM, where their first
        # touch costs 3x the system time (cpu.allocate_private says why).
        base = cpu.allocate_private(end - start, huge_pages=False)
        base_offset = start
        view = base.numpy().data if end > start else memoryview(b"")
    entries = sorted(header.tensors, key=lambda e: e.end)
    copied, emitted = start, 0
    while True:
        while emitted < len(entries) and entries[emitted].end <= copied:
            entry = entries[emitted]
            yield entry.name, cpu.typed_view(base, entry, entry.start - base_offset)
            emitted += 1
        if copied >= end:
            return
        generation = watch.snapshot()
        upto = min(end, copied + _STEP, watch.wait_for(name, copied + 1))
        for gap_start, gap_end in mirror.gaps(copied, upto) if mirror is not None else [(copied, upto)]:
            cpu.pread_exact(fd, view[gap_start - base_offset:gap_end - base_offset], gap_start, name)
        if watch.snapshot() == generation:  # else the fill restarted in the next tier meanwhile: read it again
            copied = upto


def _landed(watch: RangeWatch, name: str, mirror: Mirror | None, fd: int, offset: int, length: int) -> bytes:
    """Bytes ``[offset, offset + length)`` once landed: from the mirror where the origin received them there
    (it writes the file from it only after the download verified), else from the file; read again if the
    fill restarted in the next tier meanwhile (``RangeWatch.started``: ``fd`` then names that tier's file)."""
    while True:
        generation = watch.snapshot()
        watch.wait_for(name, min(offset + length, watch.sizes[name]))
        if mirror is not None and not mirror.gaps(offset, offset + length):
            data = bytes(mirror.view[offset:offset + length])
        else:
            data = os.pread(fd, length, offset)
        if watch.snapshot() == generation:
            return data
