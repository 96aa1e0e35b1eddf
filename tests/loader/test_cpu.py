"""Page residency decides how pages are faulted in: cached files in parallel, cold ones in one stream."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fastload_core.loader import cpu


@pytest.fixture
def mapped(tmp_path: Path) -> Iterator[tuple[int, torch.Tensor]]:
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(8 << 20))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    yield fd, cpu.map_file(fd, populate=False)
    os.close(fd)


def test_residency_follows_the_page_cache(mapped: tuple[int, torch.Tensor]) -> None:
    fd, base = mapped
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert cpu.resident_fraction(base) < 0.5
    cpu.populate_pages(base)
    assert cpu.resident_fraction(base) == 1.0


def test_populate_leaves_the_bytes_unchanged(mapped: tuple[int, torch.Tensor], tmp_path: Path) -> None:
    _, base = mapped
    cpu.populate_pages(base)
    assert bytes(base.numpy()) == (tmp_path / "blob.bin").read_bytes()


def test_tiny_and_empty_mappings() -> None:
    assert cpu.resident_fraction(torch.empty(0, dtype=torch.uint8)) == 0.0
    small = cpu.allocate_private(100)
    small.fill_(1)
    cpu.populate_pages(small)
    assert cpu.resident_fraction(small) == 1.0
