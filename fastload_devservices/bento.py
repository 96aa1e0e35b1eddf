"""``bentoml serve`` in a subprocess on a free loopback port, for the end-to-end tests and the benchmark.

The server runs in its own session with ``BENTOML_HOME`` where the caller says (never the user's) and
BentoML's usage tracking off; its output goes to a file the caller can read while it runs. ``stop()``
ends the whole process group (the ``bentoml serve`` arbiter and its workers).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ._process import free_port


def bentoml_command() -> list[str]:
    return [sys.executable, "-m", "bentoml"]


class BentoServe:
    """One ``bentoml serve TARGET`` run. ``start()`` returns once the process is up (not yet ready);
    ``wait_until(check)`` polls; ``initialized()`` counts workers that finished ``__init__``."""

    def __init__(self, target: str, *, cwd: str | os.PathLike[str], home: str | os.PathLike[str],
                 log: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> None:
        self.target = target
        self.cwd = Path(cwd)
        self.home = Path(home)
        self.log_path = Path(log)
        self.port = free_port()
        self.env = {**os.environ, **(env or {}), "BENTOML_HOME": str(self.home), "BENTOML_DO_NOT_TRACK": "True"}
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> BentoServe:
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.started_at = time.monotonic()
            self.process = subprocess.Popen(
                [*bentoml_command(), "serve", self.target, "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def exited(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def initialized(self) -> int:
        """Workers whose service instance is built (BentoML logs one line per worker)."""
        return len(re.findall(r"\] Service \S+ initialized", self.output()))

    def wait_until(self, check: Callable[[], bool], *, timeout: float = 180.0, interval: float = 0.05) -> float:
        """Seconds since ``start()`` when ``check()`` first held; raises if the server exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return time.monotonic() - self.started_at
            if self.exited() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.exited()}:\n{self.output()[-4000:]}")
            time.sleep(interval)
        raise TimeoutError(f"bentoml serve: not there after {timeout:.0f}s:\n{self.output()[-4000:]}")

    def wait_exit(self, timeout: float = 120.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def post(self, route: str, payload: Mapping[str, Any], timeout: float = 30.0) -> Any:
        request = urllib.request.Request(f"{self.url}/{route}", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def try_post(self, route: str, payload: Mapping[str, Any]) -> Any:
        """``post``, or None while the server does not answer (not listening yet, or no worker up)."""
        try:
            return self.post(route, payload, timeout=10.0)
        except (OSError, urllib.error.HTTPError, ValueError):
            return None

    def get(self, route: str, timeout: float = 10.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"{self.url}/{route}", timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the process group (BentoML shuts its workers down), SIGKILL if it lingers."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        with contextlib.suppress(ProcessLookupError):  # workers that outlived the arbiter
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None

    def __enter__(self) -> BentoServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
