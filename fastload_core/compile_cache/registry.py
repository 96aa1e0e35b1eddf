"""From a cache URL to a backend, through the ``register_compile_cache_backends`` hook."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import PluginError
from ..plugins import collect
from .base import BackendFactory, CompileCacheBackend
from .errors import CacheURLError


def accept_backend(scheme: object, factory: object) -> tuple[str, BackendFactory]:
    """The contract of ``register_compile_cache_backends``: ``register(scheme, factory)``, where
    ``factory(url)`` returns a ``CompileCacheBackend``."""
    if not isinstance(scheme, str) or not scheme:
        raise PluginError(f"register_compile_cache_backends got scheme {scheme!r}; a scheme is a str such "
                          "as 'redis'")
    if not callable(factory):
        raise PluginError(f"register_compile_cache_backends got factory {factory!r} for {scheme!r}; it must "
                          "be callable with the cache URL and return a CompileCacheBackend")
    return scheme.lower(), factory


def backend_factories() -> dict[str, BackendFactory]:
    """Scheme -> factory. Plugins are called the last registered first and the first claim of a scheme
    wins, so a third-party plugin can swap a built-in."""
    factories: dict[str, BackendFactory] = {}
    for registration in collect("register_compile_cache_backends", accept_backend):
        scheme, factory = registration.value
        factories.setdefault(scheme, factory)
    return factories


def schemes() -> list[str]:
    return sorted(backend_factories())


def normalize_url(url: str | os.PathLike[str]) -> str:
    """A cache URL as the backends take it: a plain path (``/srv/compile-cache``, ``~/cc``, ``./cc``)
    becomes the ``file://`` URL of that directory, made absolute so that every worker process, whatever
    its working directory, reads the same place. Anything that names a scheme (``://``) is left alone.
    """
    text = os.fspath(url)
    if "://" in text or not text.strip():
        return text
    return Path(text).expanduser().absolute().as_uri()


def open_backend(url: str | os.PathLike[str]) -> CompileCacheBackend:
    """The backend serving ``url`` (a URL, or a directory path); raises ``CacheURLError`` naming the URL
    and the schemes on offer."""
    factories = backend_factories()
    url = normalize_url(url)
    scheme = urlsplit(url).scheme.lower()
    if not scheme:
        raise CacheURLError(url, "has no scheme; use e.g. file:///var/cache/fastload-compile or a directory path",
                            list(factories))
    factory = factories.get(scheme)
    if factory is None:
        raise CacheURLError(url, f"no compile-cache backend serves {scheme}://", list(factories))
    backend: Any = factory(url)
    if not isinstance(backend, CompileCacheBackend):
        raise PluginError(f"the compile-cache backend registered for {scheme}:// returned "
                          f"{type(backend).__name__}, not a CompileCacheBackend")
    return backend
