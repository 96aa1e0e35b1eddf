"""publish_file: whole files or nothing, with the mode a reader on another account needs."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastload_core._atomic import mode_like, publish_file


@pytest.fixture
def umask() -> Iterator[object]:
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)

    def set_to(value: int) -> None:
        os.umask(value)

    yield set_to
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_without_a_source_the_mode_is_a_new_files(tmp_path: Path, umask: object, mask: int, expected: int) -> None:
    umask(mask)  # type: ignore[operator]
    publish_file(tmp_path / "out.bin", lambda path: path.write_bytes(b"x" * 10))
    assert _mode(tmp_path / "out.bin") == expected and (tmp_path / "out.bin").read_bytes() == b"x" * 10


@pytest.mark.parametrize(
    ("source_mode", "mask", "expected"),
    [(0o644, 0o022, 0o644), (0o600, 0o022, 0o600), (0o640, 0o022, 0o640), (0o604, 0o022, 0o604),
     (0o644, 0o027, 0o640), (0o444, 0o022, 0o644)],
)
def test_readable_by_whoever_reads_the_source(
    tmp_path: Path, umask: object, source_mode: int, mask: int, expected: int
) -> None:
    umask(mask)  # type: ignore[operator]
    source = tmp_path / "source.pt"
    source.write_bytes(b"weights")
    source.chmod(source_mode)
    publish_file(tmp_path / "out.safetensors", lambda path: path.write_bytes(b"converted"), readable_like=source)
    assert _mode(tmp_path / "out.safetensors") == expected
    assert mode_like(source) & 0o077 == source_mode & 0o044  # group and others: read bits of the source only


def test_a_writer_that_recreates_the_file_private_still_publishes_it_readable(tmp_path: Path, umask: object) -> None:
    def recreate(path: Path) -> None:  # as safetensors' save_file does: its own file, 0600
        path.unlink()
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(descriptor, b"data")
        os.close(descriptor)

    publish_file(tmp_path / "out", recreate)
    assert _mode(tmp_path / "out") == 0o644


def test_a_private_source_is_never_readable_by_others_while_written(tmp_path: Path, umask: object) -> None:
    source = tmp_path / "secret.pt"
    source.write_bytes(b"s")
    source.chmod(0o600)
    seen: list[int] = []
    publish_file(tmp_path / "out", lambda path: seen.append(_mode(path)), readable_like=source)
    assert seen == [0o600]  # narrowed before the writer got the file


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")

    def fail(path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_file(target, fail)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
