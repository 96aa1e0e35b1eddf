"""Storage test fixtures: a private /dev/shm dir per test, an S3 bucket behind the fault proxy."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.storage.faultproxy import FaultProxy

BUCKET = "models"


@pytest.fixture(autouse=True)
def _isolated_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own shm root (never the real /dev/shm/fastload) and no inherited settings."""
    shm = Path("/dev/shm") / f"fastload-test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("FASTLOAD_SHM_DIR", str(shm))
    for variable in list(os.environ):
        if variable.startswith("FASTLOAD_") and variable not in ("FASTLOAD_CACHE_DIR", "FASTLOAD_SHM_DIR"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("FASTLOAD_S3_PART_SIZE", "256KiB")
    monkeypatch.setenv("FASTLOAD_S3_CONCURRENCY", "4")
    yield shm
    shutil.rmtree(shm, ignore_errors=True)


@pytest.fixture
def shm_root(_isolated_storage: Path) -> Path:
    return _isolated_storage


@pytest.fixture
def s3(s3_endpoint: str) -> Any:
    """A boto3 client talking to moto directly (not through the proxy), with the test bucket created."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def proxy(s3: Any, s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """The fault proxy in front of moto; fastload's own S3 client goes through it."""
    fault_proxy = FaultProxy(s3_server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", fault_proxy.endpoint_url)
    yield fault_proxy
    fault_proxy.close()


def leftovers(root: Path) -> list[Path]:
    """Anything a crashed or interrupted writer could leave behind in a tier."""
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*") if p.name.startswith((".partial-", ".trash-")))
