"""Streaming load from S3: tensors come out while the download is still running, identical to a plain load."""

from __future__ import annotations

import errno
import gc
import os
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastload_core.loader import cpu
from fastload_core.loader import streaming as loader_streaming
from fastload_core.loader.api import stream_state_dict
from fastload_core.storage import default_store, fetch, writethrough
from fastload_core.storage import store as store_module
from fastload_core.storage.errors import IntegrityError, OriginError, StorageError
from fastload_core.storage.streaming import PendingPin
from fastload_devservices.faultproxy import FaultProxy
from tests.storage import conftest as storage_fixtures
from tests.storage.conftest import BUCKET
from tests.storage.helpers import fill_up_after, spawn

# The storage tests' S3 fixtures: the fault proxy, and small parts so a small checkpoint takes many GETs.
proxy = storage_fixtures.proxy
_small_s3_parts = storage_fixtures._small_s3_parts

pytestmark = pytest.mark.s3


def checkpoint(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.randn(256, 512) for i in range(8)}
    tensors["bias16"] = torch.randn(1001).to(torch.float16)
    tensors["ids"] = torch.arange(7, dtype=torch.int64)
    tensors["empty"] = torch.empty(0, 3)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


def test_streaming_overlaps_the_download_and_matches_a_plain_load(s3: Any, proxy: FaultProxy,
                                                                   tmp_path: Path) -> None:
    expected = checkpoint(tmp_path / "model.safetensors")
    s3.upload_file(str(tmp_path / "model.safetensors"), BUCKET, "stream/model.safetensors")
    s3.put_object(Bucket=BUCKET, Key="stream/config.json", Body=b"{}")
    proxy.delay = 0.02
    stats: dict[str, float] = {}
    tensors, pinned = stream_state_dict(f"s3://{BUCKET}/stream/", stats=stats)
    with pinned as path:
        assert set(tensors) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(tensors[name], tensor), name
        published = load_file(str(path / "model.safetensors"))
        assert all(torch.equal(published[n], t) for n, t in expected.items())
    assert stats["first_tensor"] < stats["fetch_done"]  # loading began before the download ended
    assert proxy.get_body_bytes == os.path.getsize(tmp_path / "model.safetensors") + 2

    proxy.reset_counters()
    again, pinned = stream_state_dict(f"s3://{BUCKET}/stream/")  # now a cache hit
    pinned.release()
    assert proxy.get_body_bytes == 0 and all(torch.equal(again[n], t) for n, t in expected.items())


def test_a_cold_stream_lands_in_ram_and_a_hit_is_read_where_it_is(s3: Any, proxy: FaultProxy, tmp_path: Path) -> None:
    # The reader copies the bytes out as they land: a cold download goes into the shm tier (no disk on its
    # critical path), the default tier (local disk) is written through from it, and a later start that
    # finds the model only on disk loads it from there without copying it into RAM first.
    expected = checkpoint(tmp_path / "model.safetensors")
    s3.upload_file(str(tmp_path / "model.safetensors"), BUCKET, "ram/model.safetensors")
    uri = f"s3://{BUCKET}/ram/model.safetensors"
    tensors, pinned = stream_state_dict(uri)
    with pinned:
        assert pinned.tier == "shm"
        assert all(torch.equal(tensors[n], t) for n, t in expected.items())
    writethrough.wait()
    store = default_store()
    assert [e.entry.tier for e in store.ls()] == ["shm", "local_disk"]

    removed, busy = store.rm(uri, tier="shm")
    assert len(removed) == 1 and not busy
    proxy.reset_counters()
    again, pinned = stream_state_dict(uri)
    with pinned:
        assert pinned.tier == "local_disk"
        assert all(torch.equal(again[n], t) for n, t in expected.items())
    assert proxy.get_body_bytes == 0 and store.ls(tier="shm") == []


def test_streaming_hands_out_nothing_when_verification_fails(s3: Any, proxy: FaultProxy, tmp_path: Path) -> None:
    checkpoint(tmp_path / "model.safetensors")
    s3.put_object(Bucket=BUCKET, Key="bad/model.safetensors", Body=(tmp_path / "model.safetensors").read_bytes())
    proxy.faults = ["ok"] * 3 + ["corrupt"]
    with pytest.raises(IntegrityError):
        stream_state_dict(f"s3://{BUCKET}/bad/model.safetensors")
    proxy.faults = []
    assert fetch(f"s3://{BUCKET}/bad/model.safetensors").read_bytes() == \
        (tmp_path / "model.safetensors").read_bytes()


def test_streamed_tensors_are_received_in_place_and_only_resumed_ranges_are_copied(
        s3: Any, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The S3 origin receives the bytes straight into the tensors' private memory: a cold stream copies
    # nothing out of the landed file. Ranges that arrive another way (here: resumed from the journal of a
    # fetch that failed) are copied from the file, and the tensors are the same either way.
    expected = checkpoint(tmp_path / "model.safetensors")
    size = os.path.getsize(tmp_path / "model.safetensors")
    copied: list[int] = []
    pread_exact = cpu.pread_exact

    def counting_pread(fd: int, target: memoryview, offset: int, path: str) -> None:
        copied.append(len(target))
        pread_exact(fd, target, offset, path)

    monkeypatch.setattr(loader_streaming.cpu, "pread_exact", counting_pread)
    s3.upload_file(str(tmp_path / "model.safetensors"), BUCKET, "inplace/model.safetensors")
    tensors, pinned = stream_state_dict(f"s3://{BUCKET}/inplace/model.safetensors")
    pinned.release()
    assert all(torch.equal(tensors[n], t) for n, t in expected.items())
    assert copied == []

    s3.upload_file(str(tmp_path / "model.safetensors"), BUCKET, "resumed/model.safetensors")
    monkeypatch.setenv("FASTLOAD_S3_MAX_ATTEMPTS", "2")
    proxy.faults = ["ok"] * 3 + ["500"] * 200
    with pytest.raises(OriginError):
        stream_state_dict(f"s3://{BUCKET}/resumed/model.safetensors")
    proxy.faults = []
    proxy.reset_counters()
    tensors, pinned = stream_state_dict(f"s3://{BUCKET}/resumed/model.safetensors")
    pinned.release()
    assert all(torch.equal(tensors[n], t) for n, t in expected.items())
    assert 0 < proxy.get_body_bytes < size  # the three ranges of the failed fetch were not fetched again
    assert 0 < sum(copied) <= size - proxy.get_body_bytes + cpu.PAGE


def _gate_mirror_writes(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list[set[str]]]:
    """Hold the store's write of the RAM tier's files from the mirrors until the returned event is set; the
    list gets, for each write, the files the journal named when it began."""
    gate = threading.Event()
    journalled: list[set[str]] = []
    write_mirrors = store_module._write_mirrors

    def gated(files_dir: Path, journal: Any, mirrors: Any, uri: str) -> None:
        journalled.append({name for name, _, _ in journal.done})
        assert gate.wait(60)
        write_mirrors(files_dir, journal, mirrors, uri)

    monkeypatch.setattr(store_module, "_write_mirrors", gated)
    return gate, journalled


def test_a_cold_stream_hands_out_verified_tensors_before_its_ram_copy_is_written(
        s3: Any, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Once the download verified, the tensors (views of the memory it was received into) are handed out; the
    # shm files are written from that memory afterwards, on the fetch's thread, and only then journalled and
    # published, with the default tier written through after. Until then the copy is a pending write-through.
    expected = checkpoint(tmp_path / "model.safetensors")
    s3.upload_file(str(tmp_path / "model.safetensors"), BUCKET, "deferred/model.safetensors")
    uri = f"s3://{BUCKET}/deferred/model.safetensors"
    gate, journalled = _gate_mirror_writes(monkeypatch)
    try:
        tensors, pinned = stream_state_dict(uri)
        assert isinstance(pinned, PendingPin) and pinned.tier == "shm" and pinned.held
        assert all(torch.equal(tensors[n], t) for n, t in expected.items())
        store = default_store()
        assert store.ls() == [] and writethrough.pending()  # nothing published yet, and waited for
        assert journalled == [set()]  # received into memory only: no journal line names bytes the file lacks
    finally:
        gate.set()
    writethrough.wait(timeout=60)
    assert [e.entry.tier for e in store.ls()] == ["shm", "local_disk"]
    with pinned as path:
        assert path.read_bytes() == (tmp_path / "model.safetensors").read_bytes()
        assert all(info.in_use == (info.entry.tier == "shm") for info in store.ls())
    assert not pinned.held and not any(info.in_use for info in store.ls())
    proxy.reset_counters()
    again, hit = stream_state_dict(uri)
    hit.release()
    assert proxy.get_body_bytes == 0 and all(torch.equal(again[n], t) for n, t in expected.items())


def test_tensors_changed_before_the_ram_copy_is_written_are_not_cached(
        s3: Any, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # The caller owns the handed-out tensors at once, and they are the memory the shm files are written from:
    # a write to them before that copy must not end up in the cache. The copy is checked against the digests
    # taken as the bytes arrived, and an entry that does not match is dropped, not published.
    expected = checkpoint(tmp_path / "model.safetensors")
    s3.upload_file(str(tmp_path / "model.safetensors"), BUCKET, "changed/model.safetensors")
    uri = f"s3://{BUCKET}/changed/model.safetensors"
    write_mirrors = store_module._write_mirrors
    gate, _ = _gate_mirror_writes(monkeypatch)
    try:
        tensors, pinned = stream_state_dict(uri)
        tensors["layers.3.weight"].mul_(2)
    finally:
        gate.set()
    writethrough.wait(timeout=60)
    with pytest.raises(IntegrityError, match="changed in memory"):
        _ = pinned.path
    pinned.release()
    assert default_store().ls() == []
    assert "was not published" in caplog.text
    monkeypatch.setattr(store_module, "_write_mirrors", write_mirrors)
    proxy.reset_counters()
    tensors, pinned = stream_state_dict(uri)
    pinned.release()
    assert proxy.get_body_bytes == os.path.getsize(tmp_path / "model.safetensors")
    assert all(torch.equal(tensors[n], t) for n, t in expected.items())


STREAM_AND_EXIT = """
import logging, os, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
import fastload_core.storage.store as store
real = store._write_mirrors
def slow(*args):  # the shm copy from the tensors' memory is slow: the load returns long before it is done
    time.sleep(float(os.environ["SLEEP"]))
    real(*args)
store._write_mirrors = slow
from fastload_core.loader.api import stream_state_dict
tensors, pinned = stream_state_dict(os.environ["URI"])
pinned.release()
print(type(pinned).__name__, len(tensors), flush=True)
"""


def test_a_process_does_not_exit_before_its_streamed_entry_is_published(
        s3: Any, proxy: FaultProxy, tmp_path: Path, shm_root: Path) -> None:
    checkpoint(tmp_path / "model.safetensors")
    s3.upload_file(str(tmp_path / "model.safetensors"), BUCKET, "exit/model.safetensors")
    uri = f"s3://{BUCKET}/exit/model.safetensors"
    child = spawn(STREAM_AND_EXIT, {"URI": uri, "SLEEP": "1.5"})
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-2000:]
    assert out.split() == ["PendingPin", "11"]  # handed out before the entry was published
    assert "waiting for 1 write-through(s) to finish before exit" in err
    entries = default_store().ls()
    assert [e.entry.tier for e in entries] == ["shm", "local_disk"]
    for info in entries:
        assert (info.entry.path / "files" / "model.safetensors").read_bytes() == \
            (tmp_path / "model.safetensors").read_bytes()


@pytest.mark.parametrize(("error", "raised", "message"), [
    (OSError(errno.EIO, "the shm device failed"), OSError, "shm device failed"),
    # /dev/shm filling up while the copy is written is the RAM tier's usual way to say it is full (it reserves
    # nothing up front); the next tier down would mean a second download of the whole model for a cache copy
    (OSError(errno.ENOSPC, "No space left on device"), StorageError,
     "filled up while the streamed model's cache copy was written"),
], ids=["io-error", "ram-tier-full"])
def test_a_publication_that_fails_after_verification_costs_only_the_cache_entry(
        s3: Any, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, error: OSError, raised: type[Exception], message: str) -> None:
    # However fast the shm copy fails after the download verified, the verified tensors are handed out and the
    # failure is logged, as a failed write-through is; the pin says what failed; the origin sent the model once,
    # and the next start downloads it again.
    expected = checkpoint(tmp_path / "model.safetensors")
    s3.upload_file(str(tmp_path / "model.safetensors"), BUCKET, "unpublished/model.safetensors")

    def broken(*args: Any) -> None:
        raise error

    monkeypatch.setattr(store_module, "_write_mirrors", broken)
    proxy.reset_counters()
    tensors, pinned = stream_state_dict(f"s3://{BUCKET}/unpublished/model.safetensors")
    assert all(torch.equal(tensors[n], t) for n, t in expected.items())
    writethrough.wait(timeout=60)
    assert proxy.get_body_bytes == os.path.getsize(tmp_path / "model.safetensors")  # once, not twice
    with pytest.raises(raised, match=message):
        _ = pinned.path
    pinned.release()
    assert default_store().ls() == [] and "was not published" in caplog.text


def test_the_streamed_models_memory_goes_with_its_tensors_not_with_its_pin(
        s3: Any, proxy: FaultProxy, tmp_path: Path) -> None:
    # The tensors are views of the memory the download was received into; a caller keeps the pin for as long as
    # it serves the model (the entry stays in RAM), and often copies the tensors into its module first. The pin
    # must not keep that model-sized memory alive once the tensors are gone (no garbage collection needed).
    checkpoint(tmp_path / "model.safetensors")
    s3.upload_file(str(tmp_path / "model.safetensors"), BUCKET, "memory/model.safetensors")
    seen: list[Any] = []
    real = store_module._write_mirrors

    def record(files_dir: Path, journal: Any, mirrors: dict[str, Any], uri: str) -> None:
        seen.extend(weakref.ref(mirror) for mirror in mirrors.values())
        real(files_dir, journal, mirrors, uri)

    store_module._write_mirrors = record  # type: ignore[assignment]
    try:
        tensors, pinned = stream_state_dict(f"s3://{BUCKET}/memory/model.safetensors")
        writethrough.wait(timeout=60)
    finally:
        store_module._write_mirrors = real  # type: ignore[assignment]
    assert isinstance(pinned, PendingPin) and pinned.held and seen
    gc.disable()
    try:
        del tensors
        assert all(ref() is None for ref in seen)  # freed with the tensors, while the pin is still held
    finally:
        gc.enable()
    assert pinned.path.is_file()
    pinned.release()


def test_a_ram_tier_that_fills_up_mid_stream_hands_out_the_next_tiers_bytes(
        s3: Any, proxy: FaultProxy, tmp_path: Path, shm_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An object without an additional checksum is hashed from its file as it lands, so the download writes into
    # /dev/shm as it goes and a full tmpfs shows mid-download (ENOSPC). The fill restarts in the next tier down
    # while the reader is following the first: it must read that tier's file from then on (not the discarded
    # one, whose unwritten bytes read as zeros), and keep no descriptor of the discarded file open.
    import boto3
    from botocore.config import Config

    expected = checkpoint(tmp_path / "model.safetensors")
    plain = boto3.client("s3", endpoint_url=s3.meta.endpoint_url,
                         config=Config(request_checksum_calculation="when_required"))
    plain.upload_file(str(tmp_path / "model.safetensors"), BUCKET, "fills/model.safetensors")
    shm_writes = fill_up_after(monkeypatch, shm_root, 4)
    proxy.delay = 0.02
    tensors, pinned = stream_state_dict(f"s3://{BUCKET}/fills/model.safetensors")
    with pinned as path:
        assert len(shm_writes) > 4 and pinned.tier == "local_disk"
        assert all(torch.equal(tensors[n], t) for n, t in expected.items())
        assert path.read_bytes() == (tmp_path / "model.safetensors").read_bytes()
    writethrough.wait(timeout=60)
    assert not [link for link in (os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                                  if os.path.exists(f"/proc/self/fd/{fd}"))
                if link.startswith(str(shm_root))]


@pytest.mark.parametrize(("header_len", "message"), [
    (2**64 - 1, "exceeds the 100000000-byte limit"),
    (2**40, "exceeds the 100000000-byte limit"),
    (10**6, "runs past the end of the"),
], ids=["max-u64", "1-TiB", "past-the-end"])
def test_a_streamed_object_with_a_bad_header_length_is_a_header_error(
        s3: Any, proxy: FaultProxy, header_len: int, message: str) -> None:
    # The same checks as a local file's, before anything of that size is read or waited for
    import struct

    from fastload_core.errors import CheckpointError

    s3.put_object(Bucket=BUCKET, Key="badlen/model.safetensors", Body=struct.pack("<Q", header_len) + b"{}" * 64)
    with pytest.raises(CheckpointError, match=message):
        stream_state_dict(f"s3://{BUCKET}/badlen/model.safetensors")
    writethrough.wait(timeout=60)
