"""The fleet harness at its smallest (2 nodes x 1 replica, a 70 KB model) and the fleet simulator's rules:
bytes are conserved, a node fetches once whatever its replica count, a shared link is shared fairly, and
the report names the link that held the fleet back."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "fleet"))

import simulate  # noqa: E402
from simulate import MB, GiB, Params, Simulation, flow  # noqa: E402
from throttle import Bucket  # noqa: E402

SIZE = 1 * GiB
run = simulate.simulate


# --- the engine -------------------------------------------------------------------------------------------
def test_flows_share_a_link_fairly_and_respect_their_caps() -> None:
    sim = Simulation()
    link = simulate.Link("wire", 100.0)
    finished: dict[str, float] = {}

    def transfer(name: str, amount: float, cap: float | None = None) -> simulate.Process:
        yield flow(amount, [(link, 1.0)], cap)
        finished[name] = sim.now

    sim.start(transfer("short", 100))
    sim.start(transfer("long", 200))
    sim.start(transfer("capped", 20, cap=10))
    sim.run()
    # capped takes 10/s (done at 2 s); the other two split the other 90: 45/s each; then 50/s each until
    # short is done (2.2 s); long has the link to itself for its last 100 bytes.
    assert finished["capped"] == pytest.approx(2.0)
    assert finished["short"] == pytest.approx(2.2)
    assert link.carried == pytest.approx(320)
    assert finished["long"] == pytest.approx(3.2)  # 320 bytes through a 100 B/s link, never idle


# --- the fleet --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", simulate.STRATEGIES)
def test_bytes_are_conserved(strategy: str) -> None:
    outcome = run(strategy, 7, 3, SIZE, Params())
    # stock: every replica downloads; otherwise one copy per node (the lease holder's from the origin into its
    # RAM, which its write-through copies into the mount; the others' from the mount or a peer)
    copies = {"stock": 7 * 3}.get(strategy, 7)
    assert outcome.received == pytest.approx(copies * SIZE)
    assert outcome.received == pytest.approx(outcome.origin_bytes + outcome.shared_read + outcome.peer_bytes)
    assert len(outcome.ready) == 21


def test_each_node_fetches_once_whatever_its_replicas() -> None:
    for strategy in ("origin", "shared", "peer", "peer-unlimited"):
        one, many = (run(strategy, 5, m, SIZE, Params()) for m in (1, 8))
        assert many.received == pytest.approx(one.received)
        assert many.origin_bytes + many.shared_read + many.peer_bytes == pytest.approx(many.received)
    assert run("shared", 5, 8, SIZE, Params()).origin_bytes == pytest.approx(SIZE)  # once for the fleet
    assert run("peer", 5, 8, SIZE, Params()).origin_bytes == pytest.approx(SIZE)
    assert run("origin", 5, 8, SIZE, Params()).origin_bytes == pytest.approx(5 * SIZE)  # once per node
    assert run("stock", 5, 8, SIZE, Params()).origin_bytes == pytest.approx(40 * SIZE)


def test_the_bottleneck_is_named() -> None:
    slow_origin = replace(Params(), origin_bw=50 * MB)
    assert run("stock", 20, 2, SIZE, slow_origin).bottleneck() == "origin"
    slow_mount = replace(Params(), shared_bw=100 * MB)
    assert run("shared", 20, 2, SIZE, slow_mount).bottleneck() == "shared mount"
    one_slot = replace(Params(), peer_slots=1, node_net_bw=200 * MB)
    assert run("peer", 20, 2, SIZE, one_slot).bottleneck() in ("peer uplink", "node network")
    # without an upload limit every waiting node pulls from the first node that advertises: one uplink for all
    quick = replace(Params(), node_net_bw=1e9, advertise_delay=0.1, shared_write_bw=100 * MB)
    assert run("peer-unlimited", 50, 1, SIZE, quick).bottleneck() == "peer uplink"
    few_cores = replace(Params(), cores_per_node=0.5)
    assert run("shared", 2, 8, SIZE, few_cores).bottleneck() == "cpu"


def test_peers_spread_as_a_tree_only_with_a_fan_out_limit() -> None:
    """With two upload slots per peer (as built, --max-uploads 2) a peer fleet's time grows with log(nodes),
    not nodes; without a limit every waiting node pulls from the first holder and it grows with nodes, as the
    mount's does."""
    params = Params()
    ten, thousand = (run("peer", n, 1, 16 * GiB, params).all_ready for n in (10, 1000))
    assert thousand < 3 * ten
    assert run("shared", 1000, 1, 16 * GiB, params).all_ready > 10 * ten  # one mount's bandwidth for all
    assert run("peer-unlimited", 1000, 1, 16 * GiB, params).all_ready > 10 * ten  # one uplink for all


def test_the_lease_holder_serves_its_replicas_before_the_mount_is_written() -> None:
    """RAM first: the holder's replicas are ready once its download lands; the other nodes wait for the shared
    copy its write-through publishes, so they are ready later by at least that write and their own copy."""
    params = replace(Params(), shared_write_bw=500 * MB, shared_bw=500 * MB, cores_per_node=64)
    outcome = run("shared", 3, 1, SIZE, params)
    first, *others = outcome.ready
    assert all(later - first >= 2 * SIZE / (500 * MB) for later in others)
    assert outcome.shared_written == SIZE and outcome.shared_read == pytest.approx(2 * SIZE)


def test_a_late_fetch_waits_for_the_imports() -> None:
    early, late = (run("shared", 2, 3, SIZE, replace(Params(), early_fetch=e, import_cpu=10.0)) for e in (True, False))
    assert late.all_ready > early.all_ready + 0.3


def test_calibration_recovers_the_cpu_costs_and_holds_out() -> None:
    truth = replace(Params(), import_cpu=2.0, stock_load_cpu_per_gib=3.0, copy_cpu_per_gib=0.4)
    limits = {"origin": 100 * MB, "node_net": 1250 * MB, "shared": 500 * MB, "per_connection": None}

    def measured(method: str, nodes: int, replicas: int, size: int) -> dict[str, object]:
        run_ = {"method": method, "nodes": nodes, "replicas": replicas, "size": size, "limits": limits}
        outcome = simulate.predict(run_, truth)
        return {**run_, "timeline": [{"ready": t} for t in outcome.ready], "origin_bytes": outcome.origin_bytes,
                "redis_ops": outcome.redis_ops}

    fit_on = [measured(m, 3, 2, GiB) for m in ("stock", "fastload")]
    held_out = [measured(m, 2, 2, GiB // 2) for m in ("stock", "fastload")]
    fitted = simulate.calibrate(fit_on, Params())
    for row in simulate.check(held_out, fitted):
        assert abs(row["error"]) < 0.05, row


# --- the throttle -----------------------------------------------------------------------------------------
def test_bucket_paces_every_process_sharing_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import throttle

    monkeypatch.setattr(throttle, "time", SimpleNamespace(time=lambda: 1000.0))  # stopped: no pause counts
    first, second = Bucket(tmp_path / "link", 1_000_000.0), Bucket(tmp_path / "link", 1_000_000.0)
    ends = [first.reserve(250_000), second.reserve(250_000), first.reserve(500_000)]
    assert ends == [1000.25, 1000.5, 1001.0]  # 1 MB through a 1 MB/s link, whoever sent it
    assert Bucket(tmp_path / "link", None).total == 1_000_000


# --- the harness, end to end ------------------------------------------------------------------------------
@pytest.mark.s3
@pytest.mark.redis
@pytest.mark.slow
def test_quick_fleet(tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fleet" / "harness.py"), "--quick", "--methods",
         "stock,fastload", "--origin", "50", "--shared", "50", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    size = results["stock"]["size"]
    for method, copies in (("stock", 2), ("fastload", 1)):
        result = results[method]
        assert len(result["timeline"]) == 2 and all(r["ready"] > 0 for r in result["timeline"])
        # the proxy's count (bytes sent to clients, HTTP headers included) agrees with SeaweedFS's own, to within
        # the headers of a few dozen responses (each carries the object's checksum headers now)
        assert 0 <= result["origin_bytes"] - result["origin_bytes_seaweed"] < 16_384
        assert copies * size <= result["origin_bytes_seaweed"] < copies * size * 1.05
    fastload = results["fastload"]
    assert fastload["shared_written"] == size  # one node wrote the shared mount, under the lease
    # the lease holder filled its RAM and the shared mount from one download; the other node copied the mount
    assert fastload["shared_read"] == size
    assert fastload["redis_commands"].get("set", 0) >= 1  # the lease (a later node may find the mount filled)
    assert results["stock"]["shared_read"] == 0 and results["stock"]["redis_ops"] == 0
    assert (out.with_suffix(".md")).read_text().count("| stock |") == 1


def test_harness_rejects_bad_arguments() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fleet" / "harness.py"), "--methods", "nope"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown nope" in done.stderr
