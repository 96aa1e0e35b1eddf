"""``fastload serve --max-uploads``: a peer serves a few fills at once and refuses more with S3's own throttling
reply, so that a fleet's cold start spreads as a tree instead of every node pulling from the first holder.

Real nodes on loopback (conftest.py): a refused fill completes from another holder; a node waiting on the
shared mount's lease keeps waiting while every holder is busy (it does not go to the origin) and pulls as soon
as a slot frees; a fill whose client dies frees its slot after the idle time; ordinary S3 clients are not
limited; bad values of the option and of its variable are refused by name."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from botocore.exceptions import ClientError

from fastload_devservices.faultproxy import FaultProxy
from fastload_devservices.s3 import BUCKET

from .conftest import KEY, SECRET, become_node, fetch_behind_a_held_lease

pytestmark = [pytest.mark.s3, pytest.mark.redis, pytest.mark.slow]

MODEL = "m1/model.safetensors"
SIZE = 12 * 1024 * 1024 + 4321
URI = f"s3://{BUCKET}/{MODEL}"


@pytest.fixture
def node_env(node_env: dict[str, str]) -> dict[str, str]:
    return {**node_env, "FASTLOAD_S3_PART_SIZE": "4MiB", "FASTLOAD_PEER_TTL": "3",
            "FASTLOAD_PEER_PART_SIZE": "1MiB"}


def _holding(make_node: Any, name: str, data: bytes, **env: str) -> Any:
    """A node that holds the model in its RAM (a GET through its endpoint filled it), advertised."""
    node = make_node(name, **env)
    assert node.client().get_object(Bucket=BUCKET, Key=MODEL)["Body"].read() == data
    return node


def _open_fill(node: Any, fill: str) -> tuple[Any, threading.Event]:
    """Start a fill at ``node`` as a peer client does (its metadata, under the fill's id) and leave it open."""
    from fastload_core.storage.peers import PEER_BUCKET, PeerSettings, fill_client, peer_key
    from fastload_core.storage.uri import parse_uri

    settings = PeerSettings(node.env["FASTLOAD_REDIS_URL"], KEY, SECRET)
    ending = threading.Event()
    client = fill_client(f"127.0.0.1:{node.port}", settings, fill, ending)
    version = _version(node)
    client.get_object(Bucket=PEER_BUCKET, Key=peer_key(parse_uri(URI).slug, version))["Body"].read()
    return client, ending


def _version(node: Any) -> str:
    """The version ``node`` advertises the model under (the store's own naming), from the registry."""
    from fastload_core.storage.peers import KEY_PREFIX
    from fastload_core.storage.uri import parse_uri

    keys = redis.Redis.from_url(node.env["FASTLOAD_REDIS_URL"]).keys(f"{KEY_PREFIX}{parse_uri(URI).slug}/*")
    assert len(keys) == 1, keys
    return keys[0].decode().rsplit("/", 1)[1]


def _refused(node: Any, fill: str) -> ClientError:
    with pytest.raises(ClientError) as refused:
        _open_fill(node, fill)
    return refused.value


def _wait_advertised(node: Any) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            _version(node)
            return
        except AssertionError:
            time.sleep(0.1)
    raise AssertionError("the node never advertised the model")


def test_a_busy_peer_refuses_a_second_fill_which_completes_from_another_holder(
        make_node: Any, s3: Any, origin: FaultProxy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fastload_core.storage.base import Journal
    from fastload_core.storage.peers import PeerSettings, PeerSource
    from fastload_core.storage.progress import Progress
    from fastload_core.storage.store import TieredStore
    from fastload_core.storage.uri import parse_uri

    data = os.urandom(SIZE)
    s3.put_object(Bucket=BUCKET, Key=MODEL, Body=data)
    a = _holding(make_node, "a", data, FASTLOAD_SERVE_MAX_UPLOADS="1")
    c = _holding(make_node, "c", data, FASTLOAD_SERVE_MAX_UPLOADS="1")
    _wait_advertised(a)
    _open_fill(a, "first")  # A's one slot is taken
    refusal = _refused(a, "second")
    assert refusal.response["Error"]["Code"] == "SlowDown"
    assert refusal.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert refusal.response["ResponseMetadata"]["HTTPHeaders"].get("retry-after") == "1"
    _open_fill(a, "first")  # the admitted fill's own requests still pass

    become_node(monkeypatch, a, tmp_path, "b")
    store = TieredStore.from_env()
    manifest = store.origin("s3").resolve(parse_uri(URI), None)
    settings = PeerSettings.from_env()
    assert settings is not None
    source = PeerSource(settings, [f"127.0.0.1:{a.port}", f"127.0.0.1:{c.port}"], parse_uri(URI).slug,
                        manifest.version, store.origin("s3"))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / manifest.files[0].name).write_bytes(b"")
    os.truncate(dest / manifest.files[0].name, SIZE)
    origin.reset_counters()
    source.download(manifest, dest, journal=Journal(tmp_path / "journal"), progress=Progress("b", SIZE,
                                                                                              enabled=False))
    assert source.busy == [f"127.0.0.1:{a.port}"]
    assert source.used == f"127.0.0.1:{c.port}"
    assert (dest / manifest.files[0].name).read_bytes() == data
    assert origin.get_body_bytes == 0
    # The fill told C it was over: C's one slot takes the next fill at once, not after its idle time.
    _open_fill(c, "next")


def test_a_lease_waiter_keeps_waiting_while_every_holder_is_busy_then_pulls_from_one(
        make_node: Any, s3: Any, origin: FaultProxy, redis_url: str, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    from fastload_core.storage.store import TieredStore
    from fastload_core.storage.uri import parse_uri

    data = os.urandom(SIZE)
    s3.put_object(Bucket=BUCKET, Key=MODEL, Body=data)
    a = _holding(make_node, "a", data, FASTLOAD_SERVE_MAX_UPLOADS="1")
    _wait_advertised(a)
    client, ending = _open_fill(a, "other-node")  # another node's fill holds A's one slot
    become_node(monkeypatch, a, tmp_path, "b")
    monkeypatch.setenv("FASTLOAD_SHARED_DIR", str(tmp_path / "shared"))
    monkeypatch.setenv("FASTLOAD_PEER_ADVERTISE", "127.0.0.1:1")  # B claims its fill as it publishes it
    store = TieredStore.from_env()
    parsed = parse_uri(URI)
    version = store.origin("s3").resolve(parsed, None).version
    waiting, found = fetch_behind_a_held_lease(store, URI, redis_url)
    origin.reset_counters()
    waiting.start()
    time.sleep(3.0)  # several rounds of asking A, which refuses every time
    assert waiting.is_alive() and not found, found
    assert origin.get_body_bytes == 0  # still waiting: not gone to the origin
    ending.set()  # the other node's fill ends: A's slot is free at once
    client.head_object(Bucket="fastload..peer", Key=f"{parsed.slug}/{version}/meta.json")
    waiting.join(20)
    assert not waiting.is_alive(), "the waiting node never pulled from the freed peer"
    assert "error" not in found, found.get("error")
    assert Path(found["path"]).read_bytes() == data
    assert origin.get_body_bytes == 0
    claims = redis.Redis.from_url(redis_url).zrange(f"fastload:peers:{parsed.slug}/{version}", 0, -1)
    assert b"127.0.0.1:1" in claims  # the next node can pull from B at once: the tree grows


def test_a_slot_frees_after_a_fill_client_dies_midway(make_node: Any, s3: Any) -> None:
    from fastload_core.storage.peers import PEER_BUCKET, peer_key
    from fastload_core.storage.uri import parse_uri

    data = os.urandom(SIZE)
    s3.put_object(Bucket=BUCKET, Key=MODEL, Body=data)
    a = _holding(make_node, "a", data, FASTLOAD_SERVE_MAX_UPLOADS="1")
    _wait_advertised(a)
    client, _ = _open_fill(a, "dies")
    body = client.get_object(Bucket=PEER_BUCKET, Key=peer_key(parse_uri(URI).slug, _version(a), "model.safetensors"),
                             Range=f"bytes=0-{SIZE - 1}")["Body"]
    body.read(1024)
    body.close()  # the client is gone mid-range, and never says the fill is over
    refusal = _refused(a, "next")
    assert refusal.response["Error"]["Code"] == "SlowDown"
    died = time.monotonic()
    while True:
        try:
            _open_fill(a, "next")
            break
        except ClientError:
            assert time.monotonic() - died < 20, "the dead fill's slot was never freed"
            time.sleep(0.5)
    assert time.monotonic() - died >= 5  # freed by the idle time, not by a lost count


def test_ordinary_s3_clients_are_not_limited(make_node: Any, s3: Any) -> None:
    data = os.urandom(SIZE)
    s3.put_object(Bucket=BUCKET, Key=MODEL, Body=data)
    a = _holding(make_node, "a", data, FASTLOAD_SERVE_MAX_UPLOADS="1")
    _wait_advertised(a)
    _open_fill(a, "one")
    bodies: list[bytes] = []

    def get() -> None:
        bodies.append(a.client().get_object(Bucket=BUCKET, Key=MODEL, Range="bytes=0-1048575")["Body"].read())

    threads = [threading.Thread(target=get) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert bodies == [data[:1048576]] * 4
    assert _refused(a, "two").response["Error"]["Code"] == "SlowDown"  # while fills are still limited


@pytest.mark.parametrize(("args", "env", "named"), [
    (["--max-uploads", "-1"], {}, "--max-uploads"),
    (["--max-uploads", "two"], {}, "--max-uploads"),
    ([], {"FASTLOAD_SERVE_MAX_UPLOADS": "2.5"}, "FASTLOAD_SERVE_MAX_UPLOADS"),
    ([], {"FASTLOAD_SERVE_MAX_UPLOADS": "-3"}, "FASTLOAD_SERVE_MAX_UPLOADS"),
])
def test_bad_upload_limits_are_refused_by_name(node_env: dict[str, str], tmp_path: Path, args: list[str],
                                               env: dict[str, str], named: str) -> None:
    done = subprocess.run([sys.executable, "-m", "fastload_core", "serve", "--port", "1", *args],
                          env={**node_env, "FASTLOAD_CACHE_DIR": str(tmp_path), **env}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert named in done.stderr and "Traceback" not in done.stderr
