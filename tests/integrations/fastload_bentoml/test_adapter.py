"""The adapter without a server: the descriptor, the decorator's readiness and hooks, the device choice."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import bentoml
import fastload_bentoml
import pytest
import torch
from bentoml.exceptions import BentoMLException
from fastload_bentoml import _adapter
from safetensors.torch import save_file

import fastload_core
from fastload_core import serving
from fastload_core.compile_cache import default_url
from fastload_core.compile_cache.errors import CacheURLError
from fastload_core.hookspecs import hookimpl
from fastload_core.plugins import get_plugin_manager
from fastload_core.storage import default_store, tier_of, writethrough
from fastload_devservices.s3 import BUCKET

# BentoML 1.4.40's own deprecations, raised when bentoml.Service and its IO models are first built.
BENTOML_WARNINGS = [
    pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The `__get_pydantic_core_schema__` method:DeprecationWarning"),
]
pytestmark = BENTOML_WARNINGS


@pytest.fixture(autouse=True)
def _fresh_pins() -> Any:
    """Each test starts with no weights held (a worker process starts with none) and drops its own."""
    _adapter._held.clear()
    yield
    for pinned in _adapter._held.values():
        pinned.release()
    _adapter._held.clear()


def make_model(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_file({"weight": torch.arange(16.0).reshape(4, 4)}, root / "model.safetensors")
    return root


def in_use() -> list[str]:
    return [info.entry.tier for info in default_store().ls() if info.in_use]


def deployment_hooks(cls: type) -> list[Any]:
    """What BentoML's ``server_on_deployment`` calls: members marked by ``@bentoml.on_deployment``."""
    members = (getattr(cls, name) for name in dir(cls))
    return [m for m in members if callable(m) and getattr(m, "__bentoml_deployment_hook__", False)]


def run_hook(cls: type) -> None:
    """The deployment hook as ``bentoml serve`` calls it, then what each worker does first: wait for the
    download the hook left running (and, here, for the copy onto local disk behind it)."""
    (hook,) = deployment_hooks(cls)
    hook()
    wait_for_hook(cls)


def wait_for_hook(cls: type) -> None:
    for weights in fastload_bentoml.weights_of(cls):
        assert serving.wait_for_warm(os.environ[weights.handoff_variable], timeout=30)
    writethrough.wait(30)


# --- Weights -----------------------------------------------------------------------------------------
def test_on_the_class_weights_are_the_descriptor() -> None:
    class Service:
        weights = fastload_bentoml.Weights("s3://models/m1/", revision="v1")

    assert isinstance(Service.weights, fastload_bentoml.Weights)
    assert Service.weights.name == "weights" and repr(Service.weights) == "Weights('s3://models/m1/', revision='v1')"


def test_a_local_file_and_a_local_directory_resolve_to_themselves(tmp_path: Path) -> None:
    directory = make_model(tmp_path / "m1")

    class Service:
        as_dir = fastload_bentoml.Weights(directory)
        as_file = fastload_bentoml.Weights(str(directory / "model.safetensors"))

    service = Service()
    assert service.as_dir == directory and service.as_file == directory / "model.safetensors"


def test_a_uri_resolves_to_the_fetched_copy_pinned_for_the_process(tmp_path: Path) -> None:
    source = make_model(tmp_path / "origin" / "m1")

    class Service:
        weights = fastload_bentoml.Weights(source.as_uri())

    first, second = Service(), Service()
    path = first.weights
    assert isinstance(path, Path) and (path / "model.safetensors").is_file() and tier_of(path) == "local_disk"
    assert second.weights == path and in_use() == ["local_disk"]  # one pin per process, not per read
    gc.collect()
    removed, busy = default_store().rm(source.as_uri())
    assert removed == [] and len(busy) == 1  # a worker's weights are not evicted under it


def test_the_fastest_tier_holding_the_weights_is_used(tmp_path: Path, shm_root: Path) -> None:
    source = make_model(tmp_path / "origin" / "m1")
    fastload_core.fetch(source.as_uri(), tier="shm")

    class Service:
        weights = fastload_bentoml.Weights(source.as_uri())

    assert Service().weights.is_relative_to(shm_root)


def test_a_revision_selects_that_version(tmp_path: Path) -> None:
    source = make_model(tmp_path / "origin" / "m1")
    old_path = fastload_core.fetch(source.as_uri())
    (old_version,) = [info.entry.version for info in default_store().ls()]
    save_file({"weight": torch.zeros(4, 4)}, source / "model.safetensors")  # the origin moves on

    class Service:
        pinned = fastload_bentoml.Weights(source.as_uri(), revision=old_version)
        latest = fastload_bentoml.Weights(source.as_uri())

    service = Service()
    assert service.pinned == old_path and service.latest != old_path
    loaded = fastload_core.load_file(service.pinned / "model.safetensors")
    assert torch.equal(loaded["weight"], torch.arange(16.0).reshape(4, 4))


def test_missing_weights_raise_an_error_bentoml_and_fastload_both_understand(tmp_path: Path) -> None:
    missing = (tmp_path / "nowhere").as_uri()

    class Service:
        weights = fastload_bentoml.Weights(missing)

    with pytest.raises(fastload_bentoml.WeightsUnavailableError) as raised:
        Service().weights  # noqa: B018  (the read is the test)
    assert isinstance(raised.value, fastload_core.FastloadError) and isinstance(raised.value, BentoMLException)
    assert missing in str(raised.value) and raised.value.uri == missing


@pytest.mark.parametrize(("args", "kwargs"), [((None,), {}), (("",), {}), (("s3://m/",), {"revision": ""}),
                                              (("s3://m/",), {"revision": 3})])
def test_bad_weights_arguments_are_refused(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="Weights"):
        fastload_bentoml.Weights(*args, **kwargs)


# --- accelerate: readiness ---------------------------------------------------------------------------
def test_not_ready_until_init_has_finished() -> None:
    seen: list[bool] = []

    @fastload_bentoml.accelerate(prefetch=None)
    class Service:
        def __init__(self) -> None:
            seen.append(self.__is_ready__())

    service = Service()
    assert seen == [False] and service.__is_ready__() is True


def test_a_failed_init_never_becomes_ready() -> None:
    @fastload_bentoml.accelerate(prefetch=None)
    class Service:
        def __init__(self) -> None:
            raise RuntimeError("weights broke")

    half = Service.__new__(Service)
    with pytest.raises(RuntimeError):
        Service.__init__(half)
    assert half.__is_ready__() is False


@pytest.mark.parametrize("own_answer", [True, False])
def test_a_services_own_is_ready_is_kept_in_the_conjunction(own_answer: bool) -> None:
    @fastload_bentoml.accelerate(prefetch=None)
    class Service:
        def __init__(self) -> None:
            self.calls = 0

        def __is_ready__(self) -> bool:
            self.calls += 1
            return own_answer

    service = Service()
    assert service.__is_ready__() is own_answer and service.calls == 1


def test_an_async_is_ready_stays_async(tmp_path: Path) -> None:
    @fastload_bentoml.accelerate(prefetch=None)
    class Service:
        def __init__(self, fail: bool = False) -> None:
            if fail:
                raise RuntimeError("weights broke")

        async def __is_ready__(self) -> bool:
            return True

    import inspect

    assert inspect.iscoroutinefunction(Service.__is_ready__)  # BentoML awaits it only if it is async
    assert asyncio.run(Service().__is_ready__()) is True
    half = Service.__new__(Service)
    with pytest.raises(RuntimeError):
        Service.__init__(half, fail=True)
    assert asyncio.run(half.__is_ready__()) is False


def test_init_arguments_and_the_class_survive_the_decorator() -> None:
    @fastload_bentoml.accelerate
    class Service:
        """doc"""

        def __init__(self, value: int = 3) -> None:
            self.value = value

    assert Service(5).value == 5 and Service.__doc__ == "doc" and Service.__name__ == "Service"


# --- accelerate: the deployment hook -----------------------------------------------------------------
def test_the_deployment_hook_warms_every_weights_into_shm(tmp_path: Path, shm_root: Path) -> None:
    first, second = make_model(tmp_path / "origin" / "m1"), make_model(tmp_path / "origin" / "m2")

    class Base:
        a = fastload_bentoml.Weights(first.as_uri())

    @fastload_bentoml.accelerate
    class Service(Base):
        b = fastload_bentoml.Weights(second.as_uri())

    assert [w.uri for w in fastload_bentoml.weights_of(Service)] == [first.as_uri(), second.as_uri()]
    run_hook(Service)
    assert sorted(info.entry.slug.split("-")[1] for info in default_store().ls(tier="shm")) == ["m1", "m2"]
    assert in_use() == []  # the serve process holds nothing; workers pin
    assert Service().b.is_relative_to(shm_root)


def test_workers_serve_the_version_the_hook_warmed_without_asking_the_origin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shm_root: Path
) -> None:
    source = make_model(tmp_path / "origin" / "m1")

    @fastload_bentoml.accelerate
    class Service:
        weights = fastload_bentoml.Weights(source.as_uri())

    run_hook(Service)
    variable = Service.weights.version_variable
    monkeypatch.setenv(variable, os.environ.pop(variable))  # what the workers inherit; undone after the test
    shutil.rmtree(source)  # the origin is gone: a worker that asked it would fail
    assert Service().weights.is_relative_to(shm_root)


@pytest.mark.s3
def test_a_warmed_version_no_tier_holds_any_more_falls_back_to_the_current_one(
    tmp_path: Path, s3: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    source = make_model(tmp_path / "origin" / "m1")
    s3.upload_file(str(source / "model.safetensors"), BUCKET, "m1/model.safetensors")

    class Service:
        weights = fastload_bentoml.Weights(f"s3://{BUCKET}/m1/model.safetensors")

    # A digest no tier holds goes to S3 as a VersionId, which S3 refuses.
    monkeypatch.setenv(Service.weights.version_variable, "0123456789abcdef0123")
    assert Service().weights.name == "model.safetensors"
    assert "is no longer cached" in caplog.text


def test_bentoml_runs_the_hook_before_workers(tmp_path: Path, shm_root: Path) -> None:
    from _bentoml_impl.server.serving import server_on_deployment

    source = make_model(tmp_path / "origin" / "m1")

    @bentoml.service
    @fastload_bentoml.accelerate(prefetch="shm")
    class Service:
        weights = fastload_bentoml.Weights(source.as_uri())

    server_on_deployment(Service)  # BentoML's own call, as ``bentoml serve`` makes it
    wait_for_hook(Service.inner)
    assert [info.entry.tier for info in default_store().ls()] == ["shm", "local_disk"]


def test_a_local_path_is_checked_by_the_hook_and_read_in_place_not_copied(tmp_path: Path, shm_root: Path) -> None:
    """Workers read a plain local path where it is (the store's rule for a path that is no URI): copying it
    into RAM and onto local disk at deployment would be work nobody uses."""
    from _bentoml_impl.server.serving import server_on_deployment

    source = make_model(tmp_path / "models" / "m1")

    @bentoml.service
    @fastload_bentoml.accelerate(prefetch="shm")
    class Service:
        weights = fastload_bentoml.Weights(str(source))

    server_on_deployment(Service)
    writethrough.wait(30)
    assert default_store().ls() == []
    assert Service.inner().weights == source

    @bentoml.service
    @fastload_bentoml.accelerate(prefetch="shm")
    class Missing:
        weights = fastload_bentoml.Weights(str(tmp_path / "models" / "nowhere"))

    with pytest.raises(fastload_bentoml.WeightsUnavailableError, match="nowhere"):
        server_on_deployment(Missing)


class HoldFetches:
    """A plugin that holds every fetch into shm at its start until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.started = 0

    @hookimpl
    def on_fetch_start(self, uri: str, tier: str, nbytes: int) -> None:
        if tier == "shm":
            self.started += 1
            self.entered.set()
            self.release.wait(30)


def test_the_hook_downloads_while_workers_start_and_workers_wait_for_it(tmp_path: Path, shm_root: Path) -> None:
    source = make_model(tmp_path / "origin" / "m1")

    @fastload_bentoml.accelerate
    class Service:
        weights = fastload_bentoml.Weights(source.as_uri())

    hold = HoldFetches()
    get_plugin_manager().register(hold, name="hold-shm")
    (hook,) = deployment_hooks(Service)
    hook()  # returns with the download running (held at its start here): workers may start now
    assert hold.entered.wait(30) and default_store().ls() == []
    seen: list[Path] = []
    worker = threading.Thread(target=lambda: seen.append(Service().weights))
    worker.start()
    worker.join(0.5)
    assert worker.is_alive() and seen == []  # the worker waits for the hook's download ...
    hold.release.set()
    worker.join(30)
    assert seen[0].is_relative_to(shm_root)  # ... and maps what it published
    assert hold.started == 1  # one download: the worker did not start its own
    writethrough.wait(30)


def test_the_hook_fails_with_the_uri_when_weights_are_missing(tmp_path: Path) -> None:
    missing = (tmp_path / "nowhere").as_uri()

    @fastload_bentoml.accelerate
    class Service:
        weights = fastload_bentoml.Weights(missing)

    (hook,) = deployment_hooks(Service)
    with pytest.raises(fastload_bentoml.WeightsUnavailableError, match="cannot fetch the weights at " + missing):
        hook()


def test_no_prefetch_means_no_hook(tmp_path: Path) -> None:
    @fastload_bentoml.accelerate(prefetch=None)
    class Service:
        weights = fastload_bentoml.Weights(make_model(tmp_path / "m1").as_uri())

    assert deployment_hooks(Service) == []


def test_the_compile_cache_default_is_set_in_the_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASTLOAD_COMPILE_CACHE", raising=False)
    url = (tmp_path / "compile").as_uri()
    seen: list[str] = []

    @fastload_bentoml.accelerate(prefetch=None, compile_cache=url)
    class Service:
        def __init__(self) -> None:
            seen.append(default_url())

    before = default_url()
    assert before != url  # decorating (importing the service module) changes nothing
    Service()
    assert seen == [url] and os.environ["FASTLOAD_COMPILE_CACHE"] == url


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"prefetch": "ram"}, ValueError, "expected one of shm, local_disk, shared_fs"),
    ({"compile_cache": "gopher://x/"}, CacheURLError, "no compile-cache backend serves gopher"),
    ({"compile_cache": "localhost:6379"}, CacheURLError, "supported schemes"),
])
def test_bad_decorator_arguments_fail_at_import(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        fastload_bentoml.accelerate(**kwargs)


def test_written_above_bentoml_service_is_refused_with_the_fix() -> None:
    class Service:
        pass

    with pytest.raises(TypeError, match=r"below @bentoml\.service"):
        fastload_bentoml.accelerate(bentoml.service(Service))  # type: ignore[type-var]
    with pytest.raises(TypeError, match="decorates a class"):
        fastload_bentoml.accelerate(lambda: None)  # type: ignore[type-var]


def test_a_decorated_class_is_still_a_valid_bentoml_service(tmp_path: Path) -> None:
    @bentoml.service(workers=2)
    @fastload_bentoml.accelerate
    class Service:
        weights = fastload_bentoml.Weights(make_model(tmp_path / "m1").as_uri())

        @bentoml.api
        def predict(self, x: list[float]) -> list[float]:
            return x

    assert isinstance(Service, bentoml.Service) and list(Service.apis) == ["predict"]
    assert Service.models == []  # nothing for BentoML's model store to resolve at build or serve time


# --- worker_device -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("index", "gpus", "expected"), [
    (1, 0, "cpu"), (2, 0, "cpu"),
    (1, 1, "cuda:0"), (2, 1, "cuda:0"),
    (1, 2, "cuda:0"), (2, 2, "cuda:1"), (3, 2, "cuda:0"),
    (None, 2, "cuda:0"),  # outside bentoml serve: worker 1's device
])
def test_worker_device_follows_the_worker_index(monkeypatch: pytest.MonkeyPatch, index: int | None, gpus: int,
                                                expected: str) -> None:
    monkeypatch.setattr(bentoml.server_context, "worker_index", index)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert str(fastload_bentoml.worker_device()) == expected


@pytest.mark.gpu
def test_on_a_gpu_machine_a_worker_loads_onto_its_own_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bentoml.server_context, "worker_index", 2)
    device = fastload_bentoml.worker_device()
    assert device == torch.device("cuda", 1 % torch.cuda.device_count())
    source = make_model(tmp_path / "origin" / "m1")

    class Service:
        weights = fastload_bentoml.Weights(source.as_uri())

    loaded = fastload_core.load_file(Service().weights / "model.safetensors", device=device)
    assert loaded["weight"].device == device
    assert torch.equal(loaded["weight"].cpu(), torch.arange(16.0).reshape(4, 4))


# --- what a real bentoml serve does around the hook -----------------------------------------------------
def test_the_services_envs_configure_the_deployment_hook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shm_root: Path
) -> None:
    """BentoML puts ``envs=`` only into its workers' environment; the hook runs in the serve process and must
    warm where those workers look."""
    from _bentoml_impl.server.serving import server_on_deployment

    source = make_model(tmp_path / "origin" / "m1")
    declared_shm = shm_root.with_name(shm_root.name + "-from-envs")
    monkeypatch.delenv("FASTLOAD_SHM_DIR")  # restored (and what the hook set, undone) after the test

    @bentoml.service(envs=[{"name": "FASTLOAD_SHM_DIR", "value": str(declared_shm)}])
    @fastload_bentoml.accelerate
    class Service:
        weights = fastload_bentoml.Weights(source.as_uri())

    try:
        server_on_deployment(Service)
        wait_for_hook(Service.inner)
        assert len(list(declared_shm.rglob("model.safetensors"))) == 1
        assert list(shm_root.rglob("model.safetensors")) == []
    finally:
        shutil.rmtree(declared_shm, ignore_errors=True)


def test_the_services_own_deployment_hooks_run_before_the_prefetch(tmp_path: Path) -> None:
    """A service's hook that puts the weights in place (or sets credentials) must come first, and once."""
    from _bentoml_impl.server.serving import server_on_deployment

    source = tmp_path / "origin" / "m1"
    calls: list[str] = []

    @bentoml.service
    @fastload_bentoml.accelerate
    class Service:
        weights = fastload_bentoml.Weights(source.as_uri())

        @bentoml.on_deployment
        def put_weights_in_place() -> None:
            calls.append("put_weights_in_place")
            make_model(source)

    server_on_deployment(Service)
    wait_for_hook(Service.inner)
    assert calls == ["put_weights_in_place"]
    assert [info.entry.tier for info in default_store().ls()] == ["shm", "local_disk"]


def test_a_service_subclassing_an_accelerated_class_becomes_ready_and_warms_its_own_weights(
    tmp_path: Path, shm_root: Path
) -> None:
    """The subclass's ``__init__`` need not call the accelerated base's: BentoML builds the instance (in the
    worker's start-up, before it serves) and only then asks ``__is_ready__``."""
    from _bentoml_impl.server.serving import server_on_deployment

    first, second = make_model(tmp_path / "origin" / "m1"), make_model(tmp_path / "origin" / "m2")

    @fastload_bentoml.accelerate
    class WithWeights:
        weights = fastload_bentoml.Weights(first.as_uri())

    @bentoml.service
    class Embedder(WithWeights):
        extra = fastload_bentoml.Weights(second.as_uri())

        def __init__(self) -> None:
            self.paths = [self.weights, self.extra]

    server_on_deployment(Embedder)
    wait_for_hook(Embedder.inner)
    assert sorted(info.entry.slug.split("-")[1] for info in default_store().ls(tier="shm")) == ["m1", "m2"]
    assert Embedder().__is_ready__() is True


def test_a_second_serve_in_the_same_process_warms_the_origins_new_version(tmp_path: Path) -> None:
    """``bentoml.serve()`` twice in one process (a notebook, a test): the handoff directory and the variables
    of the first survive its ``stop()``; the second must still ask the origin for its current version."""
    source = make_model(tmp_path / "origin" / "m1")

    @fastload_bentoml.accelerate
    class Service:
        weights = fastload_bentoml.Weights(source.as_uri())

    run_hook(Service)
    first = os.environ[Service.weights.version_variable]
    save_file({"weight": torch.zeros(4, 4)}, source / "model.safetensors")  # the origin moves on
    run_hook(Service)
    second = os.environ[Service.weights.version_variable]
    assert second != first
    assert torch.equal(fastload_core.load_file(Service().weights / "model.safetensors")["weight"], torch.zeros(4, 4))


class MeetInFetches:
    """A plugin whose fetches into local disk each wait (up to 10 s) for the other's to start."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=10)
        self.met: list[bool] = []

    @hookimpl
    def on_fetch_start(self, uri: str, tier: str, nbytes: int) -> None:
        if tier == "local_disk":
            try:
                self.barrier.wait()
            except threading.BrokenBarrierError:
                self.met.append(False)
            else:
                self.met.append(True)


def test_two_models_are_fetched_at_the_same_time(tmp_path: Path) -> None:
    first, second = make_model(tmp_path / "origin" / "m1"), make_model(tmp_path / "origin" / "m2")

    class Service:
        a = fastload_bentoml.Weights(first.as_uri())
        b = fastload_bentoml.Weights(second.as_uri())

    meet = MeetInFetches()
    get_plugin_manager().register(meet, name="meet-in-fetches")
    service = Service()
    readers = [threading.Thread(target=lambda name=name: getattr(service, name)) for name in ("a", "b")]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(60)
    assert meet.met == [True, True]  # one model's download did not wait for the other's
