"""``fastload serve [--host 127.0.0.1] [--port 9000] [--advertise HOST:PORT]``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import os
import signal
import socket
from typing import TYPE_CHECKING

from ..storage.peers import ACCESS_KEY_VARIABLE, SECRET_KEY_VARIABLE
from . import ServeError

if TYPE_CHECKING:
    from ..storage.store import TieredStore
    from .auth import ServeCredentials

log = logging.getLogger("fastload.serve")
MAX_UPLOADS_VARIABLE = "FASTLOAD_SERVE_MAX_UPLOADS"


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve this node's cached models as a read-only S3 endpoint (and to peer nodes)",
        description="Runs in the foreground until SIGTERM or Ctrl-C. Every request must be SigV4-signed with "
        "FASTLOAD_SERVE_ACCESS_KEY_ID / FASTLOAD_SERVE_SECRET_ACCESS_KEY (clients use them as AWS credentials "
        "with endpoint_url set to this server); the server reaches the origin with its own AWS configuration. "
        "Misses are fetched through the tiered store into --tier and streamed as they land.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=9000, help="port to listen on (default 9000)")
    serve.add_argument("--tier", help="tier misses are fetched into (default: shm when configured, else "
                                      "FASTLOAD_TIER)")
    serve.add_argument("--advertise", metavar="HOST:PORT",
                       help="register this node's entries in Redis (FASTLOAD_REDIS_URL) under this address, "
                            "so other nodes fetch from it")
    serve.add_argument("--max-uploads", metavar="N",
                       help="peer fills served at once (default 2, or FASTLOAD_SERVE_MAX_UPLOADS; 0: no limit); "
                            "more are refused with 503 SlowDown and try another holder, so a fleet fills as a "
                            "tree. Ordinary S3 clients are not limited")
    serve.add_argument("--resolve-ttl", type=float, default=5.0, metavar="SECONDS",
                       help="how long an object's origin identity (ETag) is trusted before asking again")
    serve.add_argument("--drain-timeout", type=float, default=20.0, metavar="SECONDS",
                       help="on SIGTERM, how long open responses may take to finish before they are cut "
                            "(default 20, inside Kubernetes' default 30 s grace period); the node withdraws "
                            "its claims first, so peers stop choosing it at once")
    serve.set_defaults(func=run_serve)


def _credentials() -> ServeCredentials:
    from .auth import ServeCredentials

    key, secret = os.environ.get(ACCESS_KEY_VARIABLE, ""), os.environ.get(SECRET_KEY_VARIABLE, "")
    if not key.strip() or not secret.strip():
        raise ServeError(f"set {ACCESS_KEY_VARIABLE} and {SECRET_KEY_VARIABLE}: fastload serve refuses to run "
                         "without them (clients sign every request with them)")
    return ServeCredentials(key, secret)


def _address(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
        raise ServeError(f"--advertise {text!r}: expected HOST:PORT, such as 10.0.0.5:9000")
    return text


def max_uploads(option: str | None) -> int:
    """``--max-uploads``, else ``FASTLOAD_SERVE_MAX_UPLOADS``, else 2; a whole number, 0 for no limit."""
    text, name = (option, "--max-uploads") if option is not None else \
        (os.environ.get(MAX_UPLOADS_VARIABLE, ""), MAX_UPLOADS_VARIABLE)
    if option is None and not text.strip():
        return 2
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ServeError(f"{name}={text!r}: expected a whole number of peer fills served at once, such as 2 "
                         "(0: no limit)")
    return value


def warm_origin(store: TieredStore) -> None:
    """Build the S3 origin's client before listening: importing botocore and loading S3's service model costs
    a fresh process 0.2-0.4 s on a small VM, which the first miss would otherwise add to its clients' wait
    (measured in docs/benchmarks.md). A node without the s3 extra, or whose AWS configuration is broken, still
    serves hits and peers; its misses report the problem then, as they would have."""
    try:
        origin = store.origin("s3")
        getattr(origin, "client", None)  # S3Origin builds its client lazily, on first use
    except Exception as exc:
        log.debug("not preparing the s3 origin at start-up: %s: %s", type(exc).__name__, exc)


def run_serve(args: argparse.Namespace) -> int:
    credentials = _credentials()
    uploads = max_uploads(args.max_uploads)
    if not 0 < args.port < 65536:
        raise ServeError(f"--port {args.port}: expected 1-65535")
    if args.resolve_ttl < 0:
        raise ServeError("--resolve-ttl must be 0 or more seconds")
    if not 0 < args.drain_timeout < math.inf:
        raise ServeError(f"--drain-timeout {args.drain_timeout}: expected a positive number of seconds")
    address = _address(args.advertise) if args.advertise else None
    try:
        import uvicorn
    except ImportError:
        raise ServeError("fastload serve needs uvicorn: pip install 'fastload[serve]'") from None

    from ..plugins import get_plugin_manager
    from ..storage.peers import PeerRegistry
    from ..storage.settings import StorageSettings
    from ..storage.store import TieredStore
    from .advertise import Advertiser
    from .app import ServeApp, UploadLimit

    settings = StorageSettings.from_env()
    store = TieredStore.from_env(settings)
    if store.peers is not None and address is not None:
        store.peers = dataclasses.replace(store.peers, advertise=address)
    names = [tier.name for tier in store.tiers]
    tier = args.tier or ("shm" if "shm" in names else store.default_tier)
    if tier not in names:
        raise ServeError(f"--tier {tier!r}: this node has {', '.join(names)}")
    warm_origin(store)
    advertiser = None
    if address is not None:
        if not settings.redis_url:
            raise ServeError("--advertise needs FASTLOAD_REDIS_URL (the registry peers look each other up in)")
        registry = PeerRegistry(settings.redis_url, ttl=store.peers.ttl if store.peers else 30.0,
                                timeout=settings.redis_timeout)
        advertiser = Advertiser(store, registry, address)
        get_plugin_manager().register(advertiser, name="fastload.serve.advertise")
    app = ServeApp(store, credentials, tier, resolve_ttl=args.resolve_ttl,
                   on_filled=advertiser.poke if advertiser else None, uploads=UploadLimit(uploads))
    config = uvicorn.Config(app, host=args.host, port=args.port, lifespan="off", access_log=False,
                            log_level="debug" if args.verbose else "warning", timeout_keep_alive=30,
                            timeout_graceful_shutdown=max(1, math.ceil(args.drain_timeout)))

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            if advertiser is not None:  # before the drain: peers stop choosing a node that refuses them
                await asyncio.to_thread(advertiser.stop)
            await super().shutdown(sockets)

    server = Server(config)
    if advertiser is not None:
        advertiser.start()
    log.info("fastload serve: http://%s:%d (misses into %s%s; %s peer fills at once)", args.host, args.port, tier,
             f"; advertised as {address}" if address else "", uploads or "unlimited")
    # uvicorn stops on SIGTERM and SIGINT (open responses finish, new connections are refused), then raises
    # the signal again for the handler it found: a no-op one, so that the claims are withdrawn and the exit
    # status says a clean stop.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    except SystemExit:
        if server.started:
            raise
        # uvicorn exits (status 3) when it cannot bind: said below, as every other usage error is
    finally:
        if advertiser is not None:
            advertiser.stop()
    if not server.started:
        raise ServeError(f"could not listen on {args.host}:{args.port} (in use, or not an address of this host?)")
    return 0
