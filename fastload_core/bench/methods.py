"""The benchmark's methods: each a way of loading the checkpoint, with its own loader.

A method's ``prepare`` runs in the fresh worker process before the clock starts: it imports what the
method needs and sets up anything that is not the load (library imports, CUDA context, a limit's
buffers), then returns the load itself, the only part that is timed. Imports and CUDA context
creation happen here for every method alike, because a serving process has paid them before it
loads a model.

Every load ends resident (``touch``): one byte of every 4 KiB page of every tensor is read, so a
lazy method pays its page faults inside the timed region; the bytes read are summed into a checksum
that must agree across methods. On a GPU the clock stops at ``torch.cuda.synchronize()`` instead
(the worker says why) and the checksum is taken after it.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from .checkpoints import TransformerConfig

PAGE = 4096
ODIRECT_CHUNK = 16 << 20

Loaded = Any  # a dict of tensors, a module, or a list of buffers: whatever keeps the weights alive


@dataclass
class Context:
    """What a method's ``prepare`` gets: the file, the checkpoint's shapes, the device it loads to
    (for GPU methods an indexed CUDA device, or ``cpu`` in a dry run), and a dict to report stages."""

    path: str
    config: TransformerConfig
    device: str = "cpu"
    stages: dict[str, float] = field(default_factory=dict)


Prepare = Callable[[Context], Callable[[], Loaded]]


@dataclass(frozen=True)
class Method:
    """One way of loading, run by the worker as ``id``; ``name`` is what ``--methods`` selects."""

    id: str  # e.g. "cpu/torch.load", "model/fastload", "limit/odirect"
    label: str  # row label in the table
    reads: str  # "safetensors" or "pickle": which file of the checkpoint it reads
    prepare: Prepare = field(compare=False, repr=False)
    limit: bool = False
    gpu: bool = False  # loads to the GPU scenarios' device

    @property
    def name(self) -> str:
        return self.id.split("/", 1)[1]


def touch(loaded: Loaded) -> tuple[int, int, int]:
    """Read one byte of every page of every tensor; returns (bytes, tensors, checksum).

    ``[::4096]`` from each tensor's first byte, plus its last byte, lands in every page it spans.
    """
    tensors = tensors_of(loaded)
    nbytes = count = 0
    checksum: torch.Tensor | int = 0
    for tensor in tensors:
        if tensor.numel() == 0:
            continue
        raw = tensor.detach().reshape(-1).view(torch.uint8)
        checksum = checksum + raw[::PAGE].sum(dtype=torch.int64) + raw[-1]
        nbytes += raw.numel()
        count += 1
    if any(t.is_cuda for t in tensors):
        torch.cuda.synchronize()
    return nbytes, count, int(checksum)


def tensors_of(loaded: Loaded) -> list[torch.Tensor]:
    if isinstance(loaded, torch.nn.Module):
        return list(loaded.state_dict().values())
    if isinstance(loaded, dict):
        return list(loaded.values())
    return list(loaded)


# --- third-party and baseline loaders ----------------------------------------------------------------


def _torch_load(mmap: bool) -> Prepare:
    return lambda ctx: partial(torch.load, ctx.path, map_location="cpu", weights_only=True, mmap=mmap)


def _safetensors(ctx: Context) -> Callable[[], Loaded]:
    import safetensors.torch

    return partial(safetensors.torch.load_file, ctx.path, device=ctx.device)


def _runai(ctx: Context) -> Callable[[], Loaded]:
    from runai_model_streamer import SafetensorsStreamer

    def load() -> dict[str, torch.Tensor]:
        with SafetensorsStreamer() as streamer:
            streamer.stream_file(ctx.path, device=ctx.device)
            return dict(streamer.get_tensors())

    return load


def _fastsafetensors(ctx: Context) -> Callable[[], Loaded]:
    """Single-process use as its README shows; nogds because GDS needs cuFile and a supported file system.
    It needs an indexed device (``cuda:0``): a bare ``cuda`` is a ValueError."""
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    def load() -> dict[str, torch.Tensor]:
        loader = SafeTensorsFileLoader(SingleGroup(), ctx.device, nogds=True)
        try:
            loader.add_filenames({0: [ctx.path]})
            buffers = loader.copy_files_to_device()
            try:  # tensors own their storage and outlive close() (fastsafetensors >= 0.2)
                return {key: buffers.get_tensor(key) for key in loader.get_keys()}
            finally:
                buffers.close()
        finally:
            loader.close()

    return load


# --- fastload ------------------------------------------------------------------------------------------


def _fastload(*, copy: bool = False, repeat: bool = False, repin: bool = False,
              env: dict[str, str] | None = None) -> Prepare:
    """fastload ``load_file``; ``repeat``: a first load (untimed) pays the one-time set-up, the second is
    timed; ``repin``: the same, but the staging buffers are released in between, so the timed load pays
    pinning and nothing else of the set-up; ``env``: loader settings (``FASTLOAD_PINNED``, ...) for the
    variants that a short GPU lease compares side by side."""

    def prepare(ctx: Context) -> Callable[[], Loaded]:
        os.environ.update(env or {})
        from fastload_core import LoadReport, load_file

        if repeat or repin:
            touch(load_file(ctx.path, ctx.device, copy=copy))
        if repin and ctx.device != "cpu":
            from fastload_core.loader.cuda import release_staging

            release_staging()
        report = LoadReport(source=ctx.path, device=ctx.device)

        def load() -> dict[str, torch.Tensor]:
            try:
                return load_file(ctx.path, ctx.device, copy=copy, report=report)
            finally:
                ctx.stages.update(report.stages)

        return load

    return prepare


def _gpu_fastload(*, repeat: bool = False, repin: bool = False, env: dict[str, str] | None = None) -> Prepare:
    inner = {True: _fastload(copy=True, repeat=repeat, repin=repin, env=env),
             False: _fastload(repeat=repeat, repin=repin, env=env)}
    return lambda ctx: inner[ctx.device == "cpu"](ctx)  # on the CPU (dry run) a private copy, as on a GPU


def _gpu_variant(name: str, **env: str) -> Method:
    """fastload's first GPU load in a fresh process with other loader settings: one lease compares them."""
    settings = ", ".join(f"{key}={value}" for key, value in env.items())
    return Method(f"cuda/fastload-{name}", f"fastload load_file(device=cuda), {settings}", "safetensors",
                  _gpu_fastload(env=env), gpu=True)


# --- model ready: build the module and load its weights ------------------------------------------------


def _model_with_state_dict(read: Callable[[Context], Callable[[], dict[str, torch.Tensor]]]) -> Prepare:
    def prepare(ctx: Context) -> Callable[[], Loaded]:
        from .checkpoints import SyntheticTransformer

        state = read(ctx)

        def load() -> torch.nn.Module:
            model = SyntheticTransformer(ctx.config)  # random init included: that is what this path costs
            model.load_state_dict(state())
            return model

        return load

    return prepare


def _model_fastload(ctx: Context) -> Callable[[], Loaded]:
    from fastload_core import LoadReport, load_model

    from .checkpoints import SyntheticTransformer

    report = LoadReport(source=ctx.path, device="cpu")

    def load() -> torch.nn.Module:
        try:
            return load_model(partial(SyntheticTransformer, ctx.config), ctx.path, report=report)
        finally:
            ctx.stages.update(report.stages)

    return load


# --- limits: what the machine allows, measured in the same rounds --------------------------------------


def _hugepage_read(ctx: Context) -> Callable[[], Loaded]:
    """The ceiling for a private copy: parallel preads into a huge-page buffer, no parsing at all."""
    from fastload_core.loader.cpu import allocate_private, read_into

    def load() -> list[torch.Tensor]:
        buffer = allocate_private(os.path.getsize(ctx.path))
        with open(ctx.path, "rb") as file:
            read_into(file.fileno(), ctx.path, buffer, 0)
        return [buffer]

    return load


def _odirect_read(ctx: Context) -> Callable[[], Loaded]:
    """The disk's ceiling: O_DIRECT bypasses the page cache, 16 MiB aligned reads from several threads."""
    from fastload_core.loader.cpu import allocate_private, io_threads

    def load() -> list[torch.Tensor]:
        size = os.path.getsize(ctx.path)
        aligned = -(-size // PAGE) * PAGE
        buffer = allocate_private(aligned)  # mmap: page-aligned, as O_DIRECT requires
        view = memoryview(buffer.numpy().data).cast("B")
        fd = os.open(ctx.path, os.O_RDONLY | os.O_DIRECT)
        try:
            def read(offset: int) -> None:
                end = min(offset + ODIRECT_CHUNK, aligned)
                while offset < end:
                    count = os.preadv(fd, [view[offset:end]], offset)
                    if count <= 0:
                        return  # end of file inside the last, rounded-up block
                    offset += count

            with ThreadPoolExecutor(io_threads()) as pool:
                list(pool.map(read, range(0, aligned, ODIRECT_CHUNK)))
        finally:
            os.close(fd)
        return [buffer[:size]]

    return load


def _h2d_pinned(ctx: Context) -> Callable[[], Loaded]:
    """Host-to-device bandwidth for the file's size in one copy from pinned memory: the ceiling of any
    GPU loader (copied in small pieces it reads far lower, ~24 vs ~55 GB/s on an H100)."""
    nbytes = os.path.getsize(ctx.path)
    pinned = ctx.device != "cpu"
    source = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    destination = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device)
    warm = min(nbytes, 1 << 20)
    destination[:warm].copy_(source[:warm])  # the first copy initialises the copy engine: not timed
    if pinned:
        torch.cuda.synchronize()

    def copy() -> list[torch.Tensor]:
        destination.copy_(source, non_blocking=pinned)
        if pinned:
            torch.cuda.synchronize()
        return [destination]

    return copy


def _pread_pinned(ctx: Context) -> Callable[[], Loaded]:
    """The whole file read by parallel ``pread``s (``io_threads()`` of them, 16 MiB each) into pinned
    memory allocated beforehand: the ceiling of the read side of a GPU loader."""
    from fastload_core.loader.cpu import read_into

    buffer = torch.empty(os.path.getsize(ctx.path), dtype=torch.uint8, pin_memory=ctx.device != "cpu")
    buffer[:: mmap.PAGESIZE] = 0  # pinned memory is resident already; a dry run's buffer is made so

    def read() -> list[torch.Tensor]:
        with open(ctx.path, "rb") as file:
            read_into(file.fileno(), ctx.path, buffer, 0)
        return [buffer]

    return read


# --- the table ---------------------------------------------------------------------------------------

CPU_METHODS = (
    Method("cpu/torch.load", "torch.load (pickle)", "pickle", _torch_load(mmap=False)),
    Method("cpu/torch.load-mmap", "torch.load(mmap=True)", "pickle", _torch_load(mmap=True)),
    Method("cpu/safetensors", "safetensors.torch.load_file", "safetensors", _safetensors),
    Method("cpu/runai", "Run:ai Model Streamer", "safetensors", _runai),
    Method("cpu/fastsafetensors", "fastsafetensors (nogds)", "safetensors", _fastsafetensors),
    Method("cpu/fastload", "fastload load_file", "safetensors", _fastload()),
    Method("cpu/fastload-copy", "fastload load_file(copy=True)", "safetensors", _fastload(copy=True)),
)
GPU_METHODS = (
    Method("cuda/safetensors", "safetensors.torch.load_file(device=cuda)", "safetensors", _safetensors, gpu=True),
    Method("cuda/fastsafetensors", "fastsafetensors (nogds)", "safetensors", _fastsafetensors, gpu=True),
    Method("cuda/runai", "Run:ai Model Streamer", "safetensors", _runai, gpu=True),
    Method("cuda/fastload", "fastload load_file(device=cuda)", "safetensors", _gpu_fastload(), gpu=True),
)
GPU_EXTRA_METHODS = (
    Method("cuda/fastload-repeat", "fastload load_file(device=cuda), second load in the process", "safetensors",
           _gpu_fastload(repeat=True), gpu=True),
    Method("cuda/fastload-repin", "fastload load_file(device=cuda), second load in the process, staging re-pinned",
           "safetensors", _gpu_fastload(repin=True), gpu=True),
)
GPU_VARIANTS = (  # first loads with other loader settings, warm and cold: what a lease compares
    _gpu_variant("alloc", FASTLOAD_PINNED="alloc"),
    _gpu_variant("buf4", FASTLOAD_GPU_BUFFER_MB="4"),
    _gpu_variant("buf8", FASTLOAD_GPU_BUFFER_MB="8"),
    _gpu_variant("buf32", FASTLOAD_GPU_BUFFER_MB="32"),
    _gpu_variant("buf64", FASTLOAD_GPU_BUFFER_MB="64"),
    _gpu_variant("buffered", FASTLOAD_DIRECT_IO="never"),  # cold: through the page cache, as fastsafetensors
    _gpu_variant("threads8", FASTLOAD_IO_THREADS="8"),
    _gpu_variant("threads24", FASTLOAD_IO_THREADS="24"),
    _gpu_variant("threads32", FASTLOAD_IO_THREADS="32"),
)
MODEL_METHODS = (
    Method("model/torch.load", "Model() + load_state_dict(torch.load)", "pickle",
           _model_with_state_dict(lambda ctx: partial(torch.load, ctx.path, map_location="cpu", weights_only=True))),
    Method("model/safetensors", "Model() + load_state_dict(safetensors load_file)", "safetensors",
           _model_with_state_dict(_safetensors)),
    Method("model/fastload", "fastload load_model", "safetensors", _model_fastload),
)
LIMITS = {
    "hugepage-read": Method("limit/hugepage-read", "limit: parallel read into huge pages", "safetensors",
                            _hugepage_read, limit=True),
    "odirect": Method("limit/odirect", "limit: O_DIRECT parallel read", "safetensors", _odirect_read, limit=True),
    "pread-pinned": Method("limit/pread-pinned", "limit: parallel pread into pinned memory", "safetensors",
                           _pread_pinned, limit=True, gpu=True),
    "h2d-pinned": Method("limit/h2d-pinned", "limit: one pinned host-to-device copy", "safetensors",
                         _h2d_pinned, limit=True, gpu=True),
}
METHODS: dict[str, Method] = {
    m.id: m for m in (*CPU_METHODS, *GPU_METHODS, *GPU_EXTRA_METHODS, *GPU_VARIANTS, *MODEL_METHODS, *LIMITS.values())
}
