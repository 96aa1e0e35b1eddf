"""A real TorchServe (``torchserve --start --foreground``) with everything in one temporary directory.

Its own free loopback ports, token auth off, the model API on, and ``model_store``, ``TEMP`` (where the
frontend extracts archives and keeps its pid file, so ``--stop`` finds this server and no other) and
``LOG_LOCATION`` under ``root``. Used by the adapter's end-to-end test and by its benchmark.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._process import free_port


def _bin(name: str) -> str:
    beside_python = Path(sys.executable).with_name(name)
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: pip install fastload[torchserve]")
    return found


def build_archive(name: str, store: Path, *, model_file: Path, handler: Path, config_file: Path | None = None,
                  serialized_file: Path | None = None, extra_files: list[Path] | None = None) -> Path:
    """``torch-model-archiver`` into ``store``; returns the .mar's path."""
    command = [_bin("torch-model-archiver"), "--model-name", name, "--version", "1.0", "--model-file",
               str(model_file), "--handler", str(handler), "--export-path", str(store), "--force"]
    if config_file is not None:
        command += ["--config-file", str(config_file)]
    if serialized_file is not None:
        command += ["--serialized-file", str(serialized_file)]
    if extra_files:
        command += ["--extra-files", ",".join(map(str, extra_files))]
    store.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed ({done.returncode}): {done.stderr[-2000:]}")
    return store / f"{name}.mar"


class TorchServe:
    def __init__(self, root: Path, *, env: Mapping[str, str] | None = None) -> None:
        self.root = root
        self.model_store = root / "model_store"
        self.temp = root / "temp"
        self.logs = root / "logs"
        for directory in (self.model_store, self.temp, self.logs):
            directory.mkdir(parents=True, exist_ok=True)
        self.inference_port, self.management_port, self.metrics_port = free_port(), free_port(), free_port()
        self.config = root / "config.properties"
        self.config.write_text("\n".join([
            f"inference_address=http://127.0.0.1:{self.inference_port}",
            f"management_address=http://127.0.0.1:{self.management_port}",
            f"metrics_address=http://127.0.0.1:{self.metrics_port}",
            "disable_token_authorization=true",
            "enable_model_api=true",
            f"model_store={self.model_store}",
            "install_py_dep_per_model=false",
            "disable_system_metrics=true",
            "",
        ]))
        self.env = {**os.environ, **(env or {}), "TEMP": str(self.temp), "TMPDIR": str(self.temp),
                    "LOG_LOCATION": str(self.logs), "METRICS_LOCATION": str(self.logs)}
        self.process: subprocess.Popen[bytes] | None = None
        self._stdout: Any = None

    # --- life cycle ------------------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        self._stdout = open(self.root / "stdout.log", "wb")  # noqa: SIM115  (closed in stop)
        self.process = subprocess.Popen(
            [_bin("torchserve"), "--start", "--foreground", "--ncs", "--ts-config", str(self.config),
             "--model-store", str(self.model_store)],
            env=self.env, cwd=self.root, stdout=self._stdout, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code, output = self.process.returncode, self.output()[-3000:]
                self.stop()  # closes the log, which a later test would otherwise collect (a ResourceWarning)
                raise RuntimeError(f"torchserve exited early ({code}): {output}")
            try:
                if self._request("GET", f"http://127.0.0.1:{self.inference_port}/ping", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"torchserve did not answer /ping within {timeout}s: {self.output()[-3000:]}")

    def stop(self, timeout: float = 60.0) -> int:
        """``torchserve --stop`` (it finds this server by the pid file under TEMP); returns the exit status of
        the ``--foreground`` process. Kills it if it does not stop in ``timeout``."""
        if self.process is None:
            return 0
        try:
            if self.process.poll() is None:
                subprocess.run([_bin("torchserve"), "--stop"], env=self.env, cwd=self.root, capture_output=True,
                               timeout=timeout)
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        finally:
            self.process = None
            self._stdout.close()
        return code

    def output(self) -> str:
        path = self.root / "stdout.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def model_log(self) -> str:
        path = self.logs / "model_log.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- APIs ------------------------------------------------------------------------------------------
    def register(self, archive: str, *, workers: int, timeout: float = 600.0) -> tuple[int, Any]:
        query = urllib.parse.urlencode({"url": archive, "initial_workers": workers, "synchronous": "true"})
        return self._request("POST", f"{self._management}/models?{query}", timeout=timeout)

    def unregister(self, name: str, timeout: float = 120.0) -> tuple[int, Any]:
        return self._request("DELETE", f"{self._management}/models/{name}", timeout=timeout)

    def describe(self, name: str) -> Any:
        return self._request("GET", f"{self._management}/models/{name}")[1]

    def predict(self, name: str, body: Any, timeout: float = 60.0) -> tuple[int, Any]:
        return self._request("POST", f"http://127.0.0.1:{self.inference_port}/predictions/{name}",
                             json.dumps(body).encode(), timeout=timeout)

    @property
    def _management(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @staticmethod
    def _request(method: str, url: str, data: bytes | None = None, timeout: float = 30.0) -> tuple[int, Any]:
        request = urllib.request.Request(url, data=data, method=method,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, payload = error.code, error.read()
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload.decode(errors="replace")
