"""What a model's ``model-config.yaml`` asks of fastload: the ``handler.fastload`` section, the ``pt2``
compile section and ``startupTimeout``, read and checked before anything is fetched.

Reading the whole configuration first means a typo fails the worker's load at once with a message that
names the key, instead of minutes later or as a ``KeyError`` deep in a download. Nothing here imports
TorchServe, so the checks are usable (and tested) without it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastload_core.compile_cache.errors import CacheURLError
from fastload_core.errors import FastloadError
from fastload_core.serving import check_compile_cache_url
from fastload_core.storage.settings import TIER_ORDER

DEFAULT_STARTUP_TIMEOUT = 120  # TorchServe's own default for startupTimeout, in seconds
KEYS = ("uri", "revision", "prefetch", "compile_cache")


class HandlerConfigError(FastloadError):
    """``model-config.yaml`` asks for something fastload cannot do; ``key`` names the setting."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"model-config.yaml {key}: {problem}")


@dataclass(frozen=True)
class HandlerConfig:
    """The parsed settings. ``uri`` None means the weights ship in the archive (``serializedFile``);
    ``compile`` None means no ``torch.compile``, else the arguments to pass it."""

    uri: str | None = None
    revision: str | None = None
    prefetch: str | None = None
    compile_cache: str | None = None
    compile: dict[str, Any] | None = field(default=None)
    startup_timeout: int = DEFAULT_STARTUP_TIMEOUT

    @classmethod
    def from_model_config(cls, model_yaml_config: Mapping[str, Any] | None) -> HandlerConfig:
        """Parse TorchServe's ``context.model_yaml_config`` (an empty dict when the archive has none)."""
        config = model_yaml_config or {}
        if not isinstance(config, Mapping):
            raise HandlerConfigError("(top level)", f"expected a mapping, got {type(config).__name__}")
        handler = config.get("handler") or {}
        if not isinstance(handler, Mapping):
            raise HandlerConfigError("handler", f"expected a mapping, got {type(handler).__name__}")
        section = handler.get("fastload") or {}
        if not isinstance(section, Mapping):
            raise HandlerConfigError("handler.fastload", f"expected a mapping of {', '.join(KEYS)}, "
                                     f"got {type(section).__name__}")
        unknown = sorted(str(key) for key in section if key not in KEYS)
        if unknown:
            raise HandlerConfigError(f"handler.fastload.{unknown[0]}",
                                     f"unknown setting; the settings are {', '.join(KEYS)}")
        uri = _text(section, "uri")
        revision = _text(section, "revision")
        prefetch = _text(section, "prefetch")
        if prefetch is not None and prefetch not in TIER_ORDER:
            raise HandlerConfigError("handler.fastload.prefetch",
                                     f"{prefetch!r} is not a tier; use one of {', '.join(TIER_ORDER)}")
        if uri is None:  # the weights come from the archive, which has no versions and is already local
            for key, value in (("revision", revision), ("prefetch", prefetch)):
                if value is not None:
                    raise HandlerConfigError(f"handler.fastload.{key}", "needs handler.fastload.uri (where to "
                                             "fetch the weights from); set it, or remove this setting")
        compile_cache = _text(section, "compile_cache")
        if compile_cache is not None:  # a typo fails here, not after the download or as a cold compile
            try:
                check_compile_cache_url(compile_cache)
            except CacheURLError as exc:
                raise HandlerConfigError("handler.fastload.compile_cache", str(exc)) from None
        return cls(
            uri=uri,
            revision=revision,
            prefetch=prefetch,
            compile_cache=compile_cache,
            compile=compile_arguments(config.get("pt2")),
            startup_timeout=_startup_timeout(config.get("startupTimeout", DEFAULT_STARTUP_TIMEOUT)),
        )


def compile_arguments(pt2: Any) -> dict[str, Any] | None:
    """``torch.compile`` arguments from the ``pt2`` section, or None when it asks for no compile.

    The forms TorchServe 0.12 reads: ``pt2: {compile: {enable: true, backend: ..., mode: ...}}``, and the
    deprecated ``pt2: inductor`` / ``pt2: {backend: ..., mode: ...}``. TorchServe's own ``BaseHandler``
    deletes ``compile.enable`` once it has read it as true, so a ``compile`` section without ``enable``
    (read before by other code, or written without it) counts as enabled. The caller's mapping is copied,
    never changed. ``pt2.export`` (an AOT-compiled ``.so`` in the archive) is not a weights file fastload
    can load, so it is refused.
    """
    if pt2 is None:
        return None
    if isinstance(pt2, str):
        return {"backend": pt2}
    if not isinstance(pt2, Mapping):
        raise HandlerConfigError("pt2", f"expected a backend name or a mapping, got {type(pt2).__name__}")
    if "export" in pt2:
        raise HandlerConfigError("pt2.export", "an AOT-exported model is loaded by TorchServe's BaseHandler, "
                                 "not through fastload; remove pt2.export or use the stock handler")
    if "compile" not in pt2:
        return _string_keys(copy.deepcopy(dict(pt2)), "pt2")
    section = pt2["compile"]
    if not isinstance(section, Mapping):
        raise HandlerConfigError("pt2.compile", f"expected a mapping, got {type(section).__name__}")
    options = _string_keys(copy.deepcopy(dict(section)), "pt2.compile")
    enable = options.pop("enable", True)
    if not isinstance(enable, bool):
        raise HandlerConfigError("pt2.compile.enable", f"expected true or false, got {enable!r}")
    return options if enable else None


def _string_keys(options: dict[Any, Any], where: str) -> dict[str, Any]:
    bad = [key for key in options if not isinstance(key, str)]
    if bad:
        raise HandlerConfigError(where, f"keys must be torch.compile argument names, got {bad[0]!r}")
    return options


def _text(section: Mapping[str, Any], key: str) -> str | None:
    value = section.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise HandlerConfigError(f"handler.fastload.{key}", f"expected a non-empty string, got {value!r}")
    return value.strip()


def _startup_timeout(value: Any) -> int:
    """TorchServe's frontend reads ``startupTimeout`` only as an integer: for ``300.0`` it logs a warning and
    keeps its default, killing the worker at 120 s while fastload would still be waiting for the weights."""
    if isinstance(value, float) and math.isfinite(value) and value > 0:
        raise HandlerConfigError("startupTimeout", f"TorchServe ignores {value!r} (it reads only whole seconds) "
                                 f"and keeps its default of {DEFAULT_STARTUP_TIMEOUT}; write startupTimeout: "
                                 f"{math.ceil(value)}")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise HandlerConfigError("startupTimeout", f"expected a whole number of seconds above 0, got {value!r}")
    return value
