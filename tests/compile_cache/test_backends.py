"""The contract every backend keeps, run against the real services: one entry survives a race."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from fastload_core.compile_cache.base import CompileCacheBackend
from fastload_core.compile_cache.registry import open_backend


def _s3_url(request: pytest.FixtureRequest) -> str:
    request.getfixturevalue("s3_endpoint")
    import boto3

    boto3.client("s3").create_bucket(Bucket="compile-cache")
    return "s3://compile-cache/team/entries"


@pytest.fixture(
    params=[
        pytest.param("file", id="file"),
        pytest.param("redis", id="redis", marks=pytest.mark.redis),
        pytest.param("redis+blob", id="redis-pointer-to-file", marks=pytest.mark.redis),
        pytest.param("s3", id="s3", marks=pytest.mark.s3),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CompileCacheBackend]:
    if request.param == "file":
        url = (tmp_path / "entries").as_uri()
    elif request.param == "redis":
        url = request.getfixturevalue("redis_url")
    elif request.param == "redis+blob":
        # every test blob is over 1 KiB, so Redis holds only pointers here
        blob_url = (tmp_path / "blobs").as_uri()
        url = f"{request.getfixturevalue('redis_url')}?max_inline=1024&blob={quote(blob_url, safe='')}"
    else:
        url = _s3_url(request)
    backend = open_backend(url)
    yield backend
    backend.close()


def test_missing_key(backend: CompileCacheBackend) -> None:
    assert backend.get("v1-nothing") is None
    assert backend.get_prefix("v1-nothing", 16) is None
    assert backend.delete("v1-nothing") is False
    assert backend.entries() == []


def test_put_get_list_delete(backend: CompileCacheBackend) -> None:
    data = os.urandom(5000)
    assert backend.put("v1-abc", data) is True
    assert backend.get("v1-abc") == data
    assert backend.get_prefix("v1-abc", 100) == data[:100]
    [entry] = backend.entries()
    assert (entry.key, entry.size) == ("v1-abc", 5000)
    assert backend.delete("v1-abc") is True
    assert backend.get("v1-abc") is None
    assert backend.entries() == []


def test_put_keeps_the_first_entry_unless_told_to_overwrite(backend: CompileCacheBackend) -> None:
    first, second = os.urandom(3000), os.urandom(3000)
    assert backend.put("v1-k", first) is True
    assert backend.put("v1-k", second) is False
    assert backend.get("v1-k") == first
    assert backend.put("v1-k", second, overwrite=True) is True
    assert backend.get("v1-k") == second


def test_racing_replicas_leave_one_whole_entry(backend: CompileCacheBackend) -> None:
    blobs = [os.urandom(200_000) for _ in range(6)]
    results: list[bool] = [False] * len(blobs)
    barrier = threading.Barrier(len(blobs))

    def store(index: int) -> None:
        barrier.wait()
        results[index] = backend.put("v1-race", blobs[index])

    threads = [threading.Thread(target=store, args=(i,)) for i in range(len(blobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(results) == 1
    assert backend.get("v1-race") in blobs
    assert [e.key for e in backend.entries()] == ["v1-race"]


def test_check_describes_the_backend(backend: CompileCacheBackend) -> None:
    backend.put("v1-one", b"x" * 2000)
    assert "1 entries" in backend.check()
