"""mincore through libc: residency of a file's pages, sampled or page by page, without faulting any in."""

from __future__ import annotations

import os
from pathlib import Path

from fastload_core.loader.pagecache import PAGE, file_resident_fraction, mapped, resident_fraction_at


def test_residency_follows_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(4096 * PAGE))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        path.read_bytes()
        assert file_resident_fraction(fd) == 1.0 and file_resident_fraction(fd, sample=False) == 1.0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert file_resident_fraction(fd, sample=False) <= 0.01
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: exactly what is read comes back
        os.pread(fd, 400 * PAGE, 0)  # about a tenth back in: a full count sees it, asking faults nothing
        back = file_resident_fraction(fd, sample=False)
        assert 0.09 <= back <= 0.12
        with mapped(fd, 4096 * PAGE) as address:
            assert resident_fraction_at(address, 400 * PAGE, None) == 1.0
            assert resident_fraction_at(address + 1, PAGE) == 0.0  # unaligned: nothing known
        assert abs(file_resident_fraction(fd, sample=False) - back) < 0.01  # mapping and asking read nothing
    finally:
        os.close(fd)


def test_an_empty_file_has_nothing_resident(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    fd = os.open(tmp_path / "empty", os.O_RDONLY)
    try:
        assert file_resident_fraction(fd) == 0.0
    finally:
        os.close(fd)
