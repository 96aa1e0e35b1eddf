"""Two "nodes" (separate local caches and node ids) sharing one shared_fs tier and a Redis lease."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.storage.conftest import BUCKET, leftovers
from tests.storage.faultproxy import FaultProxy
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
