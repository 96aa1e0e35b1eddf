"""A small fleet on one machine: K nodes x M replicas started at once, stock against fastload.

Each node has its own /dev/shm tier directory, local-disk directory (its FASTLOAD_CACHE_DIR) and process
group; all nodes share one directory standing in for the Ceph mount, one Redis (fastload's cross-node
lease) and one S3 origin: SeaweedFS (``weed mini``), not moto, because moto copies the whole object for
every ranged GET and tops out near 0.5 GB/s, which would measure moto rather than the fleet. Every node
reaches the origin through its own port of a rate-limiting proxy (throttle.py), so the bytes each node
pulls are counted there and checked against SeaweedFS's own bytes-sent counter.

Limits (``--origin``, ``--node-net``, ``--shared``, ``--per-connection``, in MB/s, 0 = none) are token
buckets shared by every process: the origin's total egress, each node's network (origin and shared-mount
reads both cross it) and the shared mount's total read bandwidth. Writes into the shared mount are not
paced (they arrive at the origin's pace anyway) but are counted.

Methods (all replicas of a run are launched together; seconds to ready = from that launch to the replica's
HTTP server listening with the model loaded, then checked with one correct answer):
  * stock    -- replica.py stock: each replica downloads ``model.pt`` with boto3 and ``torch.load``s it;
  * fastload -- replica.py fastload: ``prefetch(background=True)`` first thing, then ``load_model`` (shm <-
                local disk <- shared <- S3): one node downloads under the Redis lease into its RAM and writes
                the shared mount through; the others wait for the shared copy;
  * fastload-late -- the same, but the fetch starts only after torch is imported (the order before);
  * peer     -- fastload with ``fastload serve --advertise`` on every node (started before the launch) and
                the Redis registry: the waiting nodes pull the first node's RAM copy as soon as it is
                advertised, over both nodes' paced networks;
  * bentoml  -- the BentoML example (examples/bentoml, ``@fastload_bentoml.accelerate``): one ``bentoml
                serve`` per node with M workers; a worker is ready when BentoML logs its service initialized.

Totals per run: origin bytes (proxy and SeaweedFS), shared-mount bytes read and written, Redis commands
(INFO commandstats), per-node network bytes. Results go to a JSON file (the simulator's calibration input)
and a Markdown table.

Usage: python benchmarks/fleet/harness.py [--nodes 3] [--replicas 2] [--size 1GiB] [--methods stock,fastload]
           [--rounds 1] [--origin 0] [--node-net 0] [--shared 0] [--per-connection 0] [--out bench-out/fleet.json]
       python benchmarks/fleet/harness.py --quick      (2 nodes x 1 replica, a 70 KB model: a smoke test)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(REPO / "examples" / "bentoml"), str(HERE)]

from throttle import Bucket  # noqa: E402

MB = 1_000_000
MiB = 2**20
SAFETENSORS_PREFIX = "fleet/"
PICKLE_KEY = "fleet-stock/model.pt"
METHODS = ("stock", "fastload", "fastload-late", "peer", "bentoml")
SERVE_KEY, SERVE_SECRET = "fleet-serve", "fleet-serve-secret"  # the nodes' credentials for each other's endpoint


@dataclass
class Limits:
    """Bandwidth limits in bytes per second (None: unlimited)."""

    origin: float | None = None
    node_net: float | None = None
    shared: float | None = None
    per_connection: float | None = None

    def describe(self) -> str:
        def show(rate: float | None) -> str:
            return "none" if rate is None else f"{rate / MB:g} MB/s"

        return (f"origin {show(self.origin)}, node network {show(self.node_net)}, shared mount "
                f"{show(self.shared)}, per connection {show(self.per_connection)}")


@dataclass
class Fleet:
    """The services and directories one harness run shares between its methods and rounds."""

    work: Path
    shm_root: Path
    nodes: int
    replicas: int
    width: int
    layers: int
    limits: Limits
    size: int = 0
    expected: list[float] = field(default_factory=list)
    seaweed: Any = None
    redis: Any = None
    replica_cpu: float = 0.0  # CPU-seconds the last run's replicas used (plain replicas only)
    object_checksum: dict[str, str] = field(default_factory=dict)  # the uploaded safetensors' ETag and checksum

    def service_pids(self) -> list[int]:
        return [server._process.pid for server in (self.seaweed, self.redis) if server._process is not None]

    def node_dirs(self, node: int) -> tuple[Path, Path]:
        return self.shm_root / f"node{node}", self.work / f"node{node}" / "cache"

    @property
    def shared_dir(self) -> Path:
        return self.work / "shared"

    def bucket(self, name: str) -> Path:
        return self.work / "links" / f"{name}.bucket"

    def reset(self) -> None:
        """Empty every tier and link counter and Redis: each run starts from a cold fleet."""
        for node in range(self.nodes):
            for directory in self.node_dirs(node):
                shutil.rmtree(directory, ignore_errors=True)
            shutil.rmtree(self.work / f"node{node}", ignore_errors=True)
            (self.work / f"node{node}" / "scratch").mkdir(parents=True)
        shutil.rmtree(self.shared_dir, ignore_errors=True)
        self.shared_dir.mkdir(parents=True)
        shutil.rmtree(self.work / "links", ignore_errors=True)
        (self.work / "links").mkdir()
        redis_call(self.redis, "FLUSHALL")
        redis_call(self.redis, "CONFIG", "RESETSTAT")

    def node_env(self, node: int, proxy_port: int, serve_ports: list[int] | None = None) -> dict[str, str]:
        """A node's environment; with ``serve_ports`` (one per node) its fastload also fetches from the other
        nodes' RAM through their ``fastload serve``, paced on both nodes' networks."""
        shm, cache = self.node_dirs(node)
        rate = self.limits
        links = [f"{self.bucket('shared')}={rate.shared or 0}", f"{self.bucket(f'node{node}')}={rate.node_net or 0}"]
        peers: dict[str, str] = {}
        if serve_ports is not None:
            uplinks = [f"127.0.0.1:{port}={self.bucket(f'node{n}-out')}={rate.node_net or 0}"
                       for n, port in enumerate(serve_ports)]
            peers = {"FASTLOAD_SERVE_ACCESS_KEY_ID": SERVE_KEY, "FASTLOAD_SERVE_SECRET_ACCESS_KEY": SERVE_SECRET,
                     "FASTLOAD_PEER_TTL": "1.5",  # claims renewed every 0.5 s: a new copy is advertised within that
                     "FLEET_NODE_BUCKET": f"{self.bucket(f'node{node}')}={rate.node_net or 0}",
                     "FLEET_PEER_UPLINKS": ",".join(uplinks)}
        return {
            **os.environ,
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{proxy_port}", "AWS_ACCESS_KEY_ID": "fleet",
            "AWS_SECRET_ACCESS_KEY": "fleet", "AWS_DEFAULT_REGION": "us-east-1",
            "FASTLOAD_SHM_DIR": str(shm), "FASTLOAD_CACHE_DIR": str(cache), "FASTLOAD_SHARED_DIR": str(self.shared_dir),
            "FASTLOAD_REDIS_URL": self.redis.url, "FASTLOAD_TIER": "shm",
            "FLEET_SHARED_BUCKETS": ",".join(links),
            "PYTHONPATH": os.pathsep.join([str(HERE / "site"), str(REPO)]),
            "OMP_NUM_THREADS": "1",  # 2 cores for the whole fleet: torch's thread pools would only fight
            **peers,
        }


def redis_call(server: Any, *command: str) -> Any:
    import redis

    client = redis.Redis(port=server.port)
    try:
        return client.execute_command(*command)
    finally:
        client.close()


def write_model(fleet: Fleet) -> None:
    """The demo model (examples/bentoml/demo_model.py) as safetensors under ``fleet/`` and as ``torch.save``
    for the stock path, uploaded straight to the origin (not through the proxy, so not counted)."""
    import boto3
    import torch
    from demo_model import example_input, make  # type: ignore[import-not-found]
    from safetensors.torch import save_file

    model = make(fleet.width, fleet.layers)
    with torch.inference_mode():
        fleet.expected = model(torch.tensor(example_input(fleet.width))).tolist()
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    client = boto3.client("s3", endpoint_url=fleet.seaweed.endpoint_url, aws_access_key_id="fleet",
                          aws_secret_access_key="fleet", region_name="us-east-1")
    staging = fleet.work / "upload"
    staging.mkdir(exist_ok=True)
    save_file(state, str(staging / "model.safetensors"), metadata={"width": str(fleet.width),
                                                                    "layers": str(fleet.layers)})
    torch.save(state, staging / "model.pt")
    fleet.size = (staging / "model.safetensors").stat().st_size  # what fastload fetches, header included
    del model, state
    # As a user's pipeline would: boto3's defaults (8 MiB parts, and since boto3 1.36 a CRC32 checksum the
    # object keeps where the server supports it), so fastload meets the object a real origin would hold.
    client.upload_file(str(staging / "model.safetensors"), "models", f"{SAFETENSORS_PREFIX}model.safetensors")
    client.upload_file(str(staging / "model.pt"), "models", PICKLE_KEY)
    head = client.head_object(Bucket="models", Key=f"{SAFETENSORS_PREFIX}model.safetensors", ChecksumMode="ENABLED")
    fleet.object_checksum = {k: v for k, v in head.items() if k.startswith("Checksum") or k == "ETag"}
    shutil.rmtree(staging)


class Proxy:
    """throttle.py's proxy in its own process: one port per node, paced on the origin's and the node's links."""

    def __init__(self, fleet: Fleet) -> None:
        rate = fleet.limits
        links = [f"{fleet.bucket('origin')}={rate.origin or 0},{fleet.bucket(f'node{n}')}={rate.node_net or 0}"
                 for n in range(fleet.nodes)]
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "throttle.py"), f"127.0.0.1:{fleet.seaweed.port}",
             str(rate.per_connection or 0), *links], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the throttling proxy exited before it listened")
        self.ports: list[int] = json.loads(line)["ports"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Replica:
    node: int
    index: int
    ready: float | None = None  # seconds after the launch
    port: int | None = None
    marks: dict[str, float] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)  # the store's, seconds after the launch
    settled: threading.Event = field(default_factory=threading.Event)  # READY seen, or the process ended


def post(url: str, body: bytes = b"{}") -> Any:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def check(answer: list[float], expected: list[float], where: str) -> None:
    flat = answer[0] if answer and isinstance(answer[0], list) else answer
    if len(flat) != len(expected) or any(abs(a - b) > 1e-4 for a, b in zip(flat, expected, strict=True)):
        raise SystemExit(f"{where}: wrong answer {flat[:3]} (expected {expected[:3]})")


class PeerServers:
    """``fastload serve --advertise`` on every node, started before the launch (a node daemon, like the
    kubelet: already up when a deploy starts replicas) and stopped after the run."""

    def __init__(self, fleet: Fleet, ports: list[int]) -> None:
        from fastload_devservices._process import free_port

        self.ports = [free_port() for _ in range(fleet.nodes)]
        self.processes: list[subprocess.Popen[bytes]] = []
        for node in range(fleet.nodes):
            env = fleet.node_env(node, ports[node], self.ports)
            log = open(fleet.work / f"node{node}" / "serve.log", "ab")  # noqa: SIM115 (kept by the child)
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "fastload_core", "serve", "--port", str(self.ports[node]), "--advertise",
                 f"127.0.0.1:{self.ports[node]}"], env=env, stdout=log, stderr=log, cwd=fleet.work))
            log.close()
        deadline = time.time() + 60
        for node, port in enumerate(self.ports):
            while True:
                if self.processes[node].poll() is not None:
                    raise SystemExit(f"fastload serve on node {node} exited: "
                                     f"{(fleet.work / f'node{node}' / 'serve.log').read_text()[-2000:]}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise SystemExit(f"fastload serve on node {node} did not listen in 60 s") from None
                    time.sleep(0.1)

    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start_replicas(fleet: Fleet, method: str, ports: list[int], launched: float,
                   timeout: float, serve_ports: list[int] | None = None) -> list[Replica]:
    """Launch every plain replica (one process group per node), wait until all print READY."""
    replicas: list[Replica] = []
    processes: list[subprocess.Popen[str]] = []
    groups: list[int] = []
    mode = "fastload" if method == "peer" else method
    for node in range(fleet.nodes):
        env = fleet.node_env(node, ports[node], serve_ports)
        group = 0  # the node's process group: its first replica's pid
        for index in range(fleet.replicas):
            process = subprocess.Popen(
                [sys.executable, str(HERE / "replica.py"), mode, "--width", str(fleet.width), "--layers",
                 str(fleet.layers), "--uri", f"s3://models/{SAFETENSORS_PREFIX}", "--key", PICKLE_KEY,
                 "--scratch", str(fleet.work / f"node{node}" / "scratch")],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                preexec_fn=functools.partial(os.setpgid, 0, group))  # Popen(process_group=) needs 3.11
            group = group or process.pid
            processes.append(process)
            replicas.append(Replica(node, index))
        groups.append(group)
    errors: list[str] = []

    def watch(replica: Replica, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None and process.stderr is not None
        for line in process.stdout:  # READY, then the store's later events until the process ends
            if line.startswith("READY "):
                record = json.loads(line[6:])
                replica.port = record["port"]
                replica.marks = {k: record[k] - launched for k in MARKS if k in record}
                replica.events = [{**e, "t": e["t"] - launched} for e in record.get("events", [])]
                replica.ready = record["ready"] - launched
                replica.settled.set()
            elif line.startswith("EVENT "):
                event = json.loads(line[6:])
                replica.events.append({**event, "t": event["t"] - launched})
        if replica.ready is None:
            errors.append(f"node {replica.node} replica {replica.index} exited: {process.stderr.read()[-3000:]}")
            replica.settled.set()

    threads = [threading.Thread(target=watch, args=pair, daemon=True) for pair in zip(replicas, processes, strict=True)]
    for thread in threads:
        thread.start()
    for replica in replicas:
        replica.settled.wait(max(0.0, launched + timeout - time.time()))
    try:
        if errors or any(r.ready is None for r in replicas):
            raise SystemExit("; ".join(errors) or f"{method}: not every replica was ready after {timeout} s")
        for replica in replicas:
            check(post(f"http://127.0.0.1:{replica.port}/"), fleet.expected, f"{method} node {replica.node}")
        if method != "stock":
            wait_written_through(fleet, replicas, deadline=time.time() + 120)
    finally:
        fleet.replica_cpu = cpu_seconds([process.pid for process in processes])
        for group in groups:
            os.killpg(group, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return replicas


MARKS = ("started", "prefetch_started", "imported", "fetched", "loaded")


def wait_written_through(fleet: Fleet, replicas: list[Replica], deadline: float) -> None:
    """Keep the replicas up until every node's write-through has published its local-disk copy and one node
    has published the shared copy (they run on after the replicas are ready, competing for the same cores
    and disks), so the timeline shows when the fleet settled. Gives up quietly at ``deadline``."""
    def done() -> bool:
        finished = {(r.node, e["tier"]) for r in replicas for e in list(r.events)
                    if e["event"] == "fetch_finish" and e.get("error") is None}
        return (all((n, "local_disk") in finished for n in range(fleet.nodes))
                and any(tier == "shared_fs" for _, tier in finished))

    while not done() and time.time() < deadline:
        time.sleep(0.1)


def start_bentoml(fleet: Fleet, ports: list[int], launched: float, timeout: float) -> list[Replica]:
    """One ``bentoml serve`` of examples/bentoml per node with M workers; a worker's ready time is when its
    "Service ... initialized" line appears in the node's log."""
    from fastload_devservices.bento import BentoServe

    servers = []
    for node in range(fleet.nodes):
        env = fleet.node_env(node, ports[node])
        env.update({"DEMO_WEIGHTS": f"s3://models/{SAFETENSORS_PREFIX}", "DEMO_WORKERS": str(fleet.replicas)})
        servers.append(BentoServe("service:Demo", cwd=REPO / "examples" / "bentoml",
                                  home=fleet.work / f"node{node}" / "bentoml",
                                  log=fleet.work / f"node{node}" / "bentoml.log", env=env).start())
    replicas = [Replica(node, index) for node in range(fleet.nodes) for index in range(fleet.replicas)]
    try:
        while any(r.ready is None for r in replicas):
            now = time.time()
            if now - launched > timeout:
                raise SystemExit(f"bentoml: not every worker was ready after {timeout} s")
            for node, server in enumerate(servers):
                if server.exited() is not None:
                    raise SystemExit(f"bentoml serve on node {node} exited:\n{server.output()[-3000:]}")
                waiting = [r for r in replicas if r.node == node and r.ready is None]
                newly = server.initialized() - (fleet.replicas - len(waiting))  # log lines not yet counted
                for replica in waiting[:max(0, newly)]:
                    replica.ready = now - launched
            time.sleep(0.05)
        for node, server in enumerate(servers):
            from demo_model import example_input

            body = json.dumps({"x": example_input(fleet.width)}).encode()
            deadline = time.time() + 60
            while True:  # the HTTP port may open a moment after the last worker's log line
                try:
                    check(post(f"{server.url}/predict", body), fleet.expected, f"bentoml node {node}")
                    break
                except OSError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.1)
    finally:
        for server in servers:
            if server.process is not None:
                os.killpg(server.process.pid, signal.SIGTERM)
                try:
                    server.process.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(server.process.pid, signal.SIGKILL)
                    server.process.wait()
    return replicas


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU-seconds the live processes ``pids`` have used so far (0 for one that is gone)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def host_busy() -> float:
    """CPU-seconds the whole machine has spent busy since boot (everything but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / _TICK


def shared_written(fleet: Fleet) -> int:
    return sum(path.stat().st_size for path in fleet.shared_dir.rglob("*") if path.is_file()
               and "files" in path.parts)


def run_once(fleet: Fleet, method: str, timeout: float) -> dict[str, Any]:
    fleet.reset()
    proxy = Proxy(fleet)
    servers = PeerServers(fleet, proxy.ports) if method == "peer" else None
    sent_before = fleet.seaweed.sent_bytes()
    fleet.replica_cpu = 0.0
    services = [*fleet.service_pids(), proxy.process.pid, *(servers.pids() if servers else [])]
    services_before, busy_before = cpu_seconds(services), host_busy()
    launched = time.time()
    try:
        if method == "bentoml":
            replicas = start_bentoml(fleet, proxy.ports, launched, timeout)
        else:
            replicas = start_replicas(fleet, method, proxy.ports, launched, timeout,
                                      servers.ports if servers else None)
        # The machine is shared: what the rest of it used meanwhile is CPU the fleet did not get.
        window = time.time() - launched
        fleet_cpu = fleet.replica_cpu + cpu_seconds(services) - services_before
        others = max(0.0, host_busy() - busy_before - fleet_cpu)
    finally:
        proxy.stop()
        if servers is not None:
            servers.stop()
    stats = redis_call(fleet.redis, "INFO", "commandstats")
    commands = {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}
    for name in ("flushall", "config|resetstat", "info", "config"):  # the harness's own
        commands.pop(name, None)
    commands["hello"] = commands.get("hello", 1) - 1  # the harness's connection's handshake
    commands = {name: calls for name, calls in commands.items() if calls}
    links = {name: Bucket(fleet.bucket(name), None).total
             for name in ("origin", "shared", *(f"node{n}{way}" for n in range(fleet.nodes) for way in ("", "-out")))}
    ready = [r.ready or 0.0 for r in replicas]
    return {
        "method": method, "nodes": fleet.nodes, "replicas": fleet.replicas, "size": fleet.size,
        "limits": fleet.limits.__dict__, "all_ready": max(ready), "first_ready": min(ready),
        "timeline": [{"node": r.node, "index": r.index, "ready": r.ready, **r.marks, "events": r.events}
                     for r in replicas],
        "origin_bytes": links["origin"], "origin_bytes_seaweed": fleet.seaweed.sent_bytes() - sent_before,
        "shared_read": links["shared"], "shared_written": shared_written(fleet),
        "node_net": [links[f"node{n}"] for n in range(fleet.nodes)],
        "peer_bytes": sum(links[f"node{n}-out"] for n in range(fleet.nodes)),
        "redis_commands": commands, "redis_ops": sum(commands.values()),
        "fleet_cpu": fleet_cpu if method != "bentoml" else None, "others_cpu": others if method != "bentoml" else None,
        "cores_available": (os.cpu_count() or 1) - others / window if method != "bentoml" else None,
    }


def sizing(size: int) -> tuple[int, int]:
    """(width, layers) of a demo model close to ``size`` bytes: 64 MiB layers above 256 MiB, else one
    square layer."""
    if size >= 256 * MiB:
        return 4096, max(1, round(size / (4096 * 4096 * 4)))
    width = max(8, int((size / 4) ** 0.5))
    return width, 1


def summary(results: list[dict[str, Any]], fleet: Fleet, command: str, load: tuple[float, ...]) -> str:
    lines = [f"Command: `{command}`; load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.",
             f"{fleet.nodes} nodes x {fleet.replicas} replicas, a {fleet.size / 2**30:.3f} GiB model; limits: "
             f"{fleet.limits.describe()}.", "",
             "| method | all ready s (median) | first ready s | rounds (all ready) | origin bytes (x model) | "
             "shared read / written (x model) | peer bytes (x model) | Redis ops |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        size = fleet.size
        lines.append(
            f"| {method} | {statistics.median(r['all_ready'] for r in runs):.2f} | "
            f"{statistics.median(r['first_ready'] for r in runs):.2f} | "
            f"{', '.join(format(r['all_ready'], '.1f') for r in runs)} | "
            f"{statistics.median(r['origin_bytes'] for r in runs) / size:.2f} | "
            f"{statistics.median(r['shared_read'] for r in runs) / size:.2f} / "
            f"{statistics.median(r['shared_written'] for r in runs) / size:.2f} | "
            f"{statistics.median(r.get('peer_bytes', 0) for r in runs) / size:.2f} | "
            f"{statistics.median(r['redis_ops'] for r in runs):.0f} |")
    if "stock" in methods:
        stock = statistics.median(r["all_ready"] for r in results if r["method"] == "stock")
        for method in methods[1:]:
            mine = statistics.median(r["all_ready"] for r in results if r["method"] == method)
            lines.append(f"\n{method}: all replicas ready in {mine / stock:.2f}x the stock path's time "
                         f"({stock / mine:.1f}x faster).")
    return "\n".join(lines) + "\n"


def first(events: list[dict[str, Any]], kind: str, tier: str) -> float | None:
    return next((e["t"] for e in events if e["event"] == kind and e.get("tier") == tier), None)


def stages(run: dict[str, Any]) -> str:
    """One run's replicas, stage by stage (seconds since the launch): where a start's time went. For fastload,
    the replica that filled its node's RAM tier shows the fill; its neighbours wait on the node's single
    flight and then hit; the write-through into the node's local disk (and, on one node, the shared mount)
    runs on after the replica is ready."""
    def show(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    lines = [f"{run['method']}, {run['nodes']}x{run['replicas']}: seconds since launch", "",
             "| node.replica | script runs | torch imported | fetch from | fetch start | fetch end | loaded | ready | "
             "write-through shared_fs | write-through local_disk |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(run["timeline"], key=lambda r: (r["node"], r["index"])):
        events = r.get("events", [])
        if run["method"] == "stock":
            source, start, end = "origin", r.get("imported"), r.get("fetched")
        else:
            start, end = first(events, "fetch_start", "shm"), first(events, "fetch_finish", "shm")
            hit = first(events, "hit", "shm")
            peers = [e for e in events if e["event"] == "peer_fetch" and e.get("error") is None]
            shared_hit = first(events, "hit", "shared_fs")
            if start is None:
                source, end = "node's own fill (hit)", hit
            elif peers:
                source = "peer"
            elif shared_hit is not None and shared_hit <= (end or shared_hit):
                source = "shared mount"
            else:
                source = "origin (lease)"
        through = [f"{show(first(events, 'fetch_start', tier))}-{show(first(events, 'fetch_finish', tier))}"
                   if first(events, "fetch_start", tier) is not None else "" for tier in ("shared_fs", "local_disk")]
        lines.append(f"| {r['node']}.{r['index']} | {show(r.get('started'))} | {show(r.get('imported'))} | {source} | "
                     f"{show(start)} | {show(end)} | {show(r.get('loaded'))} | {show(r['ready'])} | {through[0]} | "
                     f"{through[1]} |")
    return "\n".join(lines) + "\n"


def parse_rate(text: str) -> float | None:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a rate is MB/s, 0 for no limit")
    return value * MB or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=2, help="replicas per node")
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--methods", default="stock,fastload")
    parser.add_argument("--rounds", type=int, default=1)
    for name in ("origin", "node-net", "shared", "per-connection"):
        parser.add_argument(f"--{name}", type=parse_rate, default=None, metavar="MB/s", help="0: no limit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take")
    parser.add_argument("--quick", action="store_true", help="2 nodes x 1 replica, a 70 KB model")
    parser.add_argument("--out", default=str(REPO / "bench-out" / "fleet.json"))
    args = parser.parse_args(argv)
    from fastload_core.storage.settings import parse_size

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        parser.error(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    size = parse_size(args.size, variable="--size")
    if not isinstance(size, int) or size < 4096:
        parser.error("--size must be a byte size of at least 4KiB, such as 1GiB")
    if args.nodes < 1 or args.replicas < 1 or args.rounds < 1:
        parser.error("--nodes, --replicas and --rounds must be at least 1")
    if args.quick:
        args.nodes, args.replicas = 2, 1
        width, layers = 64, 4
    else:
        width, layers = sizing(size)

    from benchmarks.bench_bentoml import CountingSeaweed
    from fastload_devservices.redis import RedisServer

    load = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="fl-fleet-", dir="/tmp"))
    fleet = Fleet(work=work, shm_root=Path("/dev/shm") / work.name, nodes=args.nodes, replicas=args.replicas,
                  width=width, layers=layers,
                  limits=Limits(args.origin, args.node_net, args.shared, args.per_connection))
    fleet.seaweed = CountingSeaweed(work / "weed")
    fleet.redis = RedisServer()
    results: list[dict[str, Any]] = []
    try:
        fleet.seaweed.start()
        fleet.redis.start()
        write_model(fleet)
        print(f"{args.nodes} nodes x {args.replicas} replicas, model {fleet.size / MiB:.1f} MiB "
              f"(width {width}, {layers} layers); {fleet.limits.describe()}", flush=True)
        for number in range(1, args.rounds + 1):
            order = list(methods)
            random.shuffle(order)
            for method in order:
                result = run_once(fleet, method, args.timeout)
                result["round"] = number
                results.append(result)
                print(f"round {number}: {method:<8} all ready {result['all_ready']:6.2f} s, origin "
                      f"{result['origin_bytes'] / fleet.size:.2f}x, shared read "
                      f"{result['shared_read'] / fleet.size:.2f}x, Redis ops {result['redis_ops']}", flush=True)
    finally:
        fleet.seaweed.stop()
        fleet.redis.stop()
        shutil.rmtree(fleet.shm_root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    command = "python benchmarks/fleet/harness.py " + " ".join(argv if argv is not None else sys.argv[1:])
    end_load = os.getloadavg()
    report = summary(results, fleet, command.strip(), load)
    report += (f"\nLoad average at the end {end_load[0]:.2f} / {end_load[1]:.2f} / {end_load[2]:.2f}. The model "
               f"object: {json.dumps(fleet.object_checksum)}.\n")
    report += "".join("\n" + stages(r) for r in results if r["method"] != "bentoml")
    print("\n" + report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command.strip(), "load_average": load, "load_average_end": end_load,
                               "object": fleet.object_checksum, "results": results}, indent=1))
    out.with_suffix(".md").write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
