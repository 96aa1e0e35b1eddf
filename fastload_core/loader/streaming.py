"""Streaming load: tensors are read out of a model's files while they are still downloading.

A cold start from S3 normally costs a download and then a load. Here the fetch runs as usual (parallel
ranged GETs into the cache tier, verified, published), and this module watches which byte ranges have
landed: each safetensors header is parsed as soon as its first bytes are in, and each tensor is copied out
(into private memory or onto the device) as soon as the contiguous prefix of its file covers it. The bytes
are hot in the page cache, so the copy costs a memcpy that overlaps the rest of the download; the cold
start costs about one download. The cache entry is published as usual, so the next start is a hit.

The tensors are returned only after the whole fetch verified: a corrupt or changed object raises before
any weight is handed out, exactly as a plain fetch would.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .eviction import Pin
from .meta import Manifest
from .store import TieredStore, default_store


class _Watch:
    """Collects the partial files' descriptors and each file's contiguous landed prefix."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.started_event = threading.Event()
        self.manifest: Manifest | None = None
        self.fds: dict[str, int] = {}
        self.watermark: dict[str, int] = {}
        self._pending: dict[str, dict[int, int]] = {}
        self.failed: BaseException | None = None
        self.finished = False

    def started(self, tier: str, files_dir: Path, manifest: Manifest) -> None:
        # Opened now, before the download: the partial directory is renamed when it is published, and
        # an open descriptor follows the file wherever it goes.
        for item in manifest.files:
            if item.name.endswith(".safetensors"):
                self.fds[item.name] = os.open(files_dir.joinpath(*item.name.split("/")), os.O_RDONLY)
                self.watermark[item.name] = 0
                self._pending[item.name] = {}
        self.manifest = manifest
        self.started_event.set()

    def range_done(self, name: str, start: int, end: int) -> None:
        if name not in self._pending:
            return
        with self.cond:
            pending = self._pending[name]
            pending[start] = end
            mark = self.watermark[name]
            while mark in pending:
                mark = pending.pop(mark)
            self.watermark[name] = mark
            self.cond.notify_all()

    def finish(self, future: Future[Pin]) -> None:
        with self.cond:
            self.failed = future.exception()
            self.finished = True
            self.cond.notify_all()
        self.started_event.set()

    def wait_for(self, name: str, position: int) -> None:
        with self.cond:
            while self.watermark[name] < position:
                if self.failed is not None:
                    raise self.failed
                if self.finished:
                    return  # complete (ranges of a resumed download are not reported again)
                self.cond.wait(0.5)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def stream_state_dict(uri: str, device: str | torch.device = "cpu", *, tier: str | None = None,
                      store: TieredStore | None = None,
                      stats: dict[str, float] | None = None) -> tuple[dict[str, torch.Tensor], Pin]:
    """Fetch ``uri`` and load every tensor of its safetensors files, overlapping the two on a cold start.

    Returns the state dict and the pin of the cached entry (release it when the model is dropped; the
    tensors are private copies, so releasing early only lets the entry be evicted). On a cache hit this is
    a plain load of the cached files. ``stats``, when given, receives monotonic times: ``started``,
    ``first_tensor``, ``last_tensor``, ``fetch_done`` (the overlap, for benchmarks and tests).
    """
    stats = stats if stats is not None else {}
    stats["started"] = time.monotonic()
    from ..loader.cpu import pread_exact
    from ..loader.header import parse_header

    store = store or default_store()
    target = torch.device(device)
    watch = _Watch()
    executor = ThreadPoolExecutor(1, thread_name_prefix="fastload-stream-fetch")
    future = executor.submit(store.pin, uri, tier=tier, watch=watch)
    executor.shutdown(wait=False)
    future.add_done_callback(lambda f: stats.__setitem__("fetch_done", time.monotonic()))
    future.add_done_callback(watch.finish)
    watch.started_event.wait()
    try:
        if watch.manifest is None:  # a hit (or a failure before any download began)
            pinned = future.result()
            return _load_cached(pinned.path, target), pinned
        tensors: dict[str, torch.Tensor] = {}
        for name, fd in watch.fds.items():
            watch.wait_for(name, 8)
            (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            size = next(f.size for f in watch.manifest.files if f.name == name)
            watch.wait_for(name, min(8 + header_len, size))
            header = parse_header(name, os.pread(fd, header_len, 8), size)
            for entry in sorted(header.tensors, key=lambda e: e.start):
                watch.wait_for(name, entry.end)
                raw = bytearray(entry.nbytes)
                pread_exact(fd, memoryview(raw), entry.start, name)
                tensor = torch.frombuffer(raw, dtype=torch.uint8) if entry.nbytes else \
                    torch.empty(0, dtype=torch.uint8)
                tensor = tensor.view(entry.dtype).reshape(entry.shape)
                tensors[entry.name] = tensor.to(target) if target.type != "cpu" else tensor
                stats.setdefault("first_tensor", time.monotonic())
                stats["last_tensor"] = time.monotonic()
        pinned = future.result()  # verified and published: only now are the weights handed out
        return tensors, pinned
    finally:
        watch.close()


def _load_cached(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from ..loader.api import load_state_dict

    return load_state_dict(path, device, copy=device.type == "cpu")
