"""A node waiting on the shared mount's Redis lease stops waiting when a peer advertises the model in RAM.

At a fleet's cold start every node asks at once: one holds the lease and downloads into its RAM, the others
wait for the shared copy, which its write-through publishes seconds later. The holder's RAM copy is
advertised before that, and a waiting node takes it from there (issue 17's fleet harness measures what that
buys)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from fastload_devservices.faultproxy import FaultProxy
from fastload_devservices.s3 import BUCKET

from .conftest import become_node, fetch_behind_a_held_lease

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

    data = os.urandom(SIZE)
    s3.put_object(Bucket=BUCKET, Key=MODEL, Body=data)
    a = make_node("a")  # no shared mount: its fill takes no lease
    become_node(monkeypatch, a, tmp_path, "b")
    monkeypatch.setenv("FASTLOAD_SHARED_DIR", str(tmp_path / "shared"))
    store = TieredStore.from_env()
    waiting, found = fetch_behind_a_held_lease(store, f"s3://{BUCKET}/{MODEL}", redis_url)
    origin.reset_counters()
    with caplog.at_level("INFO", logger="fastload.storage"):
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
