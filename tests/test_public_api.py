"""The public surface, pinned (as httpx pins its own): a name is public because it is listed here and in
docs/api.md, and changing that is a decision made in both places together."""

from __future__ import annotations

import importlib
import inspect
import types
from pathlib import Path

import pytest

import fastload_core
from fastload_core import hookspecs

PUBLIC: dict[str, list[str]] = {
    "fastload_core": [
        "CompileCache", "CompileCacheError", "CompileReport", "FastloadError", "LoadReport", "StorageError",
        "TieredStore", "compile", "errors", "fetch", "hookimpl", "load_file", "load_model", "load_model_async",
        "load_state_dict", "pin", "pin_path", "prefetch", "read_metadata", "report_of",
    ],
    "fastload_core.storage": [
        "BadURIError", "Checksums", "FetchTimeoutError", "IntegrityError", "Journal", "LocalDiskTier", "Manifest",
        "ModelURI", "NotCachedError", "ObjectChangedError", "Origin", "OriginError", "Pin", "Progress",
        "RemoteFile", "SharedFsTier", "ShmTier", "StorageError", "StorageSettings", "Tier", "TierFullError",
        "TieredStore", "UnsafeKeyError", "fetch", "pin", "pin_path", "prefetch", "tier_of",
    ],
    "fastload_core.compile_cache": [
        "CacheURLError", "CompileCache", "CompileCacheBackend", "CompileCacheError", "CompileEntry",
        "CompileReport", "CorruptEntryError", "EntryTooLargeError", "StoredEntry", "UnsafeCacheKeyError",
        "check_backend", "compile", "default_url", "list_entries", "remove_entry", "report_of",
    ],
    "fastload_core.metrics": ["serve"],
}

# The exception tree: every error class each errors module defines.
ERRORS: dict[str, list[str]] = {
    "fastload_core.errors": [
        "CheckpointError", "DeviceError", "FastloadError", "HeaderError", "LoaderSettingError", "MissingShardError",
        "PluginError",
        "StateDictMismatchError", "TorchVersionError", "TruncatedFileError", "UnsafeKeyError",
        "UnsupportedDtypeError", "UnsupportedFormatError",
    ],
    "fastload_core.storage.errors": [
        "BadURIError", "FetchTimeoutError", "IntegrityError", "NotCachedError", "ObjectChangedError",
        "OriginError", "StorageError", "TierFullError", "UnsafeKeyError",
    ],
    "fastload_core.compile_cache.errors": [
        "CacheURLError", "CompileCacheError", "CorruptEntryError", "EntryTooLargeError", "UnsafeCacheKeyError",
    ],
}

# The plugin surface: hook names and the arguments each passes.
HOOKS: dict[str, list[str]] = {
    "after_compile": ["report"],
    "after_load": ["report", "error"],
    "before_load": ["source", "device"],
    "on_evict": ["tier", "key", "nbytes"],
    "on_fetch_finish": ["uri", "tier", "nbytes", "seconds", "error"],
    "on_fetch_start": ["uri", "tier", "nbytes"],
    "on_peer_fetch": ["uri", "peer", "nbytes", "seconds", "error"],
    "on_serve_request": ["method", "status", "nbytes", "source"],
    "on_tier_full": ["uri", "tier", "nbytes"],
    "on_tier_hit": ["uri", "tier", "path"],
    "on_tier_miss": ["uri", "tier"],
    "register_checkpoint_formats": ["register"],
    "register_compile_cache_backends": ["register"],
    "register_storage_schemes": ["register"],
}


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_each_public_namespace_declares_exactly_the_pinned_names(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert module.__all__ == sorted(module.__all__)  # one order, so diffs stay readable
    assert sorted(module.__all__) == sorted(PUBLIC[module_name])


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_every_public_name_resolves_and_is_listed_by_dir(module_name: str) -> None:
    module = importlib.import_module(module_name)
    for name in module.__all__:
        value = getattr(module, name)  # lazy names (PEP 562) included
        assert not isinstance(value, types.ModuleType) or name == "errors", name
    assert set(module.__all__) <= set(dir(module))


def test_the_top_level_names_are_the_subpackages_objects() -> None:
    for name in ("fetch", "pin", "pin_path", "prefetch", "TieredStore", "StorageError"):
        assert getattr(fastload_core, name) is getattr(fastload_core.storage, name)
    for name in ("compile", "report_of", "CompileCache", "CompileReport", "CompileCacheError"):
        assert getattr(fastload_core, name) is getattr(fastload_core.compile_cache, name)


@pytest.mark.parametrize("module_name", sorted(ERRORS))
def test_the_error_tree_is_pinned_and_has_one_base(module_name: str) -> None:
    module = importlib.import_module(module_name)
    defined = sorted(name for name, value in vars(module).items() if isinstance(value, type)
                     and issubclass(value, BaseException) and value.__module__ == module_name)
    assert defined == ERRORS[module_name]
    assert all(issubclass(getattr(module, name), fastload_core.FastloadError) for name in defined)


def test_unsafe_keys_share_one_base() -> None:
    from fastload_core.compile_cache.errors import UnsafeCacheKeyError
    from fastload_core.storage.errors import UnsafeKeyError

    assert issubclass(UnsafeKeyError, fastload_core.errors.UnsafeKeyError)
    assert issubclass(UnsafeCacheKeyError, fastload_core.errors.UnsafeKeyError)


def test_the_hooks_and_their_arguments_are_pinned() -> None:
    specs = {name: list(inspect.signature(function).parameters) for name, function in vars(hookspecs).items()
             if hasattr(function, "fastload_spec")}
    assert specs == HOOKS


def test_the_docs_list_every_public_name_and_hook() -> None:
    docs = Path(__file__).parents[1] / "docs"
    page = (docs / "api.md").read_text()
    missing = [f"{module}.{name}" for module, names in PUBLIC.items() for name in names if f"`{name}" not in page]
    everything = "".join(path.read_text() for path in sorted(docs.glob("*.md")))
    missing += [f"hook {name}" for name in HOOKS if f"`{name}" not in everything]
    assert missing == []
