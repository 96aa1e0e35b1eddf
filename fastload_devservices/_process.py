"""Start a server process on a free loopback port and wait until it answers."""

from __future__ import annotations

import random
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

_handed_out: set[int] = set()


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, also_free_at: int = 0) -> int:
    """A loopback port nobody listens on, for a server started moments later.

    It is drawn outside the kernel's ephemeral range: a port from ``bind(0)`` comes from that range, and
    so does the local port of every outgoing connection, so one of the suite's many connections can take
    it before the server binds (CI saw ``weed`` refuse its master port so). No port is handed out twice
    in a process. With ``also_free_at=k``, port + k is free and outside that range too (a weed server
    listens on p and p + 10000)."""
    ephemeral = _ephemeral_ports()
    outside = [p for p in range(10_000, 65_536 - also_free_at)
               if p not in ephemeral and p + also_free_at not in ephemeral]
    for _ in range(1000):
        # A host whose ephemeral range covers every port leaves no choice but the kernel's.
        port = random.choice(outside) if outside else _kernel_port()
        wanted = {port, port + also_free_at}
        if any(p in _handed_out or p > 65_535 for p in wanted) or not all(map(_bindable, wanted)):
            continue
        _handed_out.update(wanted)
        return port
    raise RuntimeError("no free loopback port")


def _kernel_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A server that tests can stop and start again on the same port (to simulate an outage)."""

    def __init__(self, command: Callable[[int], Sequence[str]], ready: Callable[[int], bool], *,
                 env: Mapping[str, str] | None = None) -> None:
        self._command = command
        self._env = dict(env) if env is not None else None
        self._ready = ready
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            raise RuntimeError(f"{self._command(self.port)[0]} already runs on port {self.port}; stop() it first")
        # The server's log goes to a file, not a pipe: nobody reads a pipe while the server runs, and a
        # server that logs every request (moto) blocks for good once the pipe's 64 KiB buffer is full.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115  (closed in stop)
        self._process = subprocess.Popen(
            list(self._command(self.port)), stdout=subprocess.DEVNULL, stderr=self._log, env=self._env
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._log.seek(0)
                stderr = self._log.read().decode(errors="replace")
                self.stop()
                raise RuntimeError(f"{self._command(self.port)[0]} exited early: {stderr[-2000:]}")
            if self._ready(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self._command(self.port)[0]} did not answer on port {self.port} in {timeout}s")

    @property
    def running(self) -> bool:
        """Whether the process is alive: what a fixture asks before starting it again, as a ping can time out
        on a loaded machine, and a second start on the same port would fail and orphan the first server."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (the S3 benchmark reads its CPU time from /proc)."""
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
