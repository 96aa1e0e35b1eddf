"""A real TorchServe, the example's archive, weights from moto's S3: two workers fetch once, share one
/dev/shm copy, answer like the reference model, let go of it when the model is unregistered, and a bad
configuration fails the registration quickly with fastload's one-line message in the model log."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fastload_core.storage import TieredStore
from fastload_devservices.faultproxy import FaultProxy
from fastload_devservices.s3 import BUCKET
from fastload_devservices.torchserve import TorchServe, build_archive
from tests.integrations.fastload_torchserve.conftest import EXAMPLE, reference_outputs

pytestmark = [pytest.mark.slow, pytest.mark.s3]


@pytest.fixture
def proxy(s3: Any, s3_server: Any) -> Iterator[FaultProxy]:
    """Counts the object bytes moto serves (the origin's bytes)."""
    counting = FaultProxy(s3_server.port)
    yield counting
    counting.close()


@pytest.fixture
def server(tmp_path: Path, proxy: FaultProxy) -> Iterator[TorchServe]:
    env = {key: value for key, value in os.environ.items() if key.startswith(("FASTLOAD_", "AWS_"))}
    env["AWS_ENDPOINT_URL_S3"] = proxy.endpoint_url
    torchserve = TorchServe(tmp_path / "torchserve", env=env)
    torchserve.start()
    yield torchserve
    torchserve.stop()


def _pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        if "State:\tZ" not in status:
            alive.append(pid)
    return alive


def _holders(path: Path) -> list[str]:
    """Who holds a flock on ``path`` (from /proc/locks), with command lines: why an entry is still in use."""
    inode = path.stat().st_ino
    found = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].endswith(f":{inode}"):
            cmdline = Path(f"/proc/{fields[4]}/cmdline")
            command = cmdline.read_bytes().replace(b"\0", b" ").decode() if cmdline.exists() else "(gone)"
            found.append(f"{fields[3]} lock held by pid {fields[4]}: {command}")
    return found


def _wait_until(condition: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return bool(condition())


def test_two_workers_fetch_once_share_shm_and_answer_like_the_reference(
    server: TorchServe, proxy: FaultProxy, s3: Any, example_weights: Path, tmp_path: Path
) -> None:
    weights = example_weights / "model.safetensors"
    s3.upload_file(str(weights), BUCKET, "tiny-classifier/model.safetensors")  # the example config's URI
    build_archive("tiny", server.model_store, model_file=EXAMPLE / "model.py", handler=EXAMPLE / "handler.py",
                  config_file=EXAMPLE / "model-config.yaml")
    assert (server.model_store / "tiny.mar").stat().st_size < 10_000  # the weights are not in the archive

    status, answer = server.register("tiny.mar", workers=2)
    assert status == 200, (answer, server.model_log()[-5000:])
    workers = server.describe("tiny")[0]["workers"]
    assert len(workers) == 2 and all(worker["status"] == "READY" for worker in workers), (
        workers, server.model_log()[-5000:])
    pids = [int(worker["pid"]) for worker in workers]

    inputs = torch.linspace(-3.0, 3.0, 8 * 16).reshape(8, 16)
    expected = reference_outputs(example_weights, inputs)
    for row, want in zip(inputs, expected, strict=True):
        status, got = server.predict("tiny", row.tolist())
        assert status == 200, got
        assert torch.allclose(torch.tensor(got), want, rtol=0, atol=1e-6)

    assert proxy.get_body_bytes == weights.stat().st_size  # the origin served the model once, for both workers
    shm = [info for info in TieredStore.from_env().ls(tier="shm")]
    assert len(shm) == 1 and shm[0].in_use
    shm_file = str(shm[0].entry.path / "files" / "model.safetensors")
    for pid in pids:  # each worker maps the one /dev/shm copy
        assert shm_file in Path(f"/proc/{pid}/maps").read_text()
    ready = re.findall(r"fastload: model 'tiny' ready on cpu in [0-9.]+s \(cpu-mmap from tier shm\)",
                       server.model_log())
    assert len(ready) == 2

    status, answer = server.unregister("tiny")
    assert status == 200, answer
    assert _wait_until(lambda: not _pids_alive(pids)), "workers still running after unregistering"
    # The pins went with the workers. A killed worker's main thread can show as a zombie while its other
    # threads still hold the process's files, so this polls the lock itself rather than trusting the pids.
    entry = TieredStore.from_env().ls(tier="shm")[0].entry
    lock = TieredStore.from_env().tiers[0].use_lock_path(entry.slug, entry.version)
    assert _wait_until(lambda: not TieredStore.from_env().ls(tier="shm")[0].in_use), _holders(lock)
    assert server.stop() == 0


@pytest.mark.parametrize(
    ("fastload_section", "line"),
    [
        ("url: s3://models/tiny/", "fastload: model 'typo' cannot start: model-config.yaml handler.fastload.url: "
         "unknown setting; the settings are uri, revision, prefetch, compile_cache"),
        ("uri: s3://models/absent/", "fastload: model 'typo' cannot start: cannot fetch the weights at "
         "s3://models/absent/: "),
    ],
    ids=["unknown-key", "missing-weights"],
)
def test_a_bad_config_fails_the_registration_with_one_clear_line(
    server: TorchServe, tmp_path: Path, fastload_section: str, line: str
) -> None:
    config = tmp_path / "model-config.yaml"
    config.write_text(f"minWorkers: 1\nstartupTimeout: 60\nhandler:\n  fastload:\n    {fastload_section}\n")
    build_archive("typo", server.model_store, model_file=EXAMPLE / "model.py", handler=EXAMPLE / "handler.py",
                  config_file=config)
    started = time.monotonic()
    status, answer = server.register("typo.mar", workers=1)
    assert status == 500 and "Failed to start workers" in answer["message"]
    assert time.monotonic() - started < 60  # within startupTimeout
    log = server.model_log()
    attempts = log.count("Backend worker process died.")
    assert attempts >= 1 and log.count(line) == attempts  # one line per failed worker start
    assert server.stop() == 0
