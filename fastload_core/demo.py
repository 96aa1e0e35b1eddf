"""``fastload demo``: the stock start-up path beside fastload's, on this machine, in one table.

It starts from what most users have — a pickled ``state_dict`` on local disk — and shows what each
step of fastload buys: the one-time conversion to safetensors, then the zero-copy load into a model
built without random init. Every row ends with a model ready to serve, and the outputs are checked
to be identical to the stock path's.
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


@dataclass
class Row:
    step: str
    seconds: float
    nbytes: int

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

    with tempfile.TemporaryDirectory(prefix="fastload-demo-") as scratch:
        # The conversion cache starts empty so the first fastload row really converts.
        config_override = {"FASTLOAD_CACHE_DIR": scratch}
        steps: list[tuple[str, Callable[[], nn.Module]]] = [
            ("stock: Model() + load_state_dict(torch.load(.pt))", stock),
            ("fastload: load_model(.pt), first time (converts once)", lambda: load_model(build, checkpoint.pickle)),
            ("fastload: load_model(.pt), converted (page cache)", lambda: load_model(build, checkpoint.pickle)),
        ]
        rows, outputs = [], []
        with mock.patch.dict(os.environ, config_override):
            for name, step in steps:
                gc.collect()
                started = time.perf_counter()
                model = step()
                elapsed = time.perf_counter() - started
                with torch.no_grad():
                    outputs.append(model.eval()(tokens))
                rows.append(Row(name, elapsed, checkpoint.nbytes))
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
        lines.append(f"{row.step:<{width}}  {row.seconds:>8.3f}  {row.gbps:>6.2f}  {baseline / row.seconds:>7.1f}x")
    return "\n".join(lines)
