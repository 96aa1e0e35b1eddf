"""Plugin discovery and hook calling, through pluggy.

Plugins come from the ``fastload`` entry-point group; built-in parts register through the same
hooks. Hooks are called through pluggy, so ordering (``tryfirst``/``trylast``), wrappers
(``wrapper=True`` and old-style ``hookwrapper=True``) and blocking behave as pluggy documents. One
thing differs from plain pluggy, on purpose: a serving replica must not die because a third-party
plugin is broken, so every hook implementation is wrapped when it registers; one that raises is
logged and skipped while the others still run (plain pluggy stops at the first exception). A
plugin that fails to import is logged and skipped too, and a registration that breaks its hook's
contract is logged as a ``PluginError`` and skipped, the same way for every registration hook.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import importlib.metadata
import inspect
import logging
import os
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pluggy

from . import hookspecs
from .errors import PluginError

log = logging.getLogger("fastload.plugins")

# Modules whose hook implementations ship with fastload. Names are what FASTLOAD_DISABLE_PLUGINS takes.
BUILTIN_PLUGINS: dict[str, str] = {
    "fastload.torch_pickle": "fastload_core.loader.legacy",
    "fastload.storage": "fastload_core.storage.builtin",
    "fastload.metrics": "fastload_core.metrics",
    "fastload.compile_cache": "fastload_core.compile_cache.backends",
}

_lock = threading.Lock()
_manager: PluginManager | None = None
# The plugin whose hook implementation is running: what a ``register`` callback attributes a call to.
_calling: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastload_plugin", default=None)

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


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, with every hook implementation isolated when it registers (see the module)."""

    def register(self, plugin: object, name: str | None = None) -> str | None:
        registered = super().register(plugin, name)
        if registered is not None:
            for caller in self.get_hookcallers(plugin) or []:
                for impl in caller.get_hookimpls():
                    if impl.plugin is plugin:
                        # HookImpl keeps the argument names it read from the original function, and
                        # pluggy reads ``function`` at each call: swapping it is the least invasive seam.
                        impl.function = _isolated(impl, caller.name)  # type: ignore[misc]
        return registered


def _log_raised(plugin: str, hook_name: str, exc: BaseException) -> None:
    log.warning("fastload plugin %r raised in %s and is ignored: %r", plugin, hook_name, exc)


def _isolated(impl: pluggy.HookImpl, hook_name: str) -> Callable[..., object]:
    """``impl.function`` that logs instead of raising; wrappers keep pluggy's protocol (one yield)."""
    function = impl.function
    plugin = impl.plugin_name
    if not (impl.wrapper or impl.hookwrapper):

        @functools.wraps(function)
        def isolated(*args: object, **kwargs: object) -> object:
            token = _calling.set(plugin)
            try:
                return function(*args, **kwargs)
            except Exception as exc:
                _log_raised(plugin, hook_name, exc)
                return None
            finally:
                _calling.reset(token)

        return isolated

    @functools.wraps(function)
    def isolated_wrapper(*args: object, **kwargs: object) -> Generator[None, object, object]:
        token = _calling.set(plugin)
        teardown: Generator[None, object, object] | None = None
        try:
            teardown = function(*args, **kwargs)  # type: ignore[assignment]
            next(teardown)  # type: ignore[arg-type]
        except StopIteration:
            _log_raised(plugin, hook_name, RuntimeError("the wrapper returned without yielding"))
            teardown = None
        except Exception as exc:
            _log_raised(plugin, hook_name, exc)
            teardown = None
        finally:
            _calling.reset(token)
        if teardown is None:  # its setup failed: pass the result (or the exception) straight through
            return (yield)
        try:
            # New-style wrappers are sent the result, old-style ones a pluggy.Result: forwarded as is.
            sent = yield
        except BaseException as exc:  # an inner wrapper raised: the plugin may handle it, as in pluggy
            token = _calling.set(plugin)
            try:
                teardown.throw(exc)
            except StopIteration as stop:
                return stop.value
            except BaseException as raised:
                if raised is exc:
                    raise
                _log_raised(plugin, hook_name, raised)
                raise exc  # noqa: B904  (the inner error goes on; the plugin's own was logged)
            finally:
                _calling.reset(token)
            teardown.close()
            _log_raised(plugin, hook_name, RuntimeError("the wrapper yielded twice"))
            raise
        token = _calling.set(plugin)
        try:
            teardown.send(sent)
        except StopIteration as stop:
            return stop.value
        except Exception as exc:
            _log_raised(plugin, hook_name, exc)
            return sent
        finally:
            _calling.reset(token)
        teardown.close()
        _log_raised(plugin, hook_name, RuntimeError("the wrapper yielded twice"))
        return sent

    return isolated_wrapper


def _names_from_env(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _build_manager() -> PluginManager:
    manager = PluginManager("fastload")
    manager.add_hookspecs(hookspecs)
    for name in _names_from_env("FASTLOAD_DISABLE_PLUGINS") or ():
        manager.set_blocked(name)
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
        if manager.is_blocked(name):
            continue  # not even imported: a disabled plugin may be the broken one
        try:
            manager.register(load(), name=name)
        except Exception as exc:  # built-ins included: an optional dependency may be broken
            log.warning("fastload plugin %r (%s) failed to load and is skipped: %r", name, where, exc)
    return manager


def get_plugin_manager() -> PluginManager:
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


def notify(hook_name: str, **kwargs: Any) -> None:
    """Fire an event hook through pluggy; a plugin that raises is logged, never propagated."""
    getattr(get_plugin_manager().hook, hook_name)(**kwargs)


def collect(hook_name: str, accept: Callable[..., T]) -> list[Registration[T]]:
    """Call a registration hook and return what the plugins registered, in pluggy's call order (the
    last registered plugin first, so where two claim the same name the first one should win).

    ``accept`` states the contract of the hook's ``register`` callback: it is called with the
    plugin's arguments and returns the checked value, or raises ``PluginError`` saying what is wrong.
    A call that does not fit its signature, or that ``accept`` refuses, is logged as a ``PluginError``
    naming the plugin and skipped; the plugin's other registrations and the other plugins still count.
    """
    signature = inspect.signature(accept)
    accepted: list[Registration[T]] = []

    def register(*args: Any, **kwargs: Any) -> None:
        plugin = _calling.get() or "?"
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
    manager = get_plugin_manager()
    distributions = {
        ep.name: (ep.dist.name if ep.dist else "?")
        for ep in importlib.metadata.entry_points(group="fastload")
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
