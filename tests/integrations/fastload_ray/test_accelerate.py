"""fastload_ray.accelerate and load_model_async in this process, without a Ray cluster: the decorator's
checks, the reconfigure contract Ray relies on, in-place swaps, and memory given back under a frozen GC."""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import threading
import time
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fastload_ray
import pytest
import torch
from fastload_ray import UserConfigError, WeightsUnavailableError
from fastload_ray._memory import shm_budget
from safetensors.torch import save_file
from torch import nn

from fastload_core import serving
from fastload_core.errors import FastloadError
from fastload_core.hookspecs import hookimpl
from fastload_core.plugins import get_plugin_manager
from fastload_core.storage.settings import parse_size


class Hooked(nn.Module):
    """A module in a reference cycle (a forward hook bound to itself), as real models often are: reference
    counting alone never frees it, and once the collector is frozen nothing does."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 64)
        self.calls = 0
        self.register_forward_hook(self._count)

    def _count(self, module: nn.Module, args: Any, output: Any) -> None:
        self.calls += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def write_weights(directory: Path, seed: int) -> str:
    """A model directory on a 'mount', named by a file:// URI (copied through the tiers like S3)."""
    torch.manual_seed(seed)
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in Hooked().state_dict().items()}, str(directory / "model.safetensors"))
    return directory.as_uri() + "/"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


X = torch.ones(2, 64)


def expected(uri: str) -> torch.Tensor:
    from safetensors.torch import load_file

    state = load_file(uri.removeprefix("file://") + "model.safetensors")
    return X @ state["linear.weight"].T + state["linear.bias"]


# --- the decorator's own checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((Hooked(),), {}, TypeError, "not an instance"),
        ((42,), {}, TypeError, "class or a factory"),
        ((Hooked,), {"attr": "not a name"}, ValueError, "attr='not a name'"),
        ((Hooked,), {"prefetch": "ram"}, ValueError, "prefetch='ram'; expected one of shm, local_disk"),
        ((Hooked,), {"uri": 3}, TypeError, "uri must be a string"),
        ((Hooked,), {"device": "gpu:0"}, RuntimeError, "gpu"),
        ((Hooked,), {"dtpye": torch.float16}, TypeError, "unknown load option.*dtpye.*takes dtype"),
        ((Hooked,), {"compile_cache": "reddis://cache:6379/0"}, FastloadError, "no compile-cache backend serves"),
    ],
)
def test_bad_decorator_arguments_fail_at_import(args: tuple[Any, ...], kwargs: dict[str, Any],
                                                error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        fastload_ray.accelerate(*args, **kwargs)


def test_it_decorates_classes_below_serve_deployment() -> None:
    from ray import serve

    with pytest.raises(TypeError, match="decorates a class"):
        fastload_ray.accelerate(Hooked)(lambda: None)

    deployment = serve.deployment(type("Plain", (), {}))
    with pytest.raises(TypeError, match=r"below @serve\.deployment"):
        fastload_ray.accelerate(Hooked)(deployment)


def test_the_class_keeps_its_name_and_the_reconfigure_signature_ray_inspects() -> None:
    class WithRank:
        """Mine."""

        def __init__(self) -> None:
            self.seen: list[tuple[Any, Any]] = []

        def reconfigure(self, config: dict[str, Any], rank: Any) -> None:
            self.seen.append((config, rank))

    class WithoutRank:
        async def reconfigure(self, config: dict[str, Any]) -> None:
            self.seen = config

    class WithoutReconfigure:
        pass

    for cls in (WithRank, WithoutRank, WithoutReconfigure):
        wrapped = fastload_ray.accelerate(Hooked, uri="file:///nowhere/")(cls)
        assert wrapped.__name__ == cls.__name__ and wrapped.__qualname__ == cls.__qualname__
        assert wrapped.__doc__ == cls.__doc__ and issubclass(wrapped, cls)
        # Ray passes rank= only to a reconfigure that declares it, and calls one that declares it even
        # without a user_config: the wrapper always declares it, so the weights always load.
        parameters = inspect.signature(wrapped.reconfigure).parameters
        assert list(parameters) == ["self", "user_config", "rank"]


def test_the_users_reconfigure_is_called_as_ray_would_call_it(tmp_path: Path) -> None:
    uri = write_weights(tmp_path / "m", seed=1)
    calls: list[tuple[Any, ...]] = []

    class WithRank:
        def reconfigure(self, config: Any, rank: Any) -> None:
            calls.append(("rank", config, rank, hasattr(self, "model")))

    class WithoutRank:
        async def reconfigure(self, config: Any) -> None:
            calls.append(("plain", config, hasattr(self, "model")))

    with_rank = fastload_ray.accelerate(Hooked, uri=uri, prefetch=None)(WithRank)()
    run(with_rank.reconfigure(None, rank=3))
    assert calls == [("rank", None, 3, True)]  # the weights are there before the user's reconfigure runs

    calls.clear()
    without_rank = fastload_ray.accelerate(Hooked, uri=uri, prefetch=None)(WithoutRank)()
    run(without_rank.reconfigure(None, rank=0))
    assert calls == []  # no user_config: Ray would not have called it
    run(without_rank.reconfigure({"mine": 1}, rank=0))
    assert calls == [("plain", {"mine": 1}, True)]
    torch.testing.assert_close(without_rank.model(X), expected(uri))


# --- the download starts in __init__ ---------------------------------------------------------------------


def in_replica(monkeypatch: pytest.MonkeyPatch, user_config: Any, deployment: str = "Embedder") -> None:
    """What Ray's replica context holds while the replica's ``__init__`` runs: the deployment's name and the
    config it was created with (the replica gets ``user_config`` itself only later, in ``reconfigure``)."""
    from ray import serve

    context = SimpleNamespace(deployment=deployment, _deployment_config=SimpleNamespace(user_config=user_config))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)


class Downloads:
    """A plugin that counts the fetches into each tier and says when the first one started."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.tiers: list[str] = []

    @hookimpl
    def on_fetch_start(self, uri: str, tier: str, nbytes: int) -> None:
        self.tiers.append(tier)
        self.started.set()


def test_a_replica_starts_fetching_before_its_own_init_runs_and_reconfigure_loads_that_copy(
    tmp_path: Path, shm_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = write_weights(tmp_path / "m", seed=6)
    config = {"fastload": {"uri": uri, "revision": None}}
    in_replica(monkeypatch, config)
    downloads = Downloads()
    get_plugin_manager().register(downloads)
    seen: dict[str, Any] = {}

    class Embedder:
        """Mine."""

        def __init__(self, greeting: str, *, loud: bool = False) -> None:
            # A slow __init__ (a tokenizer, a client): the download is already running while it does.
            seen["fetching"] = downloads.started.wait(30)
            seen["model"] = hasattr(self, "model")
            self.greeting = greeting

    wrapped = fastload_ray.accelerate(Hooked)(Embedder)
    assert str(inspect.signature(wrapped.__init__)) == str(inspect.signature(Embedder.__init__))
    replica = wrapped("hello")
    assert seen == {"fetching": True, "model": False} and replica.greeting == "hello"

    run(replica.reconfigure(config))
    torch.testing.assert_close(replica.model(X), expected(uri))
    weights = replica._fastload_weights
    assert weights.loaded_early and weights.pin is not None and weights.pin.tier == "shm"
    assert downloads.tiers.count("shm") == 1  # reconfigure took the download __init__ started, not a second one

    model = replica.model
    run(replica.reconfigure(config))  # Ray repeats the start-up config: still a no-op
    assert replica.model is model


def test_the_shm_budget_is_set_in_init_before_any_download_or_user_code(
    tmp_path: Path, shm_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reservation writes the environment: on the calling thread, before the download's thread exists and
    before the user's __init__ (a setenv racing C code that reads the environment is a libc data race)."""
    from fastload_ray import _accelerate

    uri = write_weights(tmp_path / "m", seed=9)
    config = {"fastload": {"uri": uri}}
    in_replica(monkeypatch, config)
    monkeypatch.setattr(_accelerate, "_reserved", False)
    events: list[tuple[str, str]] = []
    real_warm = serving.warm

    def reserve() -> None:
        events.append(("reserve", threading.current_thread().name))

    def warm(*args: Any, **kwargs: Any) -> Any:
        events.append(("download", threading.current_thread().name))
        return real_warm(*args, **kwargs)

    monkeypatch.setattr(_accelerate, "reserve_object_store", reserve)
    monkeypatch.setattr(serving, "warm", warm)

    class Embedder:
        def __init__(self) -> None:
            events.append(("user __init__", threading.current_thread().name))

    replica = fastload_ray.accelerate(Hooked)(Embedder)()
    run(replica.reconfigure(config))
    here = threading.current_thread().name
    assert events[0] == ("reserve", here)  # before the download's thread and the user's __init__, both of
    assert sorted(events[1:]) == [("download", "fastload-warm"), ("user __init__", here)]  # which then overlap

    # Outside a replica nothing is known in __init__: the first reconfigure reserves, on the event loop's
    # thread, then downloads on a worker thread.
    monkeypatch.setattr(_accelerate, "_reserved", False)
    monkeypatch.setattr(_accelerate, "_initial_user_config", lambda: _accelerate._UNKNOWN)
    monkeypatch.setattr(_accelerate, "warm", warm)
    events.clear()
    late = fastload_ray.accelerate(Hooked)(Embedder)()
    run(late.reconfigure(config))
    assert events[:2] == [("user __init__", here), ("reserve", here)]
    assert len(events) == 3 and events[2][0] == "download" and events[2][1] != here


def test_a_failed_early_fetch_fails_the_replicas_start_with_the_usual_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = (tmp_path / "nothing").as_uri() + "/"
    config = {"fastload": {"uri": missing}}
    with pytest.raises(WeightsUnavailableError) as direct:  # what a replica reported before the early start
        serving.warm(missing)
    in_replica(monkeypatch, config)
    early: list[str] = []
    real_warm = serving.warm

    def counted(*args: Any, **kwargs: Any) -> Any:
        early.append(threading.current_thread().name)
        return real_warm(*args, **kwargs)

    def again(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("reconfigure fetched again instead of reporting the early fetch's failure")

    monkeypatch.setattr(serving, "warm", counted)
    monkeypatch.setattr("fastload_ray._accelerate.warm", again)
    replica = fastload_ray.accelerate(Hooked)(type("Embedder", (), {}))()

    async def start() -> None:  # Ray's start-up, bounded: a failed download must not leave it waiting
        await asyncio.wait_for(replica.reconfigure(config), timeout=60)

    with pytest.raises(WeightsUnavailableError) as caught:
        run(start())
    assert str(caught.value) == str(direct.value) and f"cannot fetch the weights at {missing}" in str(caught.value)
    assert early == ["fastload-warm"]  # the failure came from the download __init__ started
    assert not hasattr(replica, "model")


def test_bad_configuration_in_a_replica_starts_no_fetch_and_fails_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    config = {"fastload": {"url": "s3://b/m/"}}
    in_replica(monkeypatch, config)
    monkeypatch.setattr(serving, "warm", lambda *args, **kwargs: pytest.fail("nothing should be fetched"))
    replica = fastload_ray.accelerate(Hooked)(type("Embedder", (), {}))()
    with pytest.raises(UserConfigError, match=r"unknown key.*url; it takes uri, revision"):
        run(replica.reconfigure(config))


def test_a_config_changed_before_the_first_load_loads_the_new_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = write_weights(tmp_path / "v1", seed=1), write_weights(tmp_path / "v2", seed=2)
    in_replica(monkeypatch, {"fastload": {"uri": first}})
    replica = fastload_ray.accelerate(Hooked)(type("Embedder", (), {}))()
    run(replica.reconfigure({"fastload": {"uri": second}}))  # `serve deploy` while the replica was starting
    torch.testing.assert_close(replica.model(X), expected(second))
    assert not replica._fastload_weights.loaded_early


def test_an_explicit_uri_starts_early_and_an_async_init_is_still_awaited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = write_weights(tmp_path / "m", seed=7)
    in_replica(monkeypatch, None)  # no user_config: uri= alone names the weights
    ran: list[bool] = []

    class Embedder:
        async def __init__(self) -> None:
            await asyncio.sleep(0)
            ran.append(True)

    wrapped = fastload_ray.accelerate(Hooked, uri=uri, prefetch=None)(Embedder)
    replica = wrapped.__new__(wrapped)  # as Ray builds a class whose __init__ is async

    async def start() -> None:
        await replica.__init__()
        await replica.reconfigure(None, rank=0)

    run(start())
    assert ran == [True] and replica._fastload_weights.loaded_early
    torch.testing.assert_close(replica.model(X), expected(uri))


def construct_as_ray_does(cls: type, *args: Any) -> Any:
    """A replica's construction in Ray Serve 2.60 (``Replica.initialize_callable``): ``__new__``, then
    ``__init__`` called on the event loop and its result awaited when it is a coroutine."""

    async def build() -> Any:
        replica = cls.__new__(cls)
        result = replica.__init__(*args)
        if inspect.iscoroutine(result):
            await result
        return replica

    return run(build())


# Ray awaits the ingress wrapper's ``async def __del__`` at shutdown; the collector's own call of it at the end of
# the test only makes a coroutine that nobody awaits.
@pytest.mark.filterwarnings(r"ignore:coroutine '.*ASGIIngressWrapper\.__del__' was never awaited:RuntimeWarning")
@pytest.mark.parametrize("user_init_is_async", [True, False], ids=["async-init", "sync-init"])
@pytest.mark.parametrize("accelerate_above_ingress", [True, False], ids=["above-ingress", "below-ingress"])
def test_it_composes_with_serve_ingress_in_either_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accelerate_above_ingress: bool, user_init_is_async: bool
) -> None:
    """``@serve.ingress`` wraps the class in one whose ``__init__`` is ``async def``, refuses a subclass with a
    sync ``__init__``, and awaits the wrapped class's ``__init__`` only when it is a coroutine function."""
    from fastapi import FastAPI
    from ray import serve

    uri = write_weights(tmp_path / "m", seed=8)
    in_replica(monkeypatch, None)

    class SyncInit:
        def __init__(self, greeting: str) -> None:
            self.greeting = greeting

    class AsyncInit:
        async def __init__(self, greeting: str) -> None:
            await asyncio.sleep(0)
            self.greeting = greeting

    user = AsyncInit if user_init_is_async else SyncInit
    accelerate = fastload_ray.accelerate(Hooked, uri=uri, prefetch=None)
    if accelerate_above_ingress:
        wrapped = accelerate(serve.ingress(FastAPI())(user))
    else:
        wrapped = serve.ingress(FastAPI())(accelerate(user))

    replica = construct_as_ray_does(wrapped, "hello")
    assert replica.greeting == "hello"  # the user's __init__ ran to its end
    assert replica.app is not None  # and so did the ingress wrapper's
    run(replica.reconfigure(None, rank=0))
    assert replica._fastload_weights.loaded_early
    torch.testing.assert_close(replica.model(X), expected(uri))
    del replica
    gc.collect()  # here, under this test's warning filter


def test_a_sync_reconfigure_runs_off_the_event_loop_as_ray_runs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray runs a sync ``reconfigure`` in a thread pool (``RAY_SERVE_RUN_SYNC_IN_THREADPOOL``, on by default)
    so that a slow one does not stall the replica's requests; wrapped, it must not stall them either."""
    from ray.serve._private import constants

    uri = write_weights(tmp_path / "m", seed=10)
    threads: list[threading.Thread] = []

    class Slow:
        def reconfigure(self, config: Any) -> None:
            time.sleep(1.0)  # a slow client reconnecting, a cache warming
            threads.append(threading.current_thread())

    replica = fastload_ray.accelerate(Hooked, uri=uri, prefetch=None)(Slow)()
    run(replica.reconfigure({"mine": 1}))  # the weights load; the slow reconfigure is not measured yet

    async def worst_lag(config: Any) -> float:
        lags: list[float] = []
        done = asyncio.Event()

        async def probe() -> None:
            while not done.is_set():
                started = time.perf_counter()
                await asyncio.sleep(0.01)
                lags.append(time.perf_counter() - started - 0.01)

        task = asyncio.create_task(probe())
        await asyncio.sleep(0.05)  # the probe is sleeping when reconfigure starts
        await replica.reconfigure(config)
        done.set()
        await task
        return max(lags)

    assert run(worst_lag({"mine": 2})) < 0.5
    assert threads[-1] is not threading.main_thread()

    # With the thread pool turned off, Ray calls a sync reconfigure on the loop: so does the wrapper.
    monkeypatch.setattr(constants, "RAY_SERVE_RUN_SYNC_IN_THREADPOOL", False)
    run(replica.reconfigure({"mine": 3}))
    assert threads[-1] is threading.main_thread()


# --- configuration errors: one clear FastloadError ------------------------------------------------------


@pytest.mark.parametrize(
    ("decorator_uri", "user_config", "message"),
    [
        (None, None, "no weights to load: pass uri= to fastload_ray.accelerate or set user_config"),
        (None, {"other": 1}, "no weights to load"),
        (None, ["s3://b/m/"], "user_config must be a dict with a 'fastload' section, not list"),
        (None, {"fastload": "s3://b/m/"}, r"user_config\['fastload'\] must be a dict"),
        (None, {"fastload": {"url": "s3://b/m/"}}, "unknown key.*url; it takes uri, revision"),
        (None, {"fastload": {"uri": ""}}, r"\['uri'\] must be a non-empty string"),
        (None, {"fastload": {"uri": "s3://b/m/", "revision": 7}}, r"\['revision'\] must be a string or None"),
        ("s3://b/m/", {"fastload": {"uri": "s3://b/other/"}}, "named twice.*keep one"),
    ],
)
def test_bad_configuration_is_one_clear_error(decorator_uri: str | None, user_config: Any, message: str) -> None:
    replica = fastload_ray.accelerate(Hooked, uri=decorator_uri)(type("Embedder", (), {}))()
    with pytest.raises(UserConfigError, match=message) as caught:
        run(replica.reconfigure(user_config))
    assert caught.value.deployment == "Embedder" and "deployment 'Embedder'" in str(caught.value)
    assert not hasattr(replica, "model")


def test_unreachable_weights_name_the_uri(tmp_path: Path) -> None:
    replica = fastload_ray.accelerate(Hooked)(type("Embedder", (), {}))()
    missing = (tmp_path / "nothing").as_uri() + "/"
    with pytest.raises(WeightsUnavailableError, match=r"cannot fetch the weights at file://.*nothing"):
        run(replica.reconfigure({"fastload": {"uri": missing}}))


# --- swaps and memory ------------------------------------------------------------------------------------


def test_a_new_config_swaps_in_place_and_a_repeat_is_a_no_op(tmp_path: Path, shm_root: Path) -> None:
    first, second = write_weights(tmp_path / "v1", seed=1), write_weights(tmp_path / "v2", seed=2)
    replica = fastload_ray.accelerate(Hooked)(type("Embedder", (), {}))()

    run(replica.reconfigure({"fastload": {"uri": first, "revision": None}}))
    model = replica.model
    weights = replica._fastload_weights
    assert weights.pin is not None and weights.pin.tier == "shm" and shm_root in weights.pin.path.parents
    torch.testing.assert_close(model(X), expected(first))

    run(replica.reconfigure({"fastload": {"uri": first, "revision": None}}))
    assert replica.model is model  # Ray repeats the start-up config: nothing reloads

    old_path = weights.pin.path
    run(replica.reconfigure({"fastload": {"uri": second}}))
    assert replica.model is not model
    torch.testing.assert_close(replica.model(X), expected(second))
    torch.testing.assert_close(model(X), expected(first))  # a request still holding the old model finishes
    ref = weakref.ref(model)
    del model  # the request ends; its cycle goes with the next collection (it was never frozen)
    gc.collect()
    assert ref() is None and not mapped(old_path)


def test_swapped_out_weights_are_freed_although_ray_froze_the_collector(tmp_path: Path) -> None:
    first, second = write_weights(tmp_path / "v1", seed=1), write_weights(tmp_path / "v2", seed=2)
    replica = fastload_ray.accelerate(Hooked)(type("Embedder", (), {}))()
    run(replica.reconfigure({"fastload": {"uri": first}}))
    old = weakref.ref(replica.model)
    old_path = replica._fastload_weights.pin.path
    control = weakref.ref(Hooked())  # the same kind of object, left to the collector alone
    gc.collect()
    gc.freeze()  # what Ray does after a replica's first reconfigure (RAY_SERVE_FREEZE_GC_ON_STARTUP)
    try:
        run(replica.reconfigure({"fastload": {"uri": second}}))
        assert old() is None and not mapped(old_path)
        assert gc.get_freeze_count() > 0  # frozen again afterwards, as Ray left it
    finally:
        gc.unfreeze()
    assert control() is None  # (it was garbage all along: the cycle is real and only the collector frees it)


def test_evicted_multiplexed_models_are_freed_as_ray_evicts_them(tmp_path: Path, shm_root: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's multiplexer pops the model, awaits ``model.__del__()`` while still holding it, then replaces
    the attribute and lets go; the memory must be gone on the loop's next turn, with the collector
    frozen and the model in a cycle."""
    monkeypatch.setenv("FASTLOAD_TIER", "shm")
    uri = write_weights(tmp_path / "adapter", seed=3)

    async def main() -> tuple[weakref.ref[nn.Module], Path]:
        model = await fastload_ray.load_model_async(Hooked, uri)
        torch.testing.assert_close(model(X), expected(uri))
        files = [line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                 if str(shm_root) in line]
        assert files, "a CPU load from the shm tier maps the file"
        gc.collect()
        gc.freeze()  # as if loaded before Ray froze the collector: the hardest case
        ref = weakref.ref(model)
        models = {"a": model}
        del model
        evicted = models.pop("a")
        assert inspect.iscoroutinefunction(evicted.__del__)  # Ray awaits it on the loop
        await evicted.__del__()
        await evicted.__del__()  # a second call (idempotent) changes nothing
        evicted.__del__ = lambda _: None  # what Ray does next
        del evicted
        await asyncio.sleep(0)  # the loop's next turn
        return ref, Path(files[0])

    try:
        ref, path = run(main())
        assert ref() is None and not mapped(path)
    finally:
        gc.unfreeze()


def test_load_model_async_defaults_to_the_replicas_device_and_keeps_the_cores_errors(tmp_path: Path) -> None:
    uri = write_weights(tmp_path / "m", seed=4)
    model = run(fastload_ray.load_model_async(Hooked, uri))
    assert model.linear.weight.device.type == "cpu"  # no GPU here (and none assigned outside Ray)
    with pytest.raises(FastloadError):  # as from load_model
        run(fastload_ray.load_model_async(Hooked, (tmp_path / "missing").as_uri() + "/"))


def test_shm_budget_leaves_room_for_the_object_store(shm_root: Path) -> None:
    shm_root.mkdir(parents=True)
    stats = os.statvfs("/dev/shm")
    free, total = stats.f_bavail * stats.f_frsize, stats.f_blocks * stats.f_frsize
    reserved = 64 << 20
    budget = shm_budget(shm_root, reserved=reserved, configured=None)
    assert abs(budget - (free - reserved)) < 64 << 20  # other tenants of /dev/shm move a little meanwhile
    assert shm_budget(shm_root, reserved=reserved, configured=1 << 20) == 1 << 20
    assert shm_budget(shm_root, reserved=total * 2, configured=0.5) == 0
    half = parse_size("50%")
    assert isinstance(half, float) and shm_budget(shm_root, reserved=0, configured=half) <= total // 2


def test_load_options_reach_load_model(tmp_path: Path) -> None:
    uri = write_weights(tmp_path / "m", seed=5)
    replica = fastload_ray.accelerate(Hooked, uri=uri, dtype=torch.float16, copy=True)(type("Half", (), {}))()
    run(replica.reconfigure(None, rank=0))
    assert replica.model.linear.weight.dtype == torch.float16
    assert replica._fastload_weights.pin is None  # private copies: the tier entry is not held
    torch.testing.assert_close(replica.model(X.half()), expected(uri).half(), rtol=1e-2, atol=1e-2)
