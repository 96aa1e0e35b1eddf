"""From a cache URL to a backend, through the ``register_compile_cache_backends`` hook."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import PluginError
from ..plugins import collect
from . import backends
from .base import BackendFactory, CompileCacheBackend
from .errors import CacheURLError

log = logging.getLogger("fastload.compile_cache")


def backend_factories() -> dict[str, BackendFactory]:
    """Scheme -> factory. A later registration replaces an earlier one, so a plugin can swap a built-in."""
    try:
        registered = collect("register_compile_cache_backends")
    except Exception as exc:
        # The plugin manager itself failed to build (a broken built-in or entry point). Compiling must
        # still work, so fall back to the built-in backends rather than take the replica down.
        log.warning("fastload plugins could not be loaded (%r); using the built-in compile-cache backends",
                    exc)
        registered = []
        backends.register_compile_cache_backends(lambda *args: registered.append(args))
    factories: dict[str, BackendFactory] = {}
    for args in registered:
        if len(args) != 2 or not isinstance(args[0], str) or not callable(args[1]):
            log.warning("ignoring a compile-cache backend registration that is not (scheme, factory): %r",
                        args)
            continue
        factories[args[0].lower()] = args[1]
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
