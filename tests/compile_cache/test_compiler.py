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
from fastload_devservices.redis import RedisServer

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


def _assert_close(actual: list[list[float]], expected: list[list[float]], *, tolerance: float) -> None:
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=tolerance, atol=tolerance)


@pytest.fixture(scope="module")
def cold(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cold]:
    """A first replica: nothing cached anywhere, so it compiles and stores through Redis."""
    if not redis_server.running:  # an earlier module may have stopped it
        redis_server.start()
    redis_client.Redis.from_url(redis_server.url).flushall()
    result = run_child(tmp_path_factory.mktemp("cold"), "cold", redis_server.url)
    entry = redis_client.Redis.from_url(redis_server.url).get(_redis_key(result["key"]))
    assert isinstance(entry, bytes)
    yield Cold(result, entry)


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


# On a GPU, inductor picks some Triton kernels' configurations by timing them on the first call (for
# reductions the block size and warp count, which set the summation order). torch 2.11 does not always
# restore that choice on a cache hit (read from torch's source and tracker, not observed here: a
# statically launched kernel restored from the FX-graph cache looks its autotune result up beside the
# kernel path it had on the cold node, and configurations added at run time by _dynamic_scale_rblock
# are never cached; pytorch/pytorch#181789, #181292, #189121). The warm replica then times the
# candidates again and a near tie can go the other way: same kernels, same function, a different
# rounding of a few sums. That is what made the old exact comparison fail on an H100.
# Hence two tests: with default options the replicas agree within float32 rounding of a reordered sum
# (<= 64 terms of magnitude ~1 here: a few ulp, far below 1e-5, while a kernel built for another shape
# or a wrong restore is off by O(0.1)) and both agree with eager; with inductor's deterministic mode,
# which makes no timing-based choice that changes numerics, they must be bit-identical.
_SAME_KERNELS_REORDERED = 1e-5
_COMPILED_VS_EAGER = 1e-4  # other algorithms (fused LayerNorm, attention kernels), same function


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_second_process_hits(tmp_path: Path) -> None:
    url = (tmp_path / "entries").as_uri()
    cold = run_child(tmp_path, "gpu-cold", url, "--device", "cuda")
    assert (cold["status"], cold["store"]) == ("miss", "stored")
    warm = run_child(tmp_path, "gpu-warm", url, "--device", "cuda")
    assert warm["status"] == "hit" and warm["torch_counters"]["fxgraph_cache_miss"] == 0
    for replica in (cold, warm):
        _assert_close(replica["outputs"], replica["eager"], tolerance=_COMPILED_VS_EAGER)
    _assert_close(warm["outputs"], cold["outputs"], tolerance=_SAME_KERNELS_REORDERED)


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_deterministic_mode_replicas_are_bit_identical(tmp_path: Path) -> None:
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config, "deterministic"):
        pytest.skip(f"torch {torch.__version__} has no inductor deterministic mode")
    url = (tmp_path / "entries").as_uri()
    cold = run_child(tmp_path, "gpu-det-cold", url, "--device", "cuda", "--deterministic")
    warm = run_child(tmp_path, "gpu-det-warm", url, "--device", "cuda", "--deterministic")
    assert (cold["status"], warm["status"]) == ("miss", "hit")
    assert _same_outputs(warm, cold)


@pytest.mark.slow
def test_more_example_inputs_each_shape_is_restored(tmp_path: Path) -> None:
    url = (tmp_path / "entries").as_uri()
    cold = run_child(tmp_path, "shapes-cold", url, "--more-shape")
    warm = run_child(tmp_path, "shapes-warm", url, "--more-shape")
    assert (cold["status"], cold["store"], warm["status"]) == ("miss", "stored", "hit")
    # two graphs (batch 2, then batch 5) compiled once, stored in one entry, both restored
    assert cold["torch_counters"]["fxgraph_cache_miss"] >= 2
    assert warm["torch_counters"]["fxgraph_cache_hit"] >= 2 and warm["torch_counters"]["fxgraph_cache_miss"] == 0
    assert cold["recompiled_for_more"] == warm["recompiled_for_more"] == 0  # the request found its graph
    assert "more_calls" in warm["stages"]
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


def test_precompiled_header_and_isa_probe_are_off_unless_asked_for() -> None:
    defaults = {"cpp_cache_precompile_headers": False, "cpp.vec_isa_ok": True}
    assert _with_fastload_defaults({}) == {"options": defaults}
    mode = _with_fastload_defaults({"mode": "max-autotune-no-cudagraphs"})
    assert "mode" not in mode and mode["options"]["max_autotune"] is True
    assert mode["options"]["cpp_cache_precompile_headers"] is False and mode["options"]["cpp.vec_isa_ok"] is True
    kept = {"options": {"cpp_cache_precompile_headers": True, "cpp.vec_isa_ok": None}}
    assert _with_fastload_defaults(kept) == kept
    assert _with_fastload_defaults({"backend": "eager"}) == {"backend": "eager"}


def _frames_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def test_an_example_made_outside_inference_mode_primes_what_requests_inside_it_need(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The README's old pattern: the example comes from outside ``inference_mode``, requests from inside."""
    model = torch.nn.Linear(4, 4).eval()
    example = torch.randn(2, 4)
    with caplog.at_level(logging.WARNING, logger="fastload"), torch.inference_mode():
        compiled = compile_cache.compile(model, cache=(tmp_path / "s").as_uri(), backend="eager",
                                         example_inputs=(example,))
        request = torch.randn(2, 4)
        before = _frames_compiled()
        assert torch.allclose(compiled(request), model(request))
        assert _frames_compiled() == before  # no recompile on the first request
    assert "made outside torch.inference_mode()" in caplog.text
    report = compile_cache.report_of(compiled)
    assert report is not None and report.fields["grad_mode"] == "grad=False,inference=True"


def test_an_example_made_inside_inference_mode_is_primed_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = torch.nn.Linear(4, 4).eval()
    with caplog.at_level(logging.WARNING, logger="fastload"), torch.inference_mode():
        compiled = compile_cache.compile(model, cache=(tmp_path / "s").as_uri(), backend="eager",
                                         example_inputs=(torch.randn(2, 4),))
        before = _frames_compiled()
        compiled(torch.randn(2, 4))
        assert _frames_compiled() == before
    assert caplog.text == ""


def test_more_example_inputs_are_primed_and_keyed(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 4).eval()
    url = (tmp_path / "s").as_uri()
    with torch.inference_mode():
        one = compile_cache.compile(model, cache=url, backend="eager", example_inputs=torch.randn(2, 4))
        several = compile_cache.compile(model, cache=url, backend="eager", example_inputs=torch.randn(2, 4),
                                        more_example_inputs=[(torch.randn(8, 4),), {"input": torch.randn(3, 4)}])
        before = _frames_compiled()
        several(torch.randn(8, 4))
        several(torch.randn(3, 4))
        assert _frames_compiled() == before  # every shape was compiled while priming
    first, both = compile_cache.report_of(one), compile_cache.report_of(several)
    assert first is not None and both is not None
    assert "more_calls" in both.stages and "more_calls" not in first.stages
    assert both.key != first.key and both.fields["inputs"].startswith(first.fields["inputs"] + "+")
    loaded, loaded_report = compile_cache.compile_loaded_model(  # what load_model(compile={...}) passes
        model, compile={"backend": "eager", "more_example_inputs": [(torch.randn(8, 4),)]}, compile_cache=url,
        example_inputs=torch.randn(2, 4))
    assert loaded_report is not None and "more_calls" in loaded_report.stages
    assert "+" in loaded_report.fields["inputs"] and loaded is not model
    with pytest.raises(compile_cache.CompileCacheError, match="more_example_inputs is a sequence"):
        compile_cache.compile(model, cache=url, backend="eager", more_example_inputs=torch.randn(2, 4))


def test_a_directory_path_is_a_directory_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Linear(4, 4)
    compiled = compile_cache.compile(model, cache=str(tmp_path / "srv" / "compile-cache"), backend="eager",
                                     example_inputs=torch.randn(1, 4))
    report = compile_cache.report_of(compiled)
    assert report is not None and report.cache_url == (tmp_path / "srv" / "compile-cache").as_uri()
    monkeypatch.chdir(tmp_path)
    relative = compile_cache.CompileCache("relative/cc")
    assert relative.url == (tmp_path / "relative" / "cc").as_uri()  # absolute: workers may chdir
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.CompileCache("~/cc").url == (tmp_path / "home" / "cc").as_uri()
    loaded, _ = compile_cache.compile_loaded_model(model, compile={"backend": "eager"},
                                                   compile_cache=tmp_path / "as-pathlib",
                                                   example_inputs=torch.randn(1, 4))
    loaded_report = compile_cache.report_of(loaded)
    assert loaded_report is not None and loaded_report.cache_url == (tmp_path / "as-pathlib").as_uri()


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


# --- review: a password in the cache URL stays out of the report, the hook and the log ---


def test_a_password_in_the_cache_url_stays_out_of_the_report_hook_and_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from fastload_core import plugins

    notified: list[Any] = []
    monkeypatch.setattr(plugins, "notify", lambda hook, **kwargs: notified.append((hook, kwargs)))
    url = f"redis://:hunter2@127.0.0.1:1/0?connect_timeout=0.2&prefix=leak-{os.getpid()}:"  # nothing listens
    with caplog.at_level(logging.INFO, logger="fastload"):
        compiled = compile_cache.compile(torch.nn.Linear(2, 2), cache=url, backend="eager",
                                         example_inputs=torch.randn(1, 2))
    report = compile_cache.report_of(compiled)
    assert report is not None and report.lookup == "unavailable"
    assert report.cache_url == "redis://***@127.0.0.1:1/0?connect_timeout=0.2" + f"&prefix=leak-{os.getpid()}:"
    [(hook, kwargs)] = notified
    assert hook == "after_compile" and kwargs["report"].cache_url == report.cache_url
    assert "compile cache" in caplog.text and "hunter2" not in caplog.text
    assert "hunter2" not in repr(report) and "hunter2" not in report.summary()


# --- review: a local cache directory that cannot be created makes compile() uncached, never failed ---


def test_an_unwritable_local_cache_directory_compiles_without_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    monkeypatch.setenv("FASTLOAD_CACHE_DIR", str(tmp_path / "a-file" / "fastload"))  # NotADirectoryError
    x = torch.randn(1, 3)
    model = torch.nn.Linear(3, 3)
    with caplog.at_level(logging.WARNING, logger="fastload"):
        compiled = compile_cache.compile(model, cache=(tmp_path / "entries").as_uri(), backend="eager",
                                         example_inputs=x)
    report = compile_cache.report_of(compiled)
    assert report is not None and report.lookup == "skipped"
    assert "cannot create the local inductor directory" in report.notes[0]
    assert str(tmp_path / "a-file" / "fastload") in caplog.text and "compiling without the cache" in caplog.text
    assert torch.equal(compiled(x), model(x))
