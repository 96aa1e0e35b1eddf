"""S3 cold-fetch benchmark against moto's S3 server on loopback (or any endpoint: --endpoint).

Measures, in one run and against the same endpoint:
  * the endpoint's ceiling: many parallel raw ranged GETs whose bodies are discarded;
  * boto3 ``download_file`` with defaults, and with a tuned ``TransferConfig``;
  * fastload ``fetch`` (cold cache), and Run:ai Model Streamer's S3 reader where it works;
  * cold S3 -> state dict: streaming (``stream_state_dict``) vs fetch-then-load;
  * N processes starting at once: bytes served by the origin (counted by a proxy) and wall time.

moto is not S3: its throughput is bounded by one Python process, so compare ratios, not MB/s.
Usage: python benchmarks/bench_s3.py [--size 2GiB] [--rounds 3] [--processes 4] [--out bench-out/s3.md]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastload_core.storage.settings import parse_size  # noqa: E402

BUCKET = "bench"
KEY = "model/model.safetensors"
MiB = 1024 * 1024


def make_checkpoint(path: Path, size: int) -> None:
    """A safetensors file of ``size`` bytes of random int32 tensors, 64 MiB each (random data: no
    compression or dedup anywhere can flatter a number)."""
    tensor_bytes = 64 * MiB
    count = max(1, size // tensor_bytes)
    header = {f"layers.{i}.weight": {"dtype": "I32", "shape": [tensor_bytes // 4],
                                     "data_offsets": [i * tensor_bytes, (i + 1) * tensor_bytes]}
              for i in range(count)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        for _ in range(count):
            handle.write(os.urandom(tensor_bytes))


def timed(label: str, results: list[tuple[str, float, int]], nbytes: int):  # type: ignore[no-untyped-def]
    class Timer:
        def __enter__(self) -> Timer:
            self.start = time.monotonic()
            return self

        def __exit__(self, *exc: object) -> None:
            seconds = time.monotonic() - self.start
            results.append((label, seconds, nbytes))
            print(f"{label:<48} {seconds:7.2f} s  {nbytes / seconds / MiB:8.1f} MiB/s", flush=True)

    return Timer()


def ceiling(client, size: int, part: int, workers: int) -> None:  # type: ignore[no-untyped-def]
    def get(start: int) -> int:
        byte_range = f"bytes={start}-{min(start + part, size) - 1}"
        body = client.get_object(Bucket=BUCKET, Key=KEY, Range=byte_range)["Body"]
        total = 0
        while chunk := body.read(MiB):
            total += len(chunk)
        return total

    with ThreadPoolExecutor(workers) as pool:
        assert sum(pool.map(get, range(0, size, part))) == size


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="2GiB")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--part-size", default="16MiB")
    parser.add_argument("--endpoint", help="use this S3 endpoint instead of starting moto")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each in a shuffled order; medians reported")
    parser.add_argument("--out", default=str(REPO / "bench-out" / "s3.md"))
    args = parser.parse_args()
    size = int(parse_size(args.size) or 0)
    part = int(parse_size(args.part_size) or 0)
    work = Path(tempfile.mkdtemp(prefix="fastload-bench-", dir="/dev/shm"))
    server = None
    os.environ.update(AWS_ACCESS_KEY_ID=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
                      AWS_SECRET_ACCESS_KEY=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
                      AWS_DEFAULT_REGION=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                      FASTLOAD_S3_CONCURRENCY=str(args.concurrency), FASTLOAD_S3_PART_SIZE=args.part_size,
                      FASTLOAD_SHM_DIR=str(work / "shm"))
    if args.endpoint:
        endpoint = args.endpoint
    else:
        from fastload_devservices.s3 import S3Server

        server = S3Server()
        server.start()
        endpoint = server.endpoint_url
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    results: list[tuple[str, float, int]] = []
    notes: list[str] = []
    try:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        client = boto3.client("s3", config=Config(max_pool_connections=args.concurrency + 8))
        client.create_bucket(Bucket=BUCKET)
        source = work / "source.safetensors"
        make_checkpoint(source, size)
        size = source.stat().st_size
        # Uploaded in parts of --part-size so every contender makes the same number of requests: moto reads
        # the whole object for each ranged GET, which would otherwise penalise smaller ranges (not S3's way).
        client.upload_file(str(source), BUCKET, KEY,
                           Config=TransferConfig(multipart_threshold=part, multipart_chunksize=part))
        source.unlink()
        print(f"checkpoint: {size / MiB:.0f} MiB at {endpoint}; destinations in /dev/shm", flush=True)

        from fastload_core.loader.api import load_state_dict, stream_state_dict
        from fastload_core.storage import fetch

        uri = f"s3://{BUCKET}/{KEY}"
        tuned = TransferConfig(max_concurrency=args.concurrency, multipart_chunksize=part)

        def boto3_download(config: TransferConfig | None) -> None:
            client.download_file(BUCKET, KEY, str(work / "download.bin"), **({"Config": config} if config else {}))
            (work / "download.bin").unlink()

        def in_empty_cache(action):  # type: ignore[no-untyped-def]
            def run() -> None:  # every fastload row starts from an empty cache: a cold replica
                os.environ["FASTLOAD_CACHE_DIR"] = str(work / "cache")
                try:
                    action()
                finally:
                    shutil.rmtree(work / "cache", ignore_errors=True)
            return run

        def streaming() -> None:
            stats: dict[str, float] = {}
            state, pinned = stream_state_dict(uri, stats=stats)
            pinned.release()
            stream_overlap.append((stats["first_tensor"] - stats["started"], stats["fetch_done"] - stats["started"]))
            del state

        def runai() -> None:
            from runai_model_streamer import SafetensorsStreamer

            os.environ.setdefault("AWS_ENDPOINT_URL", endpoint)
            os.environ.setdefault("RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "0")
            os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
            with SafetensorsStreamer() as streamer:
                streamer.stream_file(uri)
                got = sum(t.numel() * t.element_size() for _, t in streamer.get_tensors())
            assert got > 0, "Run:ai returned no tensors"

        stream_overlap: list[tuple[float, float]] = []
        methods = {
            f"ceiling: {args.concurrency} parallel raw GETs, discard":
                lambda: ceiling(client, size, part, args.concurrency),
            "boto3 download_file (defaults)": lambda: boto3_download(None),
            f"boto3 download_file (TransferConfig {args.concurrency}x{args.part_size})": lambda: boto3_download(tuned),
            "fastload fetch (cold, verified, published)": in_empty_cache(lambda: fetch(uri)),
            "Run:ai Model Streamer (S3 -> CPU tensors)": runai,
            "cold: fetch, then load (copy into private memory)":
                in_empty_cache(lambda: load_state_dict(fetch(uri), "cpu", copy=True)),
            "cold: streaming load (stream_state_dict)": in_empty_cache(streaming),
        }
        timings: dict[str, list[float]] = {name: [] for name in methods}
        failed: set[str] = set()
        shuffler = random.Random(args.rounds)
        for round_index in range(args.rounds):  # a seeded shuffle per round: no row always follows another
            for name in shuffler.sample(list(methods), len(methods)):
                if name in failed:
                    continue
                started = time.monotonic()
                try:
                    methods[name]()
                except Exception as exc:  # a third-party reader may not work against this endpoint
                    failed.add(name)
                    notes.append(f"{name} failed: {exc!r}"[:300])
                    continue
                timings[name].append(time.monotonic() - started)
                print(f"round {round_index + 1}: {name:<56} {timings[name][-1]:7.2f} s", flush=True)
        for name, seconds in timings.items():
            if seconds:
                results.append((f"{name} [{len(seconds)}/{args.rounds}]", statistics.median(seconds), size))
        first, done = statistics.median(o[0] for o in stream_overlap), statistics.median(o[1] for o in stream_overlap)
        notes.append(f"streaming (median): first tensor {first:.2f}s after start, fetch done at {done:.2f}s")

        # N processes at once, through a counting proxy
        from tests.storage.faultproxy import FaultProxy

        proxy = FaultProxy(int(endpoint.rsplit(":", 1)[1]))
        go = work / "go"
        env = dict(os.environ, AWS_ENDPOINT_URL_S3=proxy.endpoint_url, PYTHONPATH=str(REPO), GO=str(go),
                   FASTLOAD_CACHE_DIR=str(work / "cache-n"), URI=f"s3://{BUCKET}/{KEY}")
        code = ("import os, time\nfrom pathlib import Path\n"
                "while not Path(os.environ['GO']).exists(): time.sleep(0.005)\n"
                "from fastload_core.storage import fetch\nprint(fetch(os.environ['URI']))")
        procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
                 for _ in range(args.processes)]
        time.sleep(3)
        with timed(f"{args.processes} processes at once (via the counting proxy)", results, size):
            go.touch()
            outs = [p.communicate()[0].strip() for p in procs]
        proxy.close()
        assert all(p.returncode == 0 for p in procs) and len(set(outs)) == 1
        notes.append(f"{args.processes} processes: origin served {proxy.get_body_bytes} bytes = "
                     f"{proxy.get_body_bytes / size:.2f}x the model")
        print(notes[-1], flush=True)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    ceiling_rate = size / results[0][1]
    lines = ["| run [rounds] | median s | MiB/s | % of ceiling |", "|---|---:|---:|---:|"]
    for label, seconds, nbytes in results:
        lines.append(f"| {label} | {seconds:.2f} | {nbytes / seconds / MiB:.1f} | "
                     f"{100 * nbytes / seconds / ceiling_rate:.0f}% |")
    text = "\n".join([f"Checkpoint {size / MiB:.0f} MiB, endpoint {'moto on loopback' if server else endpoint}, "
                      f"concurrency {args.concurrency}, part {args.part_size}.", "", *lines, "",
                      *[f"- {n}" for n in notes]])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
