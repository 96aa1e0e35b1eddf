"""Redis-specific behaviour: pointers for large entries, and a Redis that is down or hung."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import redis as redis_client

from fastload_core.compile_cache import CompileCache
from fastload_core.compile_cache.errors import EntryTooLargeError
from fastload_core.compile_cache.keys import key_from_fields
from fastload_core.compile_cache.registry import open_backend
from tests.services.redis import RedisServer

pytestmark = pytest.mark.redis

KEY = key_from_fields({"model": "m"})


def _inductor_dir(root: Path, size: int = 4000) -> Path:
    (root / "cz").mkdir(parents=True)
    (root / "cz/kernel.so").write_bytes(os.urandom(size))  # incompressible: the entry stays large
    return root


def test_large_entries_go_to_the_blob_store_with_a_pointer_in_redis(redis_url: str, tmp_path: Path) -> None:
    blobs = (tmp_path / "blobs").as_uri()
    backend = open_backend(f"{redis_url}?max_inline=1000&blob={quote(blobs, safe='')}&prefix=t:")
    data = os.urandom(50_000)
    assert backend.put("v1-big", data)
    raw = redis_client.Redis.from_url(redis_url).get("t:v1-big")
    assert isinstance(raw, bytes) and raw.startswith(b"FLCCPTR1") and len(raw) < 500
    assert (tmp_path / "blobs/v1-big.flcc").read_bytes() == data
    assert backend.get("v1-big") == data
    assert [(e.key, e.size) for e in backend.entries()] == [("v1-big", 50_000)]
    assert backend.delete("v1-big")
    assert not (tmp_path / "blobs/v1-big.flcc").exists()


def test_large_entry_without_a_blob_store_is_skipped_with_a_warning(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(EntryTooLargeError, match="add \\?blob="):
        open_backend(f"{redis_url}?max_inline=1000").put("v1-big", os.urandom(5000))
    cache = CompileCache(f"{redis_url}?max_inline=1000")
    with caplog.at_level(logging.WARNING, logger="fastload"):
        outcome = cache.save(KEY, _inductor_dir(tmp_path / "src"), None)
    assert outcome.status == "too_large"
    assert "exceeds the inline limit of 1000 bytes" in caplog.text
    assert open_backend(redis_url).entries() == []


def test_redis_down_is_a_miss_warned_once(
    redis_server: RedisServer, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"{redis_url}?prefix=down-{os.getpid()}:"  # a URL no earlier test warned about
    cache = CompileCache(url)
    assert cache.save(KEY, _inductor_dir(tmp_path / "src"), None).status == "stored"
    redis_server.stop()
    with caplog.at_level(logging.DEBUG, logger="fastload"):
        started = time.monotonic()
        first = cache.restore(KEY, tmp_path / "a")
        second = cache.restore(KEY, tmp_path / "b")
        saved = cache.save(KEY, tmp_path / "src", None)
        elapsed = time.monotonic() - started
    assert (first.status, second.status, saved.status) == ("unavailable", "unavailable", "unavailable")
    assert elapsed < 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert url in warnings[0].getMessage() and "ConnectionError" in warnings[0].getMessage()


def test_hung_redis_costs_at_most_the_timeout(blackhole_port: int, tmp_path: Path) -> None:
    cache = CompileCache(f"redis://127.0.0.1:{blackhole_port}/0?timeout=0.3&connect_timeout=0.3")
    started = time.monotonic()
    outcome = cache.restore(KEY, tmp_path / "dest")
    assert outcome.status == "unavailable"
    assert "Timeout" in outcome.message
    assert time.monotonic() - started < 2.0


def test_garbage_under_the_key_is_a_corrupt_entry(redis_url: str, tmp_path: Path) -> None:
    cache = CompileCache(redis_url)
    redis_client.Redis.from_url(redis_url).set(f"fastload:compile:{KEY.digest}", b"FLCCPTR1{not json")
    assert cache.restore(KEY, tmp_path / "dest").status == "corrupt"
