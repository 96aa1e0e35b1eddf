"""``fastload serve`` end to end: two nodes (subprocesses with their own tiers), one moto origin behind a
byte-counting proxy, one Redis."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from botocore import UNSIGNED
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from fastload_core.storage.peers import KEY_PREFIX
from fastload_devservices.faultproxy import FaultProxy
from fastload_devservices.s3 import BUCKET
from tests.serve.conftest import KEY, SECRET

pytestmark = [pytest.mark.s3, pytest.mark.redis, pytest.mark.slow]

MODEL = "m1/model.safetensors"
SIZE = 24 * 1024 * 1024 + 12345  # six 4 MiB parts and a tail


@pytest.fixture
def data(s3: Any) -> bytes:
    payload = os.urandom(SIZE)
    s3.put_object(Bucket=BUCKET, Key=MODEL, Body=payload)
    return payload


@pytest.fixture
def node_env(node_env: dict[str, str]) -> dict[str, str]:
    return {**node_env, "FASTLOAD_S3_PART_SIZE": "4MiB", "FASTLOAD_PEER_PART_SIZE": "4MiB"}  # several ranges


def wait_advertised(redis_url: str, address: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if advertised(redis_url, address):
            return
        time.sleep(0.1)
    raise AssertionError(f"{address} never advertised an entry")


def wait_logged(node: Any, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in node.text_log():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never appeared in the node's log:\n{node.text_log()}")
        time.sleep(0.1)


def advertised(redis_url: str, address: str) -> bool:
    """Whether ``address`` holds a live (unexpired) claim on some entry."""
    client = redis.Redis.from_url(redis_url)
    return any((client.zscore(key, address) or 0) > time.time() for key in client.scan_iter(KEY_PREFIX + "*"))


def claim_expiry(redis_url: str, address: str) -> float:
    """When ``address``'s latest claim expires (0 for none): a renewal moves it on."""
    client = redis.Redis.from_url(redis_url)
    return max((client.zscore(key, address) or 0.0 for key in client.scan_iter(KEY_PREFIX + "*")), default=0.0)


def published(node: Any, timeout: float = 20.0) -> list[Path]:
    """The node's published copies in RAM, once its fetch has finished (the last bytes reach the client just
    before the entry is published, and the copy into shm may come after the one into local disk)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(node.shm.glob("*/*/files/model.safetensors"))
        if found and not list(node.shm.glob("*/.partial-*")):
            return found
        time.sleep(0.1)
    raise AssertionError(f"nothing published in {node.shm}: {list(node.shm.rglob('*'))}")


def signed_get(port: int, raw_path: str) -> tuple[int, bytes]:
    """A GET of a raw (possibly hostile) path, signed correctly, so the path rules are what answers."""
    request = AWSRequest(method="GET", url=f"http://127.0.0.1:{port}{raw_path}")
    S3SigV4Auth(Credentials(KEY, SECRET), "s3", "us-east-1").add_auth(request)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.putrequest("GET", raw_path, skip_accept_encoding=True)
    for name, value in request.headers.items():
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body


def test_boto3_through_a_node_gets_the_origins_bytes_and_the_origin_sends_them_once(
        make_node: Any, data: bytes, origin: FaultProxy, tmp_path: Path, s3: Any) -> None:
    node = make_node("a")
    client = node.client()
    origin.reset_counters()
    assert client.get_object(Bucket=BUCKET, Key=MODEL)["Body"].read() == data
    part = client.get_object(Bucket=BUCKET, Key=MODEL, Range="bytes=1000-5000000")
    assert part["ContentRange"] == f"bytes 1000-5000000/{SIZE}"
    assert part["Body"].read() == data[1000:5000001]
    assert client.get_object(Bucket=BUCKET, Key=MODEL, Range="bytes=-10")["Body"].read() == data[-10:]
    head = client.head_object(Bucket=BUCKET, Key=MODEL)
    assert head["ContentLength"] == SIZE
    assert head["ETag"] == s3.head_object(Bucket=BUCKET, Key=MODEL)["ETag"]
    client.download_file(BUCKET, MODEL, str(tmp_path / "copy"))  # s3transfer: HEAD, then parallel ranged GETs
    assert (tmp_path / "copy").read_bytes() == data
    assert origin.get_body_bytes == SIZE
    with pytest.raises(ClientError) as missing:
        client.get_object(Bucket=BUCKET, Key="m1/nothing")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"
    with pytest.raises(ClientError) as changed:
        client.get_object(Bucket=BUCKET, Key=MODEL, IfMatch='"0123"')
    assert changed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412


def test_parallel_requests_on_a_miss_share_one_download(make_node: Any, data: bytes, origin: FaultProxy) -> None:
    from concurrent.futures import ThreadPoolExecutor

    node = make_node("a")
    origin.reset_counters()
    origin.delay = 0.2  # a slow origin: the requests overlap the download and stream from it
    ranges = [(start, min(start + 3_000_000, SIZE) - 1) for start in range(0, SIZE, 3_000_000)]

    def get(bounds: tuple[int, int]) -> bytes:
        body: bytes = node.client().get_object(Bucket=BUCKET, Key=MODEL, Range=f"bytes={bounds[0]}-{bounds[1]}")[
            "Body"].read()
        return body

    with ThreadPoolExecutor(len(ranges)) as pool:
        parts = list(pool.map(get, ranges))
    assert b"".join(parts) == data
    assert origin.get_body_bytes == SIZE
    # asked once what the object is: not once per request arriving together, nor again by the fetch itself
    assert origin.requests.get("HEAD") == 1, origin.requests


def test_list_objects_v2_through_a_node(make_node: Any, data: bytes, s3: Any) -> None:
    s3.put_object(Bucket=BUCKET, Key="m1/config.json", Body=b"{}")
    s3.put_object(Bucket=BUCKET, Key="m1/sub/x y.bin", Body=b"x")
    client = make_node("a", advertise=False).client()
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="m1/")
    assert sorted(o["Key"] for o in listed["Contents"]) == ["m1/config.json", MODEL, "m1/sub/x y.bin"]
    assert {o["Key"]: o["Size"] for o in listed["Contents"]}[MODEL] == SIZE
    folded = client.list_objects_v2(Bucket=BUCKET, Prefix="m1/", Delimiter="/")
    assert [p["Prefix"] for p in folded["CommonPrefixes"]] == ["m1/sub/"]
    pages = list(client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="m1/",
                                                                   PaginationConfig={"PageSize": 1}))
    assert len(pages) == 3


def test_a_cold_node_fetches_from_its_peers_ram_not_the_origin(
        make_node: Any, data: bytes, origin: FaultProxy, redis_url: str) -> None:
    a, b = make_node("a"), make_node("b")
    assert a.client().get_object(Bucket=BUCKET, Key=MODEL)["Body"].read() == data
    wait_advertised(redis_url, f"127.0.0.1:{a.port}")
    origin.reset_counters()
    assert b.client().get_object(Bucket=BUCKET, Key=MODEL)["Body"].read() == data
    assert origin.get_body_bytes == 0
    wait_logged(b, f"from peer 127.0.0.1:{a.port}")  # logged when the fill ends: the client may be done first
    wait_advertised(redis_url, f"127.0.0.1:{b.port}")  # and now B holds it too
    assert a.stop(signal.SIGTERM) == 0  # a clean stop withdraws its claims
    assert not advertised(redis_url, f"127.0.0.1:{a.port}")


def test_the_store_of_a_node_without_serve_uses_peers_too(
        make_node: Any, data: bytes, origin: FaultProxy, redis_url: str, monkeypatch: pytest.MonkeyPatch,
        shm_root: Path) -> None:
    from fastload_core.storage.store import TieredStore

    a = make_node("a")
    a.client().get_object(Bucket=BUCKET, Key=MODEL)["Body"].read()
    wait_advertised(redis_url, f"127.0.0.1:{a.port}")
    for name in ("AWS_ENDPOINT_URL_S3", "FASTLOAD_SERVE_ACCESS_KEY_ID", "FASTLOAD_SERVE_SECRET_ACCESS_KEY",
                 "FASTLOAD_REDIS_URL"):
        monkeypatch.setenv(name, a.env[name])
    origin.reset_counters()
    path = TieredStore.from_env().fetch(f"s3://{BUCKET}/{MODEL}", tier="shm")
    assert path.read_bytes() == data
    assert origin.get_body_bytes == 0


@pytest.mark.parametrize("fault", ["killed", "corrupt", "slow", "dead"])
def test_a_failing_peer_falls_back_to_the_origin_without_a_torn_file(
        make_node: Any, data: bytes, origin: FaultProxy, redis_url: str, fault: str) -> None:
    a = make_node("a", advertise=False, start=False)
    proxy = FaultProxy(a.port)  # peers reach A through this proxy
    a.advertise = proxy.port
    a.start()
    b = make_node("b", FASTLOAD_PEER_TIMEOUT="1")
    try:
        a.client().get_object(Bucket=BUCKET, Key=MODEL)["Body"].read()
        wait_advertised(redis_url, f"127.0.0.1:{proxy.port}")
        if fault == "killed":
            proxy.before_ranged_get = lambda count: a.stop(signal.SIGKILL) if count == 3 else None
        elif fault == "corrupt":
            proxy.faults = ["ok", "corrupt"]
        elif fault == "slow":
            proxy.delay = 30
        else:
            a.stop(signal.SIGKILL)
        origin.reset_counters()
        started = time.monotonic()
        assert b.client().get_object(Bucket=BUCKET, Key=MODEL)["Body"].read() == data
        assert time.monotonic() - started < 20
        # Once the fill is over: the client can finish on a range the peer wrote (checked against its digests)
        # before the fallback's fetch of that same range from the origin has ended.
        assert [p.read_bytes() == data for p in published(b)] == [True]
        assert origin.get_body_bytes == SIZE
        assert "trying the next source" in b.text_log()
    finally:
        proxy.delay = 0
        proxy.close()


def test_unsigned_or_wrongly_signed_requests_get_403(make_node: Any, data: bytes) -> None:
    node = make_node("a", advertise=False)
    for client in (node.client(secret="wrong"), node.client(key="someone-else")):
        with pytest.raises(ClientError) as denied:
            client.get_object(Bucket=BUCKET, Key=MODEL)
        assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    import boto3

    anonymous = boto3.client("s3", endpoint_url=node.endpoint, region_name="us-east-1",
                             config=Config(signature_version=UNSIGNED))
    with pytest.raises(ClientError) as unsigned:
        anonymous.get_object(Bucket=BUCKET, Key=MODEL)
    assert unsigned.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError):
        anonymous.list_objects_v2(Bucket=BUCKET)


def test_traversal_and_links_are_refused(make_node: Any, data: bytes, tmp_path: Path) -> None:
    node = make_node("a", advertise=False)
    for path in (f"/{BUCKET}/m1/../m1/model.safetensors", f"/{BUCKET}/m1/%2e%2e/etc/passwd",
                 f"/{BUCKET}/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", "/fastload..peer/../../etc/passwd"):
        status, _ = signed_get(node.port, path)
        assert status == 400, path
    node.client().get_object(Bucket=BUCKET, Key=MODEL)["Body"].read()
    [cached] = published(node)
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * SIZE)
    cached.unlink()
    cached.symlink_to(secret)
    status, body = signed_get(node.port, f"/{BUCKET}/{MODEL}")
    assert status == 403
    assert b"sss" not in body


def test_serve_refuses_to_start_without_credentials(node_env: dict[str, str], tmp_path: Path) -> None:
    env = {k: v for k, v in node_env.items() if not k.startswith("FASTLOAD_SERVE_")}
    env["FASTLOAD_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-m", "fastload_core", "serve", "--port", "1"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "FASTLOAD_SERVE_ACCESS_KEY_ID" in done.stderr and "Traceback" not in done.stderr


def test_serve_on_a_port_in_use_says_so(node_env: dict[str, str], tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "fastload_core", "serve", "--port", str(port)],
                              env={**node_env, "FASTLOAD_CACHE_DIR": str(tmp_path)}, capture_output=True, text=True,
                              timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"fastload: error: could not listen on 127.0.0.1:{port}" in done.stderr


def test_doctor_checks_the_endpoint(make_node: Any, node_env: dict[str, str]) -> None:
    node = make_node("a", advertise=False)

    def doctor(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fastload_core", "doctor", "--serve", node.endpoint],
                              env={**node_env, **extra}, capture_output=True, text=True, timeout=120)

    good = [line for line in doctor().stdout.splitlines() if "serve endpoint" in line]
    assert good and good[0].startswith("ok"), good
    bad = doctor(FASTLOAD_SERVE_SECRET_ACCESS_KEY="wrong")
    [line] = [line for line in bad.stdout.splitlines() if "serve endpoint" in line]
    assert line.startswith("FAIL") and "refused the signature" in line and bad.returncode == 1
    node.stop()
    [line] = [line for line in doctor().stdout.splitlines() if "serve endpoint" in line]
    assert line.startswith("FAIL") and "unreachable" in line


def test_an_evicted_entry_is_withdrawn_and_a_claim_renewed(make_node: Any, data: bytes, redis_url: str) -> None:
    node = make_node("a", FASTLOAD_PEER_TTL="2")
    node.client().get_object(Bucket=BUCKET, Key=MODEL)["Body"].read()
    address = f"127.0.0.1:{node.port}"
    wait_advertised(redis_url, address)
    first = claim_expiry(redis_url, address)
    deadline = time.monotonic() + 20  # a renewal every TTL/3; a starved node may be late, so wait for one
    while claim_expiry(redis_url, address) <= first and time.monotonic() < deadline:
        time.sleep(0.1)
    assert claim_expiry(redis_url, address) > first, "the claim was never renewed"
    removed = subprocess.run([sys.executable, "-m", "fastload_core", "cache", "rm", f"s3://{BUCKET}/{MODEL}"],
                             env=node.env, capture_output=True, text=True, timeout=120)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    deadline = time.monotonic() + 10
    while advertised(redis_url, address) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not advertised(redis_url, address)


@pytest.mark.parametrize("peer_alive", [True, False])
def test_a_peer_comes_before_the_shared_mount_which_comes_before_the_origin(
        make_node: Any, data: bytes, origin: FaultProxy, redis_url: str, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path, peer_alive: bool, caplog: pytest.LogCaptureFixture) -> None:
    from fastload_core.storage.store import TieredStore

    a = make_node("a")
    a.client().get_object(Bucket=BUCKET, Key=MODEL)["Body"].read()
    wait_advertised(redis_url, f"127.0.0.1:{a.port}")
    for name in ("AWS_ENDPOINT_URL_S3", "FASTLOAD_SERVE_ACCESS_KEY_ID", "FASTLOAD_SERVE_SECRET_ACCESS_KEY",
                 "FASTLOAD_REDIS_URL", "FASTLOAD_PEER_TIMEOUT"):
        monkeypatch.setenv(name, a.env[name])
    monkeypatch.setenv("FASTLOAD_SHARED_DIR", str(tmp_path / "shared"))
    monkeypatch.setenv("FASTLOAD_PEERS", "off")
    TieredStore.from_env().fetch(f"s3://{BUCKET}/{MODEL}", tier="shared_fs")  # another node filled the mount
    monkeypatch.delenv("FASTLOAD_PEERS")
    if not peer_alive:
        a.stop(signal.SIGKILL)
    origin.reset_counters()
    with caplog.at_level("INFO", logger="fastload.storage"):
        path = TieredStore.from_env().fetch(f"s3://{BUCKET}/{MODEL}", tier="shm")
    assert path.read_bytes() == data
    assert origin.get_body_bytes == 0  # from the peer, or from the mount when the peer is dead
    peer = f"peer 127.0.0.1:{a.port}"
    assert (f"bytes from {peer}" in caplog.text) is peer_alive
    assert (f"{peer} failed" in caplog.text) is not peer_alive  # the peer is asked before the mount either way


def test_a_prefix_with_several_files_and_an_empty_one_comes_from_a_peer(
        make_node: Any, s3: Any, origin: FaultProxy, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastload_core.storage.store import TieredStore

    files = {"model-1.safetensors": os.urandom(9_000_000), "model-2.safetensors": os.urandom(5_000_000),
             "sub/config.json": b'{"a": 1}', "empty.txt": b""}
    for name, payload in files.items():
        s3.put_object(Bucket=BUCKET, Key=f"m2/{name}", Body=payload)
    a = make_node("a", FASTLOAD_PEER_TTL="3")
    filled = subprocess.run([sys.executable, "-m", "fastload_core", "fetch", f"s3://{BUCKET}/m2/", "--tier", "shm"],
                            env=a.env, capture_output=True, text=True, timeout=120)
    assert filled.returncode == 0, filled.stderr
    wait_advertised(redis_url, f"127.0.0.1:{a.port}")
    for name in ("AWS_ENDPOINT_URL_S3", "FASTLOAD_SERVE_ACCESS_KEY_ID", "FASTLOAD_SERVE_SECRET_ACCESS_KEY",
                 "FASTLOAD_REDIS_URL", "FASTLOAD_S3_PART_SIZE"):
        monkeypatch.setenv(name, a.env[name])
    origin.reset_counters()
    path = TieredStore.from_env().fetch(f"s3://{BUCKET}/m2/", tier="shm")
    assert {name: (path / name).read_bytes() for name in files} == files
    assert origin.get_body_bytes == 0
