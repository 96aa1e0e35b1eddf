"""The load benchmark: every method in a fresh process, interleaved, several rounds, medians and ratios.

Why each rule:

- **Fresh process per run.** A loader that ran before in the same process finds warm allocator
  pools, a populated CUDA context and already-imported libraries; a server cold start has none of
  that. The child reports the time of the load itself (imports and CUDA context creation are
  recorded as ``setup`` but not counted), the parent records the whole process as well.
- **Interleaved, order shuffled per round.** Machine noise (other jobs, thermal, the host's cache)
  drifts over minutes; running method A five times then B five times would put the drift into the
  ratio. A rotated round-robin still keeps each method's predecessor fixed, and on a VM that
  matters: a method that runs right after one that freed 2 GiB reuses memory the host has already
  backed (measured: 22 GB/s first touch vs 0.6 GB/s for memory the host had reclaimed). A seeded
  shuffle per round gives every method varied neighbours.
- **Everything ends resident.** Each run finishes by reading one byte of every 4 KiB page of every
  tensor (and synchronizing CUDA), so a lazy method (``torch.load(mmap=True)``) pays its page
  faults inside the timed region instead of looking free. The bytes read are summed into a
  checksum that must agree across methods: a method that returned the wrong bytes is caught.
- **Limits in the same run.** A target such as "85% of the disk" means nothing against a number
  from another day; the limits (huge-page read of the warm file, O_DIRECT read of the cold file,
  pinned host-to-device copy) run as extra methods in the same rounds.
- **Cold means evicted and verified.** Before every cold run the file's pages are dropped with
  ``posix_fadvise(DONTNEED)`` (per file: other people's caches stay intact) and ``mincore`` checks
  that they are gone; ``drop_caches`` is the fallback. The residency left is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .checkpoints import GIB, Checkpoint, TransformerConfig

PAGE = 4096
RESULT_PREFIX = "FASTLOAD-BENCH "
ODIRECT_CHUNK = 16 << 20
H2D_CHUNK = 64 << 20


# ---------------------------------------------------------------------------------------------------
# Methods and scenarios
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One way of loading, run by the worker as ``id``; ``name`` is what ``--methods`` selects."""

    id: str  # e.g. "cpu/torch.load", "model/fastload", "limit/odirect"
    label: str  # row label in the table
    reads: str  # "safetensors" or "pickle": which file of the checkpoint it reads
    limit: bool = False

    @property
    def name(self) -> str:
        return self.id.split("/", 1)[1]


def _cpu_methods() -> list[Method]:
    return [
        Method("cpu/torch.load", "torch.load (pickle)", "pickle"),
        Method("cpu/torch.load-mmap", "torch.load(mmap=True)", "pickle"),
        Method("cpu/safetensors", "safetensors.torch.load_file", "safetensors"),
        Method("cpu/runai", "Run:ai Model Streamer", "safetensors"),
        Method("cpu/fastsafetensors", "fastsafetensors (nogds)", "safetensors"),
        Method("cpu/fastload", "fastload load_file", "safetensors"),
        Method("cpu/fastload-copy", "fastload load_file(copy=True)", "safetensors"),
    ]


@dataclass(frozen=True)
class Scenario:
    """Where the file lives, which methods run, and what the ratios are taken against."""

    name: str
    title: str
    methods: tuple[Method, ...]
    fastload: str  # method id the "÷ fastload" column divides by
    anchor: str | None  # method id of the anchor; None = the best non-fastload, non-limit method
    cold: bool = False
    needs_cuda: bool = False


SCENARIOS: dict[str, Scenario] = {
    "warm": Scenario(
        "warm", "Warm: checkpoint in /dev/shm (page cache), CPU",
        (*_cpu_methods(), Method("limit/hugepage-read", "limit: parallel read into huge pages", "safetensors", True)),
        fastload="cpu/fastload", anchor="cpu/safetensors",
    ),
    "cold": Scenario(
        "cold", "Cold: local disk, page cache evicted before every run, CPU",
        (*_cpu_methods(), Method("limit/odirect", "limit: O_DIRECT parallel read", "safetensors", True)),
        fastload="cpu/fastload", anchor=None, cold=True,
    ),
    "model": Scenario(
        "model", "Model ready: build the module and load its weights (warm file), CPU",
        (
            Method("model/torch.load", "Model() + load_state_dict(torch.load)", "pickle"),
            Method("model/safetensors", "Model() + load_state_dict(safetensors load_file)", "safetensors"),
            Method("model/fastload", "fastload load_model", "safetensors"),
        ),
        fastload="model/fastload", anchor="model/torch.load",
    ),
    "gpu": Scenario(
        "gpu", "GPU: warm file to cuda:0",
        (
            Method("cuda/safetensors", "safetensors.torch.load_file(device=cuda)", "safetensors"),
            Method("cuda/fastsafetensors", "fastsafetensors (nogds)", "safetensors"),
            Method("cuda/runai", "Run:ai Model Streamer", "safetensors"),
            Method("cuda/fastload", "fastload load_file(device=cuda)", "safetensors"),
            Method("limit/h2d-pinned", "limit: pinned host-to-device copy", "safetensors", True),
        ),
        fastload="cuda/fastload", anchor="cuda/safetensors", needs_cuda=True,
    ),
}
METHOD_NAMES = sorted({m.name for s in SCENARIOS.values() for m in s.methods if not m.limit})


# ---------------------------------------------------------------------------------------------------
# Worker: runs in the fresh process
# ---------------------------------------------------------------------------------------------------

Loaded = Any  # a dict of tensors, a module, or a list of buffers: whatever keeps the weights alive
_STAGES: dict[str, float] = {}  # fastload's own per-stage report, where the method provides one


def touch(loaded: Loaded) -> tuple[int, int, int]:
    """Read one byte of every page of every tensor; returns (bytes, tensors, checksum).

    ``[::4096]`` from each tensor's first byte, plus its last byte, lands in every page it spans.
    """
    tensors = _tensors_of(loaded)
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


def _tensors_of(loaded: Loaded) -> list[torch.Tensor]:
    if isinstance(loaded, torch.nn.Module):
        return list(loaded.state_dict().values())
    if isinstance(loaded, dict):
        return list(loaded.values())
    return list(loaded)


def _prepare(method_id: str, path: str, config: TransformerConfig) -> Callable[[], Loaded]:
    """Import what the method needs and set up anything that is not the load; return the load.

    Only the returned callable is timed. Library imports and CUDA context creation happen here
    for every method alike, because a serving process has paid them before it loads a model.
    """
    kind, name = method_id.split("/", 1)
    if kind in ("cuda",) or method_id == "limit/h2d-pinned":
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available (torch.cuda.is_available() is False)")
        torch.empty(1, device="cuda")
        torch.cuda.synchronize()
    device = "cuda" if kind == "cuda" else "cpu"
    if name == "torch.load" and kind == "cpu":
        return partial(torch.load, path, map_location="cpu", weights_only=True)
    if name == "torch.load-mmap":
        return partial(torch.load, path, map_location="cpu", weights_only=True, mmap=True)
    if name == "safetensors" and kind != "model":
        import safetensors.torch

        return partial(safetensors.torch.load_file, path, device=device)
    if name == "runai":
        return partial(_runai, path, device)
    if name == "fastsafetensors":
        return partial(_fastsafetensors, path, device)
    if name in ("fastload", "fastload-copy") and kind != "model":
        from fastload_core import load_file

        return partial(load_file, path, device, copy=name == "fastload-copy")
    if kind == "model":
        return _prepare_model(name, path, config)
    if method_id == "limit/hugepage-read":
        return partial(_hugepage_read, path)
    if method_id == "limit/odirect":
        return partial(_odirect_read, path)
    if method_id == "limit/h2d-pinned":
        return _prepare_h2d(os.path.getsize(path))
    raise ValueError(f"unknown benchmark method {method_id!r}")


def _prepare_model(name: str, path: str, config: TransformerConfig) -> Callable[[], Loaded]:
    from .checkpoints import SyntheticTransformer

    def with_state_dict(read: Callable[[], dict[str, torch.Tensor]]) -> torch.nn.Module:
        model = SyntheticTransformer(config)  # random init included: that is what this path costs
        model.load_state_dict(read())
        return model

    if name == "torch.load":
        return partial(with_state_dict, partial(torch.load, path, map_location="cpu", weights_only=True))
    if name == "safetensors":
        import safetensors.torch

        return partial(with_state_dict, partial(safetensors.torch.load_file, path))
    if name == "fastload":
        from fastload_core import LoadReport, load_model

        _STAGES.clear()
        report = LoadReport(source=path, device="cpu")

        def build_and_load() -> torch.nn.Module:
            try:
                return load_model(partial(SyntheticTransformer, config), path, report=report)
            finally:
                _STAGES.update(report.stages)

        return build_and_load
    raise ValueError(f"unknown model-scenario method {name!r}")


def _runai(path: str, device: str) -> dict[str, torch.Tensor]:
    from runai_model_streamer import SafetensorsStreamer

    with SafetensorsStreamer() as streamer:
        streamer.stream_file(path, device=device)
        return dict(streamer.get_tensors())


def _fastsafetensors(path: str, device: str) -> dict[str, torch.Tensor]:
    """Single-process use as its README shows; nogds because GDS needs cuFile and a supported file system."""
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    loader = SafeTensorsFileLoader(SingleGroup(), device, nogds=True)
    try:
        loader.add_filenames({0: [path]})
        buffers = loader.copy_files_to_device()
        try:  # tensors own their storage and outlive close() (fastsafetensors >= 0.2)
            return {key: buffers.get_tensor(key) for key in loader.get_keys()}
        finally:
            buffers.close()
    finally:
        loader.close()


def _hugepage_read(path: str) -> list[torch.Tensor]:
    """The ceiling for a private copy: parallel preads into a huge-page buffer, no parsing at all."""
    from fastload_core.loader.cpu import allocate_private, read_into

    buffer = allocate_private(os.path.getsize(path))
    with open(path, "rb") as file:
        read_into(file.fileno(), path, buffer, 0)
    return [buffer]


def _odirect_read(path: str) -> list[torch.Tensor]:
    """The disk's ceiling: O_DIRECT bypasses the page cache, 16 MiB aligned reads from several threads."""
    from fastload_core.loader.cpu import allocate_private, io_threads

    size = os.path.getsize(path)
    aligned = -(-size // PAGE) * PAGE
    buffer = allocate_private(aligned)  # mmap: page-aligned, as O_DIRECT requires
    view = memoryview(buffer.numpy().data).cast("B")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
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


def _prepare_h2d(nbytes: int) -> Callable[[], Loaded]:
    """Pinned host-to-device bandwidth for a file-sized transfer: the ceiling of any GPU loader."""
    source = torch.empty(H2D_CHUNK, dtype=torch.uint8, pin_memory=True)
    destination = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    destination[: min(nbytes, H2D_CHUNK)].copy_(source[: min(nbytes, H2D_CHUNK)])  # warm the copy engine
    torch.cuda.synchronize()

    def copy() -> list[torch.Tensor]:
        for offset in range(0, nbytes, H2D_CHUNK):
            length = min(H2D_CHUNK, nbytes - offset)
            destination[offset:offset + length].copy_(source[:length], non_blocking=True)
        torch.cuda.synchronize()
        return [destination]

    return copy


def run_worker(method_id: str, path: str, config: TransformerConfig) -> dict[str, Any]:
    """One timed run in this process: prepare (untimed), load + touch (timed)."""
    setup_started = time.perf_counter()
    load = _prepare(method_id, path, config)
    setup = time.perf_counter() - setup_started
    started = time.perf_counter()
    loaded = load()
    loaded_at = time.perf_counter()
    nbytes, tensors, checksum = touch(loaded)
    finished = time.perf_counter()
    return {
        "method": method_id,
        "seconds": finished - started,
        "load_seconds": loaded_at - started,
        "touch_seconds": finished - loaded_at,
        "setup_seconds": setup,
        "bytes": nbytes,
        "tensors": tensors,
        "checksum": checksum,
        "stages": dict(_STAGES),
        **_memory_counters(),
    }


def _memory_counters() -> dict[str, int]:
    """Peak RSS (``VmHWM``: per exec, unlike ``ru_maxrss`` which a child inherits from its parent)
    and anonymous huge-page bytes: private copies are fast only when the kernel granted huge pages."""
    counters: dict[str, int] = {}
    for source, key, name in (("/proc/self/status", "VmHWM:", "peak_rss_bytes"),
                              ("/proc/self/smaps_rollup", "AnonHugePages:", "anon_huge_bytes")):
        with contextlib.suppress(OSError):
            for line in Path(source).read_text().splitlines():
                if line.startswith(key):
                    counters[name] = int(line.split()[1]) * 1024
    return counters


def worker_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastload_core.bench.load")
    parser.add_argument("--worker", required=True, metavar="METHOD_ID")
    parser.add_argument("--file", required=True)
    parser.add_argument("--config", required=True, help="TransformerConfig as JSON")
    args = parser.parse_args(argv)
    interpreter_started = time.perf_counter()
    try:
        result = run_worker(args.worker, args.file, TransformerConfig(**json.loads(args.config)))
    except Exception as exc:
        result = {"method": args.worker, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    result["since_main_seconds"] = time.perf_counter() - interpreter_started
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------
# Page cache control
# ---------------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_fraction(path: Path) -> float:
    """Share of ``path``'s pages in the page cache: mincore on a read-only mapping never touched.

    libc's mmap rather than Python's, whose read-only mappings expose no address to ctypes.
    """
    size = path.stat().st_size
    if size == 0:
        return 0.0
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if address in (None, _MAP_FAILED):
        raise OSError(ctypes.get_errno(), f"mmap failed on {path}")
    try:
        pages = -(-size // mmap.PAGESIZE)
        vector = (ctypes.c_ubyte * pages)()
        if _libc.mincore(address, size, vector) != 0:
            raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
        return sum(byte & 1 for byte in bytes(vector)) / pages
    finally:
        _libc.munmap(address, size)


@dataclass
class EvictionLog:
    """How the cold scenario evicted pages, and how well it worked (reported with the results)."""

    method: str = "posix_fadvise(POSIX_FADV_DONTNEED) per file"
    max_resident_after: float = 0.0
    fallbacks: int = 0
    failures: int = 0


def evict(path: Path, log: EvictionLog) -> float:
    """Drop ``path`` from the page cache; returns the fraction still resident afterwards."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    left = resident_fraction(path)
    if left > 0.01:
        log.fallbacks += 1
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
        except OSError:
            log.failures += 1
        left = resident_fraction(path)
    log.max_resident_after = max(log.max_resident_after, left)
    return left


# ---------------------------------------------------------------------------------------------------
# Parent: rounds, medians, ratios, tables
# ---------------------------------------------------------------------------------------------------


@dataclass
class Run:
    scenario: str
    method: str
    round: int
    seconds: float | None = None
    bytes: int = 0
    tensors: int = 0
    checksum: int | None = None
    setup_seconds: float | None = None
    process_seconds: float = 0.0
    resident_before: float | None = None
    peak_rss_bytes: int | None = None
    anon_huge_bytes: int | None = None
    stages: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Summary:
    """Median of the successful rounds of one method in one scenario."""

    method: Method
    runs: list[Run]
    expected_bytes: int

    @property
    def ok(self) -> list[Run]:
        return [r for r in self.runs if r.error is None and r.seconds is not None]

    @property
    def median(self) -> float | None:
        return statistics.median(r.seconds for r in self.ok if r.seconds is not None) if self.ok else None

    @property
    def bytes(self) -> int:
        return self.ok[0].bytes if self.ok else 0

    @property
    def gbps(self) -> float | None:
        median = self.median
        return self.bytes / median / 1e9 if median else None

    @property
    def error(self) -> str | None:
        failed = [r.error for r in self.runs if r.error]
        return failed[0] if failed and not self.ok else None


@dataclass
class ScenarioResult:
    scenario: Scenario
    summaries: dict[str, Summary]
    location: str
    notes: list[str] = field(default_factory=list)

    def median(self, method_id: str) -> float | None:
        summary = self.summaries.get(method_id)
        return summary.median if summary else None

    def gbps(self, method_id: str) -> float | None:
        summary = self.summaries.get(method_id)
        return summary.gbps if summary else None

    @property
    def anchor_id(self) -> str | None:
        if self.scenario.anchor is not None:
            return self.scenario.anchor if self.median(self.scenario.anchor) else None
        candidates = [(s.median, mid) for mid, s in self.summaries.items()
                      if not s.method.limit and "fastload" not in s.method.name and s.median]
        return min(candidates)[1] if candidates else None


@dataclass
class BenchConfig:
    size_bytes: int
    rounds: int
    scenarios: list[str]
    methods: list[str] | None  # None = all
    disk_dir: Path
    warm_dir: Path
    dtype: str = "bf16"
    timeout_s: float = 900.0
    keep_warm: bool = False
    python: str = sys.executable


def selected_methods(scenario: Scenario, names: Sequence[str] | None) -> list[Method]:
    """Limits always run (the targets need them); other methods as ``--methods`` selects."""
    return [m for m in scenario.methods if m.limit or names is None or m.name in names]


def run_method(bench: BenchConfig, method: Method, path: Path, config: TransformerConfig) -> dict[str, Any]:
    """Spawn the worker for one run; an error of any kind comes back as ``{"error": ...}``."""
    command = [bench.python, "-m", "fastload_core.bench.load", "--worker", method.id, "--file", str(path),
               "--config", json.dumps(asdict(config))]
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=bench.timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {bench.timeout_s:.0f}s", "process_seconds": bench.timeout_s}
    elapsed = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"error": f"worker crashed (exit {done.returncode}): {tail[:300]}", "process_seconds": elapsed}
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["process_seconds"] = elapsed
    return result


def run_scenario(
    bench: BenchConfig,
    scenario: Scenario,
    checkpoint: Checkpoint,
    eviction: EvictionLog,
    progress: Callable[[str], None] = lambda _: None,
) -> ScenarioResult:
    methods = selected_methods(scenario, bench.methods)
    runs: dict[str, list[Run]] = {m.id: [] for m in methods}
    failed: set[str] = set()
    shuffler = random.Random(f"{scenario.name}-{bench.rounds}")  # reproducible orders
    for round_index in range(bench.rounds):
        for method in shuffler.sample(methods, len(methods)):
            run = Run(scenario.name, method.id, round_index)
            if method.id in failed:  # the same import or API error again: say it once, save the time
                run.error = runs[method.id][0].error
                runs[method.id].append(run)
                continue
            path = checkpoint.safetensors if method.reads == "safetensors" else checkpoint.pickle
            if scenario.cold:
                run.resident_before = evict(path, eviction)
            result = run_method(bench, method, path, checkpoint.config)
            run.process_seconds = result.get("process_seconds", 0.0)
            if "error" in result:
                run.error = result["error"]
                failed.add(method.id)
            else:
                run.seconds, run.bytes, run.tensors = result["seconds"], result["bytes"], result["tensors"]
                run.checksum, run.setup_seconds = result["checksum"], result["setup_seconds"]
                run.peak_rss_bytes = result.get("peak_rss_bytes")
                run.anon_huge_bytes = result.get("anon_huge_bytes")
                run.stages = result.get("stages", {})
            runs[method.id].append(run)
            shown = f"{run.seconds:.3f}s" if run.seconds is not None else f"n/a ({run.error})"
            progress(f"  {scenario.name} round {round_index + 1}/{bench.rounds} {method.id}: {shown}")
    expected = checkpoint.nbytes
    summaries = {m.id: Summary(m, runs[m.id], expected) for m in methods}
    outcome = ScenarioResult(scenario, summaries, str(checkpoint.safetensors.parent))
    _check_consistency(outcome, checkpoint)
    return outcome


def _check_consistency(result: ScenarioResult, checkpoint: Checkpoint) -> None:
    """Every non-limit method must have touched the same bytes: same count, same checksum."""
    reference: int | None = None
    for summary in result.summaries.values():
        if summary.method.limit:
            continue
        for run in summary.ok:
            if run.bytes != checkpoint.nbytes:
                result.notes.append(f"{summary.method.label} loaded {run.bytes} bytes, expected {checkpoint.nbytes}")
            reference = run.checksum if reference is None else reference
            if run.checksum != reference:
                result.notes.append(f"{summary.method.label} returned different bytes (checksum mismatch)")
    if reference is not None and not result.notes:
        result.notes.append(f"all methods loaded {checkpoint.nbytes} bytes with the same page checksum")


# ---------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------


VERDICT_MIN_BYTES = 1 << 30  # below this, process start and per-call costs, not bandwidth, decide the ratios


@dataclass
class Verdict:
    target: str
    measured: str
    passed: bool | None  # None: could not be measured here


def verdicts(results: dict[str, ScenarioResult]) -> list[Verdict]:
    out: list[Verdict] = []

    def ratio(scenario: str, slower: str, faster: str) -> float | None:
        r = results.get(scenario)
        a, b = (r.median(slower), r.median(faster)) if r else (None, None)
        return a / b if a and b else None

    def na(target: str, why: str) -> None:
        out.append(Verdict(target, f"n/a: {why}", None))

    warm = results.get("warm")
    target = "warm `load_file` ≤ 1.1× the time of `safetensors.torch.load_file`"
    value = ratio("warm", "cpu/fastload", "cpu/safetensors")
    if value is None:
        na(target, "warm scenario or a method missing")
    else:
        out.append(Verdict(target, f"{value:.2f}×", value <= 1.1))
    target = "warm `load_file` ≥ 8× faster than `torch.load`"
    value = ratio("warm", "cpu/torch.load", "cpu/fastload")
    if value is None:
        na(target, "warm scenario or a method missing")
    else:
        out.append(Verdict(target, f"{value:.1f}× faster", value >= 8))
    target = "`load_model` ≥ 10× faster than `Model()` + `load_state_dict(torch.load(...))`"
    value = ratio("model", "model/torch.load", "model/fastload")
    if value is None:
        na(target, "model scenario or a method missing")
    else:
        out.append(Verdict(target, f"{value:.1f}× faster", value >= 10))
    cold = results.get("cold")
    target = "cold `load_file` ≥ 85% of the O_DIRECT read limit"
    fast, limit = (cold.gbps("cpu/fastload"), cold.gbps("limit/odirect")) if cold else (None, None)
    if fast and limit:
        out.append(Verdict(target, f"{fast / limit:.0%} ({fast:.2f} of {limit:.2f} GB/s)", fast / limit >= 0.85))
    else:
        na(target, "cold scenario, fastload or the O_DIRECT limit missing")
    target = "cold `load_file` ≥ 1.2× the best anchor (best non-fastload method)"
    anchor = cold.anchor_id if cold else None
    value = ratio("cold", anchor, "cpu/fastload") if cold and anchor else None
    if value is None or cold is None or anchor is None:
        na(target, "cold scenario or methods missing")
    else:
        out.append(Verdict(target, f"{value:.2f}× ({cold.summaries[anchor].method.label})", value >= 1.2))
    target = "private-memory load from page cache (`copy=True`) ≥ 3 GB/s"
    value = warm.gbps("cpu/fastload-copy") if warm else None
    if value is None:
        na(target, "warm scenario or fastload-copy missing")
    else:
        assert warm is not None
        limit = warm.gbps("limit/hugepage-read")
        extra = f" (huge-page read limit {limit:.2f} GB/s)" if limit else ""
        out.append(Verdict(target, f"{value:.2f} GB/s{extra}", value >= 3.0))
    gpu = results.get("gpu")
    target = "GPU `load_file` ≥ 80% of pinned host-to-device bandwidth (same run)"
    fast, limit = (gpu.gbps("cuda/fastload"), gpu.gbps("limit/h2d-pinned")) if gpu else (None, None)
    if fast and limit:
        out.append(Verdict(target, f"{fast / limit:.0%} ({fast:.2f} of {limit:.2f} GB/s)", fast / limit >= 0.8))
    else:
        na(target, "no GPU run (needs CUDA: benchmarks/gpu_check.sh)" if gpu is None else "a method failed")
    target = "GPU `load_file` faster than safetensors, fastsafetensors and Run:ai"
    others = ("cuda/safetensors", "cuda/fastsafetensors", "cuda/runai")
    mine = gpu.median("cuda/fastload") if gpu else None
    if gpu is None or mine is None:
        na(target, "no GPU run (needs CUDA: benchmarks/gpu_check.sh)" if gpu is None else "fastload failed")
    else:
        parts, passed = [], True
        for other in others:
            theirs = gpu.median(other)
            if theirs is None:
                parts.append(f"{other.split('/')[1]} n/a")
            else:
                parts.append(f"{other.split('/')[1]} {theirs / mine:.2f}×")
                passed = passed and theirs > mine
        out.append(Verdict(target, ", ".join(parts), passed))
    size = max((s.bytes for r in results.values() for s in r.summaries.values()), default=0)
    if 0 < size < VERDICT_MIN_BYTES:  # fixed costs dominate: a small run checks that things work, not speed
        why = f"not judged: the targets are for checkpoints of {VERDICT_MIN_BYTES / GIB:g} GiB and more"
        out = [v if v.passed is None else Verdict(v.target, f"{v.measured} ({why})", None) for v in out]
    return out


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def scenario_table(result: ScenarioResult) -> str:
    fastload = result.median(result.scenario.fastload)
    anchor_id = result.anchor_id
    anchor = result.median(anchor_id) if anchor_id else None
    anchor_label = result.summaries[anchor_id].method.label if anchor_id else "n/a"
    lines = [
        "| method | median s | GB/s | time ÷ fastload | time ÷ anchor | rounds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for summary in result.summaries.values():
        label = summary.method.label + (" *(anchor)*" if summary.method.id == anchor_id else "")
        median = summary.median
        if median is None:
            lines.append(f"| {label} | n/a: {_cell(summary.error or 'no result')} | | | | 0/{len(summary.runs)} |")
            continue
        gbps = summary.gbps or 0.0
        vs_fast = f"{median / fastload:.2f}×" if fastload else "n/a"
        vs_anchor = f"{median / anchor:.2f}×" if anchor else "n/a"
        lines.append(f"| {label} | {median:.3f} | {gbps:.2f} | {vs_fast} | {vs_anchor} | "
                     f"{len(summary.ok)}/{len(summary.runs)} |")
    lines.append("")
    lines.append(f"Anchor: {anchor_label}. \"time ÷ X\" above 1 means slower than X.")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def verdict_table(items: Iterable[Verdict]) -> str:
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    for item in items:
        verdict = "n/a" if item.passed is None else ("**PASS**" if item.passed else "**FAIL**")
        lines.append(f"| {item.target} | {_cell(item.measured)} | {verdict} |")
    return "\n".join(lines)


def render(
    results: dict[str, ScenarioResult],
    machine: dict[str, str],
    command: str,
    checkpoint_line: str,
    eviction: EvictionLog | None,
    notes: Sequence[str] = (),
) -> str:
    out = ["## Load benchmark", ""]
    out.append("Machine: " + "; ".join(f"{k}: {v}" for k, v in machine.items()) + ".")
    out.append("")
    out.append(f"Command: `{command}`")
    out.append("")
    out.append(f"Checkpoint: {checkpoint_line}.")
    out.extend(f"\n{note}" for note in notes)
    out.append("")
    for result in results.values():
        out.append(f"### {result.scenario.title}")
        out.append("")
        out.append(f"File location: `{result.location}`.")
        if result.scenario.cold and eviction is not None:
            out.append(f"Page cache: {eviction.method} before every run; fallback to drop_caches "
                       f"{eviction.fallbacks} time(s) ({eviction.failures} failed); at most "
                       f"{eviction.max_resident_after:.1%} of the file was resident when a run started (mincore).")
        out.append("")
        out.append(scenario_table(result))
        for note in result.notes:
            out.append(f"\nCheck: {note}.")
        out.append("")
    out.append("### Targets")
    out.append("")
    out.append(verdict_table(verdicts(results)))
    out.append("")
    return "\n".join(out)


MARK_START = "<!-- bench:load:start -->"
MARK_END = "<!-- bench:load:end -->"


def update_markdown(path: Path, section: str) -> None:
    """Replace the load section between the markers, keeping the rest of the file as it is."""
    block = f"{MARK_START}\n{section.rstrip()}\n{MARK_END}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(MARK_END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def machine_info(bench: BenchConfig) -> dict[str, str]:
    """What a reader needs to reproduce or discount the numbers."""
    from importlib import metadata

    cpu = "unknown CPU"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    versions = []
    for package in ("torch", "safetensors", "runai-model-streamer", "fastsafetensors"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    info = {
        "CPU": f"{cpu}, {os.cpu_count()} cores",
        "RAM": f"{memory:.0f} GiB",
        "kernel": os.uname().release,
        "disk": _mount_of(bench.disk_dir),
        "warm": _mount_of(bench.warm_dir),
        "THP": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "load average at start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "software": ", ".join(versions),
    }
    if torch.cuda.is_available():
        info["GPU"] = torch.cuda.get_device_name(0)
    return info


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "unknown"


def _mount_of(path: Path) -> str:
    """Device and file system under ``path`` (longest matching mount point)."""
    target = str(path.resolve())
    best = ("?", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, point, fstype = line.split()[:3]
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[1]):
                best = (device, point, fstype)
    except OSError:
        pass
    return f"{target} on {best[0]} ({best[2]})"


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


@dataclass
class BenchOutcome:
    results: dict[str, ScenarioResult]
    markdown: str
    raw: dict[str, Any]


def run_bench(
    bench: BenchConfig,
    command: str,
    notes: Sequence[str] = (),
    progress: Callable[[str], None] = lambda _: None,
) -> BenchOutcome:
    """Generate (or reuse) the checkpoint, run the scenarios, and render the report."""
    from .checkpoints import describe, ensure_checkpoint

    unknown = [s for s in bench.scenarios if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; choose from {sorted(SCENARIOS)}")
    if bench.methods is not None and (bad := [m for m in bench.methods if m not in METHOD_NAMES]):
        raise ValueError(f"unknown method(s) {bad}; choose from {METHOD_NAMES}")
    machine = machine_info(bench)
    progress(f"checkpoint: {bench.size_bytes / (1 << 30):.3g} GiB in {bench.disk_dir}")
    disk = ensure_checkpoint(bench.disk_dir, bench.size_bytes, bench.dtype)
    extra_notes = list(notes)
    warm: Checkpoint | None = None
    results: dict[str, ScenarioResult] = {}
    eviction = EvictionLog()
    try:
        for name in bench.scenarios:
            scenario = SCENARIOS[name]
            if scenario.needs_cuda and not torch.cuda.is_available():
                extra_notes.append(f"Scenario `{name}` skipped: torch.cuda.is_available() is False on this machine.")
                progress(f"{name}: skipped (no CUDA)")
                continue
            if scenario.cold:
                checkpoint = disk
            else:
                if warm is None:
                    warm, note = _warm_copy(disk, bench)
                    if note:
                        extra_notes.append(note)
                checkpoint = warm
            progress(f"{name}: {len(selected_methods(scenario, bench.methods))} methods × {bench.rounds} rounds")
            results[name] = run_scenario(bench, scenario, checkpoint, eviction, progress)
    finally:
        if warm is not None and warm.safetensors.parent != disk.safetensors.parent and not bench.keep_warm:
            warm.remove()
    machine["load average at end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    markdown = render(results, machine, command, describe(disk.config),
                      eviction if "cold" in results else None, extra_notes)
    raw = {
        "command": command,
        "machine": machine,
        "config": asdict(disk.config),
        "eviction": asdict(eviction),
        "runs": [asdict(run) for r in results.values() for s in r.summaries.values() for run in s.runs],
        "verdicts": [asdict(v) for v in verdicts(results)],
    }
    return BenchOutcome(results, markdown, raw)


def _warm_copy(disk: Checkpoint, bench: BenchConfig) -> tuple[Checkpoint, str | None]:
    """The checkpoint in the warm directory; where it does not fit, the disk copy read into the page cache."""
    need = disk.safetensors.stat().st_size + disk.pickle.stat().st_size
    try:
        bench.warm_dir.mkdir(parents=True, exist_ok=True)
        free = os.statvfs(bench.warm_dir).f_bavail * os.statvfs(bench.warm_dir).f_frsize
    except OSError:
        free = 0
    if free > need + (256 << 20):
        return disk.copy_to(bench.warm_dir), None
    for path in (disk.safetensors, disk.pickle):
        with open(path, "rb", buffering=0) as file:
            while file.read(64 << 20):
                pass
    return disk, (f"{bench.warm_dir} has {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed: the warm scenarios "
                  f"read the disk copy after reading it once into the page cache.")


if __name__ == "__main__":
    sys.exit(worker_main())
