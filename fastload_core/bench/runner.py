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

import compileall
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoints import Checkpoint, TransformerConfig
from .methods import Method
from .pagecache import MAX_RESIDENT_COLD, EvictionLog, evict
from .report import machine_info, render
from .results import Run, ScenarioResult, Summary
from .scenarios import METHOD_NAMES, SCENARIOS, Scenario, selected_methods
from .targets import verdicts
from .worker import RESULT_PREFIX


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
    device: str = "cuda:0"  # the GPU scenarios' target; "cpu" runs them as a dry run of the harness


def run_method(bench: BenchConfig, method: Method, path: Path, config: TransformerConfig, *,
               untimed_touch: bool = False) -> dict[str, Any]:
    """Spawn the worker for one run; an error of any kind comes back as ``{"error": ...}``.
    ``untimed_touch``: the clock stops before the checksum pass (a GPU scenario, every method alike)."""
    command = [bench.python, "-m", "fastload_core.bench.worker", "--worker", method.id, "--file", str(path),
               "--config", json.dumps(asdict(config)), "--device", bench.device]
    if untimed_touch:
        command.append("--untimed-touch")
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
    on_round: Callable[[ScenarioResult], None] | None = None,
) -> ScenarioResult:
    """Run every round of ``scenario``; ``on_round`` receives the result so far after each round."""
    methods = selected_methods(scenario, bench.methods)
    runs: dict[str, list[Run]] = {m.id: [] for m in methods}
    failed: set[str] = set()
    shuffler = random.Random(f"{scenario.name}-{bench.rounds}")  # reproducible orders
    cut_short: str | None = None

    def round_done(finished: int) -> None:
        if on_round is not None and finished < bench.rounds:
            snapshot = _summarize(scenario, methods, runs, checkpoint)
            snapshot.notes.append(f"partial: {finished} of {bench.rounds} rounds so far")
            snapshot.cut_short = True
            on_round(snapshot)

    try:
        _run_rounds(bench, scenario, checkpoint, eviction, progress, methods, runs, failed, shuffler, round_done)
    except Stopped as stop:
        cut_short = (f"cut short by SIGTERM in round {stop.round} of {bench.rounds} (a time budget ran out): "
                     "the medians are of the runs that finished")
        progress(f"  {scenario.name}: {cut_short}")
    outcome = _summarize(scenario, methods, runs, checkpoint)
    if cut_short is not None:
        outcome.notes.append(cut_short)
        outcome.cut_short = True
    return outcome


def _summarize(scenario: Scenario, methods: list[Method], runs: dict[str, list[Run]],
               checkpoint: Checkpoint) -> ScenarioResult:
    summaries = {m.id: Summary(m, list(runs[m.id]), checkpoint.nbytes) for m in methods}
    outcome = ScenarioResult(scenario, summaries, str(checkpoint.safetensors.parent))
    _check_consistency(outcome, checkpoint)
    return outcome


def _run_rounds(
    bench: BenchConfig,
    scenario: Scenario,
    checkpoint: Checkpoint,
    eviction: EvictionLog,
    progress: Callable[[str], None],
    methods: list[Method],
    runs: dict[str, list[Run]],
    failed: set[str],
    shuffler: random.Random,
    round_done: Callable[[int], None] = lambda _: None,
) -> None:
    for round_index in range(bench.rounds):
        if round_index:
            round_done(round_index)
        _round[0] = round_index + 1
        for method in shuffler.sample(methods, len(methods)):
            run = Run(scenario.name, method.id, round_index)
            if method.id in failed:  # the same import or API error again: say it once, save the time
                run.error = runs[method.id][0].error
                runs[method.id].append(run)
                continue
            path = checkpoint.safetensors if method.reads == "safetensors" else checkpoint.pickle
            if scenario.cold:
                run.resident_before = evict(path, eviction)
                if run.resident_before > MAX_RESIDENT_COLD:
                    run.error = (f"not cold: {run.resident_before:.0%} of the file stayed in the page cache "
                                 "(posix_fadvise and drop_caches did not evict it; drop_caches needs root)")
                    runs[method.id].append(run)
                    progress(f"  {scenario.name} round {round_index + 1}/{bench.rounds} {method.id}: skipped, "
                             f"{run.error}")
                    continue
            result = run_method(bench, method, path, checkpoint.config, untimed_touch=scenario.needs_cuda)
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
                run.load_seconds, run.touch_seconds = result.get("load_seconds"), result.get("touch_seconds")
            runs[method.id].append(run)
            shown = f"{run.seconds:.3f}s" if run.seconds is not None else f"n/a ({run.error})"
            progress(f"  {scenario.name} round {round_index + 1}/{bench.rounds} {method.id}: {shown}")


class Stopped(Exception):
    """SIGTERM arrived (``timeout`` ending a step whose budget ran out): finish with the runs done."""

    def __init__(self, round_number: int) -> None:
        super().__init__(f"stopped in round {round_number}")
        self.round = round_number


_round = [0]  # the round in progress, for the SIGTERM handler's message


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Turn the first SIGTERM into ``Stopped`` (the run in progress is killed by ``subprocess.run``),
    and ignore later ones while the report of what finished is written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stopped(_round[0])

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


@dataclass
class BenchOutcome:
    results: dict[str, ScenarioResult]
    markdown: str
    raw: dict[str, Any]
    cut_short: bool = False  # SIGTERM stopped it: the report holds what finished


def run_bench(
    bench: BenchConfig,
    command: str,
    notes: Sequence[str] = (),
    progress: Callable[[str], None] = lambda _: None,
    partial: Callable[[str], None] | None = None,
) -> BenchOutcome:
    """Generate (or reuse) the checkpoint, run the scenarios, and render the report. ``partial``, when
    given, receives the report of what finished after every round but a scenario's last, so a run that a
    time budget kills outright still leaves its tables behind."""
    from .checkpoints import ensure_checkpoint

    unknown = [s for s in bench.scenarios if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; choose from {sorted(SCENARIOS)}")
    if bench.methods is not None and (bad := [m for m in bench.methods if m not in METHOD_NAMES]):
        raise ValueError(f"unknown method(s) {bad}; choose from {METHOD_NAMES}")
    # Every run is a fresh process whose load imports part of fastload inside the clock (the GPU loader, the
    # storage modules). An installed fastload has its bytecode (pip compiles it), and so have the other loaders
    # here; a checkout run where PYTHONDONTWRITEBYTECODE is set (this project's VMs) would compile those
    # modules from source in every run. Compile them once, as an install does (quietly: where the package
    # is not writable it is an installed one, compiled already).
    compileall.compile_dir(str(Path(__file__).resolve().parents[1]), quiet=2)
    machine = machine_info(bench.disk_dir, bench.warm_dir)
    progress(f"checkpoint: {bench.size_bytes / (1 << 30):.3g} GiB in {bench.disk_dir}")
    needs_pickle = any(m.reads == "pickle" for name in bench.scenarios if name in SCENARIOS
                       for m in selected_methods(SCENARIOS[name], bench.methods))
    disk = ensure_checkpoint(bench.disk_dir, bench.size_bytes, bench.dtype, pickle=needs_pickle)
    extra_notes = list(notes)
    warm: Checkpoint | None = None
    results: dict[str, ScenarioResult] = {}
    eviction = EvictionLog()
    stopped_between = False
    try:
        with _stop_on_sigterm():
            for name in _scenarios_until_stopped(bench.scenarios, results, extra_notes):
                scenario = SCENARIOS[name]
                if scenario.needs_cuda and bench.device != "cpu" and not torch.cuda.is_available():
                    extra_notes.append(f"Scenario `{name}` skipped: torch.cuda.is_available() is False here.")
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

                def report_so_far(snapshot: ScenarioResult, name: str = name) -> None:
                    if partial is not None:
                        so_far = {**results, name: snapshot}
                        partial(_render(so_far, machine, command, disk, eviction, extra_notes, bench.device == "cpu"))

                results[name] = run_scenario(bench, scenario, checkpoint, eviction, progress, report_so_far)
    except Stopped:  # between runs (evicting, copying the warm file): what finished is still reported
        extra_notes.append("Cut short by SIGTERM between runs (a time budget ran out).")
        stopped_between = True
    finally:
        if warm is not None and warm.safetensors.parent != disk.safetensors.parent and not bench.keep_warm:
            warm.remove()
    machine["load average at end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    dry_run = bench.device == "cpu"
    if dry_run and any(SCENARIOS[name].needs_cuda for name in results):
        extra_notes.append("Dry run: the GPU scenarios' methods loaded to the CPU (`--device cpu`) to check the "
                           "harness; their figures say nothing about a GPU and their verdicts are n/a.")
    markdown = _render(results, machine, command, disk, eviction, extra_notes, dry_run)
    raw = {
        "command": command,
        "machine": machine,
        "config": asdict(disk.config),
        "eviction": asdict(eviction),
        "runs": [asdict(run) for r in results.values() for s in r.summaries.values() for run in s.runs],
        "verdicts": [asdict(v) for v in verdicts(results, dry_run)],
    }
    cut_short = stopped_between or any(result.cut_short for result in results.values())
    return BenchOutcome(results, markdown, raw, cut_short)


def _render(results: dict[str, ScenarioResult], machine: dict[str, str], command: str, disk: Checkpoint,
            eviction: EvictionLog, notes: list[str], dry_run: bool) -> str:
    from .checkpoints import describe

    return render(results, machine, command, describe(disk.config),
                  eviction if any(r.scenario.cold for r in results.values()) else None, notes, dry_run)


def _scenarios_until_stopped(names: Sequence[str], results: dict[str, ScenarioResult],
                             notes: list[str]) -> Iterator[str]:
    for index, name in enumerate(names):
        if any(result.cut_short for result in results.values()):
            notes.append(f"Not run (the run was cut short): {', '.join(names[index:])}.")
            return
        yield name


def _warm_copy(disk: Checkpoint, bench: BenchConfig) -> tuple[Checkpoint, str | None]:
    """The checkpoint in the warm directory; where it does not fit, the disk copy read into the page cache."""
    need = sum(path.stat().st_size for path in (disk.safetensors, disk.pickle) if path.exists())
    try:
        bench.warm_dir.mkdir(parents=True, exist_ok=True)
        free = os.statvfs(bench.warm_dir).f_bavail * os.statvfs(bench.warm_dir).f_frsize
    except OSError:
        free = 0
    if free > need + (256 << 20):
        return disk.copy_to(bench.warm_dir), None
    for path in (p for p in (disk.safetensors, disk.pickle) if p.exists()):
        with open(path, "rb", buffering=0) as file:
            while file.read(64 << 20):
                pass
    return disk, (f"{bench.warm_dir} has {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed: the warm scenarios "
                  f"read the disk copy after reading it once into the page cache.")
