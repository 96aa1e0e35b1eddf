"""fastload: fast cold starts for PyTorch models in serving frameworks.

The public surface is re-exported here; everything else is private and may change.
"""

from __future__ import annotations

from . import errors
from .compile_cache import CompileCache, CompileReport, compile, report_of
from .compile_cache.errors import CompileCacheError
from .errors import FastloadError
from .hookspecs import hookimpl
from .loader.api import load_file, load_state_dict, read_metadata
from .model import load_model, load_model_async
from .report import LoadReport
from .storage import TieredStore, fetch, pin, pin_path, prefetch
from .storage.errors import StorageError

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
    "load_model_async",
    "load_state_dict",
    "pin",
    "pin_path",
    "prefetch",
    "read_metadata",
    "report_of",
]
__version__ = "0.1.0"
