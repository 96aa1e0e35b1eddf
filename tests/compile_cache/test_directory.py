"""The directory backend on file systems without hard links."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastload_core.compile_cache.directory import DirectoryBackend


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
        with pytest.raises(ValueError, match="unsafe compile-cache key"):
            backend.get(bad)
