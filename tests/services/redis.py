"""pytest fixtures: a private redis-server per test session (``fastload_devservices.redis``), emptied per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fastload_devservices.redis import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A running server's URL, emptied before each test (a test that stopped it gets it back)."""
    if not redis_server.running:
        redis_server.start()
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url
