"""Cache hits are re-checked (issue 11.2): sizes on every hit, block digests with FASTLOAD_VERIFY=sample|full;
a damaged entry is dropped and fetched again, and a damaged promotion source no longer fails forever."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from fastload_core.storage import LocalDiskTier, ShmTier, StorageError, TieredStore, fetch, writethrough
from fastload_core.storage.verify import BLOCK_SIZE, DIGEST_CHARS, BlockDigests, file_digests
from tests.storage.conftest import BUCKET
from tests.storage.helpers import record_events

MiB = 1024 * 1024


def _model(tmp_path: Path, size: int = 3 * BLOCK_SIZE + 12345) -> tuple[str, bytes]:
    path = tmp_path / "models" / "w.bin"
    path.parent.mkdir(parents=True)
    data = os.urandom(size)
    path.write_bytes(data)
    return f"file://{path}", data


def _store(tmp_path: Path, verify: str = "size") -> TieredStore:
    return TieredStore([ShmTier(tmp_path / "shm", capacity=None), LocalDiskTier(tmp_path / "disk", capacity=None)],
                       show_progress=False, verify=verify)


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_digests_are_recorded_at_download(tmp_path: Path) -> None:
    uri, data = _model(tmp_path)
    path = _store(tmp_path).fetch(uri)
    (item,) = json.loads((path.parent.parent / "meta.json").read_text())["files"]
    assert item["block_size"] == BLOCK_SIZE and len(item["digests"]) == 4 * DIGEST_CHARS
    whole = BlockDigests()
    whole.update(data)
    assert item["digests"] == whole.hexdigest() == file_digests(path)


def test_a_truncated_file_is_dropped_and_fetched_again(tmp_path: Path) -> None:
    uri, data = _model(tmp_path)
    store = _store(tmp_path)
    path = store.fetch(uri, tier="shm")
    os.truncate(path, len(data) - 100)  # the case: meta says N bytes, the file has N - 100
    recorder = record_events()
    again = store.fetch(uri, tier="shm")
    assert again.read_bytes() == data
    assert [e["tier"] for e in recorder.names("evict")] == ["shm"]  # dropped, then promoted from disk again


@pytest.mark.parametrize(("verify", "offset", "caught"), [
    ("size", 5, False),  # a size check cannot see a flipped byte: that is what sample and full are for
    ("sample", 5, True),  # the first block is always sampled
    ("sample", 3 * BLOCK_SIZE + 7, True),  # so is the last
    ("full", 2 * BLOCK_SIZE - 1, True),
])
def test_flipped_bytes_in_a_hit(tmp_path: Path, verify: str, offset: int, caught: bool) -> None:
    uri, data = _model(tmp_path)
    path = _store(tmp_path).fetch(uri, tier="shm")
    _flip(path, offset)
    served = _store(tmp_path, verify).fetch(uri, tier="shm").read_bytes()
    assert (served == data) is caught


def test_a_damaged_local_entry_no_longer_fails_every_promotion(tmp_path: Path) -> None:
    uri, data = _model(tmp_path)
    store = _store(tmp_path)
    on_disk = store.fetch(uri)
    _flip(on_disk, BLOCK_SIZE + 3)  # same size: only the promotion's verification can see it
    assert store.fetch(uri, tier="shm").read_bytes() == data
    assert store.fetch(uri).read_bytes() == data
    writethrough.wait()  # the disk copy is replaced by the write-through from shm
    assert store.tiers[1].lookup(on_disk.parent.parent.parent.name, on_disk.parent.parent.name) is not None


def _forget_digests(meta_path: Path) -> None:
    meta = json.loads(meta_path.read_text())
    for item in meta["files"]:  # as written before digests existed
        item.pop("block_size")
        item.pop("digests")
    meta_path.write_text(json.dumps(meta))


def test_an_entry_without_digests_is_promoted_by_md5_and_gains_digests(tmp_path: Path) -> None:
    uri, data = _model(tmp_path, 1000)
    path = _store(tmp_path).fetch(uri)
    _forget_digests(path.parent.parent / "meta.json")
    _flip(path, 10)
    in_shm = _store(tmp_path).fetch(uri, tier="shm")  # the MD5 check catches the flip; fetched afresh
    assert in_shm.read_bytes() == data
    (item,) = json.loads((in_shm.parent.parent / "meta.json").read_text())["files"]
    assert item["digests"] == file_digests(in_shm)


def test_full_verification_of_an_entry_without_digests_uses_its_checksum(tmp_path: Path) -> None:
    uri, data = _model(tmp_path, 1000)
    path = _store(tmp_path).fetch(uri)
    _forget_digests(path.parent.parent / "meta.json")
    _flip(path, 10)
    assert _store(tmp_path, "sample").fetch(uri).read_bytes() != data  # nothing to sample against
    assert _store(tmp_path, "full").fetch(uri).read_bytes() == data


def test_a_bad_verify_setting_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASTLOAD_VERIFY", "paranoid")
    uri, _ = _model(tmp_path, 10)
    with pytest.raises(StorageError, match="FASTLOAD_VERIFY='paranoid': expected one of size, sample, full"):
        fetch(uri)


@pytest.mark.s3
def test_s3_downloads_record_digests_and_full_verification_catches_a_flip(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(2 * MiB + 17)
    s3.put_object(Bucket=BUCKET, Key="verify/w.bin", Body=data)
    uri = f"s3://{BUCKET}/verify/w.bin"
    path = fetch(uri)
    (item,) = json.loads((path.parent.parent / "meta.json").read_text())["files"]
    assert item["block_size"] == 256 * 1024  # the download ranges' size (conftest), hashed as they arrived
    assert file_digests(path, item["block_size"]) == item["digests"]
    _flip(path, MiB)
    monkeypatch.setenv("FASTLOAD_VERIFY", "full")
    assert fetch(uri).read_bytes() == data
