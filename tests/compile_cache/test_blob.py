"""The packed entry rejects anything it did not write, before it writes a single file."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastload_core.compile_cache import blob
from fastload_core.compile_cache.errors import CorruptEntryError
from fastload_core.compile_cache.keys import key_from_fields

KEY = key_from_fields({"torch": "2.13.0+cpu", "device": "cpu", "model": "m"})


def _inductor_dir(root: Path) -> Path:
    files = {
        "fxgraph/ab/fabc/entry": b"graph",
        "aotautograd/aaa/entry": b"aot",
        "cz/czkernel.so": b"\x7fELF" + bytes(range(256)) * 8,
        "cz/czkernel.cpp": b"int main() {}",
        "locks/czkernel.lock": b"",
        "cz/.123.456.tmp": b"half written",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_round_trip_carries_kernels_and_mega_but_not_locks_or_temp_files(tmp_path: Path) -> None:
    data = blob.pack(KEY, _inductor_dir(tmp_path / "src"), b"mega-bytes")
    restored = blob.unpack(data, KEY, tmp_path / "dest")
    assert restored.mega == b"mega-bytes"
    assert restored.files == 4
    dest = tmp_path / "dest"
    got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert got == ["aotautograd/aaa/entry", "cz/czkernel.cpp", "cz/czkernel.so", "fxgraph/ab/fabc/entry"]
    assert (tmp_path / "dest/cz/czkernel.so").read_bytes() == (tmp_path / "src/cz/czkernel.so").read_bytes()
    assert restored.header["fields"] == dict(KEY.fields)
    # nothing is left next to the destination
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "src"]


def test_unpack_replaces_files_another_replica_already_put_there(tmp_path: Path) -> None:
    data = blob.pack(KEY, _inductor_dir(tmp_path / "src"), None)
    (tmp_path / "dest/cz").mkdir(parents=True)
    (tmp_path / "dest/cz/czkernel.so").write_bytes(b"stale")
    restored = blob.unpack(data, KEY, tmp_path / "dest")
    assert restored.mega is None
    assert (tmp_path / "dest/cz/czkernel.so").read_bytes().startswith(b"\x7fELF")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=10_000))
def test_any_truncation_is_rejected(tmp_path: Path, cut: int) -> None:
    data = blob.pack(KEY, _inductor_dir(tmp_path / f"src{cut}"), b"m")
    cut = cut % len(data)
    with pytest.raises(CorruptEntryError):
        blob.unpack(data[:cut], KEY, tmp_path / f"dest{cut}")
    assert not (tmp_path / f"dest{cut}").exists()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_flipped_bit_is_rejected(tmp_path: Path, position: int, bit: int) -> None:
    data = bytearray(blob.pack(KEY, _inductor_dir(tmp_path / "src"), b"m"))
    data[position % len(data)] ^= 1 << bit
    with pytest.raises(CorruptEntryError):
        blob.verify(bytes(data), KEY)


def test_entry_for_another_torch_version_is_a_mismatch(tmp_path: Path) -> None:
    other = key_from_fields({**KEY.fields, "torch": "2.12.0+cpu"})
    packed = blob.pack(other, _inductor_dir(tmp_path / "src"), None)
    payload = packed[blob.read_header(packed)["_payload_offset"]:]
    # even if it somehow sits under this process's key, intact, the recorded fields give it away
    forged = blob.assemble({"format": blob.FORMAT_VERSION, "key": KEY.digest, "fields": dict(other.fields)},
                           payload)
    with pytest.raises(blob.EntryMismatchError, match=r"torch: entry '2.12.0\+cpu' vs here '2.13.0\+cpu'"):
        blob.verify(forged, KEY)


def test_not_an_entry(tmp_path: Path) -> None:
    with pytest.raises(CorruptEntryError, match="bad magic"):
        blob.verify(b"GIF89a" + bytes(100), KEY)


def test_a_header_nested_deeper_than_python_parses_is_a_corrupt_entry() -> None:
    # parsed before the checksum is checked, so a hostile or garbled entry must not escape as RecursionError
    nested = b"[" * 200_000
    entry = blob._PREFIX.pack(blob.MAGIC, blob.FORMAT_VERSION, len(nested), bytes(32)) + nested
    with pytest.raises(CorruptEntryError, match="not valid JSON"):
        blob.verify(entry, KEY)


def _forge(members: list[tarfile.TarInfo], contents: dict[str, bytes]) -> bytes:
    """An entry with a valid checksum around a hostile tar: the checksum proves integrity, not intent."""
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:gz") as tar:
        for info in members:
            data = contents.get(info.name, b"")
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return blob.assemble({"format": blob.FORMAT_VERSION, "key": KEY.digest, "fields": dict(KEY.fields)},
                         payload.getvalue())


@pytest.mark.parametrize("name", ["../escaped", "inductor/../../escaped"])
def test_members_that_leave_the_directory_are_refused(tmp_path: Path, name: str) -> None:
    data = _forge([tarfile.TarInfo(name)], {name: b"pwned"})
    with pytest.raises(CorruptEntryError, match="does not unpack safely"):
        blob.unpack(data, KEY, tmp_path / "work" / "dest")
    assert not list(tmp_path.rglob("escaped"))


def test_absolute_members_stay_inside_and_are_not_published(tmp_path: Path) -> None:
    # tarfile's "data" filter strips the leading slash; only inductor/ members are ever published
    name = "/abs/escaped"
    restored = blob.unpack(_forge([tarfile.TarInfo(name)], {name: b"pwned"}), KEY, tmp_path / "work" / "dest")
    assert restored.files == 0
    assert not list(tmp_path.rglob("escaped"))


def test_links_out_of_the_directory_are_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("inductor/cz/k.so")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    data = _forge([link], {})
    with pytest.raises(CorruptEntryError, match="does not unpack safely"):
        blob.unpack(data, KEY, tmp_path / "work" / "dest")


@pytest.mark.parametrize("fields", [["model"], "model", 3])
def test_header_fields_that_are_not_an_object_are_corrupt(fields: object) -> None:
    # checksum-valid, so only the shape check stands between it and an AttributeError
    header = {"format": blob.FORMAT_VERSION, "key": KEY.digest, "fields": fields}
    with pytest.raises(CorruptEntryError, match="header fields are a JSON"):
        blob.verify(blob.assemble(header, b""), KEY)
