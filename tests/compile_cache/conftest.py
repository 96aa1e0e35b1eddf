"""Fixtures for compile-cache tests: a usable plugin manager, fresh child processes, a blackhole port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_child(tmp_path: Path, name: str, cache_url: str, *args: str, timeout: float = 240) -> dict[str, Any]:
    """Run ``child.py`` in a fresh interpreter with empty fastload, inductor and temp directories."""
    home = tmp_path / name
    (home / "tmp").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_"))}
    env.update(FASTLOAD_CACHE_DIR=str(home / "fastload"), TMPDIR=str(home / "tmp"), PYTHONPATH=str(ROOT))
    out = home / "result.json"
    completed = subprocess.run(
        [sys.executable, "-m", "tests.compile_cache.child", cache_url, str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if completed.returncode != 0:
        pytest.fail(f"child {name} exited {completed.returncode}:\n{completed.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["home"] = str(home)
    return result


@pytest.fixture
def blackhole_port() -> Iterator[int]:
    """A port that accepts connections and never answers: a server that is up but hung."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


@pytest.fixture(autouse=True)
def _unsigned_shared_warning_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries unsigned, and the once-per-process "shared cache without a secret" warning already given, so
    tests that count warnings see only their own; the tests of signing set the secret and a fresh flag."""
    from fastload_core.compile_cache import cache

    monkeypatch.delenv("FASTLOAD_COMPILE_CACHE_SECRET", raising=False)
    given = threading.Event()
    given.set()
    monkeypatch.setattr(cache, "_unsigned_shared_warning", given)
