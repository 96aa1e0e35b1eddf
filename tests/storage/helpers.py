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


def fill_up_after(monkeypatch: pytest.MonkeyPatch, root: Path, writes: int, error: int = errno.ENOSPC) -> list[int]:
    """Make every ``os.pwrite`` into a file under ``root`` after the first ``writes`` fail with ENOSPC (or
    ``error``: EDQUOT for a tmpfs with quotas), as a tmpfs that fills up mid-download does; returns the
    offsets of every write tried there, as they happen."""
    real = os.pwrite
    tried: list[int] = []

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(root)):
            tried.append(offset)
            if len(tried) > writes:
                raise OSError(error, os.strerror(error))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return tried


def read_only(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make every write under ``root`` fail as on a read-only mount (EROFS), as a shared cache exported
    read-only to serving nodes does; reads go through. Covers what the storage code writes with: ``os.open``
    for writing or creating, ``os.mkdir``, ``os.utime`` and ``os.rename``."""
    real_open, real_mkdir, real_utime, real_rename = os.open, os.mkdir, os.utime, os.rename
    top = os.path.realpath(root)

    def under_root(path: Any, dir_fd: int | None = None) -> bool:
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.getcwd()
        where = os.path.join(base, os.fspath(path))
        return where == top or where.startswith(top + os.sep)

    def refuse(path: Any) -> OSError:
        return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC) and under_root(path, dir_fd):
            raise refuse(path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        if under_root(path, dir_fd):
            raise refuse(path)
        real_mkdir(path, mode, dir_fd=dir_fd)

    def utime(path: Any, *args: Any, **kwargs: Any) -> None:
        if under_root(path):
            raise refuse(path)
        real_utime(path, *args, **kwargs)

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if under_root(src) or under_root(dst):
            raise refuse(src)
        real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "utime", utime)
    monkeypatch.setattr(os, "rename", rename)
