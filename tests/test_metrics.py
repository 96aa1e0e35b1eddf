"""The built-in Prometheus plugin: storage, load and compile events in the default registry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY
from safetensors.torch import save_file

import fastload_core
import fastload_core.compile_cache as compile_cache
from fastload_core.hookspecs import hookimpl
from fastload_core.plugins import get_plugin_manager
from fastload_core.storage import fetch
from fastload_core.storage.errors import StorageError


def value(name: str, tier: str) -> float:
    return REGISTRY.get_sample_value(name, {"tier": tier}) or 0.0


def test_prometheus_plugin_counts_storage_events(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "w.bin").write_bytes(os.urandom(10_000))
    before = {name: value(name, "local_disk") for name in
              ("fastload_tier_misses_total", "fastload_tier_hits_total", "fastload_fetch_bytes_total",
               "fastload_fetches_total", "fastload_fetch_seconds_count")}
    fetch(f"file://{model}")
    fetch(f"file://{model}")
    assert value("fastload_tier_misses_total", "local_disk") == before["fastload_tier_misses_total"] + 1
    assert value("fastload_tier_hits_total", "local_disk") == before["fastload_tier_hits_total"] + 1
    assert value("fastload_fetch_bytes_total", "local_disk") == before["fastload_fetch_bytes_total"] + 10_000
    assert value("fastload_fetches_total", "local_disk") == before["fastload_fetches_total"] + 1
    assert value("fastload_fetch_seconds_count", "local_disk") == before["fastload_fetch_seconds_count"] + 1
    assert value("fastload_fetches_in_progress", "local_disk") == 0


class _Vanisher:
    """Deletes the model's file the moment its fetch starts: the origin fails mid-fetch, for real."""

    def __init__(self, victim: Path) -> None:
        self.victim = victim

    @hookimpl
    def on_fetch_start(self, uri: str, tier: str, nbytes: int) -> None:
        self.victim.unlink()


def test_the_in_progress_gauge_returns_to_zero_after_failed_fetches(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    victim = model / "w.bin"
    get_plugin_manager().register(_Vanisher(victim), name="test-vanisher")
    failures = value("fastload_fetch_failures_total", "local_disk")
    published = value("fastload_fetches_total", "local_disk")
    for attempt in range(3):
        victim.write_bytes(os.urandom(1000 + attempt))
        with pytest.raises(FileNotFoundError):
            fetch(f"file://{model}")
        assert value("fastload_fetches_in_progress", "local_disk") == 0
    assert value("fastload_fetch_failures_total", "local_disk") == failures + 3
    assert value("fastload_fetches_total", "local_disk") == published  # a failure is not a fetch


def test_compiles_are_counted_by_cache_outcome(tmp_path: Path) -> None:
    def compiles(status: str) -> float:
        return REGISTRY.get_sample_value("fastload_compiles_total", {"status": status}) or 0.0

    before = compiles("none")
    compiled = compile_cache.compile(lambda x: x + 1, cache=(tmp_path / "cc").as_uri(), backend="eager")
    compiled(torch.ones(2))
    compiled(torch.ones(2))  # primed once: one compile
    report = compile_cache.report_of(compiled)
    assert report is not None and report.status == "none"  # the eager backend builds nothing to cache
    assert compiles("none") == before + 1


class _LoadRecorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    @hookimpl
    def before_load(self, source: str, device: str) -> None:
        self.events.append(("before", source))

    @hookimpl
    def after_load(self, report: fastload_core.LoadReport, error: BaseException | None) -> None:
        self.events.append(("after", error))


def test_every_load_start_is_paired_with_a_finish_carrying_the_outcome(tmp_path: Path) -> None:
    recorder = _LoadRecorder()
    get_plugin_manager().register(recorder, name="test-loads")
    good = tmp_path / "a.safetensors"
    save_file({"a": torch.zeros(3)}, good)
    fastload_core.load_file(good)
    with pytest.raises(fastload_core.errors.CheckpointError):
        fastload_core.load_file(tmp_path / "missing.safetensors")
    with pytest.raises(StorageError):
        fastload_core.load_file("file:///nonexistent/model.safetensors", copy=True)
    assert [kind for kind, _ in recorder.events] == ["before", "after"] * 3
    errors = [outcome for kind, outcome in recorder.events if kind == "after"]
    assert errors[0] is None
    assert isinstance(errors[1], fastload_core.errors.CheckpointError)
    assert isinstance(errors[2], StorageError)


def test_prometheus_plugin_counts_serve_requests_and_peer_fetches() -> None:
    from fastload_core.plugins import notify

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    requests = sample("fastload_serve_requests_total", method="GET", status="206", source="hit")
    sent = sample("fastload_serve_bytes_total", source="hit")
    ok, failed = sample("fastload_peer_fetches_total", outcome="ok"), sample("fastload_peer_fetches_total",
                                                                              outcome="failed")
    pulled = sample("fastload_peer_bytes_total")
    notify("on_serve_request", method="GET", status=206, nbytes=1000, source="hit")
    notify("on_peer_fetch", uri="s3://b/k", peer="10.0.0.2:9000", nbytes=500, seconds=0.1, error=None)
    notify("on_peer_fetch", uri="s3://b/k", peer="10.0.0.3:9000", nbytes=0, seconds=2.0, error=TimeoutError())
    assert sample("fastload_serve_requests_total", method="GET", status="206", source="hit") == requests + 1
    assert sample("fastload_serve_bytes_total", source="hit") == sent + 1000
    assert sample("fastload_peer_fetches_total", outcome="ok") == ok + 1
    assert sample("fastload_peer_fetches_total", outcome="failed") == failed + 1
    assert sample("fastload_peer_bytes_total") == pulled + 500
