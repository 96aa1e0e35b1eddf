"""``fastload serve`` and peer fetching: how fast a cold node gets a model, and from where.

One run, every source side by side, rounds in a shuffled order, medians reported:
  * the serving engines' loopback ceiling: 16 parallel ranged GETs (16 MiB) of the model held in /dev/shm,
    bodies discarded, through nginx (sendfile, the candidate data plane) and through ``fastload serve``
    (uvicorn, SigV4 checked on every request), and through ``fastload serve`` again in ranges of the peer
    fetch's size (``--peer-part-size``, FASTLOAD_PEER_PART_SIZE);
  * a cold node (a fresh process, empty cache, its RAM tier in /dev/shm and its local disk on disk)
    fetching the model into its RAM tier: from a peer's RAM (node A runs ``fastload serve`` and holds it),
    from the shared directory, from the S3 origin (SeaweedFS);
  * a miss served through the endpoint: a cold ``fastload serve`` node read by the same 16 parallel ranged
    GETs, against the direct fetch from the origin;
  * Run:ai Model Streamer (``pip install runai-model-streamer runai-model-streamer-s3``) reading the model
    through node A (a hit), where it is installed.

Cold-node rows report the fetch itself (timed inside the fresh process, after the plugin manager has
loaded, which imports torch) and the whole process (interpreter, imports and all); for the peer row the
notes also give the transfer alone (the peer's log line: its ranged GETs, writes and block checks).
Usage: python benchmarks/bench_serve.py [--size 2GiB] [--rounds 3] [--rows peer,origin,miss] [--out bench-out/serve.md]
--rows runs only the rows named (ids: ceiling, ceiling-peer-part, peer, shared, origin, miss, nginx, runai); the
ceiling row always runs, since every percentage is of it.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
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
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_s3 import make_checkpoint, process_cpu  # noqa: E402

from fastload_core.storage.settings import parse_size  # noqa: E402
from fastload_devservices._process import free_port  # noqa: E402

ROW_IDS = ("ceiling", "ceiling-peer-part", "peer", "shared", "origin", "miss", "nginx", "runai")

BUCKET = "models"  # SeaweedServer's bucket
KEY = "model/model.safetensors"
URI = f"s3://{BUCKET}/{KEY}"
MiB = 1024 * 1024
SERVE_KEY, SERVE_SECRET = "bench-serve-key", "bench-serve-secret"

FETCH = """
import json, logging, os, sys, time
started = time.monotonic()
logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
logging.getLogger("fastload.storage.peers").setLevel(logging.INFO)  # "... bytes from peer X in Ys"
from fastload_core.plugins import get_plugin_manager
from fastload_core.storage import fetch
get_plugin_manager()  # loads the built-in plugins, torch included: the same for every source, so not timed
ready = time.monotonic()
path = fetch(os.environ["URI"], tier="shm")
done = time.monotonic()
print(json.dumps({"fetch": done - ready, "imports": ready - started, "path": str(path)}))
"""

RUNAI = """
import json, os, time
from runai_model_streamer import SafetensorsStreamer
started = time.monotonic()
with SafetensorsStreamer() as streamer:
    streamer.stream_file(os.environ["URI"])
    total = sum(t.numel() * t.element_size() for _, t in streamer.get_tensors())
print(json.dumps({"fetch": time.monotonic() - started, "bytes": total}))
"""


def wait_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {port}")


class Serve:
    """A ``fastload serve`` node, a subprocess: its RAM tier under ``work`` (/dev/shm), its local disk under
    ``disk`` (so that its write-through does not hold a second copy in RAM)."""

    def __init__(self, work: Path, disk: Path, name: str, env: dict[str, str], *, advertise: bool) -> None:
        self.port = free_port()
        self.root = work / name
        self.disk = disk / name
        self.env = {**env, "FASTLOAD_CACHE_DIR": str(self.disk / "cache"), "FASTLOAD_SHM_DIR": str(self.root / "shm")}
        self.root.mkdir(parents=True)
        command = [sys.executable, "-m", "fastload_core", "serve", "--port", str(self.port)]
        if advertise:
            command += ["--advertise", f"127.0.0.1:{self.port}"]
        self.log = self.root / "serve.log"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=log)
        wait_port(self.port, self.process, self.log)

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.port}", aws_access_key_id=SERVE_KEY,
                            aws_secret_access_key=SERVE_SECRET, region_name="us-east-1",
                            config=Config(max_pool_connections=32, retries={"max_attempts": 1}))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.disk, ignore_errors=True)


def parallel_read(client: Any, size: int, part: int, workers: int) -> None:
    """What a parallel S3 reader does: ranged GETs of ``part`` bytes, ``workers`` at a time, bodies discarded."""
    def get(start: int) -> int:
        body = client.get_object(Bucket=BUCKET, Key=KEY, Range=f"bytes={start}-{min(start + part, size) - 1}")["Body"]
        total = 0
        while chunk := body.read(MiB):
            total += len(chunk)
        return total

    with ThreadPoolExecutor(workers) as pool:
        got = sum(pool.map(get, range(0, size, part)))
    if got != size:
        raise RuntimeError(f"read {got} of {size} bytes")


def start_nginx(work: Path, root: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(f"""
user root;
worker_processes 2;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
""")
    log = work / "nginx.out"
    with open(log, "wb") as out:
        process = subprocess.Popen(["nginx", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    wait_port(port, process, log)
    return process, port


_PEER_LINE = re.compile(r"bytes from peer \S+ in ([0-9.]+)s")


def cold_fetch(env: dict[str, str], cache: Path, shm: Path) -> dict[str, Any]:
    """A fresh process on a node with an empty cache (local disk under ``cache``, its RAM tier ``shm`` in
    /dev/shm, as on a real node) fetches the model into the RAM tier."""
    for path in (cache, shm):
        shutil.rmtree(path, ignore_errors=True)
    run_env = {**env, "FASTLOAD_CACHE_DIR": str(cache / "cache"), "FASTLOAD_SHM_DIR": str(shm), "URI": URI}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", FETCH], env=run_env, capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - started
    for path in (cache, shm):
        shutil.rmtree(path, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    transfer = _PEER_LINE.search(done.stderr)  # the peer's part alone: its GETs, writes and checks
    result["peer_transfer"] = float(transfer.group(1)) if transfer else None
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="2GiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--part-size", default="16MiB")
    parser.add_argument("--peer-part-size", default="64MiB", help="FASTLOAD_PEER_PART_SIZE for the peer fetch")
    parser.add_argument("--out", default=str(REPO / "bench-out" / "serve.md"))
    parser.add_argument("--rows", default="", help=f"comma-separated row ids ({', '.join(ROW_IDS)}): only those and "
                                                   "the ceiling (e.g. 'peer,origin,miss' for an A/B); all by default")
    args = parser.parse_args()
    wanted = {word.strip() for word in args.rows.split(",") if word.strip()}
    if wanted - set(ROW_IDS):
        parser.error(f"--rows: unknown row id(s) {', '.join(sorted(wanted - set(ROW_IDS)))}; "
                     f"the ids are {', '.join(ROW_IDS)}")
    # Every row starts fresh processes, and a cold node's fetch imports most of fastload inside the timed call.
    # An installed fastload has its bytecode compiled (pip does it at install); a checkout run where
    # PYTHONDONTWRITEBYTECODE is set (this project's VMs) compiles those modules from source in every process,
    # 0.02-0.05 s of each cold row that no deployed node pays. Compile them once, as an install would.
    compileall.compile_dir(str(REPO / "fastload_core"), quiet=1)
    load_at_start = os.getloadavg()[0]
    size = int(parse_size(args.size) or 0)
    part = int(parse_size(args.part_size) or 0)
    peer_part = int(parse_size(args.peer_part_size) or 0)
    work = Path(tempfile.mkdtemp(prefix="fastload-bench-serve-", dir="/dev/shm"))
    disk = Path(tempfile.mkdtemp(prefix="fastload-bench-serve-"))
    from fastload_devservices.redis import RedisServer
    from fastload_devservices.seaweed import SeaweedServer

    origin, redis_server = SeaweedServer(), RedisServer()
    origin.start()
    redis_server.start()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FASTLOAD_", "AWS_"))}
    base.update(AWS_ENDPOINT_URL_S3=origin.endpoint_url, AWS_ACCESS_KEY_ID="any", AWS_SECRET_ACCESS_KEY="any",
                AWS_DEFAULT_REGION="us-east-1", FASTLOAD_S3_CONCURRENCY=str(args.concurrency),
                FASTLOAD_S3_PART_SIZE=args.part_size, FASTLOAD_SERVE_ACCESS_KEY_ID=SERVE_KEY,
                FASTLOAD_SERVE_SECRET_ACCESS_KEY=SERVE_SECRET, FASTLOAD_REDIS_URL=redis_server.url,
                FASTLOAD_PEER_TTL="6", FASTLOAD_PEER_PART_SIZE=args.peer_part_size, PYTHONPATH=str(REPO))
    no_peers = {**base, "FASTLOAD_PEERS": "off"}
    nodes: list[Serve] = []
    nginx = None
    notes: list[str] = []
    timings: dict[str, list[float]] = {}
    walls: dict[str, list[float]] = {}
    transfers: dict[str, list[float]] = {}  # the peer's part of a cold fetch, from its log line
    server_cpu: dict[str, list[float]] = {}  # CPU seconds the serving node spent during a row's reads
    try:
        import boto3
        from boto3.s3.transfer import TransferConfig

        source = work / "source.safetensors"
        make_checkpoint(source, size)
        size = source.stat().st_size
        upload = boto3.client("s3", endpoint_url=origin.endpoint_url, aws_access_key_id="any",
                              aws_secret_access_key="any", region_name="us-east-1")
        upload.upload_file(str(source), BUCKET, KEY, Config=TransferConfig(multipart_threshold=part,
                                                                            multipart_chunksize=part))
        source.unlink()
        print(f"checkpoint {size / MiB:.0f} MiB at SeaweedFS {origin.endpoint_url}", flush=True)

        peer = Serve(work, disk, "peer-a", base, advertise=True)  # node A: holds the model in RAM, advertised
        nodes.append(peer)
        parallel_read(peer.client(), size, part, args.concurrency)  # a miss: A fetches it into /dev/shm
        deadline = time.monotonic() + 60
        held: list[Path] = []
        while time.monotonic() < deadline and not held:
            held = [p for p in (peer.root / "shm").glob("*/*/files/model.safetensors")
                    if not p.parents[1].name.startswith(".")]
            time.sleep(0.2)
        if not held:
            raise RuntimeError("node A never published the model in /dev/shm")
        time.sleep(3)  # one advertisement round (TTL 6 s: every 2 s)
        nginx_root = work / "nginx-root" / BUCKET / "model"
        nginx_root.mkdir(parents=True)
        os.link(held[0], nginx_root / "model.safetensors")  # the same bytes in RAM, no copy
        nginx, nginx_port = start_nginx(work, work / "nginx-root") if shutil.which("nginx") else (None, 0)
        if nginx is None:
            notes.append("nginx is not installed (apt-get install nginx-light): its ceiling row is missing")

        def selected(row_id: str) -> bool:
            return not wanted or row_id in wanted or row_id == "ceiling"

        shared = disk / "shared"
        shared_env = {**no_peers, "FASTLOAD_SHARED_DIR": str(shared)}
        shared_row = "cold node <- shared directory (fastload fetch, peers off)"
        if selected("shared"):
            cold_fetch(shared_env, disk / "fill-shared", work / "cold-shm")  # fills the shared tier on the way

        def engine(client: Any, part: int = part, name: str = "", pid: int = 0) -> Callable[[], float]:
            def run() -> float:
                cpu = process_cpu(pid) if pid else 0.0
                started = time.monotonic()
                parallel_read(client, size, part, args.concurrency)
                seconds = time.monotonic() - started
                if pid:
                    server_cpu.setdefault(name, []).append(process_cpu(pid) - cpu)
                return seconds
            return run

        def cold(env: dict[str, str], name: str) -> Callable[[], float]:
            def run() -> float:
                result = cold_fetch(env, disk / "cold", work / "cold-shm")
                walls.setdefault(name, []).append(result["wall"])
                if result["peer_transfer"] is not None:
                    transfers.setdefault(name, []).append(result["peer_transfer"])
                return float(result["fetch"])
            return run

        def miss_through_endpoint() -> float:
            node = Serve(work, disk, "cold-c", no_peers, advertise=False)
            try:
                client = node.client()
                cpu = process_cpu(node.process.pid)
                started = time.monotonic()
                parallel_read(client, size, part, args.concurrency)
                seconds = time.monotonic() - started
                server_cpu.setdefault(through, []).append(process_cpu(node.process.pid) - cpu)
                return seconds
            finally:
                node.stop()

        def runai() -> float:
            env = {**base, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{peer.port}", "AWS_ACCESS_KEY_ID": SERVE_KEY,
                   "AWS_SECRET_ACCESS_KEY": SERVE_SECRET, "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
                   "AWS_EC2_METADATA_DISABLED": "true", "URI": URI}
            env.pop("AWS_ENDPOINT_URL_S3")
            done = subprocess.run([sys.executable, "-c", RUNAI], env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-1500:])
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if result["bytes"] <= 0:
                raise RuntimeError("Run:ai returned no tensors")
            return float(result["fetch"])

        ceiling_serve = "ceiling: fastload serve (uvicorn + SigV4), parallel ranged GETs"
        ceiling_nginx = "ceiling: nginx (sendfile), parallel ranged GETs"
        ceiling_peer_part = f"ceiling: fastload serve, parallel ranged GETs of {args.peer_part_size} (the peer fetch's)"
        from_peer = "cold node <- peer A's RAM (fastload fetch, verified)"
        from_origin = "cold node <- S3 origin (fastload fetch, peers off)"
        through = "miss through a cold fastload serve (parallel ranged GETs)"
        runai_row = "Run:ai Model Streamer through fastload serve A (hit)"
        methods: dict[str, Callable[[], float]] = {
            ceiling_serve: engine(peer.client(), name=ceiling_serve, pid=peer.process.pid),
            ceiling_peer_part: engine(peer.client(), peer_part, name=ceiling_peer_part, pid=peer.process.pid),
            from_peer: cold(base, from_peer),
            shared_row: cold(shared_env, "shared"),
            from_origin: cold(no_peers, from_origin),
            through: miss_through_endpoint,
        }
        if nginx is not None:
            import boto3 as _boto3
            from botocore import UNSIGNED
            from botocore.config import Config

            methods[ceiling_nginx] = engine(_boto3.client(
                "s3", endpoint_url=f"http://127.0.0.1:{nginx_port}", region_name="us-east-1",
                config=Config(signature_version=UNSIGNED, max_pool_connections=32)))
        try:
            import runai_model_streamer  # noqa: F401

            methods[runai_row] = runai
        except ImportError:
            notes.append("Run:ai Model Streamer is not installed: its row is missing")
        row_ids = {ceiling_serve: "ceiling", ceiling_peer_part: "ceiling-peer-part", from_peer: "peer",
                   shared_row: "shared", from_origin: "origin", through: "miss", ceiling_nginx: "nginx",
                   runai_row: "runai"}
        methods = {name: run for name, run in methods.items() if selected(row_ids[name])}
        failed: set[str] = set()
        shuffler = random.Random(args.rounds)
        for round_index in range(args.rounds):
            for name in shuffler.sample(list(methods), len(methods)):
                if name in failed:
                    continue
                try:
                    seconds = methods[name]()
                except Exception as exc:
                    failed.add(name)
                    notes.append(f"{name} failed: {exc!r}"[:400])
                    print(notes[-1], flush=True)
                    continue
                timings.setdefault(name, []).append(seconds)
                print(f"round {round_index + 1}: {name:<62} {seconds:7.2f} s", flush=True)
    finally:
        for node in nodes:
            node.stop()
        if nginx is not None:
            nginx.terminate()
            nginx.wait()
        origin.stop()
        redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)

    medians = {name: statistics.median(values) for name, values in timings.items()}
    ceiling = medians.get(ceiling_serve)
    lines = ["| source [rounds] | median s | MiB/s | vs fastload serve ceiling | whole process s |",
             "|---|---:|---:|---:|---:|"]
    for name, seconds in medians.items():
        share = f"{100 * ceiling / seconds:.0f}%" if ceiling else "-"
        wall = f"{statistics.median(walls[name]):.2f}" if name in walls else "-"
        lines.append(f"| {name} [{len(timings[name])}/{args.rounds}] | {seconds:.2f} | "
                     f"{size / seconds / MiB:.0f} | {share} | {wall} |")
    if from_origin in medians and through in medians:
        notes.append(f"miss through the endpoint / direct fetch from the origin: "
                     f"{medians[through] / medians[from_origin]:.2f}x (target <= 1.15x)")
    if ceiling and from_peer in medians:
        notes.append(f"peer fetch / fastload serve ceiling: {100 * ceiling / medians[from_peer]:.0f}% (target >= 80%)")
    if ceiling_peer_part in medians and from_peer in medians:
        notes.append(f"peer fetch / the ceiling at the peer fetch's range size: "
                     f"{100 * medians[ceiling_peer_part] / medians[from_peer]:.0f}%")
    if ceiling and transfers.get(from_peer):
        transfer = statistics.median(transfers[from_peer])
        notes.append(f"of which the transfer from the peer (ranged GETs, writes into /dev/shm, block checks): "
                     f"median {transfer:.2f} s ({', '.join(f'{t:.2f}' for t in transfers[from_peer])}), "
                     f"{100 * ceiling / transfer:.0f}% of the ceiling"
                     + (f" ({100 * medians[ceiling_peer_part] / transfer:.0f}% of the one at its range size)"
                        if ceiling_peer_part in medians else "")
                     + "; the rest is imports, resolving at the origin, the peer lookup, preparing the destination")
    for name, values in server_cpu.items():
        notes.append(f"CPU of the serving fastload serve node during '{name}': "
                     + ", ".join(f"{value:.2f}" for value in values) + f" s ({size / MiB:.0f} MiB)")
    if ceiling and ceiling_nginx in medians:
        notes.append(f"nginx ceiling / fastload serve ceiling: {ceiling / medians[ceiling_nginx]:.2f}x")
    text = "\n".join([f"Checkpoint {size / MiB:.0f} MiB; origin SeaweedFS on loopback; {args.concurrency} parallel "
                      f"ranged GETs of {args.part_size}; destinations in /dev/shm; load average "
                      f"{load_at_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.", "", *lines, "",
                      *[f"- {n}" for n in notes]])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
