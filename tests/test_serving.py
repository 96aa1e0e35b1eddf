"""The adapter-shared verbs: a worker's device, held weights, a warmed node, the compile-cache default."""

from __future__ import annotations

import gc
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import fastload_core
from fastload_core import serving
from fastload_core.compile_cache import CompileCache, default_url
from fastload_core.compile_cache.errors import CacheURLError
from fastload_core.errors import FastloadError
from fastload_core.report import LoadReport
from fastload_core.serving import (
    WeightsUnavailableError,
    device_for_worker,
    hold_warmed,
    hold_weights,
    set_default_compile_cache,
    start_warm,
    version_of,
    wait_for_warm,
    warm,
    warm_in_background,
)
from fastload_core.storage import StorageError, default_store, parse_uri, writethrough
from fastload_devservices.s3 import BUCKET
from tests.storage.helpers import record_events


def make_model(root: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A prefix-style model directory with one safetensors file."""
    root.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": torch.arange(64, dtype=torch.float32).reshape(8, 8), "bias": torch.ones(8)}
    save_file(tensors, root / "model.safetensors")
    return root, tensors


def in_use() -> list[tuple[str, str]]:
    return [(info.entry.tier, info.entry.slug) for info in default_store().ls() if info.in_use]


# --- device_for_worker -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        (0, ["cpu", "cpu", "cpu"]),
        (1, ["cuda:0", "cuda:0", "cuda:0"]),
        (2, ["cuda:0", "cuda:1", "cuda:0"]),
    ],
)
def test_workers_are_spread_round_robin_over_the_visible_gpus(gpus: int, expected: list[str]) -> None:
    assert [str(device_for_worker(i, gpu_count=gpus)) for i in (1, 2, 3)] == expected


def test_zero_based_worker_numbers_are_supported() -> None:
    assert [str(device_for_worker(i, first=0, gpu_count=2)) for i in (0, 1, 2)] == ["cuda:0", "cuda:1", "cuda:0"]


def test_the_gpu_count_defaults_to_what_torch_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_for_worker(2) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert device_for_worker(2) == torch.device("cpu")


@pytest.mark.parametrize(("index", "kwargs", "error", "match"), [
    (0, {}, ValueError, "below the first index 1"),
    (-1, {"first": 0}, ValueError, "below the first index 0"),
    ("1", {}, TypeError, "must be an int"),
    (True, {}, TypeError, "must be an int"),
    (1, {"gpu_count": -1}, ValueError, "cannot be negative"),
])
def test_bad_worker_numbers_are_refused(index: Any, kwargs: dict[str, Any], error: type[Exception],
                                        match: str) -> None:
    with pytest.raises(error, match=match):
        device_for_worker(index, **kwargs)


# --- hold_weights ------------------------------------------------------------------------------------
def test_held_weights_stay_pinned_until_released(tmp_path: Path) -> None:
    source, _ = make_model(tmp_path / "origin" / "m1")
    pin = hold_weights(source.as_uri())
    assert pin.held and pin.tier == "local_disk" and (pin.path / "model.safetensors").is_file()
    assert in_use() == [("local_disk", pin.entry.slug if pin.entry else "")]
    removed, busy = default_store().rm(source.as_uri())
    assert removed == [] and len(busy) == 1  # a serving worker's weights are never evicted under it
    pin.release()
    assert in_use() == []


def test_weights_can_be_held_in_a_named_tier(tmp_path: Path, shm_root: Path) -> None:
    source, _ = make_model(tmp_path / "origin" / "m1")
    with hold_weights(source.as_uri(), tier="shm") as path:
        assert path.is_relative_to(shm_root)


def test_a_plain_local_path_is_held_where_it_lies(tmp_path: Path) -> None:
    source, _ = make_model(tmp_path / "m1")
    with hold_weights(source) as path:
        assert path == source


@pytest.mark.parametrize("uri", ["missing-dir", "file:///nonexistent/fastload/model/", "gopher://host/m1"])
def test_unavailable_weights_raise_one_error_naming_the_uri(tmp_path: Path, uri: str) -> None:
    uri = str(tmp_path / uri) if "://" not in uri else uri
    with pytest.raises(WeightsUnavailableError) as raised:
        hold_weights(uri)
    assert isinstance(raised.value, FastloadError)
    assert raised.value.uri == uri and uri in str(raised.value)
    assert "cannot start without them" in str(raised.value)
    assert isinstance(raised.value.__cause__, StorageError)


def test_credentials_in_a_uri_are_not_repeated_in_the_error() -> None:
    with pytest.raises(WeightsUnavailableError) as raised:
        hold_weights("s3://key:secret@bucket/m1/")
    assert "secret" not in str(raised.value) and "secret" not in raised.value.uri


@pytest.mark.s3
def test_a_missing_s3_object_names_the_uri(s3: Any) -> None:
    with pytest.raises(WeightsUnavailableError, match=f"s3://{BUCKET}/no-such-model/"):
        hold_weights(f"s3://{BUCKET}/no-such-model/")


@pytest.mark.s3
def test_an_unknown_s3_revision_is_unavailable(s3: Any, tmp_path: Path) -> None:
    source, _ = make_model(tmp_path / "m1")
    s3.upload_file(str(source / "model.safetensors"), BUCKET, "m1/model.safetensors")
    with pytest.raises(WeightsUnavailableError, match="revision"):
        hold_weights(f"s3://{BUCKET}/m1/model.safetensors", revision="no-such-version")


# --- warm --------------------------------------------------------------------------------------------
def test_warm_puts_models_in_shm_and_workers_then_load_from_it(tmp_path: Path, shm_root: Path) -> None:
    first, tensors = make_model(tmp_path / "origin" / "m1")
    second, _ = make_model(tmp_path / "origin" / "m2")
    paths = warm([first.as_uri(), second.as_uri()])
    assert [p.is_relative_to(shm_root) for p in paths] == [True, True]
    writethrough.wait(30)  # the copies onto local disk, made from the shm entries after warm returned
    assert in_use() == []  # warming holds nothing: workers pin what they serve
    with hold_weights(first.as_uri()) as path:  # a worker: the fastest tier holding it
        assert path == paths[0]
        report = LoadReport(source="", device="")
        loaded = fastload_core.load_state_dict(path, report=report)
        assert report.tier == "shm" and "from tier shm" in report.summary()
        assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
        del loaded
        gc.collect()


def test_warming_an_already_warm_model_fetches_nothing(tmp_path: Path) -> None:
    source, _ = make_model(tmp_path / "origin" / "m1")
    (path,) = warm(source.as_uri())
    (source / "model.safetensors").unlink()
    (source / "model.safetensors").write_bytes(b"changed")  # a refetch would now fail verification
    assert warm(source.as_uri(), revision=default_store().ls(tier="shm")[0].entry.version) == [path]


def test_a_tier_too_small_for_the_model_falls_through_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FASTLOAD_SHM_CAPACITY", "100")  # as in a container's small /dev/shm
    source, tensors = make_model(tmp_path / "origin" / "m1")
    with caplog.at_level(logging.WARNING, logger="fastload"):
        (path,) = warm(source.as_uri())
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "tier 'shm' cannot take" in message and "--shm-size" in message
    assert message.endswith("serving it from tier local_disk instead")
    report = LoadReport(source="", device="")
    loaded = fastload_core.load_state_dict(path, report=report)
    assert report.tier == "local_disk" and torch.equal(loaded["weight"], tensors["weight"])


def test_warming_into_a_tier_the_node_lacks_warns_and_uses_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FASTLOAD_SHM_DIR", "off")
    source, _ = make_model(tmp_path / "origin" / "m1")
    with caplog.at_level(logging.WARNING, logger="fastload"):
        (path,) = warm(source.as_uri())
    assert [r.getMessage() for r in caplog.records if "has no 'shm' tier" in r.getMessage()]
    assert fastload_core.storage.tier_of(path) == "local_disk"


def test_warm_with_no_tier_fills_the_default_tier(tmp_path: Path) -> None:
    source, _ = make_model(tmp_path / "origin" / "m1")
    (path,) = warm(source.as_uri(), tier=None)
    assert fastload_core.storage.tier_of(path) == "local_disk"


def test_warming_missing_weights_fails_naming_the_uri(tmp_path: Path) -> None:
    present, _ = make_model(tmp_path / "origin" / "m1")
    missing = (tmp_path / "origin" / "m2").as_uri()
    with pytest.raises(WeightsUnavailableError, match=missing):
        warm([present.as_uri(), missing])


# --- the load report's tier --------------------------------------------------------------------------
def test_the_load_report_names_the_tier_of_a_uri_and_none_for_a_plain_file(tmp_path: Path) -> None:
    source, _ = make_model(tmp_path / "origin" / "m1")
    from_uri, from_file = LoadReport(source="", device=""), LoadReport(source="", device="")
    fastload_core.load_state_dict(source.as_uri(), report=from_uri)
    fastload_core.load_state_dict(source / "model.safetensors", report=from_file)
    assert from_uri.tier == "local_disk" and from_file.tier == ""
    assert "from tier" not in from_file.summary()


def test_a_streamed_load_reports_the_tier_it_published_to(tmp_path: Path) -> None:
    source, _ = make_model(tmp_path / "origin" / "m1")
    report = LoadReport(source="", device="")
    fastload_core.load_state_dict(source.as_uri(), copy=True, report=report)
    assert report.tier == "shm"  # a cold stream lands in the fastest tier; the default one is written through


# --- set_default_compile_cache -----------------------------------------------------------------------
def test_the_compile_cache_default_follows_the_setting(tmp_path: Path) -> None:
    url = (tmp_path / "compile-cache").as_uri()
    before = default_url()
    set_default_compile_cache(url)
    assert default_url() == url and CompileCache().url == url
    set_default_compile_cache(None)
    assert default_url() == before


@pytest.mark.parametrize(("url", "match"), [("gopher://x/", "no compile-cache backend serves gopher"),
                                            ("/var/cache/x", "has no scheme")])
def test_a_compile_cache_url_no_backend_serves_is_refused_at_once(url: str, match: str) -> None:
    with pytest.raises(CacheURLError, match=match) as raised:
        set_default_compile_cache(url)
    assert "redis://" in str(raised.value)  # says what is on offer
    assert default_url() != url


def test_a_compile_cache_url_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="redis://cache:6379/0"):
        set_default_compile_cache(6379)  # type: ignore[arg-type]


def test_checking_a_url_connects_to_nothing() -> None:
    from fastload_core.serving import check_compile_cache_url

    assert check_compile_cache_url("redis://127.0.0.1:1/0") == "redis://127.0.0.1:1/0"  # nothing listens there


def test_checking_an_s3_compile_cache_resolves_no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adapters check the URL where their configuration is read (a service module's import, bentoml build):
    a profile or credential_process must not be looked up, let alone run, there."""
    from fastload_core.serving import check_compile_cache_url

    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")  # resolving credentials would raise ProfileNotFound
    assert check_compile_cache_url("s3://bucket/compile") == "s3://bucket/compile"


def test_a_compile_cache_whose_library_is_missing_fails_the_check_not_every_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The documented install of an adapter need not hold redis-py: the check at configuration must say so,
    or every worker's compile fails later."""
    from fastload_core.serving import check_compile_cache_url

    with pytest.raises(CacheURLError, match="expected redis://host:port/db"):
        check_compile_cache_url("redis:///0")
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis raises ImportError
    with pytest.raises(CacheURLError, match=r"'redis://cache:6379/0': the redis backend needs redis-py"):
        check_compile_cache_url("redis://cache:6379/0")


def test_the_version_of_a_warmed_path_selects_it_without_the_origin(tmp_path: Path) -> None:
    from fastload_core.serving import version_of

    source, _ = make_model(tmp_path / "origin" / "m1")
    (path,) = warm(source.as_uri())
    version = version_of(path)
    assert version == default_store().ls(tier="shm")[0].entry.version
    assert version_of(source) is None  # outside every tier
    import shutil

    shutil.rmtree(source)  # gone from the origin: only the tiers can answer now
    with hold_weights(source.as_uri(), revision=version) as held:
        assert held == path


def test_a_pinned_version_no_tier_holds_is_never_replaced_by_the_current_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adapters pin each worker to the version its node warmed (version_of → revision): once that one is
    evicted, a worker must not silently load whatever the origin has now."""
    source, _ = make_model(tmp_path / "origin" / "m1")
    evicted = "0123456789abcdef0123"  # a fastload version no tier holds
    with pytest.raises(WeightsUnavailableError, match=f"no tier holds version {evicted}"):
        hold_weights(source.as_uri(), revision=evicted)
    with pytest.raises(WeightsUnavailableError, match="a path has no revisions, so none is 'not-a-revision'"):
        hold_weights(source.as_uri(), revision="not-a-revision")
    (path,) = warm(source.as_uri())
    monkeypatch.setenv("FASTLOAD_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match=f"no tier holds its revision {evicted}"):
        hold_weights(source.as_uri(), revision=evicted)
    with hold_weights(source.as_uri()) as held:
        assert held == path


def test_each_worker_that_holds_a_warmed_copy_counts_one_tier_hit(tmp_path: Path) -> None:
    """The adapters warm, then hold what was warmed: one worker's load is one hit, not two (the warm's and a
    second lookup's), or the hit figures double."""
    source, _ = make_model(tmp_path / "origin" / "m1")
    (path,) = warm(source.as_uri())  # the node's first worker
    recorder = record_events()
    for _ in range(2):  # two later workers
        with hold_warmed(warm(source.as_uri())[0], source.as_uri()) as held:
            assert held == path
    assert [event["tier"] for event in recorder.names("hit")] == ["shm", "shm"]


def test_a_warmed_copy_evicted_before_it_is_held_is_held_again_at_the_same_version(tmp_path: Path) -> None:
    source, _ = make_model(tmp_path / "origin" / "m1")
    (path,) = warm(source.as_uri())
    version = version_of(path)
    writethrough.wait(30)  # its copy onto local disk holds the shm entry until written
    removed, _ = default_store().rm(f"{parse_uri(source.as_uri()).slug}/{version}", tier="shm")
    assert removed  # another process evicted it between the warm and the hold
    with hold_warmed(path, source.as_uri()) as held:
        assert version_of(held) == version and held != path  # the same version, from the tier below


# --- start_warm --------------------------------------------------------------------------------------------
def test_start_warm_returns_at_once_and_hands_over_the_warmed_copy(
    tmp_path: Path, shm_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, _ = make_model(tmp_path / "origin" / "m1")
    gate, ran_on = threading.Event(), []
    real_warm = serving.warm

    def held(*args: Any, **kwargs: Any) -> Any:  # the download, held here to show start_warm does not wait for it
        ran_on.append(threading.current_thread().name)
        gate.wait(30)
        return real_warm(*args, **kwargs)

    monkeypatch.setattr(serving, "warm", held)
    warming = start_warm(source.as_uri())
    assert not warming.done()
    gate.set()
    path = warming.result(timeout=30)
    assert ran_on == ["fastload-warm"] and path.is_relative_to(shm_root)
    assert warming.exception() is None and serving.version_of(path) is not None


def test_start_warm_hands_its_error_to_the_waiter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = (tmp_path / "origin" / "nowhere").as_uri()
    warming = start_warm(missing)
    with pytest.raises(WeightsUnavailableError, match=f"cannot fetch the weights at {missing}"):
        warming.result(timeout=30)

    def crash(*args: Any, **kwargs: Any) -> Any:  # not a FastloadError: still handed over, never a dead thread
        raise KeyError("a bug")

    monkeypatch.setattr(serving, "warm", crash)
    with pytest.raises(KeyError, match="a bug"):
        start_warm(missing).result(timeout=30)


# --- warm_in_background --------------------------------------------------------------------------------
def test_a_background_warm_checks_the_origin_before_it_returns(tmp_path: Path) -> None:
    missing = (tmp_path / "origin" / "nowhere").as_uri()
    with pytest.raises(WeightsUnavailableError, match=missing):
        warm_in_background(missing, handoff=tmp_path / "handoff.lock")
    assert wait_for_warm(tmp_path / "handoff.lock", timeout=0)  # nothing was left locked


def test_a_background_warm_that_fails_still_lets_the_workers_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    source, _ = make_model(tmp_path / "origin" / "m1")

    def broken(*args: Any, **kwargs: Any) -> list[Path]:
        raise StorageError("the disk is on fire")

    monkeypatch.setattr(serving, "warm", broken)
    version, thread = warm_in_background(source.as_uri(), handoff=tmp_path / "handoff.lock")
    thread.join(30)
    assert wait_for_warm(tmp_path / "handoff.lock", timeout=5)
    assert "background warm-up failed (the disk is on fire)" in caplog.text
    with hold_weights(source.as_uri()) as path:  # a worker then fetches for itself: the same version
        assert serving.version_of(path) == version


def test_a_background_warm_publishes_the_version_it_announced(tmp_path: Path, shm_root: Path) -> None:
    source, _ = make_model(tmp_path / "origin" / "m1")
    version, thread = warm_in_background(source.as_uri(), handoff=tmp_path / "handoff.lock")
    assert wait_for_warm(tmp_path / "handoff.lock", timeout=30)
    thread.join(30)
    (entry,) = [info.entry for info in default_store().ls(tier="shm")]
    assert entry.version == version and entry.path.is_relative_to(shm_root)
