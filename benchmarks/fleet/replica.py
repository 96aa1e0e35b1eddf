"""One serving replica of the fleet harness: load the demo model, then answer ``POST /`` over HTTP.

    python replica.py stock    --width W --layers L --key fleet-stock/model.pt --scratch DIR
    python replica.py fastload|fastload-late --width W --layers L --uri s3://models/fleet/

stock:    boto3 ``download_file`` (16 parallel 16 MiB parts, as tuned in bench_ray) into this node's local
          disk, ``DemoMLP(...)`` (random init, as stock code does), ``torch.load(weights_only=True,
          mmap=True)`` and ``load_state_dict``.
fastload: ``fastload_core.storage.prefetch(uri, background=True)`` first thing (the download runs while the
          process imports torch), then ``fastload_core.load_model`` on the safetensors prefix, with the node's
          tiers from the environment (FASTLOAD_SHM_DIR, FASTLOAD_CACHE_DIR, FASTLOAD_SHARED_DIR,
          FASTLOAD_REDIS_URL, FASTLOAD_TIER).
fastload-late: the same without the early prefetch: imports torch first, then ``load_model`` fetches (the
          harness's replica before the stage breakdown showed what that costs).

The store's events (a tier's fill starting and finishing, hits, peer fetches) are stamped by a small fastload
plugin and reported with the READY line (later ones, the write-through, as ``EVENT {json}`` lines).

Prints one ``READY {json}`` line (times are ``time.time()``) once the HTTP server listens, then serves until
SIGTERM.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before any import: the interpreter's start-up is part of what a user waits for

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from concurrent.futures import Future  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(REPO / "examples" / "bentoml"), str(HERE)]

MiB = 2**20


class Timeline:
    """A fastload plugin that stamps the store's events (a tier's fill starting and finishing, a hit, a peer
    fetch) so the harness can split a replica's start into stages. Events before the replica is ready go into
    its READY line; later ones (the write-through into slower tiers runs on after ``load_model`` returns) are
    printed as ``EVENT {json}`` lines as they happen."""

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self.events: list[dict[str, object]] = []
        self._ready = False

    def _record(self, **event: object) -> None:
        event["t"] = time.time()
        with self._lock:
            if self._ready:
                print("EVENT " + json.dumps(event), flush=True)
            else:
                self.events.append(event)

    def ready(self, record: Mapping[str, object]) -> None:
        with self._lock:
            self._ready = True
            print("READY " + json.dumps({**record, "events": self.events}), flush=True)

    # pluggy matches hook implementations by name; the marker is fastload's own (hookspecs.hookimpl)
    def on_fetch_start(self, uri: str, tier: str, nbytes: int) -> None:
        self._record(event="fetch_start", tier=tier)

    def on_fetch_finish(self, uri: str, tier: str, nbytes: int, seconds: float, error: BaseException | None) -> None:
        self._record(event="fetch_finish", tier=tier, error=None if error is None else repr(error))

    def on_tier_hit(self, uri: str, tier: str, path: str) -> None:
        self._record(event="hit", tier=tier)

    def on_peer_fetch(self, uri: str, peer: str, nbytes: int, seconds: float, error: BaseException | None) -> None:
        self._record(event="peer_fetch", peer=peer, nbytes=nbytes, seconds=seconds,
                     error=None if error is None else repr(error))


def _hooked(timeline: Timeline) -> Timeline:
    from fastload_core.hookspecs import hookimpl

    for name in ("on_fetch_start", "on_fetch_finish", "on_tier_hit", "on_peer_fetch"):
        hookimpl(getattr(type(timeline), name))
    return timeline


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["stock", "fastload", "fastload-late"])
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--uri", default="s3://models/fleet/")
    parser.add_argument("--key", default="fleet-stock/model.pt")
    parser.add_argument("--scratch", default="/tmp")
    args = parser.parse_args()

    marks: dict[str, float] = {}
    timeline = Timeline()
    warming = None
    if args.mode.startswith("fastload"):
        # fastload_core.storage imports neither torch nor boto3 until a fetch needs them
        from fastload_core.plugins import get_plugin_manager
        from fastload_core.storage import prefetch

        get_plugin_manager().register(_hooked(timeline), name="fleet.timeline")
        if args.mode == "fastload":
            # As the docs advise (and the BentoML adapter's on_deployment does): start the fetch first, so the
            # download runs while this process imports torch; on 2 cores shared by six replicas importing torch
            # that import takes most of the 20 s before a fetch would otherwise start.
            warming = prefetch(args.uri, background=True)
            marks["prefetch_started"] = time.time()

    import torch
    from demo_model import DemoMLP, example_input  # type: ignore[import-not-found]

    marks["imported"] = time.time()
    if args.mode == "stock":
        import tempfile

        import boto3
        from boto3.s3.transfer import TransferConfig

        tuned = TransferConfig(max_concurrency=16, multipart_chunksize=16 * MiB, multipart_threshold=16 * MiB)
        directory = tempfile.mkdtemp(prefix="stock-", dir=args.scratch)
        path = os.path.join(directory, "model.pt")
        boto3.client("s3").download_file("models", args.key, path, Config=tuned)
        marks["fetched"] = time.time()
        model = DemoMLP(args.width, args.layers)
        model.load_state_dict(torch.load(path, weights_only=True, mmap=True))
        model.eval()
        os.unlink(path)
        os.rmdir(directory)
    else:
        import fastload_core  # reads of the shared mount are paced by site/sitecustomize.py

        if warming is not None:
            assert isinstance(warming, Future)
            warming.result()  # the node's copy in RAM (this process's fetch, or a neighbour's single flight)
            marks["fetched"] = time.time()
        model = fastload_core.load_model(lambda: DemoMLP(args.width, args.layers), args.uri)  # a hit when warmed
    marks["loaded"] = time.time()
    probe = torch.tensor(example_input(args.width))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            with torch.inference_mode():
                body = json.dumps(model(probe).tolist()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    def stop(*_: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    record = {"pid": os.getpid(), "port": server.server_address[1], "started": STARTED, "ready": time.time(), **marks}
    timeline.ready(record)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
