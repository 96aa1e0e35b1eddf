"""Public loading functions: resolve a source to safetensors files, load them, report the cost."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, ParamSpec, TypeVar

import torch

from .. import plugins, storage
from ..errors import CheckpointError, DeviceError
from ..report import LoadReport
from . import cpu
from .checkpoint_files import INDEX_NAME, SINGLE_NAME, choose_files, indexed_part
from .header import MAX_HEADER_BYTES, Header, gc_paused, read_header, read_header_from

log = logging.getLogger("fastload")

PathOrURI = str | os.PathLike[str]  # a file, a directory, or a model URI (storage's Source is another thing)


def read_metadata(source: PathOrURI) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file's header (None when it has none)."""
    text = os.fspath(source)
    return read_header(storage.fetch(text) if storage.is_uri(text) else text).metadata


def load_file(
    source: PathOrURI,
    device: str | int | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    copy: bool = False,
    lazy: bool = False,
    report: LoadReport | None = None,
) -> dict[str, torch.Tensor]:
    """Drop-in for ``safetensors.torch.load_file``, faster; see ``load_state_dict`` for the options."""
    if not storage.is_uri(os.fspath(source)) and Path(source).is_dir():
        raise CheckpointError(source, "is a directory; load_file takes one .safetensors file (use load_state_dict)")
    return load_state_dict(source, device, dtype=dtype, copy=copy, lazy=lazy, report=report)


def load_state_dict(
    source: PathOrURI,
    device: str | int | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    copy: bool = False,
    lazy: bool = False,
    report: LoadReport | None = None,
) -> dict[str, torch.Tensor]:
    """Load every tensor of a checkpoint: a file, a directory, a sharded index, a legacy pickle, or a
    URI (``s3://``, ``file://``, or a plugin's scheme) served through the tiered store.

    On CPU, tensors are copy-on-write views of a shared mapping (``copy=False``) or private memory
    (``copy=True``). ``lazy=True`` maps without reading: a page is read when first touched, so
    parts of the model that are never used are never read. On a CUDA device, a pinned pipeline
    fills one device allocation per file. ``dtype`` converts floating-point tensors.
    ``report``, when given, is filled with what the load cost.

    A URI's cache entry stays pinned (never evicted) while mapped tensors use it. Where the load
    copies anyway (``copy=True``, or a device), a cold URI is streamed: tensors are copied out of
    the download as their bytes land, so a cold start costs about one download.
    """
    target = _device(device)
    if lazy and target.type != "cpu":
        raise ValueError(
            f"lazy=True maps weights into CPU memory, but device={device!r}; load lazily on 'cpu' and move "
            "the submodules you need with .to(), or load eagerly onto the device"
        )
    text = os.fspath(source)
    report = report if report is not None else LoadReport(source=text, device=str(target))
    report.source, report.device = text, str(target)
    started = time.perf_counter()
    plugins.notify("before_load", source=text, device=str(target))
    try:  # every before_load is paired with one after_load, carrying the error when there is one
        private = copy or target.type != "cpu"
        if storage.is_uri(text) and private:
            tensors = _stream(text, target, report)
        else:
            pinned = _timed(report, "fetch", storage.pin, text) if storage.is_uri(text) else None
            # A load allocates hundreds of views and dict entries, all live: in a fresh process that burst
            # is what triggers the first full collection over what `import torch` left (~80 ms on 2 cores,
            # docs/benchmarks.md), so the collector waits until the load is done.
            with gc_paused():
                tensors = _load_local(pinned.path if pinned else Path(text), target, copy, lazy, report, pinned)
            report.tier = (pinned.tier or "") if pinned else storage.tier_of(text)
        if dtype is not None:
            converted_at = time.perf_counter()
            tensors = {name: t.to(dtype_for(t, dtype)) for name, t in tensors.items()}
            report.add_stage("convert", time.perf_counter() - converted_at)
    except BaseException as exc:
        report.seconds = time.perf_counter() - started
        plugins.notify("after_load", report=report, error=exc)
        raise
    report.seconds = time.perf_counter() - started
    log.info(report.summary())
    plugins.notify("after_load", report=report, error=None)
    return tensors


def _load_local(
    path: Path, device: torch.device, copy: bool, lazy: bool, report: LoadReport, pinned: storage.Pin | None
) -> dict[str, torch.Tensor]:
    files, strategy_suffix = _resolve(path, report)
    tensors: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        opened: list[tuple[BinaryIO, Path, Header]] = []
        for file_path, expected in files:
            file = stack.enter_context(open(file_path, "rb"))
            header = _timed(report, "header", read_header_from, file, file_path)
            opened.append((file, file_path, indexed_part(file_path, header, expected)))
        if device.type == "cuda":  # every file through one pipeline: shards load concurrently
            from . import cuda

            started = time.perf_counter()
            bases = cuda.load_files([(handle.fileno(), str(p), header) for handle, p, header in opened], device, report)
            report.add_stage("read", time.perf_counter() - started)
            started = time.perf_counter()
            for (_, _, header), base in zip(opened, bases, strict=True):
                tensors.update(cpu.tensor_views(base, header, header.span[0]))
            report.add_stage("views", time.perf_counter() - started)
        else:
            for handle, file_path, header in opened:
                tensors.update(_load_one(handle.fileno(), str(file_path), header, device, copy, lazy, report, pinned))
        for _, _, header in opened:
            report.files += 1
            report.tensors += len(header.tensors)
            report.nbytes += header.data_bytes
    report.strategy = _strategy(device, copy, lazy) + strategy_suffix
    return tensors


def stream_state_dict(uri: str, device: str | torch.device = "cpu", *, tier: str | None = None,
                      store: storage.TieredStore | None = None,
                      stats: dict[str, float] | None = None) -> tuple[dict[str, torch.Tensor], storage.Pin]:
    """Fetch ``uri`` and load every tensor of its safetensors files, overlapping the two on a cold start.

    Returns the state dict and the pin of the cached entry (release it when the model is dropped; the
    tensors are private copies, so releasing early only lets the entry be evicted). On a cache hit this is
    a plain load of the cached files. ``stats``, when given, receives monotonic times: ``started``,
    ``first_tensor``, ``last_tensor``, ``verified``, ``fetch_done`` (the overlap, for benchmarks and tests;
    a cold stream returns once the download verified, and its entry may be published after: the pin is then
    a ``storage.streaming.PendingPin``, whose ``path`` waits for it).
    """
    from .streaming import stream_tensors

    target = torch.device(device)
    tensors, pinned = stream_tensors(uri, target, tier=tier, store=store, stats=stats)
    if tensors is None:  # a hit: the usual private-copy load of the cached files
        try:
            scratch = LoadReport(source=str(pinned.path), device=str(target))
            tensors = _load_local(pinned.path, target, target.type == "cpu", False, scratch, None)
        except BaseException:
            pinned.release()
            raise
    return tensors, pinned


def _stream(uri: str, device: torch.device, report: LoadReport) -> dict[str, torch.Tensor]:
    stats: dict[str, float] = {}
    tensors, pinned = _timed(report, "stream", stream_state_dict, uri, device, stats=stats)
    pinned.release()  # the tensors are private copies; the published entry may now be evicted
    report.tier = pinned.tier or ""
    report.files += 1
    report.tensors += len(tensors)
    report.nbytes += sum(t.numel() * t.element_size() for t in tensors.values())
    streamed = "first_tensor" in stats  # else a cache hit, loaded from the tier
    report.strategy = ("stream+" if streamed else "") + _strategy(device, copy=True, lazy=False)
    return tensors


def _load_one(
    fd: int,
    path: str,
    header: Header,
    device: torch.device,
    copy: bool,
    lazy: bool,
    report: LoadReport,
    pinned: storage.Pin | None,
) -> dict[str, torch.Tensor]:
    started = time.perf_counter()
    start, end = header.span
    if device.type == "cpu" and not copy:
        base, base_offset = cpu.map_file(fd, populate=not lazy, keepalive=pinned), 0
    elif device.type == "cpu":
        start -= start % cpu.PAGE  # source and destination pages line up: whole-page copies
        base, base_offset = cpu.allocate_private(end - start), start
        cpu.read_into(fd, path, base, start)
    else:  # other accelerators: map, then let torch copy
        base, base_offset = cpu.map_file(fd).to(device), 0
    report.add_stage("read", time.perf_counter() - started)
    started = time.perf_counter()
    tensors = dict(cpu.tensor_views(base, header, base_offset))
    report.add_stage("views", time.perf_counter() - started)
    return tensors


def _resolve(path: Path, report: LoadReport) -> tuple[list[tuple[Path, set[str] | None]], str]:
    """The safetensors files behind ``path``, each with the tensor names an index expects of it."""
    if path.is_dir():
        names = {entry.name for entry in os.scandir(path) if entry.is_file()}
        chosen = choose_files(path, names, (path / INDEX_NAME).read_bytes)
        if chosen is not None:
            return [(path / name, expected) for name, expected in chosen], ""
        candidates = sorted(name for name in names if name.endswith(".safetensors"))
        from . import formats  # only here and for a legacy file: the converter's imports stay off the fast path

        legacy = [path / name for name in sorted(names) if formats.find_format(path / name)]
        if len(candidates) > 1 or not legacy:
            found = ", ".join(candidates) or "no checkpoint files"
            raise CheckpointError(
                path, f"cannot tell which checkpoint to load ({found}); expected {SINGLE_NAME} or {INDEX_NAME}"
            )
        path = legacy[0]
    if not path.exists():
        raise CheckpointError(path, "does not exist")
    if _is_safetensors(path):
        return [(path, None)], ""
    from . import formats

    converted = _timed(report, "convert-legacy", formats.converted_path, path)
    return [(converted, None)], "+converted"


def _is_safetensors(path: Path) -> bool:
    """By suffix, or by a plausible header (8-byte length then '{') for files named otherwise."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as file:
        prefix = file.read(9)
    return len(prefix) == 9 and prefix[8:9] == b"{" and int.from_bytes(prefix[:8], "little") <= MAX_HEADER_BYTES


def dtype_for(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``tensor`` takes when a load asks for ``dtype``: floating tensors convert, others (token
    ids, step counters) keep theirs, as ``module.to(dtype)`` does."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def _device(device: str | int | torch.device) -> torch.device:
    """The torch device for ``device``, checked before anything is read: asking for CUDA where there is
    none is a ``DeviceError`` that says why, not torch's error from deep inside a pinned allocation."""
    try:
        target = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(device, "not a torch device name; use e.g. 'cpu', 'cuda' or 'cuda:0'") from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            cause = ("this torch is a CPU-only build" if torch.version.cuda is None
                     else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)")
            raise DeviceError(target, f"CUDA is not available: {cause}; load to 'cpu', or run where a GPU is")
        count = torch.cuda.device_count()
        if target.index is not None and target.index >= count:
            raise DeviceError(target, f"only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1})")
    return target


def _strategy(device: torch.device, copy: bool, lazy: bool) -> str:
    if device.type != "cpu":
        return "cuda-pipeline" if device.type == "cuda" else f"{device.type}-copy"
    return "cpu-lazy-mmap" if lazy else ("cpu-copy" if copy else "cpu-mmap")


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _timed(report: LoadReport, stage: str, function: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
    started = time.perf_counter()
    try:
        return function(*args, **kwargs)
    finally:
        report.add_stage(stage, time.perf_counter() - started)

