"""The S3 origin against moto's real HTTP server, through the fault-injecting proxy."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig

from fastload_core.storage import fetch
from fastload_core.storage.errors import IntegrityError, ObjectChangedError, OriginError, UnsafeKeyError
from fastload_core.storage.meta import EntryMeta
from fastload_devservices.faultproxy import FaultProxy
from tests.storage.conftest import BUCKET, leftovers
from tests.storage.helpers import fill_up_after

pytestmark = pytest.mark.s3

MiB = 1024 * 1024


def put(s3: Any, key: str, data: bytes) -> None:
    """Uploaded as boto3 does by default: with a CRC32 checksum (``request_checksum_calculation``)."""
    s3.put_object(Bucket=BUCKET, Key=key, Body=data)


def put_without_checksum(s3: Any, key: str, data: bytes) -> None:
    """Uploaded with no additional checksum (older SDKs, other tools): the download is verified by MD5."""
    import boto3
    from botocore.config import Config

    plain = boto3.client("s3", endpoint_url=s3.meta.endpoint_url,
                         config=Config(request_checksum_calculation="when_required"))
    plain.put_object(Bucket=BUCKET, Key=key, Body=data)


def put_multipart(s3: Any, tmp_path: Path, key: str, data: bytes) -> None:
    source = tmp_path / f"upload-{hashlib.md5(key.encode()).hexdigest()}"
    source.write_bytes(data)
    config = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    s3.upload_file(str(source), BUCKET, key, Config=config)


def local_dir() -> Path:
    return Path(os.environ["FASTLOAD_CACHE_DIR"]) / "storage"


def test_single_object_is_fetched_once_and_byte_identical(s3: Any, proxy: FaultProxy) -> None:
    data = os.urandom(3 * MiB + 17)
    put(s3, "m1/weights.bin", data)
    path = fetch(f"s3://{BUCKET}/m1/weights.bin")
    assert path.name == "weights.bin" and path.read_bytes() == data
    assert proxy.get_body_bytes == len(data)
    assert proxy.ranged_gets == 13  # 256 KiB parts
    again = fetch(f"s3://{BUCKET}/m1/weights.bin")
    assert again == path and proxy.get_body_bytes == len(data)  # a hit: nothing downloaded
    meta = EntryMeta.read(path.parent.parent)  # verified with the CRC32 boto3 uploaded it with, not MD5
    assert meta.files[0].checksum == "crc32:" + base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    assert meta.files[0].etag == hashlib.md5(data).hexdigest()


def test_an_object_without_an_additional_checksum_is_verified_by_its_md5(s3: Any, proxy: FaultProxy) -> None:
    data = os.urandom(3 * MiB + 17)
    put_without_checksum(s3, "plain/weights.bin", data)
    path = fetch(f"s3://{BUCKET}/plain/weights.bin")
    assert path.read_bytes() == data
    meta = EntryMeta.read(path.parent.parent)
    assert meta.files[0].checksum == hashlib.md5(data).hexdigest() == meta.files[0].etag


def test_bodies_go_straight_from_the_socket_and_connections_are_reused(s3: Any, proxy: FaultProxy,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The transfer loop receives into its own buffer from http.client's stream (no botocore/urllib3
    copies); if botocore's layering changes it must fall back loudly in this test, not silently in
    production. Each fully read body hands its connection back to the pool: 13 GETs on 4 threads."""
    from fastload_core.storage import s3 as s3_module

    streams: list[object] = []
    real = s3_module._socket_stream
    monkeypatch.setattr(s3_module, "_socket_stream", lambda body: streams.append(real(body)) or streams[-1])
    data = os.urandom(3 * MiB + 17)
    put(s3, "direct/weights.bin", data)
    proxy.reset_counters()
    assert fetch(f"s3://{BUCKET}/direct/weights.bin").read_bytes() == data
    assert len(streams) == 13 and all(stream is not None for stream in streams)
    assert proxy.connections <= 4 + 1  # the download threads' connections, and the HEAD's


def test_the_fallback_read_path_gives_the_same_bytes(s3: Any, proxy: FaultProxy,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from fastload_core.storage import s3 as s3_module

    monkeypatch.setattr(s3_module, "_socket_stream", lambda body: None)  # another HTTP stack under botocore
    data = os.urandom(2 * MiB + 5)
    put(s3, "fallback/weights.bin", data)
    proxy.faults = ["short", "reset"]
    assert fetch(f"s3://{BUCKET}/fallback/weights.bin").read_bytes() == data
    assert proxy.applied == ["short", "reset"]


def test_prefix_with_sharded_checkpoint_keeps_relative_names(s3: Any, proxy: FaultProxy,
                                                              tmp_path: Path) -> None:
    shards = {f"model-0000{i}-of-00002.safetensors": os.urandom(11 * MiB + i) for i in (1, 2)}
    for name, data in shards.items():
        put_multipart(s3, tmp_path, f"llm/{name}", data)
    index = json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}).encode()
    extra = {"model.safetensors.index.json": index, "config.json": b"{}",
             "tokenizer/tokenizer.json": b'{"v":1}', "empty.txt": b""}
    for name, data in extra.items():
        put(s3, f"llm/{name}", data)
    s3.put_object(Bucket=BUCKET, Key="llm/folder-marker/", Body=b"")
    root = fetch(f"s3://{BUCKET}/llm/")
    expected = {**shards, **extra}
    got = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert got == expected
    meta = EntryMeta.read(root.parent)
    by_name = {f.name: f for f in meta.files}
    for name in shards:  # multipart ETags were recomputed from the bytes, part by part
        assert str(by_name[name].etag).endswith("-3") and by_name[name].checksum == by_name[name].etag
        assert by_name[name].part_size == 5 * MiB
    assert proxy.get_body_bytes == sum(len(v) for v in expected.values())


def test_faults_are_retried_and_resumed_to_identical_bytes(s3: Any, proxy: FaultProxy) -> None:
    data = os.urandom(4 * MiB)
    put(s3, "flaky/w.bin", data)
    proxy.faults = ["500", "503", "reset", "short", "drop", "500", "short", "reset"]
    path = fetch(f"s3://{BUCKET}/flaky/w.bin")
    assert path.read_bytes() == data
    assert proxy.applied == ["500", "503", "reset", "short", "drop", "500", "short", "reset"]
    # short and reset bodies were resumed from the byte they reached, not restarted: less than one
    # extra part was re-sent in total for the four cut responses
    assert len(data) <= proxy.get_body_bytes < len(data) + 4 * 256 * 1024


def test_a_part_cut_short_resumes_with_its_hash_intact(s3: Any, proxy: FaultProxy, tmp_path: Path) -> None:
    """Ranges hashed in their download thread (a multipart ETag's part MD5s here): a body cut mid-range is
    resumed from the byte it reached, and the hash sees each byte once. (The retry used to ask for the whole
    range again after the hash had taken the first attempt's bytes: a false IntegrityError.)"""
    data = os.urandom(11 * MiB)
    put_multipart(s3, tmp_path, "cut/w.bin", data)
    proxy.faults = ["short", "reset", "short"]
    path = fetch(f"s3://{BUCKET}/cut/w.bin")
    assert path.read_bytes() == data and proxy.applied == ["short", "reset", "short"]
    (item,) = EntryMeta.read(path.parent.parent).files
    assert item.checksum == item.etag and item.part_size == 5 * MiB
    # restarting each cut part would re-send 3 x 1/3 of a 5 MiB part; resuming re-sends at most what a reset
    # discarded in the client's socket buffer
    assert len(data) <= proxy.get_body_bytes < len(data) + 5 * MiB


@pytest.mark.parametrize(("upload", "checked"), [(put, "checksum crc32:"), (put_without_checksum, "ETag")])
def test_corrupted_bytes_fail_verification_and_nothing_is_published(s3: Any, proxy: FaultProxy, upload: Any,
                                                                     checked: str) -> None:
    data = os.urandom(2 * MiB)
    upload(s3, "bad/w.bin", data)
    proxy.faults = ["corrupt"]
    with pytest.raises(IntegrityError, match=checked):
        fetch(f"s3://{BUCKET}/bad/w.bin")
    assert not list(local_dir().rglob("meta.json")) and leftovers(local_dir()) == []
    assert fetch(f"s3://{BUCKET}/bad/w.bin").read_bytes() == data  # the next try is clean


def test_object_overwritten_mid_download_is_detected(s3: Any, proxy: FaultProxy) -> None:
    old, new = os.urandom(2 * MiB), os.urandom(2 * MiB)
    put(s3, "moving/w.bin", old)

    def overwrite(count: int) -> None:
        if count == 3:
            put(s3, "moving/w.bin", new)

    proxy.before_ranged_get = overwrite
    with pytest.raises(ObjectChangedError, match=r"overwritten|changed"):
        fetch(f"s3://{BUCKET}/moving/w.bin")
    assert not list(local_dir().rglob("meta.json")) and leftovers(local_dir()) == []
    proxy.before_ranged_get = None
    assert fetch(f"s3://{BUCKET}/moving/w.bin").read_bytes() == new


def test_a_changed_object_becomes_a_new_version(s3: Any, proxy: FaultProxy) -> None:
    put(s3, "v/w.bin", b"one" * 1000)
    first = fetch(f"s3://{BUCKET}/v/w.bin")
    put(s3, "v/w.bin", b"two" * 1000)
    second = fetch(f"s3://{BUCKET}/v/w.bin")
    assert first != second and first.read_bytes() == b"one" * 1000 and second.read_bytes() == b"two" * 1000


def test_versioned_bucket_revision_pins_a_version(s3: Any, proxy: FaultProxy,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    v1 = s3.put_object(Bucket=BUCKET, Key="ver/w.bin", Body=b"first")["VersionId"]
    s3.put_object(Bucket=BUCKET, Key="ver/w.bin", Body=b"second")
    assert fetch(f"s3://{BUCKET}/ver/w.bin", revision=v1).read_bytes() == b"first"
    assert fetch(f"s3://{BUCKET}/ver/w.bin").read_bytes() == b"second"
    monkeypatch.setenv("FASTLOAD_OFFLINE", "1")  # the VersionId still selects its cached copy, not the newest
    assert fetch(f"s3://{BUCKET}/ver/w.bin", revision=v1).read_bytes() == b"first"
    monkeypatch.delenv("FASTLOAD_OFFLINE")
    with pytest.raises(OriginError, match="a prefix names many objects"):
        fetch(f"s3://{BUCKET}/ver/", revision=v1)


@pytest.mark.parametrize("key", ["odd/a/../../escape.txt", "odd//x.txt", "odd/a\\b.txt", "odd/ctl\x01.txt"])
def test_odd_names_in_a_listing_are_rejected(s3: Any, proxy: FaultProxy, key: str) -> None:
    put(s3, "odd/good.txt", b"fine")
    put(s3, key, b"evil")
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="odd/")["Contents"]]
    assert key in listed  # the server really holds the hostile key
    with pytest.raises(UnsafeKeyError):
        fetch(f"s3://{BUCKET}/odd/")
    assert not (local_dir().parent / "escape.txt").exists() and not list(local_dir().rglob("meta.json"))


def test_missing_object_and_bucket_say_so(s3: Any, proxy: FaultProxy) -> None:
    with pytest.raises(OriginError, match="no such object"):
        fetch(f"s3://{BUCKET}/nothing/here.bin")
    with pytest.raises(OriginError, match="bucket does not exist"):
        fetch("s3://no-such-bucket/x.bin")


def test_a_failed_download_stops_its_ranges_before_closing_their_files(s3: Any, proxy: FaultProxy, shm_root: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """One range failing for good (a full tmpfs) ends the download while the others are mid-write. Their files'
    descriptors must stay open until every range has stopped: a number closed early is the next file's this
    process opens (here the next tier's download), which would then receive the stragglers' bytes."""
    import errno
    import threading
    import time

    data = os.urandom(4 * MiB)  # 16 ranges of 256 KiB on 4 threads
    put(s3, "stragglers/w.bin", data)
    real = os.pwrite
    lock = threading.Lock()
    shm_writes: list[int] = []
    misdirected: list[str] = []

    def pwrite(fd: int, buffer: Any, offset: int) -> int:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.startswith(str(shm_root)):
            with lock:
                shm_writes.append(offset)
                failing = len(shm_writes) == 2
            if failing:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            time.sleep(0.3)  # the other ranges are still writing when the failure ends the download
            try:
                now = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                now = "(closed)"
            if now != target:
                misdirected.append(f"{target} -> {now}")
        return real(fd, buffer, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    path = fetch(f"s3://{BUCKET}/stragglers/w.bin", tier="shm")
    assert not path.is_relative_to(shm_root) and path.read_bytes() == data
    assert len(shm_writes) >= 2 and misdirected == []


def test_failed_downloads_finish_their_fetch_events(s3: Any, proxy: FaultProxy) -> None:
    from prometheus_client import REGISTRY

    from tests.storage.helpers import record_events

    recorder = record_events()
    put(s3, "doomed/w.bin", os.urandom(MiB))
    proxy.faults = ["corrupt"]
    with pytest.raises(IntegrityError):
        fetch(f"s3://{BUCKET}/doomed/w.bin")
    put(s3, "gone/w.bin", os.urandom(MiB))
    proxy.before_ranged_get = lambda count: s3.delete_object(Bucket=BUCKET, Key="gone/w.bin")
    with pytest.raises(OriginError):
        fetch(f"s3://{BUCKET}/gone/w.bin")
    starts, finishes = recorder.names("start"), recorder.names("finish")
    assert len(starts) == len(finishes) == 2
    assert isinstance(finishes[0]["error"], IntegrityError) and isinstance(finishes[1]["error"], OriginError)
    assert REGISTRY.get_sample_value("fastload_fetches_in_progress", {"tier": "local_disk"}) == 0


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT], ids=["full", "over-quota"])
def test_a_tmpfs_that_fills_up_during_the_download_falls_through(s3: Any, proxy: FaultProxy, shm_root: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture, error: int) -> None:
    """The shm tier does not reserve its pages up front (see ShmTier.preallocate): a full tmpfs shows as
    ENOSPC (EDQUOT with quotas) from a download's write, and the model lands in the next tier down, nothing
    left in shm."""
    data = os.urandom(2 * MiB)
    put(s3, "full/w.bin", data)
    writes = fill_up_after(monkeypatch, shm_root, 3, error)
    path = fetch(f"s3://{BUCKET}/full/w.bin", tier="shm")
    assert not path.is_relative_to(shm_root) and path.read_bytes() == data
    assert len(writes) > 3 and leftovers(shm_root) == [] and not list(shm_root.rglob("w.bin"))
    # the filesystem filled up, not the tier's budget: raising the budget is not the advice
    assert "tier 'shm' ran out of space writing" in caplog.text and "can be freed" not in caplog.text


@pytest.mark.parametrize("upload", [put, put_multipart, put_without_checksum])
def test_a_resume_refetches_a_journalled_range_whose_bytes_never_reached_the_disk(
        s3: Any, proxy: FaultProxy, tmp_path: Path, upload: Any) -> None:
    """A power loss can keep the journal's small append and lose the data pages it describes. The resume
    must not publish those holes as verified weights: it hashes what the file holds, range by range."""
    from fastload_core.storage.base import Journal
    from fastload_core.storage.progress import Progress
    from fastload_core.storage.s3 import S3Origin
    from fastload_core.storage.settings import S3Settings
    from fastload_core.storage.uri import parse_uri

    data = os.urandom(12 * MiB + 5)
    if upload is put_multipart:
        upload(s3, tmp_path, "lost/w.bin", data)
    else:
        upload(s3, "lost/w.bin", data)
    origin = S3Origin(S3Settings(part_size=5 * MiB, concurrency=2))
    manifest = origin.resolve(parse_uri(f"s3://{BUCKET}/lost/w.bin"), None)

    def download(dest: Path) -> Any:
        dest.mkdir()
        with open(dest / "w.bin", "wb") as handle:
            handle.truncate(len(data))
        return origin.download(manifest, dest, journal=Journal(dest.with_suffix(".journal")),
                               progress=Progress("w.bin", len(data), enabled=False))

    first = download(tmp_path / "first")
    assert len(Journal(tmp_path / "first.journal").done) == 3
    (tmp_path / "first.journal").rename(tmp_path / "after-power-loss.journal")
    proxy.reset_counters()
    assert download(tmp_path / "after-power-loss") == first
    assert (tmp_path / "after-power-loss" / "w.bin").read_bytes() == data
    assert proxy.get_body_bytes == len(data)  # every journalled range was fetched again: none held its bytes


def test_a_resume_keeps_the_journalled_ranges_the_file_holds(s3: Any, proxy: FaultProxy, tmp_path: Path) -> None:
    from fastload_core.storage.base import Journal
    from fastload_core.storage.progress import Progress
    from fastload_core.storage.s3 import S3Origin
    from fastload_core.storage.settings import S3Settings
    from fastload_core.storage.uri import parse_uri

    data = os.urandom(12 * MiB + 5)
    put(s3, "kept/w.bin", data)
    origin = S3Origin(S3Settings(part_size=5 * MiB, concurrency=2))
    manifest = origin.resolve(parse_uri(f"s3://{BUCKET}/kept/w.bin"), None)
    dest = tmp_path / "dest"
    dest.mkdir()
    with open(dest / "w.bin", "wb") as handle:
        handle.truncate(len(data))
    journal = Journal(tmp_path / "dest.journal")
    origin.download(manifest, dest, journal=journal, progress=Progress("w.bin", len(data), enabled=False))
    proxy.reset_counters()
    origin.download(manifest, dest, journal=Journal(tmp_path / "dest.journal"),
                    progress=Progress("w.bin", len(data), enabled=False))
    assert proxy.get_body_bytes == 0  # all three ranges held what the journal says
    with open(dest / "w.bin", "r+b") as handle:  # now lose the third range's bytes only
        handle.seek(10 * MiB)
        handle.write(bytes(len(data) - 10 * MiB))
    proxy.reset_counters()
    origin.download(manifest, dest, journal=Journal(tmp_path / "dest.journal"),
                    progress=Progress("w.bin", len(data), enabled=False))
    assert (dest / "w.bin").read_bytes() == data
    assert proxy.get_body_bytes == len(data) - 10 * MiB
