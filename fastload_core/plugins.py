"""Plugin discovery and hook calling.

Plugins come from the ``fastload`` entry-point group; built-in parts register through the same
hooks. A serving replica must not die because a third-party plugin is broken, so a plugin that
fails to import, or raises from a hook, is logged and skipped instead.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pluggy

from . import hookspecs

log = logging.getLogger("fastload.plugins")

# Modules whose hook implementations ship with fastload. Names are what FASTLOAD_DISABLE_PLUGINS takes.
BUILTIN_PLUGINS: dict[str, str] = {
    "fastload.torch_pickle": "fastload_core.loader.legacy",
    "fastload.storage": "fastload_core.storage.builtin",
    "fastload.metrics": "fastload_core.metrics",
    "fastload.compile_cache": "fastload_core.compile_cache.backends",
}

_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None


@dataclass(frozen=True)
class PluginInfo:
    name: str
    source: str  # "builtin" or the distribution that provides the entry point
    hooks: tuple[str, ...]


def _names_from_env(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _build_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager("fastload")
    manager.add_hookspecs(hookspecs)
    disabled = _names_from_env("FASTLOAD_DISABLE_PLUGINS") or set()
    wanted = _names_from_env("FASTLOAD_PLUGINS")
    candidates: list[tuple[str, str, Callable[[], object]]] = [
        (name, module_name, functools.partial(importlib.import_module, module_name))
        for name, module_name in BUILTIN_PLUGINS.items()
    ]
    candidates += [
        (entry_point.name, entry_point.value, entry_point.load)
        for entry_point in importlib.metadata.entry_points(group="fastload")
        if wanted is None or entry_point.name in wanted
    ]
    for name, where, load in candidates:
        if name in disabled:
            continue
        try:
            manager.register(load(), name=name)
        except Exception as exc:  # built-ins included: an optional dependency may be broken
            log.warning("fastload plugin %r (%s) failed to load and is skipped: %r", name, where, exc)
    return manager


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = _build_manager()
        return _manager


def reset_plugin_manager() -> None:
    """Forget loaded plugins so the next call rediscovers them (after changing FASTLOAD_PLUGINS)."""
    global _manager
    with _lock:
        _manager = None


def _call_each(hook_name: str, kwargs: dict[str, Any]) -> None:
    caller = getattr(get_plugin_manager().hook, hook_name)
    for impl in reversed(caller.get_hookimpls()):  # pluggy calls the last registered first
        try:
            impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except Exception as exc:
            log.warning("fastload plugin %r raised in %s and is ignored: %r", impl.plugin_name, hook_name, exc)


def notify(hook_name: str, **kwargs: Any) -> None:
    """Fire an event hook; a plugin that raises is logged, never propagated."""
    _call_each(hook_name, kwargs)


def collect(hook_name: str) -> list[tuple[Any, ...]]:
    """Call a registration hook and return what each plugin registered, as argument tuples."""
    registered: list[tuple[Any, ...]] = []

    def register(*args: Any) -> None:
        registered.append(args)

    _call_each(hook_name, {"register": register})
    return registered


def plugin_infos() -> list[PluginInfo]:
    """What is loaded and which hooks each plugin implements (for ``fastload plugins``)."""
    manager = get_plugin_manager()
    distributions = {
        ep.name: (ep.dist.name if ep.dist else "?")
        for ep in importlib.metadata.entry_points(group="fastload")
    }
    infos = []
    for name, plugin in manager.list_name_plugin():
        callers = manager.get_hookcallers(plugin) or []
        infos.append(
            PluginInfo(
                name=name,
                source="builtin" if name in BUILTIN_PLUGINS else distributions.get(name, "?"),
                hooks=tuple(sorted(caller.name for caller in callers)),
            )
        )
    return sorted(infos, key=lambda info: info.name)

