"""S3 cold start, side by side: every way of getting a model from S3 into memory, each in a fresh process.

For each server (SeaweedFS, a real and fast S3 implementation, and moto, which stays the fault-injection
origin of the tests but is bounded by one Python process), one object of random bytes is uploaded in
``--part-size`` parts, and every round runs, in a shuffled order and each in a new process:

  * ceiling:   ``--concurrency`` threads of plain ranged GETs (one per part) read into memory;
  * floor shm: the same GETs, each part CRC32'd and XXH3'd as it arrives and written into one /dev/shm file,
    checked against the object's checksum: the least any verified download into RAM does, without fastload's
    fetch around it (no journal, no resume, no publishing), so the gap to fetch shm is fastload's own cost;
  * boto3:     ``download_file`` tuned to ``--concurrency`` x ``--part-size``, into /dev/shm;
  * runai:     Run:ai Model Streamer's ``SafetensorsStreamer`` from S3 into CPU tensors (when installed);
  * fetch shm: ``fastload_core.fetch(uri, tier="shm")``, cold, verified, the cache dir on local disk;
  * fetch shm md5 / crc64nvme: the same fetch of a copy of the object uploaded without an additional
    checksum (verified by its ETag's MD5), and of one uploaded with CRC64NVME (a full-object CRC);
  * fetch disk: ``fetch(uri, tier="local_disk")``, cold, beside the disk's own write speed with fsync;
  * stream:    ``load_file("s3://...", copy=True)``, cold: tensors copied out as their bytes land.

Each row reports the median of the operation's seconds (measured in the child, after its imports), the
median wall time of the whole process (imports included: what a user waits for), the child's CPU seconds
per GB over the operation (getrusage) and, for fastload's rows, until its cache copies are written too
(the write-through, and a streamed load's shm copy, run after the call returns), and the server's CPU
seconds per GB over the same run (its process's utime + stime from /proc): on a small machine the server
competes for the same cores. The report also gives the server's CPU at idle, measured before the rounds
(that column includes it, for as long as each row takes).

Usage: python benchmarks/bench_s3.py [--servers seaweed,moto] [--size 2GiB] [--rounds 3] [--quick]
       [--out bench-out/s3.md] [--json bench-out/s3.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastload_core.storage.settings import parse_size  # noqa: E402

KEY = "model/model.safetensors"  # uploaded as boto3 does by default: with a CRC32 checksum
KEY_MD5 = "model-md5/model.safetensors"  # without an additional checksum: fastload verifies the ETag (MD5)
KEY_CRC64 = "model-crc64nvme/model.safetensors"  # with ChecksumAlgorithm=CRC64NVME (full-object)
MiB = 1024 * 1024
GB = 1e9

# name -> label, in the order of the report
METHODS = {
    "ceiling": "ceiling: {c} threads of ranged GETs into memory",
    "floor_shm": "floor: the same GETs, CRC32 + XXH3, written into /dev/shm (no fastload)",
    "boto3": "boto3 download_file ({c} x {p}) into /dev/shm",
    "runai": "Run:ai Model Streamer (S3 -> CPU tensors)",
    "fetch_shm": 'fastload fetch(tier="shm"), cold, verified',
    "fetch_shm_md5": 'fastload fetch(tier="shm"), cold, object without a checksum (MD5)',
    "fetch_shm_crc64nvme": 'fastload fetch(tier="shm"), cold, CRC64NVME object',
    "fetch_disk": 'fastload fetch(tier="local_disk"), cold, verified',
    "disk_write": "local disk write + fsync (no network)",
    "stream": 'fastload load_file("s3://...", copy=True), cold (streaming)',
}


def make_checkpoint(path: Path, size: int) -> None:
    """A safetensors file of about ``size`` bytes of random int32 tensors, 64 MiB each (random data: no
    compression or dedup anywhere can flatter a number)."""
    tensor_bytes = min(64 * MiB, max(size // 4, MiB))
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


# --- the child: one method, one fresh process ------------------------------------------------------------
def _child(method: str) -> None:
    env = os.environ
    bucket, size, part = env["BENCH_BUCKET"], int(env["BENCH_SIZE"]), int(env["BENCH_PART"])
    concurrency, work = int(env["BENCH_CONCURRENCY"]), Path(env["BENCH_WORK"])
    key = {"fetch_shm_md5": KEY_MD5, "fetch_shm_crc64nvme": KEY_CRC64}.get(method, KEY)
    uri = f"s3://{bucket}/{key}"
    action: Callable[[], Any]
    if method in ("ceiling", "floor_shm", "boto3"):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        client = boto3.client("s3", config=Config(max_pool_connections=concurrency + 4))
        if method == "ceiling":
            def action() -> None:
                def get(start: int) -> int:
                    body = client.get_object(Bucket=bucket, Key=KEY,
                                             Range=f"bytes={start}-{min(start + part, size) - 1}")["Body"]
                    return len(body.read())

                with ThreadPoolExecutor(concurrency) as pool:
                    assert sum(pool.map(get, range(0, size, part))) == size
        elif method == "floor_shm":
            action = _floor_shm(client, bucket, size, concurrency, work / "floor.bin")
        else:
            tuned = TransferConfig(max_concurrency=concurrency, multipart_chunksize=part, multipart_threshold=part)

            def action() -> None:
                client.download_file(bucket, KEY, str(work / "download.bin"), Config=tuned)
    elif method == "runai":
        from runai_model_streamer import SafetensorsStreamer

        env.setdefault("AWS_ENDPOINT_URL", env["AWS_ENDPOINT_URL_S3"])
        env.setdefault("RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "0")
        env.setdefault("AWS_EC2_METADATA_DISABLED", "true")

        def action() -> None:
            with SafetensorsStreamer() as streamer:
                streamer.stream_file(uri)
                got = sum(t.numel() * t.element_size() for _, t in streamer.get_tensors())
            assert got > 0, "Run:ai returned no tensors"
    elif method in ("fetch_shm", "fetch_disk", "fetch_shm_md5", "fetch_shm_crc64nvme"):
        from fastload_core import fetch

        tier = "local_disk" if method == "fetch_disk" else "shm"

        def action() -> None:
            assert fetch(uri, tier=tier).stat().st_size == size
    elif method == "disk_write":
        def action() -> None:  # what the disk under the cache dir takes, fsync included
            block = os.urandom(part)
            fd = os.open(work / "cache" / "write-test", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for offset in range(0, size, part):
                    os.pwrite(fd, block[:min(part, size - offset)], offset)
                os.fsync(fd)
            finally:
                os.close(fd)
    elif method == "stream":
        from fastload_core import load_file

        def action() -> None:
            tensors = load_file(uri, copy=True)
            assert sum(t.numel() * t.element_size() for t in tensors.values()) > 0
    else:
        raise SystemExit(f"unknown method {method!r}")
    if method.startswith(("fetch_", "stream")):
        # The same footing as the boto3 rows, whose client exists before the clock starts: boto3 imported and
        # fastload's S3 client built (the process column still counts both).
        from fastload_core.storage import default_store

        getattr(default_store().origin("s3"), "client")  # noqa: B009
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    action()
    seconds, after = time.monotonic() - started, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    cpu_all = cpu
    if method.startswith(("fetch_", "stream")):
        # fastload returns before its cache copies are written (the write-through to disk; a streamed load's
        # shm copy): the work is moved off the wait, not removed, so count it too
        from fastload_core.storage import writethrough

        writethrough.wait()
        done = resource.getrusage(resource.RUSAGE_SELF)
        cpu_all = (done.ru_utime - before.ru_utime) + (done.ru_stime - before.ru_stime)
    print("BENCH " + json.dumps({"seconds": seconds, "cpu": cpu, "cpu_all": cpu_all}), flush=True)


def _floor_shm(client: Any, bucket: str, size: int, concurrency: int, path: Path) -> Callable[[], None]:
    """The bare verified download into /dev/shm: what fastload's fetch costs beyond it is its own. Received
    with the socket-level ``readinto`` fastload uses (botocore's ``read`` would add a copy per chunk)."""
    import threading

    from fastload_core.storage.checksum import CRC, composite, crc_function, normalize_etag
    from fastload_core.storage.s3 import _socket_stream
    from fastload_core.storage.verify import BlockDigests

    crc32 = crc_function("crc32")
    head = client.head_object(Bucket=bucket, Key=KEY, ChecksumMode="ENABLED")
    # None where the server's HEAD leaves the checksum ambiguous (moto drops a multipart CRC's type): the floor
    # still does the same work, with nothing to compare its result to
    expected = CRC.from_s3(head, normalize_etag(head.get("ETag")))
    # the ranges follow the upload's parts (S3 makes them at least 5 MiB, whatever --part-size asks), as fastload's
    part = client.head_object(Bucket=bucket, Key=KEY, PartNumber=1)["ContentLength"]
    buffers = threading.local()

    def get(fd: int, start: int) -> int:
        end = min(start + part, size)
        body = client.get_object(Bucket=bucket, Key=KEY, Range=f"bytes={start}-{end - 1}")["Body"]
        stream = _socket_stream(body)
        assert stream is not None, "botocore's body is not over http.client here"
        view = getattr(buffers, "view", None) or memoryview(bytearray(MiB))
        buffers.view = view
        crc, blocks, position = 0, BlockDigests(), start
        while position < end:
            count = stream.readinto(view[:min(MiB, end - position)])
            assert count, f"body ended at {position} of {end}"
            crc = crc32(view[:count], crc)
            blocks.update(view[:count])
            os.pwrite(fd, view[:count], position)
            position += count
        if stream.isclosed():  # read to its end: the connection goes back to the pool, as fastload's do
            body._raw_stream.release_conn()
        body.close()
        return crc

    def action() -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with ThreadPoolExecutor(concurrency) as pool:
                crcs = list(pool.map(lambda start: get(fd, start), range(0, size, part)))
        finally:
            os.close(fd)
        assert expected is None or composite("crc32", crcs) == expected, "the floor's bytes do not verify"

    return action


# --- the parent ------------------------------------------------------------------------------------------
def process_cpu(pid: int) -> float:
    """utime + stime of ``pid`` and its waited-for children, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _idle_cpu(pid: int | None, seconds: float = 2.0) -> float:
    """The server's CPU, in cores, while nobody asks it anything (after the uploads). The *server CPU s/GB*
    column counts any such background work too, for as long as a row takes, so a slow row would be charged
    more of it than a fast one; this says how much there is (``weed mini``: none measurable, 0.00 cores)."""
    if not pid:
        return float("nan")
    before = process_cpu(pid)
    time.sleep(seconds)
    return (process_cpu(pid) - before) / seconds


def _run_child(method: str, env: dict[str, str], server_pid: int | None) -> dict[str, float]:
    server_before = process_cpu(server_pid) if server_pid else 0.0
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, __file__, "--child", method], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    out, err = process.communicate()
    wall = time.monotonic() - started
    server_cpu = process_cpu(server_pid) - server_before if server_pid else float("nan")
    lines = [line for line in out.splitlines() if line.startswith("BENCH ")]
    if process.returncode or not lines:
        raise RuntimeError(f"exit {process.returncode}: {(err or out).strip()[-400:]}")
    result: dict[str, float] = json.loads(lines[-1][6:])
    result.update(wall=wall, server_cpu=server_cpu)
    return result


def _clear(work: Path) -> None:
    for name in ("cache", "shm"):
        shutil.rmtree(work / name, ignore_errors=True)
        (work / name).mkdir(parents=True)
    (work / "download.bin").unlink(missing_ok=True)


def _start(server_name: str) -> Any:
    if server_name == "seaweed":
        from fastload_devservices.seaweed import SeaweedServer

        server: Any = SeaweedServer()
    elif server_name == "moto":
        from fastload_devservices.s3 import S3Server

        server = S3Server()
    else:
        raise SystemExit(f"unknown server {server_name!r}: seaweed or moto")
    server.start(timeout=90)  # a busy 2-core machine can take a while
    return server


def bench_server(server_name: str, args: argparse.Namespace, size: int, part: int, disk: Path) -> dict[str, Any]:
    """All methods against one server; returns {method: [results]} plus notes."""
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    server = _start(server_name)
    shm_work = Path(tempfile.mkdtemp(prefix="fastload-bench-s3-", dir="/dev/shm"))
    disk_work = Path(tempfile.mkdtemp(prefix="fastload-bench-s3-", dir=disk))
    bucket = "bench"
    notes: list[str] = []
    try:
        env = dict(os.environ, AWS_ENDPOINT_URL_S3=server.endpoint_url, PYTHONPATH=str(REPO),
                   BENCH_BUCKET=bucket, BENCH_PART=str(part), BENCH_CONCURRENCY=str(args.concurrency),
                   BENCH_WORK=str(shm_work), FASTLOAD_CACHE_DIR=str(disk_work / "cache"),
                   FASTLOAD_SHM_DIR=str(shm_work / "shm"), FASTLOAD_S3_CONCURRENCY=str(args.concurrency),
                   FASTLOAD_S3_PART_SIZE=str(part))
        client = boto3.client("s3", endpoint_url=server.endpoint_url)
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
        source = shm_work / "source.safetensors"
        make_checkpoint(source, size)
        size = source.stat().st_size
        env["BENCH_SIZE"] = str(size)
        # Uploaded in parts of --part-size, so every contender makes the same number of requests: as boto3 does
        # by default (with a CRC32 checksum, which fastload verifies), and the copies the extra fetch rows use.
        methods = [m for m in args.methods.split(",") if m]
        parts = TransferConfig(multipart_threshold=part, multipart_chunksize=part)
        client.upload_file(str(source), bucket, KEY, Config=parts)
        objects = {KEY: _checksum_of(client, bucket, KEY)}
        if "fetch_shm_md5" in methods:
            plain = boto3.client("s3", endpoint_url=server.endpoint_url,
                                 config=Config(request_checksum_calculation="when_required"))
            plain.upload_file(str(source), bucket, KEY_MD5, Config=parts)
            objects[KEY_MD5] = _checksum_of(client, bucket, KEY_MD5)
        if "fetch_shm_crc64nvme" in methods:
            client.upload_file(str(source), bucket, KEY_CRC64, Config=parts,
                               ExtraArgs={"ChecksumAlgorithm": "CRC64NVME"})
            objects[KEY_CRC64] = _checksum_of(client, bucket, KEY_CRC64)
        source.unlink()
        idle = _idle_cpu(getattr(server, "pid", None))
        print(f"{server_name}: {size / MiB:.0f} MiB at {server.endpoint_url}; objects: {objects}; server CPU at "
              f"idle {idle:.2f} cores", flush=True)
        results: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
        failed: dict[str, str] = {}
        shuffler = random.Random(args.rounds)
        for round_index in range(args.rounds):  # a seeded shuffle per round: no row always follows another
            for method in shuffler.sample(methods, len(methods)):
                if method in failed:
                    continue
                _clear(shm_work)
                _clear(disk_work)
                run_env = dict(env, BENCH_WORK=str(disk_work if method == "disk_write" else shm_work))
                try:
                    result = _run_child(method, run_env, getattr(server, "pid", None))
                except RuntimeError as exc:  # e.g. a third-party reader that is not installed
                    failed[method] = str(exc)
                    notes.append(f"{method} failed: {str(exc)[-300:]}")
                    print(f"  {method}: FAILED {str(exc)[-300:]}", flush=True)
                    continue
                results[method].append(result)
                print(f"  round {round_index + 1}: {method:<11} {result['seconds']:7.2f} s "
                      f"(process {result['wall']:.2f} s, cpu {result['cpu']:.2f} s, server cpu "
                      f"{result['server_cpu']:.2f} s)", flush=True)
        if args.processes:
            notes.append(_n_processes(args.processes, server, env, bucket, size, disk_work))
        return {"server": server_name, "size": size, "results": results, "notes": notes, "objects": objects,
                "server_idle_cpu": idle}
    finally:
        server.stop()
        shutil.rmtree(shm_work, ignore_errors=True)
        shutil.rmtree(disk_work, ignore_errors=True)


def _checksum_of(client: Any, bucket: str, key: str) -> str:
    """The additional checksum the server reports for ``key`` (what fastload verifies against), in words."""
    head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    found = [f"{name[len('Checksum'):]} {head[name]}" for name in sorted(head)
             if name.startswith("Checksum") and name != "ChecksumType"]
    if not found:
        return f"no additional checksum (ETag {head.get('ETag', '?')})"
    kind = head.get("ChecksumType")
    return ", ".join(found) + (f" ({kind})" if kind else " (no type given)")


def _n_processes(count: int, server: Any, env: dict[str, str], bucket: str, size: int, work: Path) -> str:
    """``count`` processes fetch at once through a counting proxy: the origin should serve the model once."""
    from fastload_devservices.faultproxy import FaultProxy

    _clear(work)
    proxy = FaultProxy(server.port)
    go = work / "go"
    child_env = dict(env, AWS_ENDPOINT_URL_S3=proxy.endpoint_url, GO=str(go), URI=f"s3://{bucket}/{KEY}")
    code = ("import os, time\nfrom pathlib import Path\n"
            "while not Path(os.environ['GO']).exists(): time.sleep(0.005)\n"
            "from fastload_core import fetch\nprint(fetch(os.environ['URI']))")
    try:
        procs = [subprocess.Popen([sys.executable, "-c", code], env=child_env, stdout=subprocess.PIPE, text=True)
                 for _ in range(count)]
        time.sleep(2)
        started = time.monotonic()
        go.touch()
        outs = [p.communicate()[0].strip() for p in procs]
        seconds = time.monotonic() - started
    finally:
        proxy.close()
    assert all(p.returncode == 0 for p in procs) and len(set(outs)) == 1, outs
    return (f"{count} processes fetching at once (through a Python counting proxy, so slower): {seconds:.2f} s; "
            f"the origin served {proxy.get_body_bytes / size:.2f}x the model")


def _median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows) if rows else float("nan")


def report(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines: list[str] = []
    for run in runs:
        size, results = run["size"], run["results"]
        gb = size / GB
        ceiling = _median(results.get("ceiling", []), "seconds")
        boto = _median(results.get("boto3", []), "seconds")
        fetch = _median(results.get("fetch_shm", []), "seconds")
        lines += [f"**{run['server']}**, object {size / MiB:.0f} MiB in {args.part_size} parts, concurrency "
                  f"{args.concurrency}, {args.rounds} rounds (medians):", "",
                  "| method [runs] | s | GB/s | × ceiling | × boto3 | × fetch shm | process s | client CPU s/GB "
                  "| client CPU s/GB, all written | server CPU s/GB |", "|---|" + "---:|" * 9]
        for method, rows in results.items():
            if not rows:
                continue
            seconds = _median(rows, "seconds")
            label = METHODS[method].format(c=args.concurrency, p=args.part_size)
            lines.append(f"| {label} [{len(rows)}] | {seconds:.2f} | {gb / seconds:.2f} | {ceiling / seconds:.2f} | "
                         f"{boto / seconds:.2f} | {fetch / seconds:.2f} | {_median(rows, 'wall'):.2f} | "
                         f"{_median(rows, 'cpu') / gb:.2f} | {_median(rows, 'cpu_all') / gb:.2f} | "
                         f"{_median(rows, 'server_cpu') / gb:.2f} |")
        lines += ["", *[f"- object `{key}`: {what}" for key, what in run.get("objects", {}).items()],
                  f"- server CPU at idle (before the rounds): {run.get('server_idle_cpu', float('nan')):.2f} cores",
                  *[f"- {note}" for note in run["notes"]], ""]
    lines.append("× columns: the other method's seconds over this one's (above 1 = faster than it).")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--servers", default="seaweed,moto")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--size", default="2GiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--part-size", default="16MiB")
    parser.add_argument("--processes", type=int, default=4, help="also N processes at once (0: skip)")
    parser.add_argument("--disk", default=None, help="a directory on the local disk (default: the temp dir)")
    parser.add_argument("--quick", action="store_true", help="a tiny run for tests: 32 MiB, 1 round, 4 MiB parts")
    parser.add_argument("--out", default=str(REPO / "bench-out" / "s3.md"))
    parser.add_argument("--json", default=None, help="also write the raw results here")
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return 0
    if args.quick:
        args.size, args.rounds, args.part_size, args.processes = "32MiB", 1, "4MiB", 0
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    size, part = int(parse_size(args.size) or 0), int(parse_size(args.part_size) or 0)
    disk = Path(args.disk or tempfile.gettempdir())
    runs = [bench_server(name, args, size, part, disk) for name in args.servers.split(",") if name]
    text = report(runs, args)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
