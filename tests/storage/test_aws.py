"""Sessions share botocore's loaded service data, never a client's credentials or configuration."""

from __future__ import annotations

import pytest

from fastload_core.storage.aws import new_session


def test_sessions_share_the_loader_but_resolve_credentials_and_endpoint_each_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "first-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "first-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9001")
    first = new_session()
    first_client = first.client("s3", region_name="us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "second-key")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9002")
    second = new_session()
    second_client = second.client("s3", region_name="us-east-1")
    assert first._session.get_component("data_loader") is second._session.get_component("data_loader")
    assert first_client._request_signer._credentials.access_key == "first-key"
    assert second_client._request_signer._credentials.access_key == "second-key"
    assert (first_client.meta.endpoint_url, second_client.meta.endpoint_url) == \
        ("http://127.0.0.1:9001", "http://127.0.0.1:9002")


def test_another_data_path_gets_its_own_loader(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    shared = new_session()._session.get_component("data_loader")
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path))
    own = new_session()._session.get_component("data_loader")
    assert own is not shared
    assert str(tmp_path) in own.search_paths
