"""Backends come from the register_compile_cache_backends hook, built-ins included."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from fastload_core.compile_cache import CompileCache, CompileCacheBackend, StoredEntry, registry
from fastload_core.compile_cache.errors import CacheURLError
from fastload_core.errors import FastloadError, PluginError
from fastload_core.hookspecs import hookimpl
from fastload_core.plugins import BUILTIN_PLUGINS, get_plugin_manager


class MemoryBackend(CompileCacheBackend):
    scheme = "mem"
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.store: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.store.get(key)

    def put(self, key: str, blob: bytes, *, overwrite: bool = False) -> bool:
        if key in self.store and not overwrite:
            return False
        self.store[key] = blob
        return True

    def delete(self, key: str) -> bool:
        return self.store.pop(key, None) is not None

    def entries(self) -> list[StoredEntry]:
        return [StoredEntry(key, len(data), None) for key, data in self.store.items()]


class MemoryPlugin:
    @hookimpl
    def register_compile_cache_backends(self, register: Any) -> None:
        register("mem", MemoryBackend)
        register("junk", lambda url: object())


def test_builtin_schemes_are_registered_through_the_hook() -> None:
    assert {"file", "redis", "rediss", "s3"} <= set(registry.schemes())
    assert "fastload.compile_cache" in dict(get_plugin_manager().list_name_plugin())


def test_a_plugin_backend_serves_its_scheme() -> None:
    get_plugin_manager().register(MemoryPlugin(), name="memory-test")
    cache = CompileCache("mem://anything")
    assert isinstance(cache.backend, MemoryBackend)
    with pytest.raises(PluginError, match="junk:// returned object"):
        CompileCache("junk://x")


@pytest.mark.parametrize(
    ("url", "problem"),
    [("ftp://host/dir", "no compile-cache backend serves ftp://"), ("://nowhere", "has no scheme")],
)
def test_bad_url_names_itself_and_the_supported_schemes(url: str, problem: str) -> None:
    with pytest.raises(CacheURLError) as caught:
        CompileCache(url)
    message = str(caught.value)
    assert url in message and problem in message and "file://, redis://" in message
    assert isinstance(caught.value, FastloadError)


def test_malformed_builtin_urls_say_what_is_expected() -> None:
    with pytest.raises(CacheURLError, match="expected file:///absolute/directory"):
        CompileCache("file://host/dir")
    with pytest.raises(CacheURLError, match="expected s3://bucket/prefix"):
        CompileCache("s3:///prefix-only")
    with pytest.raises(CacheURLError, match="timeout='soon' is not a number"):
        CompileCache("redis://localhost:6379/0?timeout=soon")


def test_a_broken_plugin_still_leaves_the_builtins(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(BUILTIN_PLUGINS, "fastload.some_builtin", "fastload_core.some_builtin")
    with caplog.at_level(logging.WARNING, logger="fastload"):
        assert "redis" in registry.schemes()
    assert "some_builtin" in caplog.text
