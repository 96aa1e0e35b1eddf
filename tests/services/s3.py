"""pytest fixtures: moto's S3 server on loopback (``fastload_devservices.s3``), reset per test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from fastload_devservices.s3 import BUCKET, S3Server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_endpoint(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An empty S3 endpoint, with the standard AWS variables pointing boto3 at it."""
    s3_server.reset()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield s3_server.endpoint_url


@pytest.fixture
def s3(s3_endpoint: str) -> Any:
    """A boto3 client talking to the server directly, with the test bucket ``BUCKET`` created."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    return client
