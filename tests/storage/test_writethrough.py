"""A cold fetch lands in the tier it asked for first; the slower tiers are written through from that copy
off the critical path (issue 12): verified, atomic, waited for at exit, and a failure there never fails the
fetch that already returned. Also: a reply that is not S3's is a clear error."""

from __future__ import annotations

import http.server
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastload_core.hookspecs import hookimpl
from fastload_core.plugins import get_plugin_manager
from fastload_core.storage import LocalDiskTier, ShmTier, fetch, writethrough
from fastload_core.storage.errors import OriginError
from fastload_core.storage.meta import EntryMeta, Manifest, RemoteFile
from fastload_core.storage.verify import check_blocks, file_digests
from fastload_devservices.faultproxy import FaultProxy
from tests.storage.conftest import BUCKET, leftovers
from tests.storage.helpers import record_events, spawn

MiB = 1024 * 1024


def local_dir() -> Path:
    return Path(os.environ["FASTLOAD_CACHE_DIR"]) / "storage"


def published(root: Path) -> list[Path]:
    """Entries published under a tier root (a partial's sidecar does not count)."""
    return sorted(p.parent for p in root.rglob("meta.json") if ".partial-" not in str(p))


class HoldDiskWrites:
    """A plugin that holds the write-through into local disk at its start until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.fetch_returned_first = False
        self.returned = False

    @hookimpl
    def on_fetch_start(self, uri: str, tier: str, nbytes: int) -> None:
        if tier == "local_disk":
            self.release.wait(30)
            self.fetch_returned_first = self.returned


@pytest.mark.s3
def test_a_cold_fetch_into_shm_returns_before_the_disk_copy_which_is_then_verified(
    s3: Any, proxy: FaultProxy, shm_root: Path
) -> None:
    data = os.urandom(3 * MiB + 5)
    s3.put_object(Bucket=BUCKET, Key="wt/w.bin", Body=data)
    hold = HoldDiskWrites()
    get_plugin_manager().register(hold, name="hold-disk")
    recorder = record_events()
    path = fetch(f"s3://{BUCKET}/wt/w.bin", tier="shm")
    hold.returned = True
    assert path.is_relative_to(shm_root) and path.read_bytes() == data
    assert published(local_dir()) == []  # the disk copy has not even started
    hold.release.set()
    (job,) = writethrough.wait(timeout=30)
    assert hold.fetch_returned_first and job.published == ["local_disk"] and not job.errors
    (disk_entry,) = published(local_dir())
    disk_file = disk_entry / "files" / "w.bin"
    assert disk_file.read_bytes() == data
    meta = EntryMeta.read(disk_entry)
    assert meta.files == EntryMeta.read(path.parent.parent).files  # same checksum and digests, checked in copy
    assert check_blocks(disk_file, meta.files[0], "full") is None
    assert proxy.get_body_bytes == len(data)  # one download feeds both tiers
    assert [(e["tier"], e["error"]) for e in recorder.names("finish")] == [("shm", None), ("local_disk", None)]
    assert leftovers(shm_root) == [] and leftovers(local_dir()) == []


def test_a_failed_write_through_is_reported_and_leaves_no_entry(
    tmp_path: Path, shm_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = tmp_path / "m.bin"
    data = os.urandom(MiB)
    model.write_bytes(data)
    recorder = record_events()

    def broken_publish(*args: Any, **kwargs: Any) -> Path:
        raise OSError(5, "Input/output error")

    from prometheus_client import REGISTRY

    def failures() -> float:
        return REGISTRY.get_sample_value("fastload_fetch_failures_total", {"tier": "local_disk"}) or 0.0

    before = failures()
    monkeypatch.setattr(LocalDiskTier, "publish", broken_publish)
    path = fetch(f"file://{model}", tier="shm")  # the fetch itself succeeds
    (job,) = writethrough.wait(timeout=30)
    assert failures() == before + 1
    assert path.read_bytes() == data and list(job.errors) == ["local_disk"] and job.published == []
    assert published(local_dir()) == []
    finish = [e for e in recorder.names("finish") if e["tier"] == "local_disk"]
    assert len(finish) == 1 and isinstance(finish[0]["error"], OSError)  # the hook (and metrics) hear it
    assert any("write-through to local_disk failed" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert fetch(f"file://{model}", tier="local_disk").read_bytes() == data  # nothing torn in the way


def test_shm_publication_skips_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    manifest = Manifest("file:///m", (RemoteFile("w.bin", 10, "w.bin"),), single=True)
    for tier, expect_fsync in ((ShmTier(tmp_path / "shm"), False), (LocalDiskTier(tmp_path / "disk"), True)):
        calls.clear()
        partial = tier.prepare("m", "v1", manifest, make_room=lambda need: None)
        (partial / "files" / "w.bin").write_bytes(b"0123456789")
        tier.publish("m", "v1", partial, EntryMeta.from_manifest(manifest, {}))
        assert tier.lookup("m", "v1") is not None
        assert bool(calls) is expect_fsync, tier.name


SLOW_COPY = """
import logging, os, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
import fastload_core.storage.copy as copy
real = copy.copy_file
def slow(src, dst, **kwargs):  # only the write-through's copy onto disk is slow
    result = real(src, dst, **kwargs)
    if not str(dst).startswith(os.environ["FASTLOAD_SHM_DIR"]):
        print("copied", flush=True)
        time.sleep(float(os.environ["SLEEP"]))
    return result
copy.copy_file = slow
from fastload_core.storage import fetch
print(fetch(os.environ["URI"], tier="shm"), flush=True)
"""


def test_a_pending_write_through_is_waited_for_at_exit(tmp_path: Path, shm_root: Path) -> None:
    model = tmp_path / "m.bin"
    data = os.urandom(MiB)
    model.write_bytes(data)
    child = spawn(SLOW_COPY, {"URI": f"file://{model}", "SLEEP": "1.5"})
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err[-2000:]
    in_shm = Path(out.splitlines()[0])
    assert in_shm.is_relative_to(shm_root) and in_shm.read_bytes() == data
    assert "waiting for 1 write-through(s) to finish before exit" in err
    (disk_entry,) = published(local_dir())  # the process did not exit before the copy was published
    assert (disk_entry / "files" / "m.bin").read_bytes() == data


def test_a_crash_during_write_through_leaves_each_tier_complete_or_absent(tmp_path: Path, shm_root: Path) -> None:
    model = tmp_path / "m.bin"
    data = os.urandom(MiB)
    model.write_bytes(data)
    child = spawn(SLOW_COPY, {"URI": f"file://{model}", "SLEEP": "60"})
    assert child.stdout is not None
    lines = [child.stdout.readline().strip() for _ in range(2)]  # the shm path, then "copied" (disk copy)
    assert lines[1] == "copied", lines
    os.kill(child.pid, signal.SIGKILL)
    child.communicate()
    in_shm = Path(lines[0])
    (shm_entry,) = published(shm_root)
    assert check_blocks(in_shm, EntryMeta.read(shm_entry).files[0], "full") is None  # complete
    assert published(local_dir()) == []  # absent: the copy's bytes sit in a partial nobody serves
    assert fetch(f"file://{model}", tier="local_disk").read_bytes() == data


# --- a reply that is not S3's ----------------------------------------------------------------------
@pytest.fixture
def web_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A plain HTTP server standing where the S3 endpoint should be; ``reply`` says how it answers."""
    state: dict[str, Any] = {"reply": "301-html"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = b"<html><head><title>301 Moved Permanently</title></head><body>nginx</body></html>"
            if state["reply"] == "200-html":
                self.send_response(200)
            else:
                self.send_response(301)
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}{self.path}/")
            if state["reply"] != "301-bare":
                self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_HEAD = do_GET

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{server.server_address[1]}")
    for name, value in (("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "y"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    yield state
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("reply", ["301-html", "301-bare", "200-html"])
@pytest.mark.parametrize("uri", ["s3://bucket/model.safetensors", "s3://bucket/models/m1/"])
def test_a_web_server_instead_of_s3_is_a_clear_error(web_server: dict[str, Any], reply: str, uri: str) -> None:
    web_server["reply"] = reply
    started = time.monotonic()
    with pytest.raises(OriginError, match="not an S3 endpoint") as caught:
        fetch(uri)
    assert "Recursion" not in str(caught.value) and caught.value.code == "NotS3"
    assert time.monotonic() - started < 10  # answered, not retried at length
    assert published(local_dir()) == []


@pytest.mark.s3
def test_an_html_object_on_s3_is_still_a_model_file(s3: Any, proxy: FaultProxy) -> None:
    s3.put_object(Bucket=BUCKET, Key="site/index.html", Body=b"<html></html>", ContentType="text/html")
    assert fetch(f"s3://{BUCKET}/site/index.html").read_bytes() == b"<html></html>"


def test_fetch_command_reports_both_times(tmp_path: Path, shm_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from fastload_core.storage.commands import add_commands

    model = tmp_path / "m.bin"
    model.write_bytes(os.urandom(100_000))
    parser = argparse.ArgumentParser(prog="fastload")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["fetch", f"file://{model}", "--tier", "shm"])
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert Path(out.strip()).is_relative_to(shm_root)  # stdout: the path alone
    assert "published at" in err and "write-through to local_disk done at" in err, err
    assert json.loads((published(local_dir())[0] / "meta.json").read_text())["files"][0]["digests"]


def test_digests_join_from_journal_ranges(tmp_path: Path) -> None:
    from fastload_core.storage.base import Journal
    from fastload_core.storage.verify import BlockDigests

    data = os.urandom(3 * 65536 + 100)
    journal = Journal(tmp_path / ".journal")
    for start in range(0, len(data), 131072):  # out of order is fine; the join follows the offsets
        end = min(start + 131072, len(data))
        blocks = BlockDigests(65536)
        blocks.update(data[start:end])
        journal.record("w", start, end, None, (65536, blocks.hexdigest()))
    (tmp_path / "w").write_bytes(data)
    reread = Journal(tmp_path / ".journal")  # what a resumed download finds
    assert reread.file_digests("w", len(data)) == (65536, file_digests(tmp_path / "w", 65536))
    assert reread.file_digests("w", len(data) + 1) is None  # does not cover the file
    assert reread.file_digests("other", 10) is None
    journal.record("empty-range", 0, 0, None, (65536, ""))  # a garbled line must not loop forever
    assert Journal(tmp_path / ".journal").file_digests("empty-range", 10) is None


def test_a_forked_child_does_not_wait_for_its_parents_write_through(tmp_path: Path) -> None:
    from fastload_core.storage.writethrough import pending, start

    release = threading.Event()
    job = start("file:///m", ("local_disk",), lambda job: release.wait(30) and None)
    pid = os.fork()
    if pid == 0:  # the child: no pending jobs to wait for at exit
        os._exit(0 if not pending() else 1)
    _, status = os.waitpid(pid, 0)
    release.set()
    assert os.waitstatus_to_exitcode(status) == 0 and job.wait(30)


def test_digest_blocks_follow_the_download_ranges() -> None:
    from fastload_core.storage.s3 import block_size_for
    from fastload_core.storage.verify import BLOCK_SIZE

    assert block_size_for(16 * MiB) == BLOCK_SIZE  # ranges of whole blocks
    assert block_size_for(5 * MiB) == MiB  # S3's minimum part size: 1 MiB blocks start every range
    assert block_size_for(256 * 1024) == 256 * 1024
    assert block_size_for(5 * MiB + 1) == 5 * MiB + 1  # nothing sensible divides it: a block per range


def _niceness() -> int:
    """The calling thread's own niceness (Linux: a thread id names one thread)."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own niceness is Linux's")
def test_the_write_through_runs_below_the_callers_priority_and_its_threads_inherit_it() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from fastload_core.storage.writethrough import NICE, start

    seen: dict[str, int] = {}

    def run(job: writethrough.WriteThrough) -> None:
        seen["copy"] = _niceness()
        with ThreadPoolExecutor(1) as pool:  # as the copy's own pool of file copiers
            seen["pool"] = pool.submit(_niceness).result()

    caller = _niceness()
    assert start("file:///m", ("local_disk",), run).wait(30)
    assert seen == {"copy": max(caller, NICE), "pool": max(caller, NICE)}
    assert _niceness() == caller  # the caller's own thread is untouched


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own niceness is Linux's")
def test_a_write_through_others_wait_on_keeps_the_callers_priority_until_it_lowers_it() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from fastload_core.storage.writethrough import NICE, lower_priority, start

    seen: dict[str, int] = {}

    def run(job: writethrough.WriteThrough) -> None:
        seen["waited on"] = _niceness()
        lower_priority()
        seen["after"] = _niceness()
        with ThreadPoolExecutor(1) as pool:
            seen["pool"] = pool.submit(_niceness).result()

    caller = _niceness()
    assert start("file:///m", ("shared_fs", "local_disk"), run, waited_on=True).wait(30)
    assert seen == {"waited on": caller, "after": max(caller, NICE), "pool": max(caller, NICE)}


class TierNiceness:
    """A plugin that records the niceness of the thread that starts each tier's fill."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    @hookimpl
    def on_fetch_start(self, uri: str, tier: str, nbytes: int) -> None:
        self.seen[tier] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own niceness is Linux's")
def test_the_shared_tier_is_written_through_at_full_priority_and_local_disk_below_it(
    tmp_path: Path, shm_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other nodes wait (under the lease) for this node's copy onto the shared mount: that copy must not
    run at the lowest priority; the local-disk copy after it, which nobody waits for, does."""
    from fastload_core.storage.writethrough import NICE

    monkeypatch.setenv("FASTLOAD_SHARED_DIR", str(tmp_path / "ceph"))
    model = tmp_path / "origin" / "m.bin"
    model.parent.mkdir()
    model.write_bytes(os.urandom(MiB))
    niceness = TierNiceness()
    get_plugin_manager().register(niceness, name="tier-niceness")
    caller = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    fetch(f"file://{model}", tier="shm")
    (job,) = writethrough.wait(timeout=30)
    assert job.tiers == ("shared_fs", "local_disk") and job.published == ["shared_fs", "local_disk"]
    assert niceness.seen == {"shm": caller, "shared_fs": caller, "local_disk": max(caller, NICE)}
