"""SigV4 checks against requests botocore itself signs."""

from __future__ import annotations

import datetime

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from fastload_core.serve.auth import Denied, ServeCredentials

CREDS = ServeCredentials("serve-key", "serve-secret")


def signed(url: str, *, secret: str = "serve-secret", key: str = "serve-key", method: str = "GET",
           headers: dict[str, str] | None = None) -> tuple[str, str, dict[str, str]]:
    request = AWSRequest(method=method, url=url, headers=headers or {})
    S3SigV4Auth(Credentials(key, secret), "s3", "eu-west-1").add_auth(request)
    prepared = request.prepare()
    path, _, query = prepared.url.split("://", 1)[1].partition("/")[2].partition("?")
    sent = {name.lower(): value.decode() if isinstance(value, bytes) else value
            for name, value in prepared.headers.items()}
    sent["host"] = url.split("/")[2]
    return "/" + path, query, sent


def test_a_request_botocore_signed_with_the_serve_credentials_passes() -> None:
    path, query, headers = signed("http://127.0.0.1:9000/models/a%20b/w.safetensors?list-type=2&prefix=x%2Fy",
                                  headers={"Range": "bytes=0-9"})
    CREDS.check("GET", path, query, headers)


@pytest.mark.parametrize("change", ["secret", "key", "path", "range", "method", "unsigned", "skew"])
def test_anything_else_is_denied(change: str) -> None:
    path, query, headers = signed("http://127.0.0.1:9000/models/w.safetensors",
                                  secret="wrong" if change == "secret" else "serve-secret",
                                  key="other" if change == "key" else "serve-key", headers={"Range": "bytes=0-9"})
    method, now = "GET", None
    if change == "path":
        path = "/models/other.safetensors"
    elif change == "range":
        headers["range"] = "bytes=0-99"
    elif change == "method":
        method = "HEAD"
    elif change == "unsigned":
        del headers["authorization"]
    elif change == "skew":
        now = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=20)
    with pytest.raises(Denied):
        CREDS.check(method, path, query, headers, now=now)
