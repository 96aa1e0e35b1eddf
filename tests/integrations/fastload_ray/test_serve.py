"""The example deployment on a real local Ray cluster: ``serve.run``, calls through the handle and over
HTTP, one origin download for two replicas, a revision swapped inside the running replicas, multiplexed
adapters evicted, reloaded and unmapped, and a start that fails with one clear message.

Not ``_local_testing_mode``: it drops multiplexed model ids and applies ``user_config`` late.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from ray import serve
from safetensors.torch import load

from examples.ray_serve import deployment
from examples.ray_serve.models import Adapter, Embedder, tokenize
from fastload_core.storage import parse_uri
from fastload_devservices.faultproxy import FaultProxy
from fastload_devservices.s3 import BUCKET, S3Server
from tests.integrations.fastload_ray.conftest import REPO, replica_env

pytestmark = [pytest.mark.slow, pytest.mark.s3]

UPLOAD = REPO / "examples" / "ray_serve" / "upload_models.py"
CONFIG = REPO / "examples" / "ray_serve" / "serve_config.yaml"
TEXT = "fast cold starts for ray serve"


def upload(endpoint: str, *args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(UPLOAD), "--endpoint-url", endpoint, *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def reference(s3: Any, key: str, model: torch.nn.Module, version: str | None = None) -> torch.nn.Module:
    """The stock path, for the expected outputs: the object's bytes, ``load_state_dict``."""
    extra = {"VersionId": version} if version else {}
    model.load_state_dict(load(s3.get_object(Bucket=BUCKET, Key=key, **extra)["Body"].read()))
    return model.eval()


def expected(embedder: torch.nn.Module, adapter: torch.nn.Module | None = None) -> list[float]:
    with torch.inference_mode():
        vector = embedder(tokenize(TEXT))
        return (adapter(vector) if adapter is not None else vector)[0].tolist()


def post(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps({"text": TEXT}).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=60) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def replicas(app: str) -> dict[str, str]:
    """The app's live replica actors: name → actor id (a restarted replica has a new name and id)."""
    import ray

    found = {}
    for item in ray.util.list_named_actors(all_namespaces=True):
        if item["namespace"] == "serve" and item["name"].startswith(f"SERVE_REPLICA::{app}#"):
            found[item["name"]] = ray.get_actor(item["name"], namespace="serve")._actor_id.hex()
    return found


def mapped_in(app: str) -> dict[str, str]:
    """Replica name → the text of its /proc/<pid>/maps (replicas run on this machine)."""
    import ray

    maps = {}
    for name in replicas(app):
        actor = ray.get_actor(name, namespace="serve")
        pid = ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()))
        maps[name] = Path(f"/proc/{pid}/maps").read_text()
    return maps


def ray_env(replica: str, variable: str) -> str | None:
    import ray

    actor = ray.get_actor(replica, namespace="serve")
    return ray.get(actor.__ray_call__.remote(lambda _self: os.environ.get(variable)))


def loaded_early(replica: str) -> bool:
    """Whether the replica's weights came from the download its ``__init__`` started."""
    import ray

    actor = ray.get_actor(replica, namespace="serve")
    return bool(ray.get(actor.__ray_call__.remote(
        lambda _self: serve.get_replica_context().servable_object._fastload_weights.loaded_early)))


def close(actual: list[float], wanted: list[float]) -> bool:
    return torch.allclose(torch.tensor(actual), torch.tensor(wanted), atol=1e-5)


@pytest.fixture
def proxy(s3: Any, s3_server: S3Server) -> Any:
    """Counts the object bytes the origin serves (ranged GETs through it)."""
    counting = FaultProxy(s3_server.port)
    yield counting
    counting.close()


def deploy_config(tmp_path: Path, env: dict[str, str], revision: str | None) -> None:
    """``serve run <config> --non-blocking`` against the test cluster: the declarative path ``serve deploy``
    takes (a config whose code is unchanged updates replicas in place), without a dashboard to talk to."""
    import ray
    import yaml

    config = yaml.safe_load(CONFIG.read_text())
    (app,) = config["applications"]
    app["name"], app["route_prefix"] = "embed", "/embed"
    app["runtime_env"] = {"env_vars": env}
    app["deployments"][0]["user_config"]["fastload"]["revision"] = revision
    path = tmp_path / f"serve-{revision}.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([str(Path(sys.executable).with_name("serve")), "run", str(path), "--non-blocking",
                           "--address", ray.get_runtime_context().gcs_address],
                          capture_output=True, text=True, timeout=180, cwd=REPO, env={**os.environ})
    assert done.returncode == 0, done.stderr[-3000:]


def wait_until(check: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def running(app: str) -> bool:
    status = serve.status().applications.get(app)
    return status is not None and status.status == "RUNNING"


def test_two_replicas_fetch_once_serve_and_swap_revisions_in_place(
    ray_cluster: dict[str, Any], s3: Any, s3_endpoint: str, proxy: FaultProxy, tmp_path: Path, shm_root: Path,
) -> None:
    first = upload(s3_endpoint, "--seed", "1", "--adapters", "0")["embedder"]
    size = s3.head_object(Bucket=BUCKET, Key="embedder/model.safetensors")["ContentLength"]
    env = replica_env(tmp_path, shm_root, proxy.endpoint_url)
    deploy_config(tmp_path, env, first["revision"])
    try:
        wait_until(lambda: running("embed"))
        handle = serve.get_app_handle("embed")
        assert proxy.get_body_bytes == size  # two replicas, one download (the shm tier's single flight)
        started = replicas("embed")
        assert len(started) == 2
        # The fetch began in __init__: Ray's replica context carried the user_config before reconfigure did.
        assert all(loaded_early(name) for name in started)

        v1 = expected(reference(s3, "embedder/model.safetensors", Embedder(), first["revision"]))
        assert close(handle.embed.remote(TEXT).result()["embedding"], v1)
        assert close(post(f"{ray_cluster['http']}/embed")["embedding"], v1)

        budgets = {name: ray_env(name, "FASTLOAD_SHM_CAPACITY") for name in started}
        stats = os.statvfs("/dev/shm")
        room = stats.f_bavail * stats.f_frsize + size - 80 * 2**20  # free + the tier's entry - Ray's store
        assert all(budget is not None and 0 < int(budget) <= room + 2**26 for budget in budgets.values())

        maps = mapped_in("embed")
        shared = [line.split()[-1] for line in next(iter(maps.values())).splitlines() if str(shm_root) in line]
        assert shared and all(shared[0] in text for text in maps.values())  # both map the one /dev/shm copy

        second = upload(s3_endpoint, "--seed", "2", "--adapters", "0")["embedder"]
        assert second["revision"] != first["revision"]
        v2 = expected(reference(s3, "embedder/model.safetensors", Embedder(), second["revision"]))
        assert not close(v1, v2)
        deploy_config(tmp_path, env, second["revision"])  # only user_config changed

        def both_replicas_serve_v2() -> bool:
            answers = [post(f"{ray_cluster['http']}/embed")["embedding"] for _ in range(6)]
            return all(close(answer, v2) for answer in answers)

        wait_until(lambda: running("embed") and both_replicas_serve_v2())
        assert close(handle.embed.remote(TEXT).result()["embedding"], v2)
        assert replicas("embed") == started  # the same actors: swapped in place, not restarted
        assert not any(loaded_early(name) for name in started)  # the swap fetched in reconfigure
        assert proxy.get_body_bytes == 2 * size
        assert not any(shared[0] in text for text in mapped_in("embed").values())  # the old copy is unmapped
    finally:
        serve.delete("embed")


def test_multiplexed_adapters_evict_reload_and_free_their_memory(
    ray_cluster: dict[str, Any], s3: Any, s3_endpoint: str, tmp_path: Path, shm_root: Path,
) -> None:
    written = upload(s3_endpoint, "--seed", "1", "--adapters", "6")
    embedder = reference(s3, "embedder/model.safetensors", Embedder(), written["embedder"]["revision"])
    options = {"num_cpus": 0.5, "runtime_env": {"env_vars": replica_env(tmp_path, shm_root, s3_endpoint)}}
    service = deployment.EmbeddingService.options(num_replicas=1, ray_actor_options=options)
    handle = serve.run(service.bind(), name="adapters", route_prefix="/adapters")
    slugs = {f"a{i}": parse_uri(f"s3://{BUCKET}/adapters/a{i}/").slug for i in range(6)}

    def loaded() -> set[str]:
        (text,) = mapped_in("adapters").values()
        return {name for name, slug in slugs.items() if f"/{slug}/" in text}

    def wanted(adapter_id: str) -> list[float]:
        adapter = reference(s3, f"adapters/{adapter_id}/model.safetensors", Adapter())
        return expected(embedder, adapter)

    try:
        for adapter_id in ("a0", "a1", "a2", "a3"):
            answer = handle.options(multiplexed_model_id=adapter_id).embed.remote(TEXT).result()
            assert answer["adapter"] == adapter_id and close(answer["embedding"], wanted(adapter_id))
        assert loaded() == {"a0", "a1", "a2", "a3"}

        answer = handle.options(multiplexed_model_id="a4").embed.remote(TEXT).result()
        assert close(answer["embedding"], wanted("a4"))
        assert loaded() == {"a1", "a2", "a3", "a4"}  # a fifth evicts the least recently used, and unmaps it

        headers = {"serve_multiplexed_model_id": "a0"}
        answer = post(f"{ray_cluster['http']}/adapters", headers)  # over HTTP: the header picks the adapter
        assert answer["adapter"] == "a0" and close(answer["embedding"], wanted("a0"))
        assert loaded() == {"a2", "a3", "a4", "a0"}  # a0 reloaded, a1 evicted

        plain = post(f"{ray_cluster['http']}/adapters")
        assert plain["adapter"] is None and close(plain["embedding"], expected(embedder))
    finally:
        serve.delete("adapters")


def test_weights_that_cannot_be_fetched_fail_the_start_with_one_clear_message(
    ray_cluster: dict[str, Any], s3: Any, s3_endpoint: str, tmp_path: Path, shm_root: Path,
) -> None:
    options = {"num_cpus": 0.5, "runtime_env": {"env_vars": replica_env(tmp_path, shm_root, s3_endpoint)}}
    missing = f"s3://{BUCKET}/nothing/model.safetensors"
    service = deployment.EmbeddingService.options(
        num_replicas=1, ray_actor_options=options, max_constructor_retry_count=1,
        user_config={"fastload": {"uri": missing, "revision": None}},
    )
    try:
        with pytest.raises(RuntimeError) as caught:
            serve.run(service.bind(), name="broken", route_prefix="/broken")
        assert "Deploying application broken failed" in str(caught.value)
        message = serve.status().applications["broken"].deployments["EmbeddingService"].message
        assert "WeightsUnavailableError" in message and f"cannot fetch the weights at {missing}" in message
        assert message.count("cannot fetch the weights") == 1
    finally:
        serve.delete("broken")
