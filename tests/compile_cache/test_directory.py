"""The directory backend on file systems without hard links."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastload_core import errors
from fastload_core.compile_cache.directory import DirectoryBackend
from fastload_core.compile_cache.errors import UnsafeCacheKeyError


def test_without_hard_links_it_still_keeps_the_first_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: str, dst: str) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    backend = DirectoryBackend((tmp_path / "mount").as_uri())
    assert backend.put("v1-a", b"first") is True
    assert backend.put("v1-a", b"second") is False
    assert backend.get("v1-a") == b"first"
    assert [p.name for p in (tmp_path / "mount").iterdir()] == ["v1-a.flcc"]  # no temp files left


def test_keys_cannot_name_paths(tmp_path: Path) -> None:
    backend = DirectoryBackend((tmp_path / "d").as_uri())
    for bad in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(UnsafeCacheKeyError, match="unsafe compile-cache key") as caught:
            backend.get(bad)
        # one error tree: the same base as storage's unsafe keys, and still the ValueError it was
        assert isinstance(caught.value, errors.UnsafeKeyError) and isinstance(caught.value, ValueError)
        assert caught.value.key == bad


def test_an_unsafe_key_on_the_command_line_is_one_error_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "fastload_core", "cache", "rm", "--compile", "../escape",
                             "--compile-cache", (tmp_path / "d").as_uri()], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "fastload: error: refusing unsafe compile-cache key '../escape': it is empty, holds a '/' or starts "
        "with '.'; keys are the digests `fastload cache ls` shows"]
