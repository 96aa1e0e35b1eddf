"""Prometheus metrics for fastload's events (a built-in plugin, active when ``prometheus-client`` imports).

Built in rather than opt-in because every serving framework we target already scrapes the default
``prometheus_client`` registry (BentoML, Ray Serve) or can (TorchServe), so the metrics show up with no
wiring; without the ``metrics`` extra the hooks do nothing, and ``FASTLOAD_DISABLE_PLUGINS=fastload.metrics``
turns them off. Labels are tier names and outcomes only: URIs would explode cardinality and leak bucket names. Every
fetch start is paired with a finish (success or error), so ``fastload_fetches_in_progress`` returns to
zero after failed fetches; compiles are counted by the compile cache's outcome (``hit``, ``miss``,
``partial``, ``none``).
A process without an exporter can call ``serve(port)``. Under a multi-process server (BentoML workers,
``PROMETHEUS_MULTIPROC_DIR`` set) counters and histograms are summed over the processes by the collector,
and the in-progress gauge is a sum over live processes, so the exported figures add up to the node's.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .hookspecs import hookimpl

if TYPE_CHECKING:
    from .compile_cache.compiler import CompileReport

_lock = threading.Lock()
_metrics: dict[str, Any] | None = None
_unavailable = False


def _get() -> dict[str, Any] | None:
    global _metrics, _unavailable
    with _lock:
        if _metrics is None and not _unavailable:
            try:
                from prometheus_client import Counter, Gauge, Histogram
            except ImportError:
                _unavailable = True
                return None
            _metrics = {
                "hits": Counter("fastload_tier_hits", "Models found in a tier", ["tier"]),
                "misses": Counter("fastload_tier_misses", "Models not found in a tier", ["tier"]),
                "full": Counter("fastload_tier_full", "Models a tier could not make room for", ["tier"]),
                "fetches": Counter("fastload_fetches", "Fetches published into a tier", ["tier"]),
                "failed": Counter("fastload_fetch_failures", "Fetches into a tier that failed", ["tier"]),
                "bytes": Counter("fastload_fetch_bytes", "Bytes fetched into a tier", ["tier"]),
                "seconds": Histogram("fastload_fetch_seconds", "Duration of fetches into a tier", ["tier"],
                                     buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)),
                "active": Gauge("fastload_fetches_in_progress", "Fetches running now", ["tier"],
                                multiprocess_mode="livesum"),
                "evictions": Counter("fastload_evictions", "Entries evicted from a tier", ["tier"]),
                "evicted_bytes": Counter("fastload_evicted_bytes", "Bytes evicted from a tier", ["tier"]),
                "peer_fetches": Counter("fastload_peer_fetches", "Fills tried from a peer, by outcome (ok, "
                                        "failed)", ["outcome"]),
                "peer_bytes": Counter("fastload_peer_bytes", "Bytes fetched from peers"),
                "served": Counter("fastload_serve_requests", "Requests answered by fastload serve, by method, "
                                  "status and source (hit, miss, peer, list, denied, error)",
                                  ["method", "status", "source"]),
                "served_bytes": Counter("fastload_serve_bytes", "Body bytes sent by fastload serve, by source",
                                        ["source"]),
                "compiles": Counter("fastload_compiles", "First compiles, by what the compile cache did "
                                    "(hit, miss, partial, none)", ["status"]),
            }
        return _metrics


@hookimpl
def on_tier_hit(uri: str, tier: str, path: str) -> None:
    if (m := _get()) is not None:
        m["hits"].labels(tier).inc()


@hookimpl
def on_tier_miss(uri: str, tier: str) -> None:
    if (m := _get()) is not None:
        m["misses"].labels(tier).inc()


@hookimpl
def on_tier_full(uri: str, tier: str, nbytes: int) -> None:
    if (m := _get()) is not None:
        m["full"].labels(tier).inc()


@hookimpl
def on_fetch_start(uri: str, tier: str, nbytes: int) -> None:
    if (m := _get()) is not None:
        m["active"].labels(tier).inc()


@hookimpl
def on_fetch_finish(uri: str, tier: str, nbytes: int, seconds: float, error: BaseException | None) -> None:
    if (m := _get()) is not None:
        m["active"].labels(tier).dec()
        if error is not None:
            m["failed"].labels(tier).inc()
            return
        m["fetches"].labels(tier).inc()
        m["bytes"].labels(tier).inc(nbytes)
        m["seconds"].labels(tier).observe(seconds)


@hookimpl
def on_evict(tier: str, key: str, nbytes: int) -> None:
    if (m := _get()) is not None:
        m["evictions"].labels(tier).inc()
        m["evicted_bytes"].labels(tier).inc(nbytes)


@hookimpl
def on_peer_fetch(uri: str, peer: str, nbytes: int, seconds: float, error: BaseException | None) -> None:
    if (m := _get()) is not None:
        m["peer_fetches"].labels("failed" if error is not None else "ok").inc()
        m["peer_bytes"].inc(nbytes)


@hookimpl
def on_serve_request(method: str, status: int, nbytes: int, source: str) -> None:
    if (m := _get()) is not None:
        m["served"].labels(method, str(status), source).inc()
        m["served_bytes"].labels(source).inc(nbytes)


@hookimpl
def after_compile(report: CompileReport) -> None:
    if (m := _get()) is not None:
        m["compiles"].labels(report.status).inc()


def serve(port: int, addr: str = "127.0.0.1") -> None:
    """Expose the default registry on ``http://addr:port/metrics`` (for processes without an exporter)."""
    from prometheus_client import start_http_server

    _get()
    start_http_server(port, addr=addr)


__all__ = ["serve"]  # the hook implementations above are called by the plugin manager, not imported
