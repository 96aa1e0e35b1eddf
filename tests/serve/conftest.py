"""Real ``fastload serve`` nodes on loopback: each a subprocess with its own tier directories, all sharing one
moto origin (behind a byte-counting proxy) and one Redis."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fastload_devservices._process import free_port
from fastload_devservices.faultproxy import FaultProxy

KEY, SECRET = "serve-test-key", "serve-test-secret"


class Node:
    def __init__(self, root: Path, env: dict[str, str], *, advertise: int | None = None) -> None:
        self.port = free_port()
        self.shm = Path("/dev/shm") / f"fastload-test-{uuid.uuid4().hex[:12]}"
        self.env = {**env, "FASTLOAD_CACHE_DIR": str(root / "cache"), "FASTLOAD_SHM_DIR": str(self.shm)}
        self.advertise = advertise
        self.args: list[str] = []  # more ``fastload serve`` options
        self.process: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.log = root / "serve.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [sys.executable, "-m", "fastload_core", "-v", "serve", "--port", str(self.port)]
        if self.advertise is not None:
            command += ["--advertise", f"127.0.0.1:{self.advertise}"]
        command += self.args
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fastload serve exited: {self.log.read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"fastload serve did not listen: {self.log.read_text()[-3000:]}")

    def client(self, *, key: str = KEY, secret: str = SECRET) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                            region_name="us-east-1", config=Config(retries={"max_attempts": 1}))

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process is None:
            return None
        self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.process = None
        return code

    def text_log(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def origin(s3: Any, s3_server: Any) -> Iterator[FaultProxy]:
    """moto behind a proxy that counts the object bytes it serves (what "the origin sent" means here)."""
    proxy = FaultProxy(s3_server.port)
    yield proxy
    proxy.close()


@pytest.fixture
def node_env(origin: FaultProxy, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTLOAD_", "AWS_"))}
    env.update({"AWS_ENDPOINT_URL_S3": origin.endpoint_url, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "FASTLOAD_SERVE_ACCESS_KEY_ID": KEY, "FASTLOAD_SERVE_SECRET_ACCESS_KEY": SECRET,
                "FASTLOAD_REDIS_URL": redis_url, "FASTLOAD_PEER_TIMEOUT": "2", "FASTLOAD_PEER_TTL": "30"})
    return env


@pytest.fixture
def make_node(tmp_path: Path, node_env: dict[str, str]) -> Iterator[Any]:
    nodes: list[Node] = []

    def make(name: str, *, advertise: bool | int = True, start: bool = True, **extra: str) -> Node:
        node = Node(tmp_path / name, {**node_env, **extra})
        if advertise is True:
            node.advertise = node.port
        elif advertise is not False:
            node.advertise = advertise
        nodes.append(node)
        if start:
            node.start()
        return node

    yield make
    for node in nodes:
        node.stop(signal.SIGKILL)
        shutil.rmtree(node.shm, ignore_errors=True)


def become_node(monkeypatch: pytest.MonkeyPatch, node: Node, tmp_path: Path, name: str) -> None:
    """This test process becomes one more node (its own tiers, no RAM tier), configured like ``node``."""
    for variable, value in node.env.items():
        if variable.startswith(("AWS_", "FASTLOAD_")):
            monkeypatch.setenv(variable, value)
    monkeypatch.setenv("FASTLOAD_CACHE_DIR", str(tmp_path / name))
    monkeypatch.setenv("FASTLOAD_SHM_DIR", "off")


def fetch_behind_a_held_lease(store: Any, uri: str, redis_url: str) -> tuple[threading.Thread, dict[str, Any]]:
    """Another node holds the Redis lease on the shared entry and never publishes it; ``store`` fetches ``uri``
    into its local disk on a thread, so it waits on that lease. The thread, and what it found: "path" or
    "error"."""
    from fastload_core.storage.uri import parse_uri

    parsed = parse_uri(uri)
    version = store.origin("s3").resolve(parsed, None).version
    lease = f"fastload:lease:shared_fs:{parsed.slug}:{version}"
    redis.Redis.from_url(redis_url).set(lease, b"another-node", px=120_000)
    found: dict[str, Any] = {}

    def fetch() -> None:
        try:
            found["path"] = store.fetch(uri, tier="local_disk")
        except BaseException as exc:  # the caller's assertions report it
            found["error"] = exc

    return threading.Thread(target=fetch), found
