"""Compile cache: a new replica restores torch.compile's artifacts instead of compiling again.

``compile()`` is the entry point; ``CompileCache`` names where entries live; the backends are plugins
registered through ``register_compile_cache_backends``. See docs/compile_cache.md.
"""

from __future__ import annotations

from .base import CompileCacheBackend, StoredEntry
from .cache import CompileCache, default_url
from .compiler import CompileReport, compile, compile_loaded_model, report_of
from .errors import CacheURLError, CompileCacheError, CorruptEntryError, EntryTooLargeError
from .keys import CompileKey, derive_key
from .manage import Entry, check_backend, list_entries, remove_entry

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
