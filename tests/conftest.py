"""Shared fixtures: isolated cache directories for every test, and the service fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fastload_core.plugins import reset_plugin_manager
from tests.services.redis import redis_server, redis_url  # noqa: F401  (fixtures)
from tests.services.s3 import s3_endpoint, s3_server  # noqa: F401  (fixtures)


@pytest.fixture(autouse=True)
def _isolated_fastload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test reads or writes the user's real cache, and plugin state never leaks between tests."""
    monkeypatch.setenv("FASTLOAD_CACHE_DIR", str(tmp_path / "fastload-cache"))
    for variable in ("FASTLOAD_PLUGINS", "FASTLOAD_DISABLE_PLUGINS"):
        monkeypatch.delenv(variable, raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests are the only ones allowed to skip, and only where no CUDA device exists."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here); run benchmarks/gpu_check.sh on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
