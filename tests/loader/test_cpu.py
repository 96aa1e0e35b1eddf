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


def _mapped_kib(base: torch.Tensor) -> int:
    """Rss of the mapping holding ``base``, from /proc/self/smaps: the pages this process has mapped."""
    address = base.data_ptr()
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for index, line in enumerate(lines):
        start, _, rest = line.partition("-")
        if rest and " " in rest and all(c in "0123456789abcdef" for c in start):
            end = int(rest.split()[0], 16)
            if int(start, 16) <= address < end:
                return next(int(entry.split()[1]) for entry in lines[index + 1:] if entry.startswith("Rss:"))
    raise AssertionError("mapping not found in /proc/self/smaps")


def test_map_file_maps_every_page_up_front(tmp_path: Path) -> None:
    """populate=True: the kernel maps the whole file before the loader returns (one madvise on Linux),
    so the first pass over the weights takes no page faults; the bytes are the file's."""
    path = tmp_path / "blob.bin"
    data = os.urandom(4 << 20)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        lazy, eager = cpu.map_file(fd, populate=False), cpu.map_file(fd, populate=True)
        assert _mapped_kib(lazy) == 0 and _mapped_kib(eager) == 4 << 10
        assert bytes(eager.numpy()) == data
        eager[0] = eager[0] ^ 0xFF  # copy-on-write: the file itself never changes
        assert path.read_bytes() == data
    finally:
        os.close(fd)


def test_tensor_views_are_contiguous_views_of_the_base_for_any_base_alignment(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from fastload_core.loader.header import read_header

    expected = {"a_byte": torch.tensor([7], dtype=torch.uint8), "b_f32": torch.arange(6.0).reshape(2, 3),
                "c_empty": torch.zeros(2, 0, 3, dtype=torch.float16), "d_scalar": torch.tensor(3, dtype=torch.int64)}
    path = tmp_path / "m.safetensors"
    save_file(expected, path)
    header = read_header(path)
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    for base, offset in ((data, 0), (data[1:], 1)):  # a base that starts one byte in takes the general path
        views = dict(cpu.tensor_views(base, header, offset))
        for name, tensor in expected.items():
            got = views[name]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor), name
            assert got.is_contiguous() and got.stride() == tensor.stride(), name
        entry = next(entry for entry in header.tensors if entry.name == "b_f32")
        assert views["b_f32"].data_ptr() == base.data_ptr() + entry.start - offset  # a view, not a copy
