"""Verified local copies keep a private source private (issue 11.10): 0600 stays 0600, an ordinary file is 0644."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fastload_core.storage import fetch


@pytest.mark.parametrize(("source_mode", "cached_mode"),
                         [(0o600, 0o600), (0o644, 0o644), (0o640, 0o640), (0o755, 0o644)])
def test_file_uri_copies_keep_private_files_private(tmp_path: Path, shm_root: Path, source_mode: int,
                                                    cached_mode: int) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "w.bin").write_bytes(os.urandom(1000))
    os.chmod(model / "w.bin", source_mode)
    in_shm = fetch(f"file://{model}", tier="shm")  # through local disk, then promoted
    assert in_shm.is_relative_to(shm_root)
    assert stat.S_IMODE((in_shm / "w.bin").stat().st_mode) == cached_mode
    on_disk = fetch(f"file://{model}", tier="local_disk")
    assert stat.S_IMODE((on_disk / "w.bin").stat().st_mode) == cached_mode
