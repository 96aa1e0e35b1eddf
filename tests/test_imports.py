"""What ``import fastload_core`` and a local ``load_file`` pull in, in a fresh process.

A serving worker pays every import before its first request. These tests pin down *what* gets
imported, not how long it takes (timings belong to benchmarks/bench_import.py): a regression here is a
module that should be imported on first use creeping back into the import of the package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fastload_core

# Never needed to import the package or load a local file: the compile cache, the tiered store and its
# locks, service clients, the metrics client, the legacy-format converter, and pluggy where no plugin is
# installed (the test environment has none).
HEAVY = (
    "filelock", "boto3", "botocore", "redis", "tenacity", "prometheus_client", "platformdirs", "pluggy",
    "fastload_core._plugin_manager", "fastload_core.loader.formats", "fastload_core._atomic",
    "fastload_core.compile_cache.cache", "fastload_core.compile_cache.compiler", "fastload_core.compile_cache.keys",
    "fastload_core.storage.store", "fastload_core.storage.eviction", "fastload_core.model",
)

PROBE = r"""
import json, sys
import torch
before = set(sys.modules)
import fastload_core
after_import = sorted(set(sys.modules) - before)
loaded = None
if len(sys.argv) > 1:
    loaded = sorted(fastload_core.load_file(sys.argv[1]))
print(json.dumps({"import": after_import, "load": sorted(set(sys.modules) - before), "keys": loaded}))
"""


def _probe(*argv: str) -> dict[str, list[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=300,
                          check=True)
    result: dict[str, list[str]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_import_fastload_core_imports_next_to_nothing() -> None:
    imported = _probe()["import"]
    assert set(imported) <= {"fastload_core", "fastload_core.errors"}, imported


def test_a_local_load_does_not_import_the_compile_cache_store_or_clients(tmp_path: Path) -> None:
    save_file({"w": torch.ones(3)}, tmp_path / "m.safetensors")
    result = _probe(str(tmp_path / "m.safetensors"))
    assert result["keys"] == ["w"]
    assert not [name for name in result["load"] if name in HEAVY or name.split(".")[0] in HEAVY], result["load"]


def test_lazy_names_are_the_real_objects() -> None:
    from fastload_core.compile_cache.compiler import compile as compile_function
    from fastload_core.loader.api import load_file
    from fastload_core.storage.store import TieredStore

    assert fastload_core.load_file is load_file and fastload_core.compile is compile_function
    assert fastload_core.TieredStore is TieredStore
    assert set(fastload_core.__all__) <= set(dir(fastload_core))
    for name in fastload_core.__all__:
        assert getattr(fastload_core, name) is not None
    for package in ("fastload_core.storage", "fastload_core.compile_cache"):
        module = __import__(package, fromlist=["__all__"])
        assert all(getattr(module, name) is not None for name in module.__all__), package


def test_subpackages_are_reachable_as_attributes() -> None:
    """As they were when the package imported them eagerly: ``import fastload_core`` then ``.storage.fetch``."""
    code = "import fastload_core as f; print(f.storage.fetch.__module__, f.compile_cache.compile.__module__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.split() == ["fastload_core.storage", "fastload_core.compile_cache.compiler"]


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'load_everything'"):
        fastload_core.load_everything  # noqa: B018


def test_a_fetch_does_not_import_torch(tmp_path: Path) -> None:
    """Fetching bytes (``fastload fetch``, a prefetch hook) builds the plugin manager, which imports every
    built-in plugin: none of them may pull in torch, seconds of a cold start spent on nothing."""
    (tmp_path / "m.bin").write_bytes(b"x" * 10)
    code = ("import sys, fastload_core\n"
            f"fastload_core.fetch({(tmp_path / 'm.bin').as_uri()!r})\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True,
                          env={**os.environ, "FASTLOAD_CACHE_DIR": str(tmp_path / "cache"),
                               "FASTLOAD_SHM_DIR": str(tmp_path / "shm")})
    assert done.stdout.strip().splitlines()[-1] == "False", done.stderr
