"""examples/bentoml/put_model.py as a user runs it: a subprocess, good and bad arguments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastload_core
from tests.integrations.fastload_bentoml.test_serve import EXAMPLE, demo

pytestmark = pytest.mark.slow


def put_model(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLE / "put_model.py"), *args], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, **(env or {})})


def test_a_local_directory_gets_the_model_and_another_its_pickle(tmp_path: Path) -> None:
    result = put_model(str(tmp_path / "m1"), "--width", "16", "--layers", "2", "--seed", "3",
                       "--pickle-to", (tmp_path / "stock").as_uri())
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (tmp_path / "m1").iterdir()] == [demo.WEIGHTS_NAME]  # a fastload prefix: nothing else
    reference = demo.make(16, 2, seed=3).state_dict()
    assert int(result.stdout) == sum(t.numel() * t.element_size() for t in reference.values())
    assert fastload_core.read_metadata(tmp_path / "m1" / demo.WEIGHTS_NAME) == {"width": "16", "layers": "2"}
    loaded = fastload_core.load_file(tmp_path / "m1" / demo.WEIGHTS_NAME)
    pickled = torch.load(tmp_path / "stock" / demo.PICKLE_NAME, weights_only=True)
    for name, tensor in reference.items():
        assert torch.equal(loaded[name], tensor) and torch.equal(pickled[name], tensor)


@pytest.mark.parametrize(("args", "message"), [
    (["gopher://host/m1/"], "expected s3://bucket/prefix/ or a local directory"),
    (["s3:///m1/"], "an s3:// target needs a bucket"),
    (["{tmp}/m1", "--pickle-to", "gopher://x/"], "expected s3://bucket/prefix/ or a local directory"),
    (["{tmp}/m1", "--width", "0"], "--width and --layers must be at least 1"),
    (["{tmp}/m1", "--layers", "many"], "invalid int value"),
])
def test_bad_arguments_are_refused_with_usage(tmp_path: Path, args: list[str], message: str) -> None:
    result = put_model(*(arg.format(tmp=tmp_path) for arg in args))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m1").exists()


def test_an_unreachable_endpoint_is_one_line_and_status_1(tmp_path: Path) -> None:
    result = put_model("s3://models/m1/", "--endpoint-url", "http://127.0.0.1:1",
                       env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_MAX_ATTEMPTS": "1"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("put_model: cannot upload to s3://models/m1") and result.stdout == ""
