"""pluggy's plugin manager for fastload, with every hook implementation isolated when it registers.

Kept apart from ``plugins`` so that a process whose events no plugin listens to never imports pluggy
or scans entry points (see ``plugins.notify``); ``plugins`` builds the manager from here on first need.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import importlib.metadata
import logging
from collections.abc import Callable, Generator

import pluggy

from . import hookspecs

log = logging.getLogger("fastload.plugins")

# The plugin whose hook implementation is running: what a ``register`` callback attributes a call to.
_calling: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastload_plugin", default=None)


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


def build_manager(builtins: dict[str, str], group: str, blocked: set[str], wanted: set[str] | None) -> PluginManager:
    """A manager with the hook specifications, the built-ins ``builtins`` (name -> module) and the
    entry points of ``group`` (only ``wanted`` ones where given), none of ``blocked`` even imported."""
    manager = PluginManager("fastload")
    manager.add_hookspecs(hookspecs)
    for name in blocked:
        manager.set_blocked(name)
    candidates: list[tuple[str, str, Callable[[], object]]] = [
        (name, module_name, functools.partial(importlib.import_module, module_name))
        for name, module_name in builtins.items()
    ]
    candidates += [
        (entry_point.name, entry_point.value, entry_point.load)
        for entry_point in importlib.metadata.entry_points(group=group)
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


def calling_plugin() -> str | None:
    """The plugin whose hook implementation is running in this context (None outside one)."""
    return _calling.get()
