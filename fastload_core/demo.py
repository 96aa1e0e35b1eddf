"""``fastload demo``: the stock start-up path beside fastload's, on this machine, step by step.

It starts from what most users have — a pickled ``state_dict`` on local disk — and shows what each
step of fastload buys: the one-time conversion to safetensors, the zero-copy load into a model
built without random init, and a node warmed ahead of deployment by copying the model from the
(here simulated) shared mount into /dev/shm. Every load row ends with a model ready to serve, and
the outputs are checked to be identical to the stock path's.

A shared machine's noise swings one run by tens of percent, so each load step runs ``--repeat``
times (the state it measures restored before each run) and its row shows the median and the range,
printed as soon as the step ends. The sample checkpoint is removed afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from . import config
from .bench.checkpoints import (
    GIB,
    Checkpoint,
    SyntheticTransformer,
    TransformerConfig,
    describe,
    ensure_checkpoint,
    existing_checkpoint,
)
from .compile_cache import report_of
from .errors import FastloadError
from .model import load_model
from .storage import default_store, fetch, writethrough


@dataclass
class Row:
    step: str
    runs: list[float]  # seconds of each run
    nbytes: int
    model_ready: bool  # a load row (comparable with the stock path), not a preparation step

    @property
    def seconds(self) -> float:
        return statistics.median(self.runs)

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.nbytes else 0.0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = subparsers.add_parser(
        "demo", help="show the stock load beside fastload's on a sample checkpoint",
        description="Writes a sample pickled checkpoint, then times the stock start-up path and fastload's, "
        "each load step several times (--repeat), printing each step's median and range as it ends. The "
        "sample is removed afterwards unless --keep.",
    )
    demo.add_argument("--size-gb", type=float, default=1.0, help="sample checkpoint size in GiB (default 1)")
    demo.add_argument("--dir", type=Path, default=None,
                      help="where to write the sample (default: the demo directory under the fastload cache dir)")
    demo.add_argument("--repeat", type=int, default=3,
                      help="runs of each load step; the table shows the median and the range (default 3)")
    demo.add_argument("--keep", action="store_true",
                      help="keep the sample checkpoint for the next run instead of removing it")
    demo.add_argument("--no-compile", action="store_true", help="skip the torch.compile replicas (~20 s on 2 cores)")
    demo.add_argument("--replica", metavar="URL", help=argparse.SUPPRESS)  # a compile replica's child process
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if args.replica:
        return _compile_replica(args.replica)
    if not args.size_gb > 0:
        raise FastloadError(f"--size-gb must be more than 0 (got {args.size_gb:g}); the default is 1")
    if args.repeat < 1:
        raise FastloadError(f"--repeat must be at least 1 (got {args.repeat})")
    directory: Path = args.dir or config.cache_dir() / "demo"
    size = max(1, int(args.size_gb * GIB))
    checkpoint = existing_checkpoint(directory, size)
    if checkpoint is not None:
        print(f"fastload demo: reusing the sample pickled checkpoint ({args.size_gb:g} GiB) in {directory}")
    else:
        print(f"fastload demo: writing a sample pickled checkpoint ({args.size_gb:g} GiB) to {directory} ...",
              flush=True)
        started = time.perf_counter()
        checkpoint = ensure_checkpoint(directory, size)
        print(f"  written in {time.perf_counter() - started:.1f}s")
    try:
        identical = _run_steps(checkpoint, args)
    finally:
        _clean_up(checkpoint, directory, keep=args.keep, default_dir=args.dir is None)
    print(f"\noutputs identical to the stock path: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


def _run_steps(checkpoint: Checkpoint, args: argparse.Namespace) -> bool:
    print(f"  model: {describe(checkpoint.config)}")
    tokens = torch.randint(0, checkpoint.config.vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    shared = f"file://{checkpoint.safetensors}"  # stands in for a model on the cluster's shared mount

    def build() -> SyntheticTransformer:
        return SyntheticTransformer(checkpoint.config)

    def stock() -> nn.Module:
        model = build()
        model.load_state_dict(torch.load(checkpoint.pickle, weights_only=True))
        return model

    def warm_node() -> None:
        fetch(shared, tier="shm")

    # Empty caches and a private shm tier, so the first rows really convert and copy; removed after.
    with tempfile.TemporaryDirectory(prefix="fastload-demo-") as scratch, tempfile.TemporaryDirectory(
        prefix="fastload-demo-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None
    ) as shm:
        converted = Path(scratch) / "converted"
        steps: list[Step] = [
            Step("stock: Model() + load_state_dict(torch.load(.pt))", stock),
            Step("fastload: load_model(.pt), first time (converts once)", lambda: load_model(build, checkpoint.pickle),
                 before=lambda: shutil.rmtree(converted, ignore_errors=True)),
            Step("fastload: load_model(.pt), converted (page cache)", lambda: load_model(build, checkpoint.pickle)),
            Step("fastload: warm the node: fetch(file://, tier='shm')", warm_node,
                 before=lambda: _forget(shared), model_ready=False),
            Step("fastload: load_model(file://), served from /dev/shm", lambda: load_model(build, shared)),
        ]
        width = max(len(step.name) for step in steps)
        if not args.no_compile:
            width = max(width, len(_COMPILE_NAMES[0]) + len(": miss"))
        runs = "one run each" if args.repeat == 1 else f"median seconds of {args.repeat} runs and their range"
        print(f"\nEach step as it ends ({runs}; speed-up against the stock path):\n")
        print(header(width))
        rows: list[Row] = []
        outputs: list[torch.Tensor] = []
        environment = {"FASTLOAD_CACHE_DIR": scratch, "FASTLOAD_SHM_DIR": shm}
        with mock.patch.dict(os.environ, environment), _quiet("fastload"), _progress(len(steps) * args.repeat) as bar:
            for step in steps:
                bar.set_description(step.name.split(": ", 1)[1][:40])
                seconds: list[float] = []
                model: nn.Module | None = None
                for _ in range(args.repeat):
                    model = None
                    gc.collect()
                    if step.before is not None:
                        step.before()
                    started = time.perf_counter()
                    model = step.run()
                    seconds.append(time.perf_counter() - started)
                    bar.update()
                if model is not None:
                    with torch.no_grad():
                        outputs.append(model.eval()(tokens))
                del model
                row = Row(step.name, seconds, checkpoint.nbytes, model_ready=step.model_ready)
                rows.append(row)
                bar.write(format_row(row, rows[0].seconds, width))
                sys.stdout.flush()  # piped output (tee, a CI log) shows each step as it ends too
            # The fetches above copy shm's entry onto local disk in the background; the scratch tiers go away
            # when this block ends, so let those copies finish first.
            writethrough.wait()
        print(_WARM_NOTE)
        if not args.no_compile:
            print()
            with _progress(len(_COMPILE_NAMES)) as bar:
                for row in _compile_rows(Path(scratch) / "compile-cache", bar):
                    bar.write(format_row(row, rows[0].seconds, width))
                    sys.stdout.flush()
            print(f"\ntorch.compile rows: one run each; a small transformer ({_COMPILE_CONFIG.layers} blocks), each "
                  "replica a fresh process with empty inductor and temp dirs,\nsharing only the compile cache "
                  "(here a directory; redis:// or s3:// across a fleet).")
    return all(torch.equal(outputs[0], output) for output in outputs[1:])


def _forget(uri: str) -> None:
    """Drop ``uri`` from every tier, once the background copy of its last fetch is done with it."""
    writethrough.wait()
    default_store().rm(uri)


@dataclass
class Step:
    name: str
    run: Callable[[], nn.Module | None]
    before: Callable[[], object] | None = None  # untimed: puts the machine back in the state the step measures
    model_ready: bool = True  # ends with a model to serve (compared with the stock path)


_WARM_NOTE = (
    "\nwarm the node: a one-time step per node, before its workers start (`fastload warm URI`): the file is "
    "copied from the\nshared mount to local disk and from there into /dev/shm, each copy verified, so it can "
    "take longer than one stock\nload. What it buys is the row below it: every worker on the node then loads "
    "from RAM."
)


def header(width: int) -> str:
    return (f"{'step':<{width}}  {'seconds':>8}  {'(min–max)':>13}  {'GB/s':>6}  {'speed-up':>8}\n"
            + "-" * (width + 45))


def format_row(row: Row, baseline: float, width: int) -> str:
    speedup = f"{baseline / row.seconds:>7.1f}x" if row.model_ready else f"{'-':>8}"
    gbps = f"{row.gbps:>6.2f}" if row.nbytes else f"{'-':>6}"
    spread = f"{min(row.runs):.3f}–{max(row.runs):.3f}" if len(row.runs) > 1 else "one run"
    return f"{row.step:<{width}}  {row.seconds:>8.3f}  {spread:>13}  {gbps}  {speedup}"


def format_rows(rows: list[Row]) -> str:
    """The whole table at once (the demo prints it row by row, as each step ends)."""
    width = max(len(row.step) for row in rows)
    return "\n".join([header(width), *(format_row(row, rows[0].seconds, width) for row in rows)])


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """The demo prints its own figures; the loader's per-load log lines would only interleave with them."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _progress(total: int) -> Any:
    """A bar on a terminal (stderr); nothing where output goes to a file or a pipe."""
    return tqdm(total=total, unit="run", leave=False, file=sys.stderr, disable=None,
                bar_format="{desc}: {n_fmt}/{total_fmt} runs [{elapsed}]")


def _clean_up(checkpoint: Checkpoint, directory: Path, *, keep: bool, default_dir: bool) -> None:
    files = [p for p in (checkpoint.safetensors, checkpoint.pickle) if p.exists()]
    nbytes = sum(p.stat().st_size for p in files)
    if keep:
        spec = checkpoint.safetensors.with_suffix(".json")
        print(f"\nkept the sample ({nbytes / 1e9:.1f} GB) in {directory} for the next run; remove it with: "
              f"rm {shlex.join(str(p) for p in [*files, spec])}")
        return
    checkpoint.remove()
    if default_dir:
        with contextlib.suppress(OSError):
            directory.rmdir()  # only if empty: nothing of the user's is in it
    print(f"\nremoved the sample ({nbytes / 1e9:.1f} GB) from {directory} (--keep keeps it for the next run)")


# A model small enough that its cold compile is a demo's worth of waiting on two cores.
_COMPILE_CONFIG = TransformerConfig(vocab=512, hidden=64, intermediate=256, layers=2, dtype="bf16")


_COMPILE_NAMES = ("torch.compile: first replica (compiles, stores)", "torch.compile: next replica (from cache)")


def _compile_rows(cache: Path, bar: Any) -> Iterator[Row]:
    """Two replica starts in fresh processes: the first compiles and stores, the second restores.
    Each row is yielded as its replica ends."""
    url = f"file://{cache}"
    for name in _COMPILE_NAMES:
        bar.set_description(name.split(": ", 1)[1])
        with tempfile.TemporaryDirectory(prefix="fastload-replica-") as home:
            os.makedirs(f"{home}/tmp")
            env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_"))}
            env.update(FASTLOAD_CACHE_DIR=f"{home}/fastload", TMPDIR=f"{home}/tmp")
            done = subprocess.run(
                [sys.executable, "-m", "fastload_core", "demo", "--replica", url],
                env=env, capture_output=True, text=True, timeout=900, check=False,
            )
        if done.returncode != 0:
            raise FastloadError(f"a torch.compile replica of the demo failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        bar.update()
        yield Row(f"{name}: {result['status']}", [result["seconds"]], 0, model_ready=False)


def _compile_replica(url: str) -> int:
    """One replica: build, load and compile with a warm-up call; print how long until it was ready."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        weights = Path(scratch) / "model.safetensors"
        save_file(SyntheticTransformer(_COMPILE_CONFIG).state_dict(), weights)
        tokens = torch.randint(0, _COMPILE_CONFIG.vocab, (1, 16))
        started = time.perf_counter()
        with torch.inference_mode():
            model = load_model(
                lambda: SyntheticTransformer(_COMPILE_CONFIG), weights, compile=True, compile_cache=url,
                example_inputs=tokens,
            )
        seconds = time.perf_counter() - started
    report = report_of(model)
    print(json.dumps({"seconds": seconds, "status": report.status if report else "none"}))
    return 0
