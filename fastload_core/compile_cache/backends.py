"""The built-in compile-cache backends, registered as a plugin like any third-party one."""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl
from .directory import DirectoryBackend
from .redis import RedisBackend
from .s3 import S3Backend


@hookimpl
def register_compile_cache_backends(register: Callable[[str, Callable[[str], object]], None]) -> None:
    register("file", DirectoryBackend)
    register("redis", RedisBackend)
    register("rediss", RedisBackend)
    register("unix", RedisBackend)
    register("s3", S3Backend)
