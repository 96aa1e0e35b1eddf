"""A node told to stop (SIGTERM) withdraws its claims before it drains its open responses, and the drain is
bounded: peers stop choosing a node that already refuses connections, and a stalled client cannot hold the
node (and its claims) until the orchestrator's SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from fastload_devservices.s3 import BUCKET
from tests.serve.conftest import KEY, SECRET
from tests.serve.test_serve import advertised, wait_advertised

pytestmark = [pytest.mark.s3, pytest.mark.redis, pytest.mark.slow]

MODEL = "m1/big.bin"
SIZE = 64 * 1024 * 1024  # far more than the socket buffers of a client that stops reading hold


def stalled_get(port: int) -> socket.socket:
    """A signed GET of the whole model whose reader stops after the first bytes (a hung or paused client)."""
    request = AWSRequest(method="GET", url=f"http://127.0.0.1:{port}/{BUCKET}/{MODEL}")
    S3SigV4Auth(Credentials(KEY, SECRET), "s3", "us-east-1").add_auth(request)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port))
    lines = [f"GET /{BUCKET}/{MODEL} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in request.headers.items()]
    client.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert client.recv(1000).startswith(b"HTTP/1.1 200")
    return client


def test_sigterm_withdraws_the_claims_at_once_and_the_drain_ends_on_time(
        make_node: Any, s3: Any, redis_url: str) -> None:
    s3.put_object(Bucket=BUCKET, Key=MODEL, Body=os.urandom(SIZE))
    node = make_node("a", start=False)
    node.args = ["--drain-timeout", "3"]
    node.start()
    assert len(node.client().get_object(Bucket=BUCKET, Key=MODEL)["Body"].read()) == SIZE
    address = f"127.0.0.1:{node.port}"
    wait_advertised(redis_url, address)
    client = stalled_get(node.port)
    try:
        assert node.process is not None
        process = node.process
        process.send_signal(signal.SIGTERM)
        withdrawn_by = time.monotonic() + 2
        while advertised(redis_url, address) and time.monotonic() < withdrawn_by:
            time.sleep(0.05)
        assert not advertised(redis_url, address)
        assert process.poll() is None  # still draining the stalled response
        assert process.wait(timeout=15) == 0  # cut after --drain-timeout, not held until the client goes
        assert "Traceback" not in node.text_log()
    finally:
        client.close()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_bad_drain_timeout_is_refused_before_start(value: str, node_env: dict[str, str], tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "fastload_core", "serve", "--port", "1", "--drain-timeout", value],
                          env={**node_env, "FASTLOAD_CACHE_DIR": str(tmp_path)}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--drain-timeout" in done.stderr
