"""fastload: fast cold starts for PyTorch models in serving frameworks.

The public surface is re-exported here; everything else is private and may change.

Names are imported when first used (PEP 562 ``__getattr__``), not by ``import fastload_core``: a
serving process pays only for what it calls, so ``import fastload_core`` costs next to nothing on
top of ``import torch``, and ``load_file`` of a local file never imports the compile cache, the
tiered store or their clients. ``tests/test_imports.py`` holds that line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import errors
from .errors import FastloadError

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from .compile_cache import CompileCache, CompileReport, compile, report_of
    from .compile_cache.errors import CompileCacheError
    from .hookspecs import hookimpl
    from .loader.api import load_file, load_state_dict, read_metadata
    from .model import load_model
    from .report import LoadReport
    from .storage import TieredStore, fetch, pin, pin_path, prefetch
    from .storage.errors import StorageError

# public name -> the module that defines it
_LAZY = {
    "CompileCache": ".compile_cache",
    "CompileReport": ".compile_cache",
    "compile": ".compile_cache",
    "report_of": ".compile_cache",
    "CompileCacheError": ".compile_cache.errors",
    "hookimpl": ".hookspecs",
    "load_file": ".loader.api",
    "load_state_dict": ".loader.api",
    "read_metadata": ".loader.api",
    "load_model": ".model",
    "LoadReport": ".report",
    "TieredStore": ".storage",
    "fetch": ".storage",
    "pin": ".storage",
    "pin_path": ".storage",
    "prefetch": ".storage",
    "StorageError": ".storage.errors",
}

__all__ = [
    "CompileCache",
    "CompileCacheError",
    "CompileReport",
    "FastloadError",
    "LoadReport",
    "StorageError",
    "TieredStore",
    "compile",
    "errors",
    "fetch",
    "hookimpl",
    "load_file",
    "load_model",
    "load_state_dict",
    "pin",
    "pin_path",
    "prefetch",
    "read_metadata",
    "report_of",
]
__version__ = "0.1.0"


# Subpackages an eager __init__ used to import; ``fastload_core.storage.fetch`` after a bare
# ``import fastload_core`` keeps working.
_SUBMODULES = frozenset({"compile_cache", "config", "hookspecs", "loader", "model", "plugins", "report", "storage"})


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # the next access is a plain global lookup
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
