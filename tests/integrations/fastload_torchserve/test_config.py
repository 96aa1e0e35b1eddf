"""model-config.yaml parsing: every mistake is a HandlerConfigError naming the key, before any fetch."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fastload_torchserve.config import DEFAULT_STARTUP_TIMEOUT, HandlerConfig, HandlerConfigError, compile_arguments

from fastload_core.errors import FastloadError


def test_the_documented_section_parses() -> None:
    config = HandlerConfig.from_model_config({
        "minWorkers": 2,
        "startupTimeout": 300,
        "handler": {"fastload": {"uri": "s3://models/minilm/", "prefetch": "shm",
                                 "compile_cache": "redis://cache:6379/0", "revision": "v1"}},
    })
    assert config == HandlerConfig(uri="s3://models/minilm/", revision="v1", prefetch="shm",
                                   compile_cache="redis://cache:6379/0", compile=None, startup_timeout=300)


@pytest.mark.parametrize("yaml_config", [None, {}, {"handler": {}}, {"handler": {"fastload": None}}])
def test_no_section_means_weights_from_the_archive(yaml_config: dict[str, Any] | None) -> None:
    assert HandlerConfig.from_model_config(yaml_config) == HandlerConfig(startup_timeout=DEFAULT_STARTUP_TIMEOUT)


@pytest.mark.parametrize(
    ("yaml_config", "key", "says"),
    [
        ({"handler": {"fastload": {"url": "s3://m/"}}}, "handler.fastload.url", "uri, revision, prefetch"),
        ({"handler": {"fastload": {"prefetch": "ram"}}}, "handler.fastload.prefetch", "shm, local_disk"),
        ({"handler": {"fastload": {"uri": 3}}}, "handler.fastload.uri", "non-empty string"),
        ({"handler": {"fastload": {"uri": "  "}}}, "handler.fastload.uri", "non-empty string"),
        ({"handler": {"fastload": "s3://m/"}}, "handler.fastload", "expected a mapping"),
        ({"handler": ["fastload"]}, "handler", "expected a mapping"),
        ({"startupTimeout": "soon"}, "startupTimeout", "a whole number of seconds above 0"),
        ({"startupTimeout": 0}, "startupTimeout", "a whole number of seconds above 0"),
        # TorchServe reads only an integer: it would ignore 300.0, keep 120 and kill the worker at 120 s.
        ({"startupTimeout": 300.0}, "startupTimeout", "write startupTimeout: 300"),
        ({"startupTimeout": 90.5}, "startupTimeout", "write startupTimeout: 91"),
        ({"startupTimeout": True}, "startupTimeout", "a whole number of seconds above 0"),
        # Without a uri the weights come from the archive, so these would be silently ignored.
        ({"handler": {"fastload": {"revision": "v1"}}}, "handler.fastload.revision", "needs handler.fastload.uri"),
        ({"handler": {"fastload": {"prefetch": "shm"}}}, "handler.fastload.prefetch", "needs handler.fastload.uri"),
        ({"pt2": {"compile": {"enable": "yes"}}}, "pt2.compile.enable", "true or false"),
        ({"pt2": {"export": {"aot_compile": True}}}, "pt2.export", "stock handler"),
        ({"pt2": 3}, "pt2", "backend name or a mapping"),
        ({"handler": {"fastload": {"compile_cache": "memcached://x"}}}, "handler.fastload.compile_cache",
         "no compile-cache backend serves memcached://"),
        ({"handler": {"fastload": {"compile_cache": "cache:6379"}}}, "handler.fastload.compile_cache",
         "redis://"),
    ],
)
def test_mistakes_name_the_key(yaml_config: dict[str, Any], key: str, says: str) -> None:
    with pytest.raises(HandlerConfigError) as raised:
        HandlerConfig.from_model_config(yaml_config)
    assert raised.value.key == key
    assert str(raised.value).startswith(f"model-config.yaml {key}: ")
    assert says in str(raised.value)
    assert isinstance(raised.value, FastloadError)


@pytest.mark.parametrize(
    ("pt2", "expected"),
    [
        (None, None),
        ({"compile": {"enable": True, "backend": "inductor", "mode": "reduce-overhead"}},
         {"backend": "inductor", "mode": "reduce-overhead"}),
        ({"compile": {"enable": False, "backend": "inductor"}}, None),
        # BaseHandler deleted enable after reading it as true: still a compile.
        ({"compile": {"backend": "inductor"}}, {"backend": "inductor"}),
        ({"compile": {}}, {}),
        ("inductor", {"backend": "inductor"}),  # the deprecated forms TorchServe still reads
        ({"backend": "inductor", "mode": "max-autotune"}, {"backend": "inductor", "mode": "max-autotune"}),
    ],
)
def test_pt2_forms(pt2: Any, expected: dict[str, Any] | None) -> None:
    assert compile_arguments(pt2) == expected


def test_the_callers_config_is_not_changed() -> None:
    """TorchServe deletes pt2.compile.enable from the config it hands out; fastload never does."""
    yaml_config = {"pt2": {"compile": {"enable": True, "options": {"x": 1}}}}
    before = copy.deepcopy(yaml_config)
    parsed = HandlerConfig.from_model_config(yaml_config)
    assert yaml_config == before
    assert parsed.compile is not None
    parsed.compile["options"]["x"] = 2
    assert yaml_config == before
