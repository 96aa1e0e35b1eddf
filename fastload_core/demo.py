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
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from . import config
from .bench.checkpoints import GIB, SyntheticTransformer, describe, ensure_checkpoint
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
        return self.nbytes / self.seconds / 1e9


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = subparsers.add_parser("demo", help="show the stock load beside fastload's on a sample checkpoint")
    demo.add_argument("--size-gb", type=float, default=1.0, help="sample checkpoint size in GiB (default 1)")
    demo.add_argument("--dir", type=Path, default=None, help="where to write the sample (default: the cache dir)")
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
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
    print()
    print(format_rows(rows))
    identical = all(torch.equal(outputs[0], output) for output in outputs[1:])
    print(f"\noutputs identical to the stock path: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


def format_rows(rows: list[Row]) -> str:
    baseline = rows[0].seconds
    width = max(len(row.step) for row in rows)
    lines = [f"{'step':<{width}}  {'seconds':>8}  {'GB/s':>6}  {'speed-up':>8}", "-" * (width + 30)]
    for row in rows:
        speedup = f"{baseline / row.seconds:>7.1f}x" if row.model_ready else f"{'-':>8}"
        lines.append(f"{row.step:<{width}}  {row.seconds:>8.3f}  {row.gbps:>6.2f}  {speedup}")
    return "\n".join(lines)
