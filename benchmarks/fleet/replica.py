"""One serving replica of the fleet harness: load the demo model, then answer ``POST /`` over HTTP.

    python replica.py stock    --width W --layers L --key fleet-stock/model.pt --scratch DIR
    python replica.py fastload --width W --layers L --uri s3://models/fleet/

stock:    boto3 ``download_file`` (16 parallel 16 MiB parts, as tuned in bench_ray) into this node's local
          disk, ``DemoMLP(...)`` (random init, as stock code does), ``torch.load(weights_only=True,
          mmap=True)`` and ``load_state_dict``.
fastload: ``fastload_core.load_model`` on the safetensors prefix, with the node's tiers from the
          environment (FASTLOAD_SHM_DIR, FASTLOAD_CACHE_DIR, FASTLOAD_SHARED_DIR, FASTLOAD_REDIS_URL).

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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(REPO / "examples" / "bentoml"), str(HERE)]

MiB = 2**20


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["stock", "fastload"])
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--uri", default="s3://models/fleet/")
    parser.add_argument("--key", default="fleet-stock/model.pt")
    parser.add_argument("--scratch", default="/tmp")
    args = parser.parse_args()

    import torch
    from demo_model import DemoMLP, example_input  # type: ignore[import-not-found]

    marks: dict[str, float] = {"imported": time.time()}
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

        model = fastload_core.load_model(lambda: DemoMLP(args.width, args.layers), args.uri)
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
    print("READY " + json.dumps(record), flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
