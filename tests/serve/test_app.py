"""What needs no server: traversal refusal, S3's Range rules, the origin prepared at start-up."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from fastload_core.serve.app import S3Error, parse_range, split_path
from fastload_core.storage.errors import StorageError


@pytest.mark.parametrize("path", ["/models/../etc/passwd", "/models/a/%2e%2e/b", "/models/%2E%2E%2Fx",
                                  "/models/a/%252e%252e/b", "/models/./a", "/models/a//b", "/models/a%00b",
                                  "/models/a%5C..%5Cb", "/models//abs"])
def test_traversal_and_odd_keys_are_refused(path: str) -> None:
    with pytest.raises(S3Error) as caught:
        split_path(path)
    assert caught.value.status == 400


def test_a_plain_key_is_decoded() -> None:
    assert split_path("/models/dir/a%20b.safetensors") == ("models", "dir/a b.safetensors")
    assert split_path("/models") == ("models", "")
    assert split_path("/models/prefix/") == ("models", "prefix/")


@pytest.mark.parametrize(("header", "expected"), [
    (None, (0, 100, False)), ("bytes=0-9", (0, 10, True)), ("bytes=90-", (90, 100, True)),
    ("bytes=-10", (90, 100, True)), ("bytes=50-500", (50, 100, True)), ("bytes=-500", (0, 100, True)),
    ("items=0-9", (0, 100, False)), ("bytes=0-1,5-6", (0, 100, False)), ("bytes=x-y", (0, 100, False)),
    ("bytes=1_0-20", (0, 100, False)), ("bytes=+1-2", (0, 100, False)), ("bytes=-", (0, 100, False)),
])
def test_ranges_follow_s3(header: str | None, expected: tuple[int, int, bool]) -> None:
    got = parse_range(header, 100)
    assert (got.start, got.end, got.partial) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0", "bytes=9-3"])
def test_unsatisfiable_ranges_are_416(header: str) -> None:
    with pytest.raises(S3Error) as caught:
        parse_range(header, 100)
    assert caught.value.status == 416


@pytest.mark.parametrize("header", ["bytes=-5", "bytes=0-", "bytes=0-0"])
def test_no_range_of_an_empty_object_is_satisfiable(header: str) -> None:
    with pytest.raises(S3Error) as caught:  # not "Content-Range: bytes 0--1/0"
        parse_range(header, 0)
    assert caught.value.status == 416


def test_the_server_builds_its_origin_client_before_the_first_miss(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from fastload_core.serve.commands import warm_origin
    from fastload_core.storage.local_disk import LocalDiskTier
    from fastload_core.storage.s3 import S3Origin
    from fastload_core.storage.store import TieredStore

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    origin = S3Origin()
    store = TieredStore([LocalDiskTier(tmp_path / "disk")], origins={"s3": origin})
    warm_origin(store)
    assert origin._client is not None  # botocore imported and S3's model loaded: no request needed for that


def test_a_node_without_an_s3_origin_still_starts(tmp_path: Path) -> None:
    from fastload_core.serve.commands import warm_origin
    from fastload_core.storage.local_disk import LocalDiskTier
    from fastload_core.storage.store import TieredStore

    store = TieredStore([LocalDiskTier(tmp_path / "disk")], origins={})  # no s3 scheme: misses will say so
    warm_origin(store)
    with pytest.raises(StorageError, match="no storage backend"):
        store.origin("s3")


def test_requests_waiting_for_a_miss_wake_on_the_event_loop_as_ranges_land_or_the_fetch_fails() -> None:
    """A parallel reader's requests wait for their bytes on the loop (no executor thread each); each wakes
    when the contiguous prefix covers it, not before, and all of them when the fetch is over."""
    import asyncio
    import threading

    from fastload_core.serve.app import _Flight
    from fastload_core.storage.errors import OriginError
    from fastload_core.storage.meta import Manifest, RemoteFile

    flight = _Flight()
    flight.started("shm", Path("/nonexistent"), Manifest("s3://b/k", (RemoteFile("k", 300, "k", None, None),),
                                                         single=True))

    async def scenario() -> list[int]:
        woke: list[int] = []

        async def wait(end: int) -> None:
            await flight.until_landed("k", end)
            woke.append(end)

        first, second = asyncio.ensure_future(wait(100)), asyncio.ensure_future(wait(200))
        await asyncio.sleep(0.05)
        assert woke == []
        await asyncio.to_thread(flight.range_done, "k", 100, 200)  # not contiguous yet: nobody wakes
        await asyncio.sleep(0.05)
        assert woke == []
        threading.Thread(target=flight.range_done, args=("k", 0, 100)).start()  # from a download thread
        await asyncio.wait_for(asyncio.gather(first, second), timeout=5)
        third = asyncio.ensure_future(flight.until_landed("k", 300))
        await asyncio.sleep(0.05)
        assert not third.done()
        flight.error = OriginError("s3://b/k", "gone", code="NotFound")
        with flight.cond:
            flight.finished = True
        await asyncio.to_thread(flight._wake, None, 0)
        with pytest.raises(S3Error) as failed:  # the fetch's error, as the request answers it
            await asyncio.wait_for(third, timeout=5)
        assert failed.value.status == 404
        return woke

    assert sorted(asyncio.run(scenario())) == [100, 200]


def test_requests_waiting_for_a_miss_to_start_hold_no_executor_thread() -> None:
    """While another process on the node fills an entry, its requests wait for the fetch to start; the loop's
    few executor threads must stay free for every other request (hits, listings, other misses)."""
    import asyncio

    from fastload_core.serve.app import _Flight

    flight = _Flight()

    async def scenario() -> None:
        waiting = [asyncio.ensure_future(flight.until_started()) for _ in range(32)]
        await asyncio.sleep(0.05)
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "answered"), timeout=2) == "answered"
        assert not any(task.done() for task in waiting)
        await asyncio.to_thread(flight.started, "shm", Path("/nonexistent"), Manifest(
            "s3://b/k", (RemoteFile("k", 1, "k", None, None),), single=True))
        await asyncio.wait_for(asyncio.gather(*waiting), timeout=5)

    from fastload_core.storage.meta import Manifest, RemoteFile

    asyncio.run(scenario())


def test_a_request_streaming_a_miss_whose_fill_moves_to_the_next_tier_never_gets_wrong_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The RAM tier fills up mid-download (its file is sparse: unwritten bytes read as zeros) and the fill
    starts over in the next tier. A request that opened the first file must not send its holes as the
    object: it stops (503 before the headers; a cut connection after them), and the client asks again."""
    import asyncio
    import threading

    from fastload_core.serve import app as app_module
    from fastload_core.serve.app import ServeApp, _Flight, _Outcome
    from fastload_core.storage.eviction import Pin
    from fastload_core.storage.meta import Manifest, RemoteFile

    size = 8 * 1024 * 1024
    data = bytes(range(256)) * (size // 256)
    manifest = Manifest("s3://b/k", (RemoteFile("k", size, "k", etag="e"),), single=True)
    opened = threading.Event()
    real_open = app_module._open

    def open_and_tell(path: Path) -> Any:
        result = real_open(path)
        opened.set()
        return result

    monkeypatch.setattr(app_module, "_open", open_and_tell)

    class RestartingStore:
        def pin(self, uri: str, tier: str, watch: Any, manifest: Manifest) -> Pin:
            first, second = tmp_path / "shm", tmp_path / "local_disk"
            first.mkdir()
            with open(first / "k", "wb") as handle:
                handle.truncate(size)  # sparse, as the RAM tier leaves it
            watch.started("shm", first, manifest)
            with open(first / "k", "r+b") as handle:
                handle.write(data[:size // 4])
            watch.range_done("k", 0, size // 4)
            assert opened.wait(10)  # the request has the first file open
            os.unlink(first / "k")  # ENOSPC: discarded, and the next tier starts over
            second.mkdir()
            (second / "k").write_bytes(data)
            watch.started("local_disk", second, manifest)
            watch.range_done("k", 0, size)
            return Pin(second / "k", fd=os.open(second / "k", os.O_RDONLY), tier="local_disk")

    async def scenario() -> tuple[list[int], bytes, BaseException | None]:
        flight = _Flight()
        threading.Thread(target=flight.run, args=(RestartingStore(), "s3://b/k", "shm", manifest),
                         daemon=True).start()
        await flight.until_started()
        statuses: list[int] = []
        body = bytearray()

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            else:
                body.extend(message.get("body", b""))

        assert flight.files_dir is not None and flight.manifest is not None
        error = None
        try:
            await ServeApp._send_file(ServeApp.__new__(ServeApp), "GET", flight.files_dir / "k", flight.manifest,
                                      {}, send, _Outcome(), flight=flight, generation=flight.generation)
        except S3Error as exc:
            error = exc
        return statuses, bytes(body), error

    statuses, body, error = asyncio.run(scenario())
    # the headers go out before the first bytes are awaited: the request ends mid-body (the server cuts the
    # connection, the client asks again), having sent only the object's own bytes
    assert isinstance(error, S3Error) and error.status == 503 and statuses == [200] and data.startswith(body)


def test_a_client_that_disconnects_stops_the_response_at_once(tmp_path: Path) -> None:
    """uvicorn's send drops the body of a gone client without a word: the server must notice the disconnect
    itself, or it reads (a hit) or waits for (a miss) every remaining byte, holding a peer fill's slot."""
    import asyncio
    import threading

    from fastload_core.serve.app import CHUNK, ServeApp, _ClientGone, _Flight, _Outcome, _watch_disconnect
    from fastload_core.storage.meta import Manifest, RemoteFile

    path = tmp_path / "k"
    path.write_bytes(os.urandom(4 * CHUNK))
    manifest = Manifest("s3://b/k", (RemoteFile("k", 4 * CHUNK, "k", etag="e"),), single=True)
    app = ServeApp.__new__(ServeApp)

    async def hit() -> int:
        outcome, sent = _Outcome(), []
        messages = iter([{"type": "http.request", "body": b"", "more_body": False}])

        async def receive() -> dict[str, Any]:
            message = next(messages, None)
            if message is not None:
                return message
            while len(sent) < 2:  # the client leaves after the headers and the first chunk
                await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            await asyncio.sleep(0.1)

        watcher = asyncio.ensure_future(_watch_disconnect(receive, outcome.gone))
        with pytest.raises(_ClientGone):
            await app._send_file("GET", path, manifest, {}, send, outcome)
        watcher.cancel()
        return len([m for m in sent if m["type"] == "http.response.body"])

    assert asyncio.run(hit()) < 4

    flight = _Flight()  # a miss whose bytes never land: the request must not wait for them
    flight.started("shm", tmp_path, manifest)

    async def miss() -> None:
        outcome = _Outcome()

        async def send(message: dict[str, Any]) -> None:
            pass

        asyncio.get_running_loop().call_later(0.2, outcome.gone.set)
        with pytest.raises(_ClientGone):
            await asyncio.wait_for(app._send_file("GET", path, manifest, {}, send, outcome, flight=flight,
                                                  generation=flight.generation), timeout=10)

    asyncio.run(miss())
    threading.Thread(target=flight._wake, args=(None, 0)).start()
