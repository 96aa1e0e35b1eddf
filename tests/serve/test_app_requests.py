"""The serve application in this process, driven through its ASGI interface (no uvicorn): what a request
costs the node besides its answer — hashing, origin fetches, executor threads, upload slots."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from fastload_devservices.s3 import BUCKET

pytestmark = [pytest.mark.s3]

Send = Callable[[dict[str, Any]], Awaitable[None]]


class _Anyone:
    """Credentials that let every request in (signing is tested in test_auth.py)."""

    def check(self, *args: Any) -> None:
        pass


def _app(**options: Any) -> Any:
    from fastload_core.serve.app import ServeApp
    from fastload_core.storage.store import TieredStore

    return ServeApp(TieredStore.from_env(), _Anyone(), "shm", **options)


async def _request(app: Any, method: str, path: str, headers: Iterable[tuple[str, str]] = (), *,
                   send: Send | None = None) -> dict[str, Any]:
    """One request; its status, headers and body. ``send``: also called with each message (it may block, as a
    client that stops reading makes uvicorn's send do)."""
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(name.lower().encode(), value.encode()) for name, value in headers]}
    out: dict[str, Any] = {"status": None, "headers": {}, "body": bytearray()}
    answered = asyncio.Event()
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await answered.wait()
        return {"type": "http.disconnect"}

    async def record(message: dict[str, Any]) -> None:
        if send is not None:
            await send(message)
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = {name.decode(): value.decode() for name, value in message["headers"]}
        else:
            out["body"].extend(message.get("body", b""))
            if not message.get("more_body"):
                answered.set()

    try:
        await app(scope, receive, record)
    finally:
        answered.set()
    return out


async def _settled(app: Any) -> None:
    """Until the fetches the app started have published (and let go of) their entries."""
    from fastload_core.storage import writethrough

    deadline = time.monotonic() + 30
    while app._flights and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not app._flights
    await asyncio.to_thread(writethrough.wait, 60)


def test_a_hit_verifies_its_entry_once_not_on_every_request(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With FASTLOAD_VERIFY=full a hit hashes the entry the first time it is served, not on each request: a
    peer fill in ranges (or an S3 client's parallel ranged GETs) would hash the whole entry per range."""
    from fastload_core.storage import eviction

    monkeypatch.setenv("FASTLOAD_VERIFY", "full")
    data = os.urandom(3 * 1024 * 1024)
    s3.put_object(Bucket=BUCKET, Key="m.bin", Body=data)
    app = _app(resolve_ttl=600)
    assert app.store.verify == "full"
    hashed: list[str] = []
    real = eviction.check_blocks

    def counting(path: Path, item: Any, mode: str) -> str | None:
        hashed.append(item.name)
        return real(path, item, mode)

    monkeypatch.setattr(eviction, "check_blocks", counting)

    async def scenario() -> None:
        assert (await _request(app, "GET", f"/{BUCKET}/m.bin"))["body"] == data  # the miss fills the RAM tier
        await _settled(app)
        hashed.clear()
        for i in range(3):
            got = await _request(app, "GET", f"/{BUCKET}/m.bin", [("Range", f"bytes={i << 20}-{(i + 1 << 20) - 1}")])
            assert got["status"] == 206 and got["body"] == data[i << 20:(i + 1) << 20]
        assert hashed == ["m.bin"]  # the first hit checked every block; the later ones its size only

    asyncio.run(scenario())


def test_a_conditional_or_unsatisfiable_get_on_a_miss_is_answered_without_fetching(
        s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """304, 412 and 416 need only the object's ETag and size (its HEAD): a miss answers them without fetching
    the object into RAM first, and as a hit answers them."""
    from fastload_core.serve.app import ServeApp

    data = os.urandom(1024 * 1024)
    s3.put_object(Bucket=BUCKET, Key="m.bin", Body=data)
    etag = s3.head_object(Bucket=BUCKET, Key="m.bin")["ETag"]
    app = _app()
    fetches: list[str] = []
    real = ServeApp._flight

    def counting(self: Any, uri: str, manifest: Any) -> Any:
        fetches.append(uri)
        return real(self, uri, manifest)

    monkeypatch.setattr(ServeApp, "_flight", counting)
    asked = [[("If-None-Match", etag)], [("If-Match", '"another"')], [("Range", f"bytes={len(data)}-")]]

    async def answers() -> list[tuple[int, dict[str, str], bytes]]:
        found = []
        for headers in asked:
            got = await _request(app, "GET", f"/{BUCKET}/m.bin", headers)
            found.append((got["status"], {k: v for k, v in got["headers"].items() if k != "content-length"},
                          bytes(got["body"])))
        return found

    async def scenario() -> None:
        missed = await answers()
        assert [status for status, _, _ in missed] == [304, 412, 416]
        assert fetches == []
        assert [e for tier in app.store.tiers for e in tier.entries()] == []
        assert (await _request(app, "GET", f"/{BUCKET}/m.bin"))["body"] == data  # a plain GET still fetches
        assert len(fetches) == 1
        await _settled(app)
        assert await answers() == missed  # hits answer the same

    asyncio.run(scenario())


def test_requests_waiting_for_another_requests_origin_head_hold_no_executor_thread(
        s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many requests for one cold key arrive while its origin HEAD is slow: one asks, the others wait on the
    loop, so the executor's threads still serve every other request (here a hit) meanwhile."""
    from fastload_core.storage.s3 import S3Origin

    s3.put_object(Bucket=BUCKET, Key="hit.bin", Body=b"hit" * 1000)
    s3.put_object(Bucket=BUCKET, Key="slow.bin", Body=b"slow" * 1000)
    app = _app(resolve_ttl=600)
    slow_head = threading.Event()
    real = S3Origin.resolve

    def resolve(self: Any, uri: Any, revision: str | None) -> Any:
        if "slow" in str(uri):
            assert slow_head.wait(30)
        return real(self, uri, revision)

    monkeypatch.setattr(S3Origin, "resolve", resolve)

    async def scenario() -> None:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(4))  # fewer than the waiting requests
        assert (await _request(app, "GET", f"/{BUCKET}/hit.bin"))["status"] == 200
        await _settled(app)
        waiting = [asyncio.ensure_future(_request(app, "GET", f"/{BUCKET}/slow.bin", [("Range", f"bytes={i}-{i}")]))
                   for i in range(8)]
        try:
            await asyncio.sleep(0.1)
            hit = await asyncio.wait_for(_request(app, "GET", f"/{BUCKET}/hit.bin", [("Range", "bytes=0-2")]), 10)
            assert hit["status"] == 206 and hit["body"] == b"hit"
            assert not any(task.done() for task in waiting)
        finally:
            slow_head.set()
        answered = await asyncio.wait_for(asyncio.gather(*waiting), 30)
        assert [bytes(got["body"]) for got in answered] == [b"slow"[i % 4:i % 4 + 1] for i in range(8)]
        await _settled(app)

    asyncio.run(scenario())


def test_requests_waiting_for_a_fetch_to_publish_hold_no_executor_thread(tmp_path: Path) -> None:
    """A request whose partial file was published (renamed) before it opened it waits for the fetch to end on
    the loop, not in an executor thread, then serves the published copy."""
    from fastload_core.serve.app import ServeApp, _Flight, _Outcome
    from fastload_core.storage.eviction import Pin
    from fastload_core.storage.meta import Manifest, RemoteFile

    data = os.urandom(1000)
    published = tmp_path / "published"
    published.write_bytes(data)
    manifest = Manifest("s3://b/k", (RemoteFile("k", len(data), "k", etag="e"),), single=True)
    flight = _Flight()
    flight.started("shm", tmp_path / "partial", manifest)  # its file is gone: renamed as it was published
    app = ServeApp.__new__(ServeApp)

    async def request() -> bytes:
        body = bytearray()

        async def send(message: dict[str, Any]) -> None:
            body.extend(message.get("body", b""))

        await app._send_file("GET", tmp_path / "partial" / "k", manifest, {}, send, _Outcome(), flight=flight,
                             generation=flight.generation)
        return bytes(body)

    def publish() -> None:
        flight.pin = Pin(published, fd=os.open(published, os.O_RDONLY), tier="shm")
        with flight.cond:
            flight.finished = True
        flight._wake(None, 0)

    async def scenario() -> None:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(2))
        waiting = [asyncio.ensure_future(request()) for _ in range(6)]
        try:
            await asyncio.sleep(0.2)
            assert await asyncio.wait_for(asyncio.to_thread(lambda: "answered"), timeout=5) == "answered"
            assert not any(task.done() for task in waiting)
        finally:
            publish()  # from the loop's thread, not the executor's (which may be all taken)
        assert await asyncio.wait_for(asyncio.gather(*waiting), timeout=10) == [data] * 6

    try:
        asyncio.run(scenario())
    finally:
        if flight.pin is not None:
            flight.pin.release()


def test_a_peer_fill_whose_client_stops_reading_frees_its_upload_slot(s3: Any) -> None:
    """A fill's client that stops reading without disconnecting (a frozen process, a host gone without a RST)
    leaves uvicorn's send waiting forever: the request ends once a send waits longer than the idle time, and
    the fill's slot frees as for a client that died, so other fills are served."""
    from fastload_core.serve.app import UploadLimit
    from fastload_core.storage.peers import FILL_HEADER, PEER_BUCKET, peer_key

    s3.put_object(Bucket=BUCKET, Key="m.bin", Body=os.urandom(1024 * 1024))
    app = _app(uploads=UploadLimit(limit=1, idle=0.3))

    async def frozen(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()  # the client never reads: its receive window stays full

    async def scenario() -> None:
        assert (await _request(app, "GET", f"/{BUCKET}/m.bin"))["status"] == 200
        await _settled(app)
        [entry] = app.store.tiers[0].entries()
        path = f"/{PEER_BUCKET}/{peer_key(entry.slug, entry.version, entry.meta.files[0].name)}"
        stuck = asyncio.ensure_future(_request(app, "GET", path, [(FILL_HEADER, "frozen")], send=frozen))
        await asyncio.sleep(0.1)
        assert (await _request(app, "GET", path, [(FILL_HEADER, "other")]))["status"] == 503  # the slot is taken
        got = await asyncio.wait_for(stuck, timeout=10)  # not forever
        assert got["status"] == 200 and not got["body"]
        await asyncio.sleep(0.4)  # the idle time, as for a fill whose client died
        assert (await _request(app, "GET", path, [(FILL_HEADER, "other")]))["status"] == 200

    asyncio.run(scenario())
