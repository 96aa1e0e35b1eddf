"""``compile()``: torch.compile that restores its artifacts before the first call and stores them after.

The order matters. Inductor looks for cached graphs and kernels in ``TORCHINDUCTOR_CACHE_DIR`` at the
moment it compiles, which is the first call, not ``torch.compile()``. So the entry is unpacked into a
per-key directory and the first call runs with that directory (and Triton's, on GPU) in the
environment; torch documents these variables as changeable while its compile workers run. After a
first call that had to compile, that same directory holds exactly this model's artifacts, which is
what gets packed and stored.

One default differs from plain torch.compile, measured on CPU (see docs/compile_cache.md):
inductor's precompiled header is turned off, because it lives outside the cache directory (under
``$TMPDIR``, ~150 MB), is rebuilt on every fresh node even when every kernel is restored, and made a
warm start 5.5 s instead of 1.1 s while saving nothing on the cold compile of a small model; pass
``options={"cpp_cache_precompile_headers": True}`` to keep it.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

from .._compat import COMPILE_CACHE_MINIMUM, require_torch
from .cache import CompileCache
from .keys import derive_key

log = logging.getLogger("fastload.compile_cache")

F = TypeVar("F", bound=Callable[..., Any])

# The cache-directory variables are process-wide, so first calls that swap them take turns. Dynamo
# serialises compiles anyway; this only keeps two threads from pointing inductor at each other's keys.
_env_lock = threading.RLock()

_COUNTERS = {
    "fxgraph_cache_hit": ("inductor", "fxgraph_cache_hit"),
    "fxgraph_cache_miss": ("inductor", "fxgraph_cache_miss"),
    "fxgraph_cache_bypass": ("inductor", "fxgraph_cache_bypass"),
    "autograd_cache_hit": ("aot_autograd", "autograd_cache_hit"),
    "autograd_cache_miss": ("aot_autograd", "autograd_cache_miss"),
    "autograd_cache_bypass": ("aot_autograd", "autograd_cache_bypass"),
}


@dataclass
class CompileReport:
    """What one compile cost and what the cache did for it.

    ``status``: ``hit`` (artifacts came from the cache and inductor compiled nothing), ``miss`` (inductor
    compiled), ``partial`` (an entry was restored but inductor still compiled some graphs: the entry
    does not cover this process's configuration) or ``none`` (nothing was compiled at all, e.g. a
    function dynamo skips). ``source`` is where artifacts came from: the cache URL, ``local`` (this
    node's directory from an earlier replica) or None.
    """

    key: str
    cache_url: str
    status: str = "none"
    source: str | None = None
    lookup: str = ""
    stored: bool = False
    store: str = ""
    restored_files: int = 0
    restored_bytes: int = 0
    entry_bytes: int = 0
    mega_artifacts: dict[str, int] = field(default_factory=dict)
    torch_counters: dict[str, int] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fields: Mapping[str, str] = field(default_factory=dict, repr=False)
    workdir: str = ""

    @property
    def hit(self) -> bool:
        return self.status == "hit"

    def summary(self) -> str:
        stages = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in self.stages.items())
        if self.source:
            size = f"{self.restored_bytes / 1e6:.2f} MB"
            what = f"restored {self.restored_files} files ({size}) from {self.source}"
        else:
            what = f"lookup {self.lookup}"
        stored = f"; stored {self.entry_bytes / 1e6:.2f} MB" if self.stored else (
            f"; store {self.store}" if self.store else "")
        return f"compile cache {self.status} [{self.key}] {what}{stored}; {stages}"


def compile(
    model_or_fn: F,
    *,
    cache: str | CompileCache | None = None,
    example_inputs: Any = None,
    extra: str = "",
    **torch_compile_kwargs: Any,
) -> F:
    """``torch.compile`` whose first compile is restored from, or stored to, a shared compile cache.

    ``cache`` is a URL (``file:///dir``, ``redis://host:port/db``, ``s3://bucket/prefix``, or a plugin's
    scheme), a ``CompileCache``, or None for ``$FASTLOAD_COMPILE_CACHE`` or a directory under the
    fastload cache. With ``example_inputs`` (a tensor, a tuple of positional arguments, or a dict of
    keyword arguments) the model is compiled and run once now, under the caller's grad mode, so the
    first request does not pay; serve under the same grad mode (e.g. call this inside
    ``torch.inference_mode()``) or dynamo recompiles. Without it the first call primes the cache.
    ``extra`` is folded into the key, for anything else the artifacts depend on.

    The report is at ``report_of(compiled)`` once the first compile has happened. The cache never makes
    this fail: any cache problem degrades to a normal compile and a logged warning.
    """
    require_torch("the compile cache (torch.compiler.save_cache_artifacts)", COMPILE_CACHE_MINIMUM)
    cc = cache if isinstance(cache, CompileCache) else CompileCache(cache)
    compile_kwargs = _with_fastload_defaults(torch_compile_kwargs)
    compiled: Any = torch.compile(model_or_fn, **compile_kwargs)
    primer = _Primer(model_or_fn, cc, compile_kwargs, extra)
    if example_inputs is not None:
        args, kwargs = _split_inputs(example_inputs)
        report = primer.prime(compiled, args, kwargs)
        _attach(compiled, report)
        return cast(F, compiled)
    if isinstance(compiled, torch.nn.Module):
        original = compiled.forward

        @functools.wraps(original)
        def priming_forward(*args: Any, **kwargs: Any) -> Any:
            with primer.lock:
                if primer.report is None:
                    report = primer.prime(original, args, kwargs, keep_output=True)
                    # Primed: later calls go straight to the compiled forward, no lock, no check.
                    compiled.forward = original
                    _attach(compiled, report)
                    return primer.pop_output()
            return original(*args, **kwargs)

        compiled.forward = priming_forward
        _attach(compiled, None)
        return cast(F, compiled)

    @functools.wraps(compiled)
    def priming_call(*args: Any, **kwargs: Any) -> Any:
        if primer.report is None:
            with primer.lock:
                if primer.report is None:
                    report = primer.prime(compiled, args, kwargs, keep_output=True)
                    _attach(priming_call, report)
                    return primer.pop_output()
        return compiled(*args, **kwargs)

    _attach(priming_call, None)
    return cast(F, priming_call)


def compile_loaded_model(
    model: torch.nn.Module,
    *,
    compile: bool | Mapping[str, Any] = True,  # the same name as load_model's argument
    compile_cache: str | CompileCache | None = None,
    example_inputs: Any = None,
) -> tuple[torch.nn.Module, CompileReport | None]:
    """What ``load_model(..., compile=..., compile_cache=..., example_inputs=...)`` calls last.

    ``compile`` is False (return the model as is), True (default torch.compile arguments) or a mapping
    of torch.compile arguments (``{"mode": "max-autotune"}``), which may also hold ``extra``. The
    report is None when there were no example inputs: it appears on ``report_of(model)`` after the
    first call.
    """
    if compile is False:
        return model, None
    kwargs = dict(compile) if isinstance(compile, Mapping) else {}
    compiled = _compile(model, cache=compile_cache, example_inputs=example_inputs, **kwargs)
    return compiled, report_of(compiled)


_compile = compile  # reachable where a parameter named ``compile`` shadows it


def report_of(compiled: Any) -> CompileReport | None:
    """The report of a callable returned by ``compile``; None until its first compile has happened."""
    report = getattr(compiled, "fastload_report", None)
    return report if isinstance(report, CompileReport) else None


class _Primer:
    """Runs the first call of one compiled model inside its cache directory, once."""

    def __init__(self, model: Callable[..., Any], cache: CompileCache, compile_kwargs: dict[str, Any],
                 extra: str) -> None:
        self.model = model
        self.cache = cache
        self.compile_kwargs = compile_kwargs
        self.extra = extra
        self.lock = threading.RLock()
        self.report: CompileReport | None = None
        self._output: Any = None

    def pop_output(self) -> Any:
        output, self._output = self._output, None
        return output

    def prime(self, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
              *, keep_output: bool = False) -> CompileReport:
        stages: dict[str, float] = {}
        mark = time.perf_counter()
        try:
            key = derive_key(self.model, args=args, kwargs=kwargs, compile_kwargs=self.compile_kwargs,
                             extra=self.extra)
        except Exception as exc:  # an exotic model or input: compile it, just without the cache
            return self._uncached(call, args, kwargs, keep_output, f"could not derive a cache key: {exc!r}")
        workdir = self.cache.workdir(key)
        report = CompileReport(key=key.digest, cache_url=self.cache.url, fields=key.fields,
                               workdir=str(workdir))
        stages["key"] = time.perf_counter() - mark
        with _inductor_cache_dir(workdir):
            lookup = self.cache.restore(key, workdir)
            report.lookup = lookup.status
            report.entry_bytes = lookup.entry_bytes
            stages["fetch"] = lookup.fetch_s
            stages["unpack"] = lookup.unpack_s
            if lookup.message:
                report.notes.append(lookup.message)
            if lookup.restored is not None:
                report.source = self.cache.url
                report.restored_files = lookup.restored.files
                report.restored_bytes = lookup.restored.nbytes
                if lookup.restored.mega is not None:
                    mark = time.perf_counter()
                    report.mega_artifacts = _load_mega(lookup.restored.mega, report.notes)
                    stages["load_mega"] = time.perf_counter() - mark
            elif lookup.status == "local":
                report.source = "local"
            before = _counter_values()
            mark = time.perf_counter()
            output = call(*args, **kwargs)
            stages["first_call"] = time.perf_counter() - mark
            report.torch_counters = {name: value - before[name] for name, value in _counter_values().items()}
        counts = report.torch_counters
        misses = counts["fxgraph_cache_miss"] + counts["autograd_cache_miss"]
        hits = counts["fxgraph_cache_hit"] + counts["autograd_cache_hit"]
        bypassed = counts["fxgraph_cache_bypass"] + counts["autograd_cache_bypass"]
        if misses:
            report.status = "partial" if report.source else "miss"
        elif hits:
            report.status = "hit"
        if report.status == "partial":
            report.notes.append(f"the restored entry did not cover {misses} graph(s); kept it as stored")
        if misses and lookup.status in ("miss", "local", "corrupt", "mismatch"):
            mark = time.perf_counter()
            mega = _save_mega(report.notes)
            stages["save_mega"] = time.perf_counter() - mark
            saved = self.cache.save(key, workdir, mega, overwrite=lookup.status in ("corrupt", "mismatch"))
            report.store = saved.status
            report.stored = saved.status == "stored"
            report.entry_bytes = saved.entry_bytes
            stages["pack"] = saved.pack_s
            stages["store"] = saved.store_s
            if saved.message:
                report.notes.append(saved.message)
        elif misses and lookup.status == "unavailable":
            report.store = "skipped (cache unavailable)"
        if bypassed:
            report.notes.append(f"inductor bypassed its own cache for {bypassed} graph(s) (caches disabled, "
                                "or something it cannot cache); those compile on every start")
        report.stages = stages
        if keep_output:
            self._output = output
        self.report = report
        log.info("%s", report.summary())
        return report


    def _uncached(self, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                  keep_output: bool, problem: str) -> CompileReport:
        log.warning("compile cache %s: %s; compiling without the cache", self.cache.url, problem)
        report = CompileReport(key="", cache_url=self.cache.url, lookup="skipped", notes=[problem])
        mark = time.perf_counter()
        output = call(*args, **kwargs)
        report.stages = {"first_call": time.perf_counter() - mark}
        if keep_output:
            self._output = output
        self.report = report
        return report


@contextmanager
def _inductor_cache_dir(path: Path) -> Iterator[None]:
    """Point inductor (and Triton) at ``path`` for the duration, then put the previous values back."""
    names = {"TORCHINDUCTOR_CACHE_DIR": str(path), "TRITON_CACHE_DIR": str(path / "triton")}
    with _env_lock:
        previous = {name: os.environ.get(name) for name in names}
        path.mkdir(parents=True, exist_ok=True)
        os.environ.update(names)
        try:
            yield
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _with_fastload_defaults(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Turn inductor's precompiled header off unless the caller chose (see the module docstring)."""
    result = dict(kwargs)
    if result.get("backend", "inductor") != "inductor":
        return result
    mode = result.get("mode")
    options = result.get("options")
    if mode not in (None, "default"):
        if options:
            return result  # torch.compile rejects mode with options; let it say so
        from torch._inductor import list_mode_options

        # A mode is only a named set of options; spelling it out lets ours be added alongside.
        options = dict(list_mode_options(mode, result.get("dynamic")))
        result.pop("mode")
    options = dict(options or {})
    options.setdefault("cpp_cache_precompile_headers", False)
    result["options"] = options
    return result


def _split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, (str, bytes)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _attach(compiled: Any, report: CompileReport | None) -> None:
    # object.__setattr__: OptimizedModule.__setattr__ would forward the attribute to the user's module.
    object.__setattr__(compiled, "fastload_report", report)


def _counter_values() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {name: int(counters[group][counter]) for name, (group, counter) in _COUNTERS.items()}


def _load_mega(data: bytes, notes: list[str]) -> dict[str, int]:
    try:
        info = torch.compiler.load_cache_artifacts(data)
    except Exception as exc:  # the unpacked directory still holds the same entries
        notes.append(f"torch could not load the mega-cache artifacts: {exc!r}")
        log.warning("compile cache: torch could not load the mega-cache artifacts: %r", exc)
        return {}
    return {kind: len(keys) for kind, keys in info.artifacts.items()} if info is not None else {}


def _save_mega(notes: list[str]) -> bytes | None:
    try:
        saved = torch.compiler.save_cache_artifacts()
    except Exception as exc:  # the directory alone still makes a useful entry
        notes.append(f"torch could not save the mega-cache artifacts: {exc!r}")
        return None
    return saved[0] if saved is not None else None
