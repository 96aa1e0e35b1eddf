"""examples/ray_serve/upload_models.py as a user runs it: a subprocess, with good and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from fastload_devservices._process import free_port
from tests.integrations.fastload_ray.conftest import REPO

SCRIPT = REPO / "examples" / "ray_serve" / "upload_models.py"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.mark.s3
def test_it_writes_versioned_weights_and_adapters(s3_endpoint: str, s3: Any) -> None:
    first = run("--endpoint-url", s3_endpoint, "--adapters", "2")
    assert first.returncode == 0, first.stderr
    written = json.loads(first.stdout)
    assert written["adapters"] == ["a0", "a1"] and written["embedder"]["revision"]
    second = json.loads(run("--endpoint-url", s3_endpoint, "--seed", "5", "--adapters", "0").stdout)
    assert second["embedder"]["revision"] != written["embedder"]["revision"]  # a new version, the old one kept
    versions = s3.list_object_versions(Bucket="models", Prefix="embedder/")["Versions"]
    assert len(versions) == 2
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="models", Prefix="adapters/")["Contents"]}
    assert keys == {"adapters/a0/model.safetensors", "adapters/a1/model.safetensors"}


def test_an_unreachable_endpoint_is_one_clear_line() -> None:
    done = run("--endpoint-url", f"http://127.0.0.1:{free_port()}",
               env={"PATH": "/usr/bin:/bin", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"})
    assert done.returncode == 1
    assert "upload_models: cannot write to s3://models at http://127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("args", "message"), [
    ([], "the following arguments are required: --endpoint-url"),
    (["--endpoint-url", "http://x", "--adapters", "-1"], "--adapters cannot be negative"),
    (["--endpoint-url", "http://x", "--seed", "one"], "invalid int value: 'one'"),
])
def test_bad_arguments_are_usage_errors(args: list[str], message: str) -> None:
    done = run(*args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_an_endpoint_without_a_scheme_is_a_usage_error() -> None:
    done = run("--endpoint-url", "127.0.0.1:9000")
    assert done.returncode == 2, done.stderr
    assert "--endpoint-url '127.0.0.1:9000'" in done.stderr and "http://127.0.0.1:9000" in done.stderr
    assert "Traceback" not in done.stderr
