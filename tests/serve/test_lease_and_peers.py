"""A node waiting on the shared mount's Redis lease stops waiting when a peer advertises the model in RAM.

At a fleet's cold start every node asks at once: one holds the lease and downloads into its RAM, the others
wait for the shared copy, which its write-through publishes seconds later. The holder's RAM copy is
advertised before that, and a waiting node takes it from there (issue 17's fleet harness measures what that
buys)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from fastload_devservices.faultproxy import FaultProxy
from fastload_devservices.s3 import BUCKET

pytestmark = [pytest.mark.s3, pytest.mark.redis, pytest.mark.slow]

MODEL = "m1/model.safetensors"
SIZE = 12 * 1024 * 1024 + 4321


@pytest.fixture
def node_env(node_env: dict[str, str]) -> dict[str, str]:
    return {**node_env, "FASTLOAD_S3_PART_SIZE": "4MiB", "FASTLOAD_PEER_TTL": "3"}  # advertised within 1 s


def test_a_node_waiting_on_the_lease_pulls_from_a_peer_that_advertises_meanwhile(
        make_node: Any, s3: Any, origin: FaultProxy, redis_url: str, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fastload_core.storage.store import TieredStore
    from fastload_core.storage.uri import parse_uri

    data = os.urandom(SIZE)
    s3.put_object(Bucket=BUCKET, Key=MODEL, Body=data)
    a = make_node("a")  # no shared mount: its fill takes no lease
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                 "FASTLOAD_SERVE_ACCESS_KEY_ID", "FASTLOAD_SERVE_SECRET_ACCESS_KEY", "FASTLOAD_REDIS_URL",
                 "FASTLOAD_PEER_TIMEOUT", "FASTLOAD_PEER_TTL", "FASTLOAD_S3_PART_SIZE"):
        monkeypatch.setenv(name, a.env[name])
    monkeypatch.setenv("FASTLOAD_SHARED_DIR", str(tmp_path / "shared"))
    monkeypatch.setenv("FASTLOAD_CACHE_DIR", str(tmp_path / "b"))
    monkeypatch.setenv("FASTLOAD_SHM_DIR", "off")
    store = TieredStore.from_env()
    uri = f"s3://{BUCKET}/{MODEL}"
    parsed = parse_uri(uri)
    version = store.origin("s3").resolve(parsed, None).version
    # Another node holds the lease on the shared entry and has not published it (it never will, here).
    held = redis.Redis.from_url(redis_url)
    held.set(f"fastload:lease:shared_fs:{parsed.slug}:{version}", b"another-node", px=120_000)
    found: dict[str, Any] = {}

    def fetch() -> None:
        try:
            found["path"] = store.fetch(uri, tier="local_disk")
        except BaseException as exc:  # reported by the assertion below
            found["error"] = exc

    origin.reset_counters()
    with caplog.at_level("INFO", logger="fastload.storage"):
        waiting = threading.Thread(target=fetch)
        waiting.start()
        time.sleep(1.0)  # B is polling the lease now
        assert "path" not in found and "error" not in found
        assert a.client().get_object(Bucket=BUCKET, Key=MODEL)["Body"].read() == data  # A fills its RAM
        started = time.monotonic()
        waiting.join(30)
    assert not waiting.is_alive(), "the waiting node never stopped waiting for the lease"
    assert "error" not in found, found.get("error")
    assert time.monotonic() - started < 15  # not the lease's 120 s
    assert Path(found["path"]).read_bytes() == data
    assert origin.get_body_bytes == SIZE  # A's download only: B's bytes came from A's RAM
    assert f"bytes from peer 127.0.0.1:{a.port}" in caplog.text
    assert not list((tmp_path / "shared").glob("*/*/meta.json"))  # the lease holder writes the mount, not B
