"""moto's S3 server on loopback: real HTTP through boto3, no in-process mocking."""

from __future__ import annotations

import sys
import urllib.request

from ._process import ServerProcess


def _answers_http(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=0.5):
            return True
    except OSError:
        return False


class S3Server(ServerProcess):
    def __init__(self) -> None:
        super().__init__(
            lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            _answers_http,
        )

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=5):
            pass


BUCKET = "models"

