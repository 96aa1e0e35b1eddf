"""Shared fixtures: isolated cache directories for every test, and the service fixtures."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastload_core.plugins import reset_plugin_manager
from tests.services.redis import redis_server, redis_url  # noqa: F401  (fixtures)
from tests.services.s3 import s3, s3_endpoint, s3_server  # noqa: F401  (fixtures)


@pytest.fixture(autouse=True)
def _isolated_fastload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No test touches the user's real caches (local disk or /dev/shm/fastload), no FASTLOAD_*
    setting leaks in from the environment, and plugin state never leaks between tests.
    Yields the test's own shm tier root (on the real tmpfs, so shm semantics hold)."""
    for variable in list(os.environ):
        if variable.startswith("FASTLOAD_"):
            monkeypatch.delenv(variable)
    shm = Path("/dev/shm") / f"fastload-test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("FASTLOAD_CACHE_DIR", str(tmp_path / "fastload-cache"))
    monkeypatch.setenv("FASTLOAD_SHM_DIR", str(shm))
    reset_plugin_manager()
    yield shm
    from fastload_core.storage import writethrough

    writethrough.wait(timeout=60)  # a test's background copies end with it, not in the next test's dirs
    reset_plugin_manager()
    shutil.rmtree(shm, ignore_errors=True)


@pytest.fixture
def shm_root(_isolated_fastload: Path) -> Path:
    return _isolated_fastload


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests are the only ones allowed to skip, and only where no CUDA device exists."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here); run benchmarks/gpu_check.sh on a GPU machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `"gpu" in item.keywords`: a folder named gpu matches
            item.add_marker(skip)
