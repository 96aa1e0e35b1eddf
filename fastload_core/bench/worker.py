"""The benchmark's worker: one timed run in a fresh process (``python -m fastload_core.bench.worker``).

A loader that ran before in the same process finds warm allocator pools, a populated CUDA context
and already-imported libraries; a server cold start has none of that. So every run is a new
process: the method's ``prepare`` (imports, CUDA context, a limit's buffers) is recorded as
``setup`` but not counted; the load and the touch of every page are timed, except in a GPU
scenario (``--untimed-touch``, every method alike, the CPU-resident limits included): there the
clock stops at ``torch.cuda.synchronize()`` after the load (device memory is resident once its
copies have landed, and the touch's hundreds of small kernels, the first of them loading their
module in a fresh process, added 0.03-0.06 s on an H200 that has nothing to do with loading), and
the touch that checks the bytes runs after it. The parent records the
whole process as well. The result is one JSON line on stdout after ``RESULT_PREFIX``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoints import TransformerConfig
from .methods import METHODS, Context, tensors_of, touch

RESULT_PREFIX = "FASTLOAD-BENCH "


def run_worker(method_id: str, path: str, config: TransformerConfig, device: str = "cuda:0", *,
               untimed_touch: bool = False) -> dict[str, Any]:
    """One timed run in this process: prepare (untimed), load + touch (timed; with ``untimed_touch``
    load + synchronize, then the touch untimed). ``device`` is where a
    GPU method loads to: an indexed CUDA device (``cuda`` becomes ``cuda:0``: fastsafetensors and
    Run:ai need the index), or ``cpu`` for a dry run of the harness without a GPU."""
    method = METHODS.get(method_id)
    if method is None:
        raise ValueError(f"unknown benchmark method {method_id!r}")
    context = Context(path, config, _indexed(device) if method.gpu else "cpu")
    setup_started = time.perf_counter()
    if context.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available (torch.cuda.is_available() is False)")
        torch.empty(1, device=context.device)
        torch.cuda.synchronize()
    load = method.prepare(context)
    setup = time.perf_counter() - setup_started
    started = time.perf_counter()
    loaded = load()
    loaded_at = time.perf_counter()
    for index in _cuda_devices(loaded):  # device memory is resident once its copies have landed
        torch.cuda.synchronize(index)
    synchronized_at = time.perf_counter()
    nbytes, tensors, checksum = touch(loaded)
    finished = time.perf_counter()
    return {
        "method": method_id,
        "seconds": (synchronized_at if untimed_touch else finished) - started,
        "load_seconds": loaded_at - started,
        "touch_seconds": finished - synchronized_at,
        "setup_seconds": setup,
        "bytes": nbytes,
        "tensors": tensors,
        "checksum": checksum,
        "stages": dict(context.stages),
        **_memory_counters(),
    }


def _cuda_devices(loaded: object) -> set[int]:
    return {tensor.device.index or 0 for tensor in tensors_of(loaded) if tensor.is_cuda}


def _indexed(device: str) -> str:
    parsed = torch.device(device)
    return f"cuda:{parsed.index or 0}" if parsed.type == "cuda" else str(parsed)


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
    parser = argparse.ArgumentParser(prog="python -m fastload_core.bench.worker")
    parser.add_argument("--worker", required=True, metavar="METHOD_ID")
    parser.add_argument("--file", required=True)
    parser.add_argument("--config", required=True, help="TransformerConfig as JSON")
    parser.add_argument("--device", default="cuda:0", help="where the GPU scenarios' methods load to")
    parser.add_argument("--untimed-touch", action="store_true",
                        help="stop the clock after the load (and CUDA synchronize), before the checksum pass")
    args = parser.parse_args(argv)
    interpreter_started = time.perf_counter()
    try:
        result = run_worker(args.worker, args.file, TransformerConfig(**json.loads(args.config)), args.device,
                            untimed_touch=args.untimed_touch)
    except Exception as exc:
        result = {"method": args.worker, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    result["since_main_seconds"] = time.perf_counter() - interpreter_started
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
