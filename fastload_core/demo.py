"""``fastload demo``: the stock start-up path beside fastload's, on this machine, in one table.

It starts from what most users have — a pickled ``state_dict`` on local disk — and shows what each
step of fastload buys: the one-time conversion to safetensors, the zero-copy load into a model
built without random init, and a node warmed ahead of deployment by copying the model from the
(here simulated) shared mount into /dev/shm. Every load row ends with a model ready to serve, and
the outputs are checked to be identical to the stock path's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import save_file
from torch import nn

from . import config
from .bench.checkpoints import GIB, SyntheticTransformer, TransformerConfig, describe, ensure_checkpoint
from .compile_cache import report_of
from .model import load_model
from .storage import fetch


@dataclass
class Row:
    step: str
    seconds: float
    nbytes: int
    model_ready: bool  # a load row (comparable with the stock path), not a preparation step

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.nbytes else 0.0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = subparsers.add_parser("demo", help="show the stock load beside fastload's on a sample checkpoint")
    demo.add_argument("--size-gb", type=float, default=1.0, help="sample checkpoint size in GiB (default 1)")
    demo.add_argument("--dir", type=Path, default=None, help="where to write the sample (default: the cache dir)")
    demo.add_argument("--no-compile", action="store_true", help="skip the torch.compile replicas (~20 s on 2 cores)")
    demo.add_argument("--replica", metavar="URL", help=argparse.SUPPRESS)  # a compile replica's child process
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if args.replica:
        return _compile_replica(args.replica)
    directory: Path = args.dir or config.cache_dir() / "demo"
    print(f"fastload demo: writing a sample pickled checkpoint ({args.size_gb:g} GiB) to {directory} ...")
    checkpoint = ensure_checkpoint(directory, int(args.size_gb * GIB))
    print(f"  model: {describe(checkpoint.config)}")
    tokens = torch.randint(0, checkpoint.config.vocab, (1, 8), generator=torch.Generator().manual_seed(0))

    def build() -> SyntheticTransformer:
        return SyntheticTransformer(checkpoint.config)

    def stock() -> nn.Module:
        model = build()
        model.load_state_dict(torch.load(checkpoint.pickle, weights_only=True))
        return model

    shared = f"file://{checkpoint.safetensors}"  # stands in for a model on the cluster's shared mount

    def warm_node() -> None:
        fetch(shared, tier="shm")

    # Empty caches and a private shm tier, so the first rows really convert and copy; removed after.
    with tempfile.TemporaryDirectory(prefix="fastload-demo-") as scratch, tempfile.TemporaryDirectory(
        prefix="fastload-demo-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None
    ) as shm:
        steps: list[tuple[str, Callable[[], nn.Module | None]]] = [
            ("stock: Model() + load_state_dict(torch.load(.pt))", stock),
            ("fastload: load_model(.pt), first time (converts once)", lambda: load_model(build, checkpoint.pickle)),
            ("fastload: load_model(.pt), converted (page cache)", lambda: load_model(build, checkpoint.pickle)),
            ("fastload: warm the node: fetch(file://, tier='shm')", warm_node),
            ("fastload: load_model(file://), served from /dev/shm", lambda: load_model(build, shared)),
        ]
        rows, outputs = [], []
        with mock.patch.dict(os.environ, {"FASTLOAD_CACHE_DIR": scratch, "FASTLOAD_SHM_DIR": shm}):
            for name, step in steps:
                gc.collect()
                started = time.perf_counter()
                model = step()
                elapsed = time.perf_counter() - started
                if model is not None:
                    with torch.no_grad():
                        outputs.append(model.eval()(tokens))
                rows.append(Row(name, elapsed, checkpoint.nbytes, model_ready=model is not None))
                del model
        if not args.no_compile:
            rows.extend(_compile_rows(Path(scratch) / "compile-cache"))
    print()
    print(format_rows(rows))
    if not args.no_compile:
        print(f"\ntorch.compile rows: a small transformer ({_COMPILE_CONFIG.layers} blocks), each replica a fresh "
              "process with empty inductor and temp dirs,\nsharing only the compile cache (here a directory; "
              "redis:// or s3:// across a fleet).")
    identical = all(torch.equal(outputs[0], output) for output in outputs[1:])
    print(f"\noutputs identical to the stock path: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


def format_rows(rows: list[Row]) -> str:
    baseline = rows[0].seconds
    width = max(len(row.step) for row in rows)
    lines = [f"{'step':<{width}}  {'seconds':>8}  {'GB/s':>6}  {'speed-up':>8}", "-" * (width + 30)]
    for row in rows:
        speedup = f"{baseline / row.seconds:>7.1f}x" if row.model_ready else f"{'-':>8}"
        gbps = f"{row.gbps:>6.2f}" if row.nbytes else f"{'-':>6}"
        lines.append(f"{row.step:<{width}}  {row.seconds:>8.3f}  {gbps}  {speedup}")
    return "\n".join(lines)


# A model small enough that its cold compile is a demo's worth of waiting on two cores.
_COMPILE_CONFIG = TransformerConfig(vocab=512, hidden=64, intermediate=256, layers=2, dtype="bf16")


def _compile_rows(cache: Path) -> list[Row]:
    """Two replica starts in fresh processes: the first compiles and stores, the second restores."""
    url = f"file://{cache}"
    rows = []
    for name in ("torch.compile: first replica (compiles, stores)", "torch.compile: next replica (from cache)"):
        with tempfile.TemporaryDirectory(prefix="fastload-replica-") as home:
            os.makedirs(f"{home}/tmp")
            env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_"))}
            env.update(FASTLOAD_CACHE_DIR=f"{home}/fastload", TMPDIR=f"{home}/tmp")
            done = subprocess.run(
                [sys.executable, "-m", "fastload_core", "demo", "--replica", url],
                env=env, capture_output=True, text=True, timeout=900, check=False,
            )
        if done.returncode != 0:
            raise RuntimeError(f"compile replica failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(Row(f"{name}: {result['status']}", result["seconds"], 0, model_ready=False))
    return rows


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
