"""A private redis-server on a free loopback port, that a test or a benchmark may kill and restart."""

from __future__ import annotations

import shutil
import socket

from ._process import ServerProcess


def answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer(ServerProcess):
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; .ci/run installs it (apt-get install redis-server)")
        super().__init__(
            lambda port: [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            answers_ping,
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

