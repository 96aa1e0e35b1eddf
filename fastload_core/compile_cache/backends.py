"""The built-in compile-cache backends, registered as a plugin like any third-party one.

The plugin manager imports this module on the first hook call of a process, also for a plain
``load_file``; each backend's module is imported only when a cache URL of its scheme is opened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..hookspecs import hookimpl

if TYPE_CHECKING:
    from .base import CompileCacheBackend


def _directory(url: str) -> CompileCacheBackend:
    from .directory import DirectoryBackend

    return DirectoryBackend(url)


def _redis(url: str) -> CompileCacheBackend:
    from .redis import RedisBackend

    return RedisBackend(url)


def _s3(url: str) -> CompileCacheBackend:
    from .s3 import S3Backend

    return S3Backend(url)


@hookimpl
def register_compile_cache_backends(register: Callable[[str, Callable[[str], object]], None]) -> None:
    register("file", _directory)
    register("redis", _redis)
    register("rediss", _redis)
    register("unix", _redis)
    register("s3", _s3)
