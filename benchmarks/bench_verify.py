"""What checking a cache hit costs (FASTLOAD_VERIFY=size|sample|full), and what the block digests recorded
at download cost and save.

Every measurement is a fresh Python process, imports included, that asks the tiered store for a model:

- ``hit/<mode>``: ``fetch(uri, tier="shm")`` of an entry already in the shm tier, with FASTLOAD_VERIFY=mode
  (the time a replica waits before it can map its weights);
- ``promote/digests``: ``fetch(uri, tier="shm")`` where only local disk holds the entry: the copy into shm
  verifies the XXH3 block digests recorded at download;
- ``promote/md5``: the same from an entry whose metadata lacks digests (as written before they existed):
  the copy recomputes the MD5 the way the origin's checksum was taken;
- ``cold/file``: ``fetch(uri)`` from a ``file://`` origin into local disk, digests computed after the copy.

    python benchmarks/bench_verify.py [--size-mib 1024] [--files 1] [--rounds 5] [--json out.json]
                                      [--baseline DIR]

``--baseline DIR``: a checkout of fastload before verified hits (``git archive <commit> fastload_core | tar
-x -C DIR``); its ``cold``, ``promote`` and ``hit`` rows are measured in the same rounds, named ``base/...``.

Prints a markdown table of medians. The model is random bytes in a temporary directory; the shm tier lives
in /dev/shm, local disk in the system temp dir (page cache warm: this measures CPU cost, not the disk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import os, sys, time
from fastload_core.storage import LocalDiskTier, ShmTier, TieredStore
started = time.perf_counter()
verify = os.environ.get("FASTLOAD_VERIFY")
store = TieredStore([ShmTier(os.environ["BENCH_SHM"], capacity=None),
                     LocalDiskTier(os.environ["BENCH_DISK"], capacity=None)],
                    show_progress=False, **({"verify": verify} if verify else {}))
begin = time.perf_counter()
path = store.fetch(sys.argv[1], tier=sys.argv[2])
print(time.perf_counter() - begin, time.perf_counter() - started)
"""


def run_child(uri: str, tier: str, env: dict[str, str]) -> tuple[float, float, float]:
    """(fetch seconds, seconds after the first import, whole process seconds)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, uri, tier], capture_output=True, text=True, check=True,
                          env=env, cwd=env["PYTHONPATH"])  # -c puts the cwd first on sys.path
    whole = time.perf_counter() - started
    fetch_s, after_import = (float(x) for x in done.stdout.split())
    return fetch_s, after_import, whole


def strip_digests(disk: Path) -> None:
    for meta_path in disk.glob("*/*/meta.json"):
        meta = json.loads(meta_path.read_text())
        for item in meta["files"]:
            item.pop("block_size", None)
            item.pop("digests", None)
        meta_path.write_text(json.dumps(meta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--baseline", type=Path, help="a checkout of the code to compare with")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fastload-bench-verify-"))
    shm = Path("/dev/shm") / f"fastload-bench-verify-{uuid.uuid4().hex[:8]}"
    disk = work / "disk"
    model = work / "model"
    model.mkdir()
    per_file = args.size_mib * 2**20 // args.files
    for index in range(args.files):
        with open(model / f"model-{index:05d}.safetensors", "wb") as handle:
            for _ in range(per_file // 2**20):
                handle.write(os.urandom(2**20))
    uri = f"file://{model}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLOAD_")}
    env.update(PYTHONPATH=str(ROOT), BENCH_SHM=str(shm), BENCH_DISK=str(disk),
               FASTLOAD_CACHE_DIR=str(work / "cache"))
    results: dict[str, list[tuple[float, float, float]]] = {}
    try:
        for _ in range(args.rounds):
            shutil.rmtree(disk, ignore_errors=True)
            shutil.rmtree(shm, ignore_errors=True)
            results.setdefault("cold/file", []).append(run_child(uri, "local_disk", env))
            results.setdefault("promote/digests", []).append(run_child(uri, "shm", env))
            for mode in ("size", "sample", "full"):
                results.setdefault(f"hit/{mode}", []).append(run_child(uri, "shm", dict(env, FASTLOAD_VERIFY=mode)))
            shutil.rmtree(shm, ignore_errors=True)
            strip_digests(disk)
            results.setdefault("promote/md5", []).append(run_child(uri, "shm", env))
            if args.baseline:
                base_env = dict(env, PYTHONPATH=str(args.baseline.resolve()))
                shutil.rmtree(disk, ignore_errors=True)
                shutil.rmtree(shm, ignore_errors=True)
                results.setdefault("base/cold/file", []).append(run_child(uri, "local_disk", base_env))
                results.setdefault("base/promote/md5", []).append(run_child(uri, "shm", base_env))
                results.setdefault("base/hit", []).append(run_child(uri, "shm", base_env))
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    load = os.getloadavg()[0]
    print(f"{args.size_mib} MiB in {args.files} file(s), {args.rounds} rounds, medians; load average at the end "
          f"{load:.2f}\n")
    print("| case | fetch (s) | process, imports included (s) | GiB/s of the fetch |")
    print("|---|---:|---:|---:|")
    summary = {}
    for case, samples in results.items():
        fetch_s = statistics.median(s[0] for s in samples)
        whole = statistics.median(s[2] for s in samples)
        rate = args.size_mib / 1024 / fetch_s if fetch_s else float("inf")
        summary[case] = {"fetch_s": fetch_s, "process_s": whole, "samples": samples}
        print(f"| {case} | {fetch_s:.4f} | {whole:.3f} | {rate:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
