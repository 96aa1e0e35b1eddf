"""Compile cache: a new replica restores torch.compile's artifacts instead of compiling again.

``compile()`` is the entry point; ``CompileCache`` names where entries live; the backends are plugins
registered through ``register_compile_cache_backends``. See docs/compile_cache.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the lazy names, for type checkers and IDEs
    from .base import CompileCacheBackend, StoredEntry
    from .cache import CompileCache, default_url
    from .compiler import CompileReport, compile, compile_loaded_model, report_of
    from .errors import CacheURLError, CompileCacheError, CorruptEntryError, EntryTooLargeError
    from .keys import CompileKey, derive_key
    from .manage import Entry, check_backend, list_entries, remove_entry

# Imported on first use (PEP 562): ``import fastload_core`` and loading weights never pay for the
# compile cache, its key derivation or its backends' clients.
_LAZY = {
    **dict.fromkeys(("CompileCacheBackend", "StoredEntry"), ".base"),
    **dict.fromkeys(("CompileCache", "default_url"), ".cache"),
    **dict.fromkeys(("CompileReport", "compile", "compile_loaded_model", "report_of"), ".compiler"),
    **dict.fromkeys(("CacheURLError", "CompileCacheError", "CorruptEntryError", "EntryTooLargeError"), ".errors"),
    **dict.fromkeys(("CompileKey", "derive_key"), ".keys"),
    **dict.fromkeys(("Entry", "check_backend", "list_entries", "remove_entry"), ".manage"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "CacheURLError",
    "CompileCache",
    "CompileCacheBackend",
    "CompileCacheError",
    "CompileKey",
    "CompileReport",
    "CorruptEntryError",
    "Entry",
    "EntryTooLargeError",
    "StoredEntry",
    "check_backend",
    "compile",
    "compile_loaded_model",
    "default_url",
    "derive_key",
    "list_entries",
    "remove_entry",
    "report_of",
]
