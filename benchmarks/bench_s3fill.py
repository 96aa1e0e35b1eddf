"""Cold ``fetch`` from SeaweedFS before and after issue 12's RAM-first fill, side by side in one run.

Each measurement is a fresh Python process (imports included, as a user waits for them) with empty cache
directories, fetching one random object uploaded in 16 MiB parts. "before" runs a source tree given with
``--before`` (e.g. ``git archive main``); "after" runs this checkout. For each it reports the seconds until
``fetch`` returned (the path is usable) and until the process exited (after: write-through to the slower
tiers done), plus the child's CPU seconds per GB. "fetch call alone" excludes building the plugin manager,
whose built-in loader plugins import torch (seconds on a busy machine; the same for both trees). Medians over
``--rounds``; rounds interleave the methods so drift in machine load hits them alike.

Usage: python benchmarks/bench_s3fill.py --before /tmp/fastload-main [--size 1GiB] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastload_core.storage.settings import parse_size  # noqa: E402
from fastload_devservices.s3 import BUCKET  # noqa: E402
from fastload_devservices.seaweed import SeaweedServer  # noqa: E402

KEY = "bench/model.bin"
MiB = 1024 * 1024

CHILD = """
import os, sys, time
started = float(os.environ["BENCH_T0"])
import fastload_core
from fastload_core.storage import fetch
assert fastload_core.__file__.startswith(os.environ["PYTHONPATH"]), fastload_core.__file__
from fastload_core.plugins import get_plugin_manager
get_plugin_manager()  # the built-in plugins import torch (seconds): timed apart from the fetch call
called = time.time()
path = fetch(os.environ["BENCH_URI"], tier=os.environ["BENCH_TIER"])
print(f"returned {time.time() - started:.4f} {time.time() - called:.4f} {path}", flush=True)
"""


def run_child(tree: Path, tier: str, endpoint: str, scratch: Path) -> tuple[float, float, float, float]:
    """(seconds to fetch's return, of the fetch call alone, to exit, CPU seconds) of one fresh process."""
    cache, shm = scratch / "cache", Path(tempfile.mkdtemp(prefix="fastload-bench-", dir="/dev/shm"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLOAD_")}
    env.update(PYTHONPATH=str(tree), BENCH_URI=f"s3://{BUCKET}/{KEY}", BENCH_TIER=tier,
               FASTLOAD_CACHE_DIR=str(cache), FASTLOAD_SHM_DIR=str(shm), FASTLOAD_SHM_CAPACITY="4GiB",
               AWS_ENDPOINT_URL_S3=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
               AWS_DEFAULT_REGION="us-east-1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env["BENCH_T0"] = repr(time.time())
    started = time.monotonic()
    child = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=tree, capture_output=True, text=True,
                           timeout=600)
    exited = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        if child.returncode != 0:
            raise RuntimeError(f"child failed ({tree}, {tier}): {child.stderr[-2000:]}")
        line = next(x for x in child.stdout.splitlines() if x.startswith("returned "))
        returned, call = float(line.split()[1]), float(line.split()[2])
        if not Path(line.split(maxsplit=3)[3]).is_relative_to(shm if tier == "shm" else cache):
            raise RuntimeError(f"fetch landed elsewhere: {line}")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return returned, call, exited, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="source tree of the code to compare with")
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scratch", type=Path, default=None, help="local-disk directory for the caches")
    args = parser.parse_args()
    size = parse_size(args.size)
    scratch = Path(tempfile.mkdtemp(prefix="bench-s3fill-", dir=args.scratch))
    server = SeaweedServer()
    server.start()
    try:
        import boto3
        from boto3.s3.transfer import TransferConfig

        client = boto3.client("s3", endpoint_url=server.endpoint_url, aws_access_key_id="bench",
                              aws_secret_access_key="bench", region_name="us-east-1")
        source = scratch / "upload.bin"
        with open(source, "wb") as handle:
            for _ in range(0, size, 64 * MiB):
                handle.write(os.urandom(min(64 * MiB, size - handle.tell())))
        client.upload_file(str(source), BUCKET, KEY, Config=TransferConfig(
            multipart_threshold=16 * MiB, multipart_chunksize=16 * MiB))
        source.unlink()
        trees = {"before": args.before, "after": REPO}
        methods = [(name, tier) for tier in ("shm", "local_disk") for name in trees]
        results: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {m: [] for m in methods}
        run_child(REPO, "shm", server.endpoint_url, scratch)  # warm the server's page cache once
        for round_ in range(args.rounds):
            for name, tier in methods:
                measured = run_child(trees[name], tier, server.endpoint_url, scratch)
                results[(name, tier)].append(measured)
                print(f"round {round_ + 1} {name:6} {tier:10} returned {measured[0]:6.2f} s  (fetch call "
                      f"{measured[1]:5.2f} s)  exited {measured[2]:6.2f} s  cpu {measured[3]:6.2f} s", flush=True)
        gb = size / 1e9
        print(f"\n{size / MiB:.0f} MiB object, 16 MiB parts, SeaweedFS on loopback, medians of {args.rounds} "
              "fresh processes")
        print("| tier | code | fetch returned, from process start (s) | fetch call alone (s) | process exited "
              "(s) | CPU s/GB |")
        print("|---|---|---|---|---|---|")
        medians = {}
        for name, tier in methods:
            runs = results[(name, tier)]
            returned, call, exited, cpu = (statistics.median(r[i] for r in runs) for i in range(4))
            medians[(name, tier)] = (returned, call)
            print(f"| {tier} | {name} | {returned:.2f} | {call:.2f} | {exited:.2f} | {cpu / gb:.2f} |")
        for tier in ("shm", "local_disk"):
            (r0, c0), (r1, c1) = medians[("before", tier)], medians[("after", tier)]
            print(f"{tier}: after/before, fetch returned {r1 / r0:.2f}x the time, fetch call {c1 / c0:.2f}x")
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
