"""A real local Ray cluster, started once per test session and shut down after it.

Ray's own import warns (a pydantic v2 deprecation in ray.serve's schema): it is imported here once with
that warning silenced, so the rest of the suite keeps warnings as errors for everything of ours.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using extra keyword arguments on `Field`", category=DeprecationWarning)
    serve = pytest.importorskip("ray.serve", reason="the Ray Serve adapter's tests need ray[serve] "
                                "(scripts/setup.sh ...,ray); a GPU machine without it skips them")

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="package")
def ray_cluster() -> Iterator[dict[str, Any]]:
    """``ray.init`` on this machine, for this package's tests only (a cluster left running would take CPU
    and /dev/shm from every later test): 2 CPUs (replicas ask for fractions), no dashboard, a small object
    store (the machine is shared), its files under a short temporary path (Ray's socket paths must fit
    107 bytes), and Serve's HTTP proxy on a free loopback port. Yields the HTTP base URL under "http"."""
    import builtins

    import ray

    from fastload_devservices._process import free_port

    own_print = builtins.print  # Ray's progress bars may swap in their own, which the rest of the suite would see
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray 2.5x turns token auth on for new local clusters
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    temp = tempfile.mkdtemp(prefix="fl-ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
             object_store_memory=80 * 2**20, namespace="fastload-tests")
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield {"http": f"http://127.0.0.1:{port}"}
    finally:
        serve.shutdown()
        ray.shutdown()
        builtins.print = own_print
        shutil.rmtree(temp, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def replica_env(tmp_path: Path, shm_root: Path, endpoint: str) -> dict[str, str]:
    """What a test's replicas need (they are Ray workers: the test's own monkeypatched environment does not
    reach them): the test's private tiers, the S3 endpoint, and the repository on the path (examples)."""
    return {
        "FASTLOAD_CACHE_DIR": str(tmp_path / "replica-cache"),
        "FASTLOAD_SHM_DIR": str(shm_root),
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "PYTHONPATH": str(REPO),
    }
