"""Plugin discovery and hook calling, through pluggy.

Plugins come from the ``fastload`` entry-point group; built-in parts register through the same
hooks. Hooks are called through pluggy, so ordering (``tryfirst``/``trylast``), wrappers
(``wrapper=True`` and old-style ``hookwrapper=True``) and blocking behave as pluggy documents. One
thing differs from plain pluggy, on purpose: a serving replica must not die because a third-party
plugin is broken, so every hook implementation is wrapped when it registers; one that raises is
logged and skipped while the others still run (plain pluggy stops at the first exception). A
plugin that fails to import is logged and skipped too, and a registration that breaks its hook's
contract is logged as a ``PluginError`` and skipped, the same way for every registration hook.

Nothing is imported or scanned before a hook could reach a plugin: an event that no built-in
implements (``before_load``, ``after_load``) fires through the manager only where a distribution on
``sys.path`` declares a ``fastload`` entry point, which a quick look at the entry-point files
answers. A plain ``load_file`` in a fresh process thus neither imports pluggy nor reads every
distribution's metadata (about 10 ms of a 0.1 s warm load of 1 GiB, docs/benchmarks.md).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .errors import PluginError

if TYPE_CHECKING:
    from ._plugin_manager import PluginManager

log = logging.getLogger("fastload.plugins")

# Modules whose hook implementations ship with fastload. Names are what FASTLOAD_DISABLE_PLUGINS takes.
BUILTIN_PLUGINS: dict[str, str] = {
    "fastload.torch_pickle": "fastload_core.loader.legacy",
    "fastload.storage": "fastload_core.storage.builtin",
    "fastload.metrics": "fastload_core.metrics",
    "fastload.compile_cache": "fastload_core.compile_cache.backends",
}
# The hooks each built-in implements, known without importing it (tests/test_plugins.py holds this to the
# modules): an event none of them implements needs the manager only where a third-party plugin exists. A
# built-in missing here is taken to implement every hook.
BUILTIN_HOOKS: dict[str, frozenset[str]] = {
    "fastload.torch_pickle": frozenset({"register_checkpoint_formats"}),
    "fastload.storage": frozenset({"register_storage_schemes"}),
    "fastload.metrics": frozenset({"on_tier_hit", "on_tier_miss", "on_tier_full", "on_fetch_start",
                                   "on_fetch_finish", "on_evict", "after_compile", "on_peer_fetch",
                                   "on_serve_request"}),
    "fastload.compile_cache": frozenset({"register_compile_cache_backends"}),
}
ENTRY_POINT_GROUP = "fastload"

_lock = threading.Lock()
_manager: PluginManager | None = None
# sys.path as last scanned, and whether a distribution on it may declare a fastload entry point.
_scanned: tuple[tuple[str, ...], bool] | None = None

T = TypeVar("T")


@dataclass(frozen=True)
class PluginInfo:
    name: str
    source: str  # "builtin" or the distribution that provides the entry point
    hooks: tuple[str, ...]


@dataclass(frozen=True)
class Registration(Generic[T]):
    """One accepted ``register(...)`` call: the checked value and the plugin that made it."""

    plugin: str
    value: T


def _names_from_env(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _build_manager() -> PluginManager:
    from ._plugin_manager import build_manager

    return build_manager(BUILTIN_PLUGINS, ENTRY_POINT_GROUP, _names_from_env("FASTLOAD_DISABLE_PLUGINS") or set(),
                         _names_from_env("FASTLOAD_PLUGINS"))


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, built on first use."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = _build_manager()
        return _manager


def reset_plugin_manager() -> None:
    """Forget loaded plugins so the next call rediscovers them (after changing FASTLOAD_PLUGINS)."""
    global _manager, _scanned
    with _lock:
        _manager = _scanned = None


def notify(hook_name: str, **kwargs: Any) -> None:
    """Fire an event hook through pluggy; a plugin that raises is logged, never propagated. Where no
    plugin could implement the hook, nothing is built or imported."""
    manager = _manager
    if manager is None:
        if not _may_be_implemented(hook_name):
            return
        manager = get_plugin_manager()
    getattr(manager.hook, hook_name)(**kwargs)


def _may_be_implemented(hook_name: str) -> bool:
    """Whether a plugin that is not disabled may implement ``hook_name``: a built-in that does, or any
    third-party plugin at all (which hooks it implements is known only once it is imported)."""
    blocked = _names_from_env("FASTLOAD_DISABLE_PLUGINS") or set()
    for name in BUILTIN_PLUGINS:
        if name not in blocked and hook_name in BUILTIN_HOOKS.get(name, (hook_name,)):
            return True
    if _names_from_env("FASTLOAD_PLUGINS") == set():  # set but empty: no third-party plugin is wanted
        return False
    global _scanned
    path = tuple(sys.path)
    scanned = _scanned
    if scanned is None or scanned[0] != path:  # a changed sys.path may bring new distributions
        scanned = _scanned = (path, _entry_points_may_exist(path))
    return scanned[1]


def _entry_points_may_exist(path: tuple[str, ...]) -> bool:
    """False only when no distribution on ``path`` can declare a ``fastload`` entry point.

    Looks for the group's section header in each ``*.dist-info``/``*.egg-info`` directory's
    ``entry_points.txt``, a few times cheaper than ``importlib.metadata.entry_points()``, which parses
    every distribution's. It errs towards True, never the other way: a header written oddly, or
    distributions that importlib.metadata would find elsewhere (a zip or an egg on the path, a finder
    of its own on ``sys.meta_path``), answer True, and the manager then asks importlib.metadata.
    """
    import importlib.machinery

    if any(hasattr(finder, "find_distributions") and finder is not importlib.machinery.PathFinder
           for finder in sys.meta_path):
        return True
    needle = f"{ENTRY_POINT_GROUP}]".encode()  # "[fastload]", as importlib.metadata reads a section name
    for entry in path:
        if entry.lower().endswith(".egg"):
            return True
        try:
            children = os.scandir(entry or ".")
        except NotADirectoryError:
            return True  # a zip file: importlib.metadata looks inside it
        except OSError:
            continue  # missing or unreadable: importlib.metadata finds nothing there either
        with children:
            for child in children:
                if not child.name.lower().endswith((".dist-info", ".egg-info")):
                    continue
                try:
                    with open(os.path.join(child.path, "entry_points.txt"), "rb") as file:
                        if needle in file.read():
                            return True
                except OSError:  # no entry points (most distributions), or an .egg-info file
                    continue
    return False


def collect(hook_name: str, accept: Callable[..., T]) -> list[Registration[T]]:
    """Call a registration hook and return what the plugins registered, in pluggy's call order (the
    last registered plugin first, so where two claim the same name the first one should win).

    ``accept`` states the contract of the hook's ``register`` callback: it is called with the
    plugin's arguments and returns the checked value, or raises ``PluginError`` saying what is wrong.
    A call that does not fit its signature, or that ``accept`` refuses, is logged as a ``PluginError``
    naming the plugin and skipped; the plugin's other registrations and the other plugins still count.
    """
    from ._plugin_manager import calling_plugin

    signature = inspect.signature(accept)
    accepted: list[Registration[T]] = []

    def register(*args: Any, **kwargs: Any) -> None:
        plugin = calling_plugin() or "?"
        try:
            try:
                signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise PluginError(f"register{signature} cannot take these arguments ({exc})") from None
            value = accept(*args, **kwargs)
        except PluginError as exc:
            log.warning("fastload plugin %r broke the contract of %s; this registration is skipped: %r",
                        plugin, hook_name, exc)
            return
        accepted.append(Registration(plugin, value))

    getattr(get_plugin_manager().hook, hook_name)(register=register)
    return accepted


def plugin_infos() -> list[PluginInfo]:
    """What is loaded and which hooks each plugin implements (for ``fastload plugins``)."""
    import importlib.metadata

    manager = get_plugin_manager()
    distributions = {
        ep.name: (ep.dist.name if ep.dist else "?")
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    }
    infos = []
    for name, plugin in manager.list_name_plugin():
        if plugin is None:  # blocked by FASTLOAD_DISABLE_PLUGINS
            continue
        callers = manager.get_hookcallers(plugin) or []
        infos.append(
            PluginInfo(
                name=name,
                source="builtin" if name in BUILTIN_PLUGINS else distributions.get(name, "?"),
                hooks=tuple(sorted(caller.name for caller in callers)),
            )
        )
    return sorted(infos, key=lambda info: info.name)
