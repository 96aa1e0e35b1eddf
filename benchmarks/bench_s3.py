"""S3 cold-fetch benchmark against moto's S3 server on loopback (or any endpoint: --endpoint).

Measures, in one run and against the same endpoint:
  * the endpoint's ceiling: many parallel raw ranged GETs whose bodies are discarded;
  * boto3 ``download_file`` with defaults, and with a tuned ``TransferConfig``;
  * fastload ``fetch`` (cold cache), and Run:ai Model Streamer's S3 reader where it works;
  * cold S3 -> state dict: streaming (``stream_state_dict``) vs fetch-then-load;
  * N processes starting at once: bytes served by the origin (counted by a proxy) and wall time.

moto is not S3: its throughput is bounded by one Python process, so compare ratios, not MB/s.
Usage: python benchmarks/bench_s3.py [--size 2GiB] [--processes 4] [--out bench-out/s3.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
        from tests.services.s3 import S3Server

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

        with timed(f"ceiling: {args.concurrency} parallel raw GETs, discard", results, size):
            ceiling(client, size, part, args.concurrency)
        with timed("boto3 download_file (defaults)", results, size):
            client.download_file(BUCKET, KEY, str(work / "default.bin"))
        (work / "default.bin").unlink()
        tuned = TransferConfig(max_concurrency=args.concurrency, multipart_chunksize=part)
        with timed(f"boto3 download_file (TransferConfig {args.concurrency}x{args.part_size})", results, size):
            client.download_file(BUCKET, KEY, str(work / "tuned.bin"), Config=tuned)
        (work / "tuned.bin").unlink()

        from fastload_core.storage import fetch

        os.environ["FASTLOAD_CACHE_DIR"] = str(work / "cache-fetch")
        with timed("fastload fetch (cold, verified, published)", results, size):
            path = fetch(f"s3://{BUCKET}/{KEY}")
        assert path.stat().st_size == size
        shutil.rmtree(work / "cache-fetch")

        try:
            from runai_model_streamer import SafetensorsStreamer

            os.environ.setdefault("AWS_ENDPOINT_URL", endpoint)
            os.environ.setdefault("RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "0")
            os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
            with timed("Run:ai Model Streamer (S3 -> CPU tensors)", results, size), \
                    SafetensorsStreamer() as streamer:
                streamer.stream_file(f"s3://{BUCKET}/{KEY}")
                got = sum(t.numel() * t.element_size() for _, t in streamer.get_tensors())
            notes.append(f"Run:ai streamer returned {got} tensor bytes")
        except Exception as exc:  # it may not work against moto; say so rather than hide the row
            notes.append(f"Run:ai Model Streamer could not read from this endpoint: {exc!r}"[:300])
            print(notes[-1], flush=True)

        # cold S3 -> ready state dict
        from fastload_core.loader.api import load_state_dict
        from fastload_core.storage.streaming import stream_state_dict

        os.environ["FASTLOAD_CACHE_DIR"] = str(work / "cache-a")
        with timed("cold: fetch, then load (copy into private memory)", results, size):
            state = load_state_dict(fetch(f"s3://{BUCKET}/{KEY}"), "cpu", copy=True)
        del state
        shutil.rmtree(work / "cache-a")
        os.environ["FASTLOAD_CACHE_DIR"] = str(work / "cache-b")
        stats: dict[str, float] = {}
        with timed("cold: streaming load (stream_state_dict)", results, size):
            state, pinned = stream_state_dict(f"s3://{BUCKET}/{KEY}", stats=stats)
        pinned.release()
        del state
        notes.append(f"streaming: first tensor {stats['first_tensor'] - stats['started']:.2f}s after start, "
                     f"fetch done at {stats['fetch_done'] - stats['started']:.2f}s, last tensor at "
                     f"{stats['last_tensor'] - stats['started']:.2f}s")
        shutil.rmtree(work / "cache-b")

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
    lines = ["| run | seconds | MiB/s | % of ceiling |", "|---|---:|---:|---:|"]
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
