"""Early write-out of a durable tier's download (writeback.py): each completed range is handed to the disk as
it lands, so the fsync that publishes the entry has little left to write."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from fastload_core.storage import LocalDiskTier, ShmTier, TieredStore
from fastload_core.storage import writeback as writeback_module
from fastload_core.storage.writeback import EarlyWriteback

MiB = 1024 * 1024


def test_the_ranges_of_a_disk_download_are_written_out_as_they_land(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if not EarlyWriteback.available():
        pytest.skip("sync_file_range is Linux-only")
    real = writeback_module._sync_file_range
    assert real is not None
    calls: list[tuple[str, int, int, int]] = []

    def spy(fd: int, offset: int, nbytes: int, flags: int) -> int:
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, nbytes, flags))
        return real(fd, offset, nbytes, flags)

    monkeypatch.setattr(writeback_module, "_sync_file_range", spy)
    source = tmp_path / "models" / "w.bin"
    source.parent.mkdir()
    data = os.urandom(20 * MiB + 3)
    source.write_bytes(data)
    store = TieredStore([ShmTier(tmp_path / "shm", capacity=None), LocalDiskTier(tmp_path / "disk", capacity=None)],
                        show_progress=False)
    path = store.fetch(f"file://{source}", tier="local_disk")
    assert path.read_bytes() == data
    assert calls and all(flags == 2 and target.startswith(str(tmp_path / "disk")) for target, _, _, flags in calls)
    covered = sorted((offset, offset + nbytes) for _, offset, nbytes, _ in calls)
    assert covered[0][0] == 0 and covered[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))  # every byte, once

    calls.clear()
    store.fetch(f"file://{source}", tier="shm")  # tmpfs: nothing to write out
    assert not any(target.startswith(str(tmp_path / "shm")) for target, *_ in calls)
