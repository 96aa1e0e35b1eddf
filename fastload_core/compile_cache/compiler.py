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
``options={"cpp_cache_precompile_headers": True}`` to keep it. A second one skips inductor's CPU
vector-ISA probe (``cpp.vec_isa_ok=True``): every fresh process otherwise builds a test library and
spawns a Python child per candidate ISA to ``dlopen`` it, which on a busy 2-core node cost several
seconds of every warm start, although the key already pins the ISA (``cpu_isa``) and the torch build
the entry was compiled for. Pass ``options={"cpp.vec_isa_ok": None}`` to have inductor probe again.

Examples are primed under the grad mode of the ``compile()`` call, and example tensors are made to
match it: a tensor made outside ``torch.inference_mode()`` but primed inside it (or the reverse) would
leave dynamo a guard that the first real request fails, recompiling outside the cache.
``more_example_inputs`` primes further calls (other batch sizes, other shapes) in the same first
compile, so each of their graphs is stored in, and restored from, the same entry.
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
from typing import Any, Literal, TypeVar, cast

import torch

from .. import plugins
from .._compat import COMPILE_CACHE_MINIMUM, require_torch
from .cache import CompileCache, inductor_cache_dir
from .errors import CompileCacheError
from .keys import derive_key

log = logging.getLogger("fastload.compile_cache")

F = TypeVar("F", bound=Callable[..., Any])

_COUNTERS = {
    "fxgraph_cache_hit": ("inductor", "fxgraph_cache_hit"),
    "fxgraph_cache_miss": ("inductor", "fxgraph_cache_miss"),
    "fxgraph_cache_bypass": ("inductor", "fxgraph_cache_bypass"),
    "autograd_cache_hit": ("aot_autograd", "autograd_cache_hit"),
    "autograd_cache_miss": ("aot_autograd", "autograd_cache_miss"),
    "autograd_cache_bypass": ("aot_autograd", "autograd_cache_bypass"),
}


#: What the cache did for a compile: see ``CompileReport.status``.
CompileStatus = Literal["hit", "miss", "partial", "none"]


@dataclass
class CompileReport:
    """What one compile cost and what the cache did for it.

    ``status``: ``hit`` (artifacts came from the cache and inductor compiled nothing), ``miss`` (inductor
    compiled), ``partial`` (an entry was restored but inductor still compiled some graphs: the entry
    does not cover this process's configuration) or ``none`` (nothing was compiled at all, e.g. a
    function dynamo skips). ``source`` is where artifacts came from: the cache URL, ``local`` (this
    node's directory from an earlier replica) or None. ``served_by`` is the path that serves the
    model: ``torch.compile``, or ``aoti-package`` (``export=True``: an AOTInductor package run by
    torch's C++ runner, no dynamo); when ``export=True`` could not be used, ``notes`` say why.
    """

    key: str
    cache_url: str
    status: CompileStatus = "none"
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
    served_by: str = "torch.compile"

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
        return f"compile cache {self.status} [{self.key}] {what}{stored}; served by {self.served_by}; {stages}"


def compile(
    model_or_fn: F,
    *,
    cache: str | os.PathLike[str] | CompileCache | None = None,
    example_inputs: Any = None,
    more_example_inputs: Sequence[Any] = (),
    extra: str = "",
    export: bool = False,
    **torch_compile_kwargs: Any,
) -> F:
    """``torch.compile`` whose first compile is restored from, or stored to, a shared compile cache.

    ``cache`` is a URL (``file:///dir``, ``redis://host:port/db``, ``s3://bucket/prefix``, or a plugin's
    scheme), a directory path (``/srv/compile-cache``), a ``CompileCache``, or None for
    ``$FASTLOAD_COMPILE_CACHE`` or a directory under the fastload cache. With ``example_inputs`` (a
    tensor, a tuple of positional arguments, or a dict of keyword arguments) the model is compiled and
    run once now, under the caller's grad mode, so the first request does not pay; serve under the
    same grad mode (call this inside ``torch.inference_mode()`` and serve inside it) or dynamo
    recompiles. Example tensors made in another mode than the call's are copied into the call's mode
    (with a warning), since the first request would otherwise fail dynamo's guard on them. Without
    ``example_inputs`` the first call primes the cache. ``more_example_inputs`` is a sequence of further
    calls' inputs (each like ``example_inputs``: other batch sizes or shapes) primed in the same first
    compile, so every graph they need is stored in and restored from one entry; ``dynamic=True`` is
    the other way to serve many shapes. ``extra`` is folded into the key, for anything else the
    artifacts depend on.

    ``export=True`` (an nn.Module with ``example_inputs``, called under ``torch.inference_mode()`` or
    ``torch.no_grad()``) serves the example's signature from an AOTInductor package instead: built with
    ``torch.export`` on a miss, stored in the same cache, and loaded on a hit by torch's C++ runner
    without importing dynamo or inductor, which is most of a warm start through torch.compile. Other
    calls, and models the package path cannot take (a CUDA model too, unless ``FASTLOAD_EXPORT_ON_CUDA=1``:
    torch 2.11's loader crashed on CUDA), go through torch.compile as without it; the
    report's ``served_by`` says which path served and its notes say why (see docs/compile_cache.md).

    The report is at ``report_of(compiled)`` once the first compile has happened. The cache never makes
    this fail: any cache problem degrades to a normal compile and a logged warning.
    """
    require_torch("the compile cache (torch.compiler.save_cache_artifacts)", COMPILE_CACHE_MINIMUM)
    cc = cache if isinstance(cache, CompileCache) else CompileCache(cache)
    compile_kwargs = _with_fastload_defaults(torch_compile_kwargs)
    if isinstance(more_example_inputs, (str, bytes)) or not isinstance(more_example_inputs, Sequence):
        raise CompileCacheError("more_example_inputs is a sequence of example inputs (one per call), e.g. "
                                f"[(batch_of_8,), (batch_of_32,)], not {type(more_example_inputs).__name__}")
    export_note = ""
    if export:
        served, export_note = _compile_exported(model_or_fn, cc, compile_kwargs, example_inputs,
                                                more_example_inputs, extra, torch_compile_kwargs)
        if served is not None:
            return cast(F, served)
    mark = time.perf_counter()
    compiled: Any = torch.compile(model_or_fn, **compile_kwargs)  # imports dynamo the first time
    compile_call_s = time.perf_counter() - mark
    more = [_split_inputs(inputs) for inputs in more_example_inputs]
    primer = _Primer(model_or_fn, cc, compile_kwargs, extra, more, compile_call_s, export_note)
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


def _compile_exported(model: Any, cache: CompileCache, compile_kwargs: dict[str, Any], example_inputs: Any,
                      more_example_inputs: Sequence[Any], extra: str, torch_compile_kwargs: dict[str, Any],
                      ) -> tuple[Any, str]:
    """The package path (``exported.py``): the served model and its report, or None and why not."""
    from . import exported

    options = dict(compile_kwargs.get("options") or {})
    reason = ("export=True needs an nn.Module" if not isinstance(model, torch.nn.Module) else
              exported.unsupported_reason(compile_kwargs, example_inputs is not None, bool(more_example_inputs),
                                          exported.touches_cuda(model, example_inputs)))
    if reason is None:
        args, kwargs = _in_current_mode(*_split_inputs(example_inputs))
        # Freezing spelled out: the key would otherwise ask inductor's config, importing dynamo.
        export_kwargs = {**compile_kwargs, "options": {**options, "freezing": False}}

        def fallback() -> Any:
            return _compile(model, cache=cache, extra=extra, **torch_compile_kwargs)

        try:
            served, report = exported.compile_packaged(model, cache, export_kwargs, args, kwargs, extra,
                                                       fallback, CompileReport)
        except exported.ExportUnsupported as exc:
            reason = str(exc)
        else:
            _attach(served, report)
            log.info("%s", report.summary())
            plugins.notify("after_compile", report=report)
            return served, ""
    note = f"export=True not used: {reason}; served by torch.compile"
    log.warning("compile cache: %s", note)
    return None, note


def compile_loaded_model(
    model: torch.nn.Module,
    *,
    compile: bool | Mapping[str, Any] = True,  # the same name as load_model's argument
    compile_cache: str | os.PathLike[str] | CompileCache | None = None,
    example_inputs: Any = None,
) -> tuple[torch.nn.Module, CompileReport | None]:
    """What ``load_model(..., compile=..., compile_cache=..., example_inputs=...)`` calls last.

    ``compile`` is False (return the model as is), True (default torch.compile arguments) or a mapping
    of torch.compile arguments (``{"mode": "max-autotune"}``), which may also hold ``extra`` and
    ``more_example_inputs`` (see ``compile``). The report is None when there were no example inputs:
    it appears on ``report_of(model)`` after the first call.
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
                 extra: str, more: Sequence[tuple[tuple[Any, ...], dict[str, Any]]] = (),
                 compile_call_s: float = 0.0, note: str = "") -> None:
        self.model = model
        self.cache = cache
        self.compile_kwargs = compile_kwargs
        self.extra = extra
        self.more = list(more)
        self.compile_call_s = compile_call_s
        self.note = note
        self.lock = threading.RLock()
        self.report: CompileReport | None = None
        self._output: Any = None

    def pop_output(self) -> Any:
        output, self._output = self._output, None
        return output

    def prime(self, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
              *, keep_output: bool = False) -> CompileReport:
        stages: dict[str, float] = {"torch_compile": self.compile_call_s}
        args, kwargs = _in_current_mode(args, kwargs)
        more = [_in_current_mode(a, k) for a, k in self.more]
        mark = time.perf_counter()
        try:
            key = derive_key(self.model, args=args, kwargs=kwargs, compile_kwargs=self.compile_kwargs,
                             extra=self.extra, more_inputs=more)
        except Exception as exc:  # an exotic model or input: compile it, just without the cache
            return self._uncached(call, args, kwargs, keep_output, f"could not derive a cache key: {exc!r}")
        workdir = self.cache.workdir(key)
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # FASTLOAD_CACHE_DIR read-only, full, or under a file: compile, just uncached
            return self._uncached(call, args, kwargs, keep_output,
                                  f"cannot create the local inductor directory {workdir} ({exc!r})")
        report = CompileReport(key=key.digest, cache_url=self.cache.url, fields=key.fields,
                               workdir=str(workdir), notes=[self.note] if self.note else [])
        stages["key"] = time.perf_counter() - mark
        with inductor_cache_dir(workdir):
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
            with _no_compile_workers(restored=report.source is not None):
                mark = time.perf_counter()
                output = call(*args, **kwargs)
                stages["first_call"] = time.perf_counter() - mark
                if more:
                    mark = time.perf_counter()
                    for more_args, more_kwargs in more:
                        call(*more_args, **more_kwargs)
                    stages["more_calls"] = time.perf_counter() - mark
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
        plugins.notify("after_compile", report=report)
        return report


    def _uncached(self, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                  keep_output: bool, problem: str) -> CompileReport:
        log.warning("compile cache %s: %s; compiling without the cache", self.cache.url, problem)
        report = CompileReport(key="", cache_url=self.cache.url, lookup="skipped", notes=[problem])
        mark = time.perf_counter()
        output = call(*args, **kwargs)
        report.stages = {"first_call": time.perf_counter() - mark}
        for more_args, more_kwargs in self.more:  # still warmed, just not through the cache
            call(*more_args, **more_kwargs)
        if keep_output:
            self._output = output
        self.report = report
        plugins.notify("after_compile", report=report)
        return report


@contextmanager
def _no_compile_workers(*, restored: bool) -> Iterator[None]:
    """With a restored entry, load kernels in this process instead of through inductor's worker pool.

    With Triton installed, inductor's first compile starts a pool of subprocesses (each imports torch and
    Triton) and hands kernel loading to it; on a hit there is nothing to compile, so that start-up is
    pure overhead on the replica's critical path. ``compile_threads`` is one of the settings inductor
    leaves out of its cache keys, so the restored graphs still hit. Without a restored entry, or when
    the user set ``TORCHINDUCTOR_COMPILE_THREADS``, nothing changes.
    """
    if not restored or "TORCHINDUCTOR_COMPILE_THREADS" in os.environ:
        yield
        return
    import torch._inductor.config as inductor_config

    with inductor_config.patch(compile_threads=1):
        yield


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
    options.setdefault("cpp.vec_isa_ok", True)
    result["options"] = options
    return result


def _in_current_mode(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Example tensors as requests made in the current grad mode would be.

    Dynamo guards on whether an input is an inference tensor. An example made outside
    ``torch.inference_mode()`` and primed inside it (the README's old pattern) left a graph that the
    first real request, made inside, failed ("dispatch key set mismatch"), and that recompile never
    went through the cache. So an example of the other kind is copied into the current mode, with a
    warning that requests must be made in that mode too.
    """
    inference = torch.is_inference_mode_enabled()
    converted: list[str] = []

    def convert(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_inference() != inference:
            converted.append(f"{tuple(value.shape)}")
            if inference:
                return value.clone()  # inside inference mode: an inference tensor
            with torch.inference_mode(False):
                return value.clone()  # outside it: an ordinary tensor
        if isinstance(value, tuple):
            return type(value)(*map(convert, value)) if hasattr(value, "_fields") else tuple(map(convert, value))
        if isinstance(value, list):
            return [convert(item) for item in value]
        if isinstance(value, dict):
            return {name: convert(item) for name, item in value.items()}
        return value

    new_args = tuple(convert(a) for a in args)
    new_kwargs = {name: convert(value) for name, value in kwargs.items()}
    if converted:
        made, primed = ("outside", "inside") if inference else ("inside", "outside")
        log.warning("compile cache: example tensor(s) %s were made %s torch.inference_mode() but compile() "
                    "runs %s it; priming with copies made %s it. Make requests %s torch.inference_mode() "
                    "as well, or dynamo recompiles on the first one (outside the cache).",
                    ", ".join(converted), made, primed, primed, primed)
    return new_args, new_kwargs


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
