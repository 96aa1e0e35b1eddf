"""Storage test fixtures: small S3 parts, an S3 bucket behind the fault proxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastload_devservices.faultproxy import FaultProxy
from fastload_devservices.s3 import BUCKET

__all__ = ["BUCKET", "leftovers"]


@pytest.fixture(autouse=True)
def _small_s3_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small parts so a few-MB test object still takes many ranged GETs (and many chances to fail)."""
    monkeypatch.setenv("FASTLOAD_S3_PART_SIZE", "256KiB")
    monkeypatch.setenv("FASTLOAD_S3_CONCURRENCY", "4")


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
