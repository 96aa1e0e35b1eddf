"""compile(): fresh processes with empty local caches, real inductor compiles, real services.

One cold compile (through Redis) is shared by the module; the other tests feed its entry to fresh
processes through each backend, or break the backend between store and load.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis as redis_client
import torch

import fastload_core.compile_cache as compile_cache
from fastload_core.compile_cache import blob as blobfmt
from fastload_core.compile_cache.compiler import _with_fastload_defaults
from fastload_core.compile_cache.errors import CacheURLError
from fastload_core.compile_cache.keys import key_from_fields
from fastload_core.compile_cache.registry import open_backend
from tests.services.redis import RedisServer

from .conftest import run_child


@dataclass
class Cold:
    result: dict[str, Any]
    entry: bytes


def _redis_key(key: str) -> str:
    return f"fastload:compile:{key}"


def _load_into_redis(url: str, key: str, entry: bytes) -> None:
    client = redis_client.Redis.from_url(url)
    client.flushall()
    client.set(_redis_key(key), entry)
    client.close()


def _same_outputs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    pairs = zip(a["outputs"], b["outputs"], strict=True)
    return all(torch.equal(torch.tensor(x), torch.tensor(y)) for x, y in pairs)


@pytest.fixture(scope="module")
def cold(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cold]:
    """A first replica: nothing cached anywhere, so it compiles and stores through Redis."""
    if not _pings(redis_server):  # an earlier module may have stopped it
        redis_server.start()
    redis_client.Redis.from_url(redis_server.url).flushall()
    result = run_child(tmp_path_factory.mktemp("cold"), "cold", redis_server.url)
    entry = redis_client.Redis.from_url(redis_server.url).get(_redis_key(result["key"]))
    assert isinstance(entry, bytes)
    yield Cold(result, entry)


def _pings(server: RedisServer) -> bool:
    try:
        return bool(redis_client.Redis.from_url(server.url, socket_connect_timeout=0.5).ping())
    except redis_client.ConnectionError:
        return False


@pytest.mark.slow
@pytest.mark.redis
def test_cold_compile_stores_a_complete_entry(cold: Cold) -> None:
    r = cold.result
    assert (r["status"], r["lookup"], r["store"], r["source"]) == ("miss", "miss", "stored", None)
    assert r["torch_counters"]["fxgraph_cache_miss"] >= 1
    assert r["warnings"] == []
    header = blobfmt.read_header(cold.entry)
    key = key_from_fields(header["fields"])
    assert key.digest == r["key"]
    blobfmt.verify(cold.entry, key)
    assert header["files"] > 0 and header["mega_bytes"] > 0
    # the precompiled header (150 MB under $TMPDIR) is off: nothing a fresh node would have to rebuild
    assert not list(Path(r["home"], "tmp").rglob("*.gch"))


@pytest.mark.slow
@pytest.mark.redis
def test_second_fresh_process_hits_and_matches(cold: Cold, redis_url: str, tmp_path: Path) -> None:
    _load_into_redis(redis_url, cold.result["key"], cold.entry)
    warm = run_child(tmp_path, "warm", redis_url)
    assert (warm["status"], warm["lookup"], warm["source"]) == ("hit", "restored", redis_url)
    counters = warm["torch_counters"]
    assert counters["fxgraph_cache_hit"] >= 1 and counters["fxgraph_cache_miss"] == 0
    assert counters["autograd_cache_hit"] >= 1 and counters["autograd_cache_miss"] == 0
    assert warm["restored_files"] == blobfmt.read_header(cold.entry)["files"]
    assert warm["mega_artifacts"].get("inductor", 0) >= 1
    assert any(p.suffix == ".so" for p in Path(warm["workdir"]).rglob("*"))
    assert not warm["stored"] and warm["warnings"] == []
    assert _same_outputs(warm, cold.result)


@pytest.mark.slow
def test_lazy_first_call_hits_from_a_directory(cold: Cold, tmp_path: Path) -> None:
    url = (tmp_path / "shared-mount").as_uri()
    open_backend(url).put(cold.result["key"], cold.entry)
    warm = run_child(tmp_path, "lazy", url, "--lazy")
    assert (warm["status"], warm["source"]) == ("hit", url)
    assert warm["torch_counters"]["fxgraph_cache_miss"] == 0
    assert _same_outputs(warm, cold.result)


@pytest.mark.slow
@pytest.mark.s3
def test_fresh_process_hits_from_s3(cold: Cold, s3_endpoint: str, tmp_path: Path) -> None:
    import boto3

    boto3.client("s3").create_bucket(Bucket="models")
    url = "s3://models/compile"
    open_backend(url).put(cold.result["key"], cold.entry)
    warm = run_child(tmp_path, "s3", url)
    assert (warm["status"], warm["source"]) == ("hit", url)
    assert warm["torch_counters"]["fxgraph_cache_miss"] == 0
    assert _same_outputs(warm, cold.result)


@pytest.mark.slow
@pytest.mark.redis
def test_redis_killed_between_store_and_load(
    cold: Cold, redis_server: RedisServer, redis_url: str, tmp_path: Path
) -> None:
    _load_into_redis(redis_url, cold.result["key"], cold.entry)
    redis_server.stop()
    try:
        warm = run_child(tmp_path, "no-redis", redis_url)
    finally:
        redis_server.start()
    assert (warm["status"], warm["lookup"]) == ("miss", "unavailable")
    assert warm["store"] == "skipped (cache unavailable)"
    assert warm["torch_counters"]["fxgraph_cache_miss"] >= 1
    assert len(warm["warnings"]) == 1 and redis_url in warm["warnings"][0]
    assert _same_outputs(warm, cold.result)


@pytest.mark.slow
@pytest.mark.redis
def test_corrupt_blob_in_redis_is_recompiled_replaced_and_then_hit(
    cold: Cold, redis_url: str, tmp_path: Path
) -> None:
    damaged = bytearray(cold.entry)
    damaged[len(damaged) // 2] ^= 0x5A
    _load_into_redis(redis_url, cold.result["key"], bytes(damaged))
    fixer = run_child(tmp_path, "fixer", redis_url)
    assert (fixer["status"], fixer["lookup"], fixer["store"]) == ("miss", "corrupt", "stored")
    assert any("sha256 does not match" in w for w in fixer["warnings"])
    assert _same_outputs(fixer, cold.result)
    replaced = redis_client.Redis.from_url(redis_url).get(_redis_key(cold.result["key"]))
    assert isinstance(replaced, bytes)
    blobfmt.verify(replaced, key_from_fields(blobfmt.read_header(replaced)["fields"]))
    after = run_child(tmp_path, "after", redis_url)
    assert (after["status"], after["lookup"]) == ("hit", "restored")


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_second_process_hits(tmp_path: Path) -> None:
    url = (tmp_path / "entries").as_uri()
    cold = run_child(tmp_path, "gpu-cold", url, "--device", "cuda")
    assert (cold["status"], cold["store"]) == ("miss", "stored")
    warm = run_child(tmp_path, "gpu-warm", url, "--device", "cuda")
    assert warm["status"] == "hit" and warm["torch_counters"]["fxgraph_cache_miss"] == 0
    assert _same_outputs(warm, cold)


# --- in-process: the wrapper's mechanics, with the eager backend so nothing is built ---------------


def test_lazy_function_primes_on_first_call_and_restores_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "users-own"))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)

    def scaled(x: torch.Tensor) -> torch.Tensor:
        return x * 3 + 1

    compiled = compile_cache.compile(scaled, cache=(tmp_path / "store").as_uri(), backend="eager")
    assert compile_cache.report_of(compiled) is None
    x = torch.arange(4.0)
    assert torch.equal(compiled(x), x * 3 + 1)
    report = compile_cache.report_of(compiled)
    assert report is not None and report.status == "none" and report.lookup == "miss"
    assert set(report.stages) >= {"key", "fetch", "first_call"}
    assert report.workdir.startswith(os.environ["FASTLOAD_CACHE_DIR"])
    # the per-key directories were only in force during the first call
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "users-own")
    assert "TRITON_CACHE_DIR" not in os.environ
    assert torch.equal(compiled(x + 1), (x + 1) * 3 + 1)
    assert compile_cache.report_of(compiled) is report


def test_lazy_module_puts_its_forward_back(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 4)
    compiled = compile_cache.compile(model, cache=(tmp_path / "store").as_uri(), backend="eager")
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x))
    assert compiled.forward.__name__ != "priming_forward"
    report = compile_cache.report_of(compiled)
    assert report is not None and report.fields["model"].endswith("Linear")
    assert not hasattr(model, "fastload_report")  # the user's module is left alone


def test_example_inputs_compile_at_start_up(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 4)
    compiled = compile_cache.compile(model, cache=(tmp_path / "store").as_uri(), backend="eager",
                                     example_inputs=torch.randn(2, 4))
    report = compile_cache.report_of(compiled)
    assert report is not None and report.stages["first_call"] > 0


def test_bad_cache_url_fails_at_start_up() -> None:
    with pytest.raises(CacheURLError, match=r"'memcached://x'.*supported schemes: file://"):
        compile_cache.compile(torch.nn.Linear(2, 2), cache="memcached://x")


def test_precompiled_header_is_off_unless_asked_for() -> None:
    assert _with_fastload_defaults({}) == {"options": {"cpp_cache_precompile_headers": False}}
    mode = _with_fastload_defaults({"mode": "max-autotune-no-cudagraphs"})
    assert "mode" not in mode and mode["options"]["max_autotune"] is True
    assert mode["options"]["cpp_cache_precompile_headers"] is False
    kept = {"options": {"cpp_cache_precompile_headers": True}}
    assert _with_fastload_defaults(kept) == kept
    assert _with_fastload_defaults({"backend": "eager"}) == {"backend": "eager"}


def test_a_model_the_key_cannot_describe_still_compiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from fastload_core.compile_cache import compiler

    def no_key(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("cannot hash this")

    monkeypatch.setattr(compiler, "derive_key", no_key)
    compiled = compile_cache.compile(torch.nn.Linear(3, 3), cache=(tmp_path / "s").as_uri(), backend="eager")
    x = torch.randn(1, 3)
    with caplog.at_level(logging.WARNING, logger="fastload"):
        assert compiled(x).shape == (1, 3)
    report = compile_cache.report_of(compiled)
    assert report is not None and report.lookup == "skipped" and "cannot hash this" in report.notes[0]
    assert "compiling without the cache" in caplog.text


def test_a_first_call_that_raises_primes_again_next_time(tmp_path: Path) -> None:
    calls: list[int] = []

    def flaky(x: torch.Tensor) -> torch.Tensor:
        if not calls:
            calls.append(1)
            raise ValueError("bad request")
        return x + 1

    compiled = compile_cache.compile(flaky, cache=(tmp_path / "s").as_uri(), backend="eager")
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with pytest.raises(ValueError, match="bad request"):
        compiled(torch.zeros(2))
    assert compile_cache.report_of(compiled) is None
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before
    assert torch.equal(compiled(torch.zeros(2)), torch.ones(2))
    assert compile_cache.report_of(compiled) is not None


def test_load_model_entry_point(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 4)
    same, report = compile_cache.compile_loaded_model(model, compile=False)
    assert same is model and report is None
    url = (tmp_path / "s").as_uri()
    compiled, report = compile_cache.compile_loaded_model(
        model, compile={"backend": "eager", "extra": "tenant-3"}, compile_cache=url,
        example_inputs=torch.randn(1, 4))
    assert compiled is not model and report is not None
    assert report.cache_url == url and report.fields["extra"] == "tenant-3"
