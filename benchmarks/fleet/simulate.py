"""A discrete-event model of a fleet cold start, calibrated on the harness's runs, projected to 1000 nodes.

The model is a fluid-flow discrete-event simulation in plain Python (no simpy: the one thing it needs
beyond a clock and events is bandwidth sharing, which simpy does not do). Every transfer is a *flow* of
bytes over a list of *links* -- the origin's total egress, a per-connection cap, a node's network in and
out, the shared mount's read bandwidth, a peer's uplink -- and CPU work is a flow of CPU-seconds over a
node's (or, when calibrating on the harness, the one host's) cores, one core at most per process. Between
two events, rates are max-min fair (progressive filling: raise every unfrozen flow's rate together until a
link fills or a flow meets its cap, freeze those, go on), which is how TCP flows sharing a bottleneck
behave to first order. The next event is the earliest of a flow's completion and a timer.

What a replica does, per strategy (the same steps the harness's replicas take, in the core's current fill
order, issue 12's RAM-first fill):
  * stock:    start the process (import CPU), download the whole model from the origin over its own
              ``connections`` parallel ranged GETs (boto3), then torch.load + random init + load_state_dict
              (CPU per GiB);
  * shared:   fastload as measured ("fastload" in the harness): the replica starts its fetch first
              (``fetch_setup_cpu``: imports, S3 client, resolve) while it imports torch on the same process
              (one core between them: the GIL); the node's first fetch is the node's single flight. Nodes take
              the Redis lease (one SET per attempt, every ``lease_poll`` s while another holds it); the holder
              downloads origin -> its RAM tier (its replicas map it at once), and its write-through copies
              RAM -> shared mount (holding the lease until that is published) and then RAM -> local disk; every
              other node wakes when the shared copy is published, copies it into RAM (shared-mount read, node
              network, a verified copy's CPU) and writes its local disk through in the background;
  * origin:   fastload without a shared mount: each node's single flight downloads from the origin;
  * peer:     fastload with ``fastload serve --advertise`` on every node, as built: a node's new RAM copy is
              in the Redis registry ``advertise_delay`` s after it lands (the store claims it itself when
              FASTLOAD_PEER_ADVERTISE is set); a waiting node that wakes pulls from an advertised peer with a
              free upload slot (over the peer's uplink and its own network, CPU on both ends); a peer serves at
              most ``peer_slots`` fills at once (``fastload serve --max-uploads``, 2 by default), and a waiter
              that every holder refuses waits for a slot (``busy_pause``, then the registry again) -- not the
              mount, not the origin -- so copies spread as a tree: each finished fill is one more holder. With
              no holder advertised it reads the shared copy once published;
  * peer-unlimited: no upload limit (``--max-uploads 0``): every waiting node pulls from the first node
              that advertises, over its one uplink (the core before the limit).
Assumptions: nodes start together; one model version; no request latency beyond ``lease_poll`` and the
advertise delay; a peer serves only once it holds the whole model (as built: it serves published entries);
disks are faster than the links (the local-disk write-through is CPU only); within a process, Python work
(imports, setup) shares one core; the download's hashing and the copies run outside the GIL.

Usage: python benchmarks/fleet/simulate.py bench-out/fleet-*.json [--calibrate SHAPES] [--out docs/fleet]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import statistics
import sys
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

GiB = 2**30
MB = 1_000_000
STRATEGIES = ("stock", "origin", "shared", "peer", "peer-unlimited")


# --- the engine -----------------------------------------------------------------------------------------
class Link:
    """A shared capacity (bytes/s, or cores for a CPU pool) and what has crossed it."""

    def __init__(self, name: str, capacity: float | None, kind: str = "") -> None:
        self.name = name
        self.capacity = capacity  # None: unlimited
        self.kind = kind or name
        self.carried = 0.0
        self.busy_time = 0.0  # seconds at which it was full


@dataclass(eq=False)
class Flow:
    amount: float
    links: list[tuple[Link, float]]  # (link, units of the link per unit of amount)
    cap: float | None
    done: Event
    rate: float = 0.0


class Event:
    def __init__(self) -> None:
        self.triggered = False
        self.waiters: list[Generator[Any, Any, None]] = []


Step = tuple[str, Any]
Process = Generator[Step, Any, None]


class Simulation:
    def __init__(self) -> None:
        self.now = 0.0
        self.flows: list[Flow] = []
        self._timers: list[tuple[float, int, Process]] = []
        self._ready: list[Process] = []
        self._order = itertools.count()
        self.saturated: dict[str, float] = {}  # link kind -> seconds some link of that kind was full

    def start(self, process: Process) -> None:
        self._ready.append(process)

    def trigger(self, event: Event) -> None:
        event.triggered = True
        self._ready.extend(event.waiters)
        event.waiters.clear()

    def _advance(self, process: Process) -> None:
        try:
            kind, value = next(process)
        except StopIteration:
            return
        if kind == "delay":
            heapq.heappush(self._timers, (self.now + value, next(self._order), process))
        elif kind == "wait":
            if value.triggered:
                self._ready.append(process)
            else:
                value.waiters.append(process)
        elif kind == "flow":
            amount, links, cap = value
            done = Event()
            done.waiters.append(process)
            if amount <= 0:
                self.trigger(done)
            else:
                self.flows.append(Flow(amount, [(link, w) for link, w in links if w > 0], cap, done))
        else:
            raise ValueError(f"unknown step {kind!r}")

    def _share(self) -> None:
        """Max-min fair rates with per-flow caps and per-link weights (progressive filling)."""
        left = {id(link): link.capacity for flow in self.flows for link, _ in flow.links}
        active = set(range(len(self.flows)))
        level = 0.0
        for flow in self.flows:
            flow.rate = 0.0
        saturated: set[str] = set()
        while active:
            step = math.inf
            load: dict[int, float] = {}
            for index in active:
                for link, weight in self.flows[index].links:
                    if link.capacity is not None:
                        load[id(link)] = load.get(id(link), 0.0) + weight
            for key, weight in load.items():
                capacity = left[key]
                assert capacity is not None
                step = min(step, capacity / weight)
            for index in active:
                cap = self.flows[index].cap
                if cap is not None:
                    step = min(step, cap - level)
            if step == math.inf:  # nothing limits these flows: treat as instantaneous
                step = 1e18
            level += step
            for key, weight in load.items():
                capacity = left[key]
                assert capacity is not None
                left[key] = capacity - step * weight
            frozen = set()
            for index in active:
                flow = self.flows[index]
                if flow.cap is not None and flow.cap - level <= 1e-9 * max(1.0, flow.cap):
                    frozen.add(index)
                for link, _ in flow.links:
                    remaining = left[id(link)]
                    if link.capacity is not None and remaining is not None and remaining <= 1e-9 * link.capacity:
                        frozen.add(index)
                        saturated.add(link.kind)
            for index in frozen:
                self.flows[index].rate = level
            active -= frozen
        self._saturated_now = saturated

    def run(self, until: float = 1e9) -> None:
        while True:
            while self._ready:
                self._advance(self._ready.pop(0))
            if not self.flows and not self._timers:
                return
            self._share()
            finish = min((f.amount / f.rate for f in self.flows if f.rate > 0), default=math.inf)
            timer = self._timers[0][0] - self.now if self._timers else math.inf
            step = min(finish, timer)
            if step == math.inf or self.now + step > until:
                raise RuntimeError(f"simulation stuck at t={self.now:.2f}s with {len(self.flows)} flows")
            for kind in self._saturated_now:
                self.saturated[kind] = self.saturated.get(kind, 0.0) + step
            self.now += step
            still = []
            for flow in self.flows:
                moved = flow.rate * step
                flow.amount -= moved
                for link, weight in flow.links:
                    link.carried += moved * weight
                if flow.amount <= 1e-6 * max(1.0, moved):
                    self.trigger(flow.done)
                else:
                    still.append(flow)
            self.flows = still
            while self._timers and self._timers[0][0] <= self.now + 1e-12:
                self._ready.append(heapq.heappop(self._timers)[2])


def delay(seconds: float) -> Step:
    return ("delay", seconds)


def wait(event: Event) -> Step:
    return ("wait", event)


def flow(amount: float, links: Sequence[tuple[Link, float]], cap: float | None = None) -> Step:
    return ("flow", (amount, list(links), cap))


# --- the fleet ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Params:
    """Links in bytes/s (None: unlimited), CPU in cores and CPU-seconds, times in seconds."""

    origin_bw: float | None = 2.5e9  # the cluster's way to the object store (20 Gbit/s), not S3's own limit
    per_connection_bw: float | None = 90 * MB  # one S3 GET stream
    connections: int = 16  # parallel ranged GETs per download (boto3 and fastload alike)
    node_net_bw: float | None = 3.1e9  # 25 Gbit/s each way
    shared_bw: float | None = 5e9  # the shared mount's total read bandwidth
    shared_write_bw: float | None = 2e9  # the shared mount's write bandwidth (None: unpaced, as in the harness)
    cores_per_node: float = 16
    host_cores: float | None = None  # set: all nodes share these cores (this machine); None: each its own
    import_cpu: float = 3.0  # CPU-seconds of a replica's own start (interpreter, torch, the demo model, server)
    fetch_setup_cpu: float = 1.0  # fastload's part before bytes flow: imports, S3 client, resolve, Redis
    stock_load_cpu_per_gib: float = 1.5  # torch.load + random init + load_state_dict
    download_cpu_per_gib: float = 0.5  # receiving bytes: the client's hashing, the harness's proxy and origin
    copy_cpu_per_gib: float = 0.6  # a verified tier copy (read, hash, write)
    serve_cpu_per_gib: float = 0.5  # a peer's ``fastload serve`` sending a copy
    map_cpu_per_gib: float = 0.05  # fastload mapping an shm file into the model
    early_fetch: bool = True  # fastload's fetch starts before the replica imports torch (prefetch first)
    lease_poll: float = 0.25
    advertise_delay: float = 0.05  # a new RAM copy reaches the peer registry this long after it is published:
    # one Redis call where FASTLOAD_PEER_ADVERTISE is set (the store claims its fill); without it, 5 s on average
    # (``fastload serve`` lists its tiers every FASTLOAD_PEER_TTL / 3, 10 s by default)
    peer_slots: int | None = 2  # fills a peer serves at once (``fastload serve --max-uploads``; None: no limit)
    busy_pause: float = 0.5  # a waiter that every holder refused asks again after this (store._BUSY_PAUSE)
    redis_ops_per_fetch: float = 6.0  # a node's own lease traffic (acquire, renewals, release), besides polls


@dataclass
class Outcome:
    strategy: str
    nodes: int
    replicas: int
    size: int
    ready: list[float]
    origin_bytes: float
    shared_read: float
    shared_written: float
    peer_bytes: float
    received: float  # bytes that arrived at nodes, from any source
    redis_ops: float
    saturated: dict[str, float]
    settled: float = 0.0  # every write-through done

    @property
    def all_ready(self) -> float:
        return max(self.ready)

    @property
    def first_ready(self) -> float:
        return min(self.ready)

    def bottleneck(self) -> str:
        """The link kind that was full the longest (the one to widen first)."""
        if not self.saturated:
            return "none"
        return max(self.saturated.items(), key=lambda item: item[1])[0]


def simulate(strategy: str, nodes: int, replicas: int, size: int, params: Params) -> Outcome:
    """One cold start of ``nodes`` x ``replicas`` for a model of ``size`` bytes, following the core's current
    fill order (issue 12): the node holding the Redis lease downloads into its RAM tier, its replicas map it,
    and its write-through copies that RAM copy into the shared mount (lease held until it is published) and
    then its local disk; every other node waits for the shared copy -- or, with peers, for the first RAM
    copy the registry advertises -- and fills its RAM from it, then writes its local disk through."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if nodes < 1 or replicas < 1 or size <= 0:
        raise ValueError(f"nodes={nodes}, replicas={replicas}, size={size}: all must be positive")
    p = params
    slots = None if strategy == "peer-unlimited" else p.peer_slots
    peering = strategy in ("peer", "peer-unlimited")
    has_mount = strategy in ("shared", "peer", "peer-unlimited")
    sim = Simulation()
    gib = size / GiB
    origin = Link("origin", p.origin_bw)
    shared = Link("shared mount", p.shared_bw)
    shared_write = Link("shared mount write", p.shared_write_bw, "shared mount")
    net_in = [Link(f"node{n} in", p.node_net_bw, "node network") for n in range(nodes)]
    net_out = [Link(f"node{n} out", p.node_net_bw, "peer uplink") for n in range(nodes)]
    if p.host_cores is not None:
        host = Link("cpu", p.host_cores, "cpu")
        cpus = [host] * nodes
    else:
        cpus = [Link(f"node{n} cpu", p.cores_per_node, "cpu") for n in range(nodes)]
    per_download = None if p.per_connection_bw is None else p.per_connection_bw * p.connections
    ready: list[float] = []
    node_done = [Event() for _ in range(nodes)]
    node_started = [False] * nodes
    published = Event()  # the shared mount holds the model
    holders: list[int] = []  # nodes whose RAM copy is in the peer registry, in the order they got it
    uploads = [0] * nodes
    counters = {"redis": 0.0, "shared_written": 0.0, "settled": 0.0}
    lease = {"held": False}

    def cpu(n: int, seconds: float, gil: Link | None = None) -> Step:
        links = [(cpus[n], 1.0)] + ([(gil, 1.0)] if gil is not None else [])
        return flow(seconds, links, 1.0)  # one thread uses at most one core

    def from_origin(n: int) -> Step:
        return flow(size, [(origin, 1.0), (net_in[n], 1.0), (cpus[n], p.download_cpu_per_gib / GiB)], per_download)

    def copy_from(n: int, source: list[tuple[Link, float]]) -> Step:
        return flow(size, [*source, (net_in[n], 1.0), (cpus[n], p.copy_cpu_per_gib / GiB)])

    def advertise(n: int) -> Process:
        yield delay(p.advertise_delay)
        holders.append(n)
        counters["redis"] += 2  # the claim and one renewal

    def write_through(n: int, holder: bool) -> Process:
        """The tiers below RAM, from the RAM copy, on the node's own thread: the shared mount first (the lease
        holder only; the others wait for it), then the local disk."""
        if holder and has_mount:
            yield flow(size, [(shared_write, 1.0), (net_out[n], 1.0), (cpus[n], p.copy_cpu_per_gib / GiB)])
            counters["shared_written"] += size
            lease["held"] = False
            sim.trigger(published)
        yield cpu(n, p.copy_cpu_per_gib * gib)  # RAM -> local disk (disks are faster than the links)
        counters["settled"] = max(counters["settled"], sim.now)

    def free_peer() -> int | None:
        free = [h for h in holders if slots is None or uploads[h] < slots]
        return min(free, key=lambda h: uploads[h]) if free else None

    def node_fetch(n: int) -> Process:
        holder = False
        if strategy == "origin":
            yield from_origin(n)
        else:
            while True:  # the lease loop: SET NX every lease_poll until held, or a copy to read appears
                counters["redis"] += 1 + peering  # the SET, and the registry lookup
                # As built (store._fill_leased): a waiter that wakes pulls from a peer the registry names that
                # has a free upload slot; while every holder is busy it waits for a slot (busy_pause), neither
                # the mount nor the origin; with no holder it reads the shared copy once it is published.
                source = free_peer() if peering else None
                if source is not None:
                    uploads[source] += 1
                    yield flow(size, [(net_out[source], 1.0), (net_in[n], 1.0),
                                      (cpus[n], p.copy_cpu_per_gib / GiB), (cpus[source], p.serve_cpu_per_gib / GiB)])
                    uploads[source] -= 1
                    break
                if peering and holders:  # every holder busy: wait for a slot, not the mount
                    yield delay(p.busy_pause)
                    continue
                if published.triggered:
                    yield copy_from(n, [(shared, 1.0)])
                    break
                if not lease["held"] and not published.triggered and not (peering and holders):
                    lease["held"] = holder = True
                    counters["redis"] += p.redis_ops_per_fetch
                    yield from_origin(n)
                    break
                yield delay(p.lease_poll)
        sim.trigger(node_done[n])
        if peering:
            sim.start(advertise(n))
        sim.start(write_through(n, holder))

    def replica(n: int) -> Process:
        gil = Link(f"node{n} process", 1.0, "cpu")  # one Python process: one core's worth of bytecode
        if strategy == "stock":
            yield cpu(n, p.import_cpu, gil)
            yield from_origin(n)
            yield cpu(n, p.stock_load_cpu_per_gib * gib, gil)
            ready.append(sim.now)
            return
        imported = Event()

        def fetching() -> Process:
            if not p.early_fetch:
                yield wait(imported)
            yield cpu(n, p.fetch_setup_cpu, gil)
            if not node_started[n]:
                node_started[n] = True
                sim.start(node_fetch(n))

        def importing() -> Process:
            yield cpu(n, p.import_cpu, gil)
            sim.trigger(imported)

        sim.start(fetching())
        sim.start(importing())
        yield wait(imported)
        yield wait(node_done[n])
        yield cpu(n, p.map_cpu_per_gib * gib, gil)
        ready.append(sim.now)

    for n in range(nodes):
        for _ in range(replicas):
            sim.start(replica(n))
    sim.run()
    peer_bytes = sum(link.carried for link in net_out) - counters["shared_written"]
    received = sum(link.carried for link in net_in)
    return Outcome(strategy, nodes, replicas, size, sorted(ready), origin.carried, shared.carried,
                   counters["shared_written"], peer_bytes, received, counters["redis"], sim.saturated,
                   max(counters["settled"], max(ready)))


# --- calibration against the harness --------------------------------------------------------------------
MEASURED_STRATEGY = {"stock": "stock", "fastload": "shared", "fastload-late": "shared", "peer": "peer"}
FITTED = ("import_cpu", "fetch_setup_cpu", "stock_load_cpu_per_gib", "download_cpu_per_gib", "copy_cpu_per_gib",
          "serve_cpu_per_gib", "map_cpu_per_gib")


def fetched_early(run: dict[str, Any]) -> bool:
    """Whether the run's fastload replicas started their fetch before importing torch (the harness's
    "fastload" and "peer" since the stage breakdown; runs recorded before it have no prefetch mark)."""
    if run["method"] == "fastload-late":
        return False
    timeline = run.get("timeline")
    return not timeline or any("prefetch_started" in replica for replica in timeline)


HARNESS_ADVERTISE_DELAY = 0.25  # the harness's FASTLOAD_PEER_TTL=1.5: claims renewed every 0.5 s


def harness_params(run: dict[str, Any], base: Params, host_cores: float = 2.0) -> Params:
    """The model of one harness run: its stated limits, and for the whole fleet the cores it actually got
    (the harness measures what the rest of the shared machine used meanwhile), else ``host_cores``."""
    limits = run["limits"]
    cores = run.get("cores_available") or host_cores
    return replace(base, origin_bw=limits["origin"], node_net_bw=limits["node_net"], shared_bw=limits["shared"],
                   per_connection_bw=limits["per_connection"], host_cores=min(max(cores, 0.25), host_cores),
                   shared_write_bw=None,  # the harness counts the mount's writes but does not pace them
                   early_fetch=fetched_early(run),
                   advertise_delay=HARNESS_ADVERTISE_DELAY)


def load_runs(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for path in paths:
        runs.extend(r for r in json.loads(Path(path).read_text())["results"] if r["method"] in MEASURED_STRATEGY)
    return runs


def shape(run: dict[str, Any]) -> str:
    return f"{run['nodes']}x{run['replicas']}@{run['size'] / GiB:.2f}GiB"


def predict(run: dict[str, Any], params: Params) -> Outcome:
    return simulate(MEASURED_STRATEGY[run["method"]], run["nodes"], run["replicas"], run["size"],
                    harness_params(run, params))


def error(runs: Sequence[dict[str, Any]], params: Params) -> float:
    """Mean squared relative error of the mean and the last replica's ready times."""
    total = 0.0
    for run in runs:
        outcome = predict(run, params)
        measured = [r["ready"] for r in run["timeline"]]
        for mine, theirs in ((outcome.all_ready, max(measured)), (statistics.mean(outcome.ready),
                                                                   statistics.mean(measured))):
            total += ((mine - theirs) / theirs) ** 2
    return total / max(1, len(runs))


def calibrate(runs: Sequence[dict[str, Any]], base: Params = Params(), rounds: int = 6) -> Params:
    """Fit the CPU costs (the only numbers the limits do not state) by coordinate search in log space."""
    params = base
    best = error(runs, params)
    factor = 2.0
    for _ in range(rounds):
        for name in FITTED:
            for scale in (factor, 1 / factor):
                trial = replace(params, **{name: getattr(params, name) * scale})
                score = error(runs, trial)
                if score < best:
                    params, best = trial, score
        factor = math.sqrt(factor)
    return params


def check(runs: Sequence[dict[str, Any]], params: Params) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        outcome = predict(run, params)
        measured = max(r["ready"] for r in run["timeline"])
        rows.append({"shape": shape(run), "method": run["method"], "limits": run["limits"],
                     "measured_all_ready": measured, "predicted_all_ready": outcome.all_ready,
                     "error": outcome.all_ready / measured - 1,
                     "measured_origin": run["origin_bytes"] / run["size"],
                     "predicted_origin": outcome.origin_bytes / run["size"],
                     "measured_redis": run["redis_ops"], "predicted_redis": outcome.redis_ops})
    return rows


# --- report ---------------------------------------------------------------------------------------------
def project(params: Params, sizes: Sequence[int], fleet: Sequence[int], replicas: int,
            strategies: Sequence[str] = STRATEGIES) -> list[Outcome]:
    return [simulate(strategy, nodes, replicas, size, params) for size in sizes for nodes in fleet
            for strategy in strategies]


def plots(out: Path, outcomes: list[Outcome], measured: list[dict[str, Any]], params: Params) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if measured:
        figure, axes = plt.subplots(figsize=(9, 4))
        for run in measured:
            times = sorted(r["ready"] for r in run["timeline"])
            line = axes.step([0, *times], range(len(times) + 1), where="post",
                             label=f"{run['method']} (measured{', ' + run['label'] if 'label' in run else ''})")
            if run["method"] in MEASURED_STRATEGY and run.get("cores_available"):
                predicted = predict(run, params)
                axes.step([0, *predicted.ready], range(len(predicted.ready) + 1), where="post", linestyle="--",
                          color=line[0].get_color(), label=f"{run['method']} (model)")
        axes.set_xlabel("seconds since launch")
        axes.set_ylabel("replicas ready")
        axes.set_title(f"measured here, {shape(measured[0])}: replicas ready over time")
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        figure.tight_layout()
        path = out / "fleet-ready-measured.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    sizes = sorted({o.size for o in outcomes})
    size = sizes[-1]
    chosen = [o for o in outcomes if o.size == size]
    fleet = sorted({o.nodes for o in chosen})
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for strategy, style in zip(STRATEGIES, ("-o", "-s", "--^", ":v", "-.D"), strict=True):
        rows = [o for o in chosen if o.strategy == strategy]
        if not rows:
            continue
        left.plot(fleet, [o.origin_bytes / size for o in rows], style, label=strategy)
        right.plot(fleet, [o.all_ready for o in rows], style, label=strategy)
    for axes, label in ((left, "origin bytes (x model)"), (right, "seconds until all replicas ready")):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("nodes")
        axes.set_ylabel(label)
        axes.legend()
    figure.suptitle(f"simulated, {size / GiB:.0f} GiB model, {chosen[0].replicas} replicas per node")
    figure.tight_layout()
    path = out / "fleet-scaling.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path)
    big = [o for o in chosen if o.nodes == max(fleet)]
    figure, axes = plt.subplots(figsize=(7, 4))
    for outcome in big:
        axes.step([0, *outcome.ready], range(len(outcome.ready) + 1), where="post", label=outcome.strategy)
    axes.set_xscale("symlog")
    axes.set_xlabel("seconds since launch")
    axes.set_ylabel("replicas ready")
    axes.set_title(f"simulated {max(fleet)} nodes, {size / GiB:.0f} GiB model: replicas ready over time")
    axes.legend()
    figure.tight_layout()
    path = out / "fleet-ready-simulated.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path)
    return written


def capacity(kind: str, params: Params) -> str:
    rate = {"origin": params.origin_bw, "shared mount": params.shared_bw, "node network": params.node_net_bw,
            "peer uplink": params.node_net_bw}.get(kind)
    if kind == "cpu":
        return f"{params.cores_per_node:g} cores"
    return "unlimited" if rate is None else f"{rate / 1e9:g} GB/s"


def table(outcomes: list[Outcome], params: Params) -> str:
    lines = ["| nodes | model | strategy | all ready s | first ready s | origin bytes (x) | shared read (x) | "
             "peer bytes (x) | Redis ops | bottleneck (capacity, seconds full) |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for o in outcomes:
        neck = o.bottleneck()
        full = f"{neck} ({capacity(neck, params)}, {o.saturated[neck]:.0f} s)" if neck != "none" else "none"
        lines.append(f"| {o.nodes} | {o.size / GiB:.0f} GiB | {o.strategy} | {o.all_ready:.1f} | {o.first_ready:.1f} | "
                     f"{o.origin_bytes / o.size:.1f} | {o.shared_read / o.size:.1f} | {o.peer_bytes / o.size:.1f} | "
                     f"{o.redis_ops:.0f} | {full} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="harness JSON files")
    parser.add_argument("--calibrate", default="3x2@1.00GiB",
                        help="comma-separated shapes (NxM@SIZEGiB) to fit on; the rest are held out (only runs "
                             "with link limits count: the model is stated for link-bound fleets)")
    parser.add_argument("--replicas", type=int, default=5, help="replicas per node in the projection")
    parser.add_argument("--sizes", default="1,16", help="model sizes (GiB) for the projection")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a projection parameter (see Params), e.g. --set shared_bw=10e9 --set peer_slots=4")
    parser.add_argument("--show", action="append", default=[], metavar="FILE[:LABEL]",
                        help="harness JSON whose runs the measured plot shows (default: the largest calibration "
                             "shape's runs); the model is drawn beside runs that recorded the cores they got")
    parser.add_argument("--show-round", type=int, default=None, metavar="N",
                        help="only that round of the --show files' runs (one curve per method)")
    parser.add_argument("--out", default="bench-out/fleet-sim", help="folder for the PNGs and the report")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in Params.__dataclass_fields__ or not value:
            names = ", ".join(Params.__dataclass_fields__)
            parser.error(f"--set {item!r}: expected NAME=VALUE with NAME one of {names}")
        overrides[name] = None if value.lower() == "none" else type(getattr(Params(), name) or 0.0)(float(value))
    everything = [r for path in args.results for r in json.loads(Path(path).read_text())["results"]]
    runs = load_runs(args.results)
    limited = [r for r in runs if r["limits"]["origin"] is not None]
    chosen = set(args.calibrate.split(","))
    fit_on = [r for r in limited if shape(r) in chosen]
    held_out = [r for r in limited if shape(r) not in chosen]
    if not fit_on:
        parser.error(f"no limited run has a shape in {sorted(chosen)}; shapes: {sorted({shape(r) for r in limited})}")
    params = calibrate(fit_on)
    fitted = {name: round(getattr(params, name), 3) for name in FITTED}
    print("fitted:", json.dumps(fitted))
    rows = check(fit_on, params) + check(held_out, params)
    for row, kind in zip(rows, ["calibration"] * len(fit_on) + ["held out"] * len(held_out), strict=True):
        row["set"] = kind
        print(f"{kind:<11} {row['shape']:<16} {row['method']:<8} measured {row['measured_all_ready']:6.1f} s "
              f"model {row['predicted_all_ready']:6.1f} s ({row['error']:+.0%}); origin {row['measured_origin']:.2f}x "
              f"vs {row['predicted_origin']:.2f}x; Redis {row['measured_redis']} vs {row['predicted_redis']:.0f}")
    production = replace(Params(), **{**fitted, **overrides})
    sizes = [int(float(s) * GiB) for s in args.sizes.split(",")]
    outcomes = project(production, sizes, [3, 10, 30, 100, 300, 1000], args.replicas)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.show:
        shown = []
        for item in args.show:
            path, _, label = item.partition(":")
            for run in json.loads(Path(path).read_text())["results"]:
                if args.show_round is None or run.get("round") == args.show_round:
                    shown.append({**run, "label": label} if label else run)
    else:
        first = max(fit_on, key=lambda r: (r["nodes"] * r["replicas"], r["size"]))
        shown = [r for r in everything if shape(r) == shape(first) and r["limits"] == first["limits"]]
    figures = plots(out, outcomes, shown, params)
    (out / "simulation.json").write_text(json.dumps({
        "fitted": fitted, "checks": rows, "production": production.__dict__,
        "projection": [{**{k: v for k, v in o.__dict__.items() if k != "ready"}, "first_ready": o.first_ready,
                        "median_ready": statistics.median(o.ready), "all_ready": o.all_ready,
                        "bottleneck": o.bottleneck()} for o in outcomes],
    }, indent=1, default=str))
    report = table([o for o in outcomes if o.nodes in (10, 100, 1000)], production)
    (out / "projection.md").write_text(report + "\n")
    print(report)
    print("figures:", ", ".join(str(f) for f in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
