from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import REGISTRY

from fastload_core.storage import fetch


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
