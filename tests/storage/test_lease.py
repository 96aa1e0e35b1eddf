"""Two "nodes" (separate local caches and node ids) sharing one shared_fs tier and a Redis lease; and a Redis
outage, which only costs the lease, never the fetch."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from fastload_core.storage import StorageError, fetch, writethrough
from fastload_core.storage import lease as lease_module
from fastload_devservices.faultproxy import FaultProxy
from tests.storage.conftest import BUCKET, leftovers
from tests.storage.helpers import spawn
from tests.storage.test_store import FETCH_CODE

MiB = 1024 * 1024


@pytest.mark.redis
@pytest.mark.s3
@pytest.mark.slow
def test_redis_lease_gives_one_origin_download_per_cluster(
    s3: Any, proxy: FaultProxy, redis_url: str, tmp_path: Path
) -> None:
    data = os.urandom(4 * MiB)
    s3.put_object(Bucket=BUCKET, Key="cluster/w.bin", Body=data)
    proxy.delay = 0.03
    shared = tmp_path / "ceph"
    go = tmp_path / "go"
    nodes = []
    for node in ("a", "b", "c"):
        nodes.append(spawn(FETCH_CODE, {
            "URI": f"s3://{BUCKET}/cluster/w.bin", "GO_FILE": str(go), "FASTLOAD_REDIS_URL": redis_url,
            "FASTLOAD_SHARED_DIR": str(shared), "FASTLOAD_NODE_ID": f"node{node}",
            "FASTLOAD_CACHE_DIR": str(tmp_path / f"node-{node}"),
        }))
    time.sleep(1.0)
    go.touch()
    outputs = [n.communicate(timeout=120) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), [err[-2000:] for _, err in outputs]
    paths = [Path(out.strip()) for out, _ in outputs]
    assert all(p.read_bytes() == data for p in paths)
    assert {p.relative_to(tmp_path).parts[0] for p in paths} == {"node-a", "node-b", "node-c"}
    assert proxy.get_body_bytes == len(data)  # one download from S3 for three nodes
    assert len(list(shared.rglob("meta.json"))) == 1 and leftovers(shared) == []


@pytest.mark.redis
def test_lease_waits_then_sees_the_published_entry(redis_url: str) -> None:
    from fastload_core.storage.lease import RedisLease

    first, second = RedisLease(redis_url, ttl=5), RedisLease(redis_url, ttl=5)
    published = []
    try:
        with first.hold("k", timeout=5, ready=lambda: False, uri="u", tier="shared_fs") as mine:
            assert mine
            started = time.monotonic()

            def ready() -> bool:
                if time.monotonic() - started > 0.3:
                    published.append(True)
                return bool(published)

            with second.hold("k", timeout=5, ready=ready, uri="u", tier="shared_fs") as theirs:
                assert theirs is False  # it waited and then reused the other node's result
        with second.hold("k", timeout=5, ready=lambda: False, uri="u", tier="shared_fs") as mine_now:
            assert mine_now  # released: free to take
    finally:
        first.close()
        second.close()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _shared_store_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    monkeypatch.setenv("FASTLOAD_SHARED_DIR", str(tmp_path / "ceph"))
    monkeypatch.setenv("FASTLOAD_REDIS_URL", redis_url)
    monkeypatch.setenv("FASTLOAD_REDIS_TIMEOUT", "0.5")
    monkeypatch.setattr(lease_module, "_warned", set())


def _models(tmp_path: Path) -> list[tuple[str, bytes]]:
    found = []
    for name in ("a", "b"):
        path = tmp_path / "models" / f"{name}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = os.urandom(1000)
        path.write_bytes(data)
        found.append((f"file://{path}", data))
    return found


def test_a_closed_redis_port_warns_once_and_fetches_without_the_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _shared_store_env(tmp_path, monkeypatch, f"redis://127.0.0.1:{_closed_port()}/0")
    for uri, data in _models(tmp_path):
        assert fetch(uri).read_bytes() == data
    writethrough.wait()
    assert len(list((tmp_path / "ceph").rglob("meta.json"))) == 2  # the shared tier was filled regardless
    warnings = [r for r in caplog.records if "Redis" in r.getMessage() and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "without the cross-node lease" in warnings[0].getMessage()


def test_a_redis_that_never_answers_costs_a_bounded_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as blackhole:  # accepts connections into its backlog, never reads or replies
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(16)
        _shared_store_env(tmp_path, monkeypatch, f"redis://127.0.0.1:{blackhole.getsockname()[1]}/0")
        (uri, data), _ = _models(tmp_path)
        assert fetch(uri).read_bytes() == data
    assert any("TimeoutError" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_a_bad_redis_url_is_a_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _shared_store_env(tmp_path, monkeypatch, "redis://:secret@127.0.0.1:notaport/0")
    (uri, _), _ = _models(tmp_path)
    with pytest.raises(StorageError, match="not a Redis URL") as caught:
        fetch(uri)
    assert "secret" not in str(caught.value)
