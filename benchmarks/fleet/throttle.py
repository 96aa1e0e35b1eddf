"""Stated bandwidth limits for the fleet harness: token buckets shared between processes, a rate-limiting
TCP proxy in front of the S3 origin, and a throttled read of the shared mount.

All the harness's "nodes" share one machine (one page cache, one loopback, two cores), so without limits a
node's network, the origin and the shared mount are all as fast as memory. Each limit is a ``Bucket``: a
FIFO reservation clock (the next free instant, in a small file under a lock) so any number of processes
drawing on it together get at most ``rate`` bytes per second in total, in the order they asked. A chunk
that passes through several links (the origin's total, one node's network) reserves on each and waits
for the latest of them, as a flow limited by its narrowest link would.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

_STATE = struct.Struct("dq")  # the link's next free instant (time.time()), bytes passed so far


class Bucket:
    """``rate`` bytes per second shared by every process that opens the same ``path``; ``rate=None``
    means unlimited (reservations return at once). Either way the file counts every byte that passed, so
    the harness reads a link's total from it after the run, whichever processes used it."""

    def __init__(self, path: str | os.PathLike[str], rate: float | None) -> None:
        self.path = Path(path)
        self.rate = rate
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def reserve(self, nbytes: int) -> float:
        """Claim ``nbytes``; return the ``time.time()`` at which they have passed the link."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            free, total = self._state()
            now = time.time()
            done = max(now, free) + nbytes / self.rate if self.rate else now
            os.pwrite(self._fd, _STATE.pack(done, total + nbytes), 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return done

    def _state(self) -> tuple[float, int]:
        raw = os.pread(self._fd, _STATE.size, 0)
        return _STATE.unpack(raw) if len(raw) == _STATE.size else (0.0, 0)

    @property
    def total(self) -> int:
        """Bytes that have passed this link, from every process."""
        return self._state()[1]

    def close(self) -> None:
        os.close(self._fd)


def pass_through(buckets: Sequence[Bucket], nbytes: int) -> float:
    """Reserve on every link and return how long the caller must wait for the slowest."""
    done = max((bucket.reserve(nbytes) for bucket in buckets), default=0.0)
    return max(0.0, done - time.time())


def buckets_from(spec: str) -> list[Bucket]:
    """``PATH=RATE,PATH=RATE`` (bytes/s, 0 = unlimited), as the harness passes them in the environment."""
    buckets = []
    for item in spec.split(","):
        path, rate = item.rsplit("=", 1)
        buckets.append(Bucket(path, float(rate) or None))
    return buckets


def throttle_shared_reads(shared_dir: str, buckets: Sequence[Bucket]) -> None:
    """Make fastload's tier copies from ``shared_dir`` (the stand-in Ceph mount) pay for their bytes on
    ``buckets``, chunk by chunk. Patches ``copy_file`` in this process only: the core stays untouched, and
    a copy from any other tier runs at full speed."""
    from fastload_core.storage import copy

    original = copy.copy_file
    root = os.path.realpath(shared_dir)

    class Paced:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def add(self, count: int) -> None:
            time.sleep(pass_through(buckets, count))
            if self.inner is not None:
                self.inner.add(count)  # type: ignore[attr-defined]

        def range_done(self, name: str, start: int, end: int) -> None:
            if self.inner is not None:
                self.inner.range_done(name, start, end)  # type: ignore[attr-defined]

    def copy_file(src: Path, dst: Path, **kwargs: object) -> object:
        if os.path.realpath(src).startswith(root + os.sep):
            kwargs["progress"] = Paced(kwargs.get("progress"))
        return original(src, dst, **kwargs)  # type: ignore[arg-type]

    copy.copy_file = copy_file  # type: ignore[assignment]


def throttle_peer_reads(inbound: Sequence[Bucket], uplinks: dict[str, Bucket]) -> None:
    """Make fastload's fills from a peer's RAM (``fastload serve`` on another node) pay for their bytes on this
    node's network (``inbound``) and on the serving node's uplink (``uplinks``, by advertised address), chunk
    by chunk, in the download threads. Patches ``PeerSource._transfer`` in this process only."""
    from fastload_core.storage import peers
    from fastload_core.storage.progress import Progress

    original = peers.PeerSource._transfer

    class Paced(Progress):
        def __init__(self, inner: Progress, links: Sequence[Bucket]) -> None:
            super().__init__(inner.label, inner.total, enabled=False)
            self.inner = inner
            self.links = links

        def add(self, nbytes: int) -> None:
            time.sleep(pass_through(self.links, nbytes))
            self.inner.add(nbytes)

        def range_done(self, name: str, start: int, end: int) -> None:
            self.inner.range_done(name, start, end)

    def _transfer(self: peers.PeerSource, peer: Any, manifest: Any, dest: Path, progress: Progress) -> Any:
        links = [*inbound, *([uplinks[peer.address]] if peer.address in uplinks else [])]
        return original(self, peer, manifest, dest, Paced(progress, links))

    peers.PeerSource._transfer = _transfer  # type: ignore[method-assign]


# --- the rate-limiting proxy -------------------------------------------------------------------------
_CHUNK = 256 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, buckets: Sequence[Bucket],
                per_connection: float | None) -> None:
    ready = time.time()
    try:
        while data := await reader.read(_CHUNK):
            wait = pass_through(buckets, len(data))
            if per_connection:
                ready = max(ready, time.time()) + len(data) / per_connection
                wait = max(wait, ready - time.time())
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _serve(upstream: tuple[str, int], buckets: list[list[Bucket]], per_connection: float | None) -> None:
    ports: list[int] = []

    def handler(links: list[Bucket]) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
            try:
                server_r, server_w = await asyncio.open_connection(*upstream)
            except OSError:
                client_w.close()
                return
            # Requests go up unthrottled (a few hundred bytes each); the model's bytes come down through the
            # origin's limit and this node's network.
            await asyncio.gather(_pipe(client_r, server_w, [], None),
                                 _pipe(server_r, client_w, links, per_connection))

        return handle

    for links in buckets:
        server = await asyncio.start_server(handler(links), "127.0.0.1", 0)
        ports.append(server.sockets[0].getsockname()[1])
    print(json.dumps({"ports": ports}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """``python throttle.py HOST:PORT CONN_RATE LINKS [LINKS ...]``: one listening port per LINKS argument
    (a ``PATH=RATE,...`` bucket list, rates in bytes/s, 0 = unlimited), printed as JSON; CONN_RATE caps
    each connection (0 = no cap). Byte counts stay in the bucket files."""
    host_port, per_connection, *links = argv if argv is not None else sys.argv[1:]
    host, port = host_port.rsplit(":", 1)
    asyncio.run(_serve((host, int(port)), [buckets_from(spec) for spec in links], float(per_connection) or None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
