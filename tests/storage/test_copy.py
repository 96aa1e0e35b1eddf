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


def test_a_destination_planted_as_a_link_is_refused_and_the_source_is_closed(tmp_path: Path) -> None:
    from fastload_core.storage.copy import copy_file
    from fastload_core.storage.errors import UnsafeKeyError

    source, target = tmp_path / "w.bin", tmp_path / "elsewhere"
    source.write_bytes(b"weights")
    target.write_bytes(b"")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "w.bin").symlink_to(target)

    def open_files() -> list[str]:
        return [link for link in (os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                                  if os.path.exists(f"/proc/self/fd/{fd}")) if link.startswith(str(tmp_path))]

    with pytest.raises(UnsafeKeyError):
        copy_file(source, tmp_path / "partial" / "w.bin", size=7, expected=None, uri="file:///m", name="w.bin")
    assert open_files() == [] and target.read_bytes() == b""
