"""Small helpers shared by the storage tests."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fastload_core.hookspecs import hookimpl
from fastload_core.plugins import get_plugin_manager

REPO = Path(__file__).resolve().parents[2]


class Recorder:
    """A plugin that records every storage event it hears."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def names(self, event: str) -> list[dict[str, Any]]:
        return [kwargs for name, kwargs in self.events if name == event]

    @hookimpl
    def on_tier_hit(self, uri: str, tier: str, path: str) -> None:
        self.events.append(("hit", {"uri": uri, "tier": tier, "path": path}))

    @hookimpl
    def on_tier_miss(self, uri: str, tier: str) -> None:
        self.events.append(("miss", {"uri": uri, "tier": tier}))

    @hookimpl
    def on_tier_full(self, uri: str, tier: str, nbytes: int) -> None:
        self.events.append(("full", {"uri": uri, "tier": tier, "nbytes": nbytes}))

    @hookimpl
    def on_fetch_start(self, uri: str, tier: str, nbytes: int) -> None:
        self.events.append(("start", {"uri": uri, "tier": tier, "nbytes": nbytes}))

    @hookimpl
    def on_fetch_finish(self, uri: str, tier: str, nbytes: int, seconds: float,
                        error: BaseException | None) -> None:
        self.events.append(("finish", {"uri": uri, "tier": tier, "nbytes": nbytes, "seconds": seconds,
                                       "error": error}))

    @hookimpl
    def on_evict(self, tier: str, key: str, nbytes: int) -> None:
        self.events.append(("evict", {"tier": tier, "key": key, "nbytes": nbytes}))


def record_events() -> Recorder:
    recorder = Recorder()
    get_plugin_manager().register(recorder, name="test-recorder")
    return recorder


def spawn(code: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start a real Python process running ``code`` from the repository root with this test's environment."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO)
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def fill_up_after(monkeypatch: pytest.MonkeyPatch, root: Path, writes: int) -> list[int]:
    """Make every ``os.pwrite`` into a file under ``root`` after the first ``writes`` fail with ENOSPC, as a
    tmpfs that fills up mid-download does; returns the offsets of every write tried there, as they happen."""
    real = os.pwrite
    tried: list[int] = []

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(root)):
            tried.append(offset)
            if len(tried) > writes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return tried
