"""The byte side of streaming: a watched fetch reports each file's landed prefix while it downloads."""

from __future__ import annotations

import os
import random
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from fastload_core.storage.errors import IntegrityError
from fastload_core.storage.meta import Manifest, RemoteFile
from fastload_core.storage.progress import Mirror, Watermark
from fastload_core.storage.streaming import RangeWatch, watch_fetch
from fastload_devservices.faultproxy import FaultProxy
from tests.storage.conftest import BUCKET

MiB = 1024 * 1024


def test_a_watermark_advances_only_over_contiguous_ranges() -> None:
    ranges = [(start, start + 10) for start in range(0, 1000, 10)]
    random.Random(0).shuffle(ranges)
    mark = Watermark()
    landed: set[int] = set()
    for start, end in ranges:
        mark.complete(start, end)
        landed.add(start)
        expected = 0
        while expected in landed:
            expected += 10
        assert mark.position == expected
    assert mark.position == 1000


def test_a_waiter_wakes_when_its_bytes_land_or_when_told_to_stop() -> None:
    mark = Watermark()
    stop = threading.Event()
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(mark.wait_until(20, stop.is_set, 10.0)))
    waiter.start()
    mark.complete(10, 20)  # not contiguous yet
    mark.complete(0, 10)
    waiter.join(5)
    assert got == [20]
    waiter = threading.Thread(target=lambda: got.append(mark.wait_until(30, stop.is_set, 10.0)))
    waiter.start()
    stop.set()
    mark.wake()
    waiter.join(5)
    assert got == [20, 20] and not waiter.is_alive()


@pytest.mark.s3
def test_a_watched_fetch_reports_the_landed_prefix_as_it_downloads(s3: Any, proxy: FaultProxy) -> None:
    data = os.urandom(2 * MiB)
    s3.put_object(Bucket=BUCKET, Key="watched/a.bin", Body=data)
    s3.put_object(Bucket=BUCKET, Key="watched/b.txt", Body=b"skip me")
    proxy.delay = 0.01
    stats: dict[str, float] = {}
    watch, future = watch_fetch(f"s3://{BUCKET}/watched/", wanted=lambda name: name.endswith(".bin"),
                                stats=stats)
    watch.started_event.wait(30)
    try:
        assert watch.manifest is not None and set(watch.fds) == {"a.bin"}
        assert watch.wait_for("a.bin", MiB) >= MiB
        assert os.pread(watch.fds["a.bin"], MiB, 0) == data[:MiB]  # readable before the fetch is done
        watch.wait_for("a.bin", len(data))
        with future.result(30) as path:
            assert (path / "a.bin").read_bytes() == data
        assert "fetch_done" in stats and watch.marks["a.bin"].position == len(data)
    finally:
        watch.close()


def test_a_mirror_reports_the_parts_of_a_span_it_has_not_filled() -> None:
    mirror = Mirror(100)
    assert mirror.gaps(0, 100) == [(0, 100)]
    mirror.filled(10, 20)
    mirror.filled(40, 70)
    mirror.filled(20, 30)
    assert mirror.gaps(0, 100) == [(0, 10), (30, 40), (70, 100)]
    assert mirror.gaps(15, 45) == [(30, 40)]
    assert mirror.gaps(40, 70) == []
    with pytest.raises(ValueError, match="positive size"):
        Mirror(0)


@pytest.mark.s3
def test_a_mirrored_watched_fetch_receives_every_byte_into_the_mirror(s3: Any, proxy: FaultProxy) -> None:
    # The S3 origin receives into the mirror and writes the file from it: the mirror holds the file, every
    # range is marked filled, and the cut and reset bodies' retries resumed into it at the right offsets.
    data = os.urandom(3 * MiB + 123)
    s3.put_object(Bucket=BUCKET, Key="mirrored/a.bin", Body=data)
    proxy.faults = ["ok", "short", "ok", "reset"]
    watch, future = watch_fetch(f"s3://{BUCKET}/mirrored/a.bin", mirror=True)
    watch.started_event.wait(30)
    try:
        with future.result(30) as path:
            assert path.read_bytes() == data
        mirror = watch.mirrors["a.bin"]
        assert bytes(mirror.view) == data and mirror.gaps(0, len(data)) == []
        assert proxy.applied == ["ok", "short", "ok", "reset"]
    finally:
        watch.close()


@pytest.mark.s3
def test_a_failed_watched_fetch_raises_to_the_waiter(s3: Any, proxy: FaultProxy) -> None:
    s3.put_object(Bucket=BUCKET, Key="spoilt/a.bin", Body=os.urandom(2 * MiB))
    proxy.faults = ["ok"] * 7 + ["corrupt"]
    watch, future = watch_fetch(f"s3://{BUCKET}/spoilt/a.bin")
    watch.started_event.wait(30)
    try:
        with pytest.raises(IntegrityError):
            watch.wait_for("a.bin", 2 * MiB + 1)  # beyond the end: only the fetch's outcome ends the wait
        with pytest.raises(IntegrityError):
            future.result(30)
    finally:
        watch.close()


def test_a_waiter_gets_everything_that_landed_and_the_whole_file_once_the_fetch_is_done(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"\0" * 100)
    manifest = Manifest("s3://b/a.bin", (RemoteFile("a.bin", 100, "a.bin", None),), single=True)
    watch = RangeWatch()
    watch.started("shm", tmp_path, manifest)
    try:
        watch.range_done("a.bin", 0, 40)
        watch.range_done("a.bin", 40, 70)
        assert watch.wait_for("a.bin", 10) == 70  # all that is there, not only what was asked for
        done: Future[Any] = Future()
        done.set_result(None)
        watch.finish(done)  # a resumed download: the ranges it had before are never reported
        assert watch.wait_for("a.bin", 71) == 100
    finally:
        watch.close()


def test_a_fill_restarted_in_the_next_tier_is_one_step_for_the_reader(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The first tier's file had fully landed when it filled up; the next tier's is still empty. A reader step
    # (snapshot, wait_for, pread, snapshot again) that overlaps the switch must see it and read again, and no
    # step may begin in the middle of it (the new descriptor with the old file's landed prefix).
    manifest = Manifest("s3://b/m", (RemoteFile("m.safetensors", 4096, "m.safetensors"),), single=True)
    for tier, fill in (("shm", b"\x11"), ("local_disk", b"\x00")):
        (tmp_path / tier).mkdir()
        (tmp_path / tier / "m.safetensors").write_bytes(fill * 4096)
    watch = RangeWatch()
    watch.started("shm", tmp_path / "shm", manifest)
    watch.range_done("m.safetensors", 0, 4096)
    fd = watch.fds["m.safetensors"]
    before = watch.snapshot()
    assert watch.wait_for("m.safetensors", 1) == 4096  # the step's wait: the first tier's file landed whole

    real_open = os.open
    during: list[int] = []

    def open_mid_switch(*args: Any, **kwargs: Any) -> int:
        reader = threading.Thread(target=lambda: during.append(watch.snapshot()))
        reader.start()
        reader.join(0.2)
        assert reader.is_alive()  # a step cannot start while the descriptors and marks change
        return real_open(*args, **kwargs)

    monkeypatch.setattr(os, "open", open_mid_switch)
    watch.started("local_disk", tmp_path / "local_disk", manifest)
    monkeypatch.setattr(os, "open", real_open)
    assert os.pread(fd, 4096, 0) == b"\x00" * 4096  # the reader's number now names the next tier's file
    assert watch.snapshot() != before  # so the step above is read again...
    deadline = 50
    while not during and deadline:
        threading.Event().wait(0.01)
        deadline -= 1
    assert during == [watch.snapshot()]  # ...and the step that waited starts on the new file and its new mark
    waiter = threading.Thread(target=lambda: watch.wait_for("m.safetensors", 1))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # nothing of the next tier's file has landed
    watch.range_done("m.safetensors", 0, 4096)
    waiter.join(5)
    assert not waiter.is_alive()
    watch.close()
