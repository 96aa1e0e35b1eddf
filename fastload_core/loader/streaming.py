"""Streaming load: tensors are read out of a model's files while they are still downloading.

A cold start from S3 normally costs a download and then a load. Here the fetch runs as usual, watched
by storage (``storage.streaming.watch_fetch``: which byte ranges of each file have landed), and this
module turns the landed bytes into tensors: each safetensors header is parsed as soon as its first bytes
are in, and each tensor is copied out (into private memory or onto the device) as soon as the contiguous
prefix of its file covers it. The bytes are hot in the page cache, so the copy costs a memcpy that
overlaps the rest of the download; the cold start costs about one download. The cache entry is published
as usual, so the next start is a hit.

The tensors are returned only after the whole fetch verified: a corrupt or changed object raises before
any weight is handed out, exactly as a plain fetch would.
"""

from __future__ import annotations

import os
import struct
import time

import torch

from ..storage import Pin, TieredStore
from ..storage.streaming import watch_fetch
from .cpu import pread_exact
from .header import parse_header


def stream_tensors(uri: str, device: torch.device, *, tier: str | None = None,
                   store: TieredStore | None = None,
                   stats: dict[str, float] | None = None) -> tuple[dict[str, torch.Tensor] | None, Pin]:
    """Fetch ``uri`` and copy out every tensor of its safetensors files as their bytes land.

    Returns the tensors and the pin of the cached entry; the tensors are None when nothing was
    downloaded (a cache hit: load the pinned files the usual way). ``stats`` receives monotonic times:
    ``started``, ``first_tensor``, ``last_tensor``, ``fetch_done``.
    """
    stats = stats if stats is not None else {}
    stats["started"] = time.monotonic()
    watch, future = watch_fetch(uri, tier=tier, store=store, stats=stats,
                                wanted=lambda name: name.endswith(".safetensors"))
    watch.started_event.wait()
    try:
        if watch.manifest is None:  # a hit (or a failure before any download began)
            return None, future.result()
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
                tensors[entry.name] = tensor.to(device) if device.type != "cpu" else tensor
                stats.setdefault("first_tensor", time.monotonic())
                stats["last_tensor"] = time.monotonic()
        pinned = future.result()  # verified and published: only now are the weights handed out
        return tensors, pinned
    finally:
        watch.close()
