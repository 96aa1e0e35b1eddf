"""``load_model``: a ready module without spending start-up on weights it is about to overwrite.

A class or factory is built with its parameters on the meta device (no allocation, no random
init) while buffers stay real, because non-persistent buffers such as rotary frequencies are
computed in ``__init__`` and never saved. Loaded tensors are then assigned, not copied, and
parameters that the module ties together (an embedding shared with the output layer) are tied
again so ``.to()`` and optimizers see one parameter, as in the original module.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

from .compile_cache import CompileCache, compile_loaded_model
from .errors import StateDictMismatchError
from .loader.api import PathOrURI, _device, dtype_for, load_state_dict
from .report import LoadReport

log = logging.getLogger("fastload")

M = TypeVar("M", bound=nn.Module)


def load_model(
    model: type[M] | Callable[[], M] | M,
    source: PathOrURI,
    device: str | int | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    lazy: bool = False,
    copy: bool = False,
    report: LoadReport | None = None,
    compile: bool | Mapping[str, Any] = False,
    compile_cache: str | CompileCache | None = None,
    example_inputs: Any = None,
) -> M:
    """Build (or take) ``model`` and give it the weights in ``source``, on ``device``, in eval mode
    (as ``from_pretrained`` does; call ``.train()`` to train it).

    ``model`` is an ``nn.Module`` subclass, a zero-argument factory, or an instance. ``strict``
    raises ``StateDictMismatchError`` naming missing, unexpected and mis-shaped keys; with
    ``strict=False`` matching keys load and modules whose weights are all missing are initialised
    by their own ``reset_parameters``. ``lazy``, ``copy`` and ``dtype`` are as in
    ``load_state_dict``; ``report`` is filled with the cost, module construction included.

    ``compile=True`` (or a dict of ``torch.compile`` arguments) returns the module compiled through
    the compile cache at ``compile_cache`` (see ``fastload_core.compile``): a new replica restores
    the artifacts an earlier one stored instead of compiling. With ``example_inputs`` the compile
    happens here, at start-up, and ``report_of(model)`` says whether it hit.
    """
    started = time.perf_counter()
    _device(device)  # a device this machine lacks fails here, before anything is built or read
    report = report if report is not None else LoadReport(source=str(source), device=str(device))
    if isinstance(model, nn.Module):
        module = model
    else:
        with _parameters_on_meta():
            module = model()
        if not isinstance(module, nn.Module):
            raise TypeError(f"load_model: {model!r} built a {type(module).__name__}, not a torch.nn.Module")
    report.add_stage("build", time.perf_counter() - started)
    state = load_state_dict(source, device, dtype=dtype, copy=copy, lazy=lazy, report=report)
    assigned_at = time.perf_counter()
    _assign(module, state, strict=strict, device=_device(device), dtype=dtype)
    module.eval()  # a model loaded to serve; a warm-up call in train mode would also update BN statistics
    report.add_stage("assign", time.perf_counter() - assigned_at)
    if compile is not False:
        compiled_at = time.perf_counter()
        module, _ = compile_loaded_model(
            module, compile=compile, compile_cache=compile_cache, example_inputs=example_inputs
        )
        report.add_stage("compile", time.perf_counter() - compiled_at)
    report.seconds = time.perf_counter() - started
    return module  # type: ignore[return-value]  # a factory's result was checked above


async def load_model_async(
    model: type[M] | Callable[[], M] | M,
    source: PathOrURI,
    device: str | int | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    lazy: bool = False,
    copy: bool = False,
    report: LoadReport | None = None,
    compile: bool | Mapping[str, Any] = False,
    compile_cache: str | CompileCache | None = None,
    example_inputs: Any = None,
) -> M:
    """``load_model`` for code running on an event loop (a Ray Serve replica, an ASGI app): the fetch and
    the load run in a worker thread, so the loop keeps serving other requests meanwhile. The arguments,
    the result and the errors are ``load_model``'s.

    Reading weights is file I/O and copies that release the GIL, so the loop stays responsive; a
    ``compile=True`` load holds the GIL for longer stretches (Python-level tracing), which slows the loop
    but does not stop it.
    """
    return await asyncio.to_thread(
        load_model, model, source, device, dtype=dtype, strict=strict, lazy=lazy, copy=copy, report=report,
        compile=compile, compile_cache=compile_cache, example_inputs=example_inputs,
    )


# Initialisers that modules call from reset_parameters. On meta tensors they do nothing useful, and
# the first meta normal_ in a process imports torch._dynamo (~0.8 s), so they are skipped there.
_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)  # fmt: skip


class _MetaBuild:
    """Like accelerate's ``init_empty_weights(include_buffers=False)``: parameters are born on meta, and
    ``torch.nn.init`` skips them, for the thread building the model only.

    The hooks are process-wide (``nn.Module.register_parameter``), so they are installed by the first build
    and restored by the last, under a lock: with each build saving and restoring them on its own, two
    overlapping builds (a Ray replica's live swap beside a multiplexed load) restored each other's hooks and
    left every later module on meta. A per-thread depth keeps modules other threads build meanwhile real."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._builds = 0
        self._saved: tuple[Callable[..., None], dict[str, Callable[..., Any]]] | None = None
        self._thread = threading.local()

    def _here(self) -> bool:
        return getattr(self._thread, "depth", 0) > 0

    def _install(self) -> None:
        original = nn.Module.register_parameter
        initialisers = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
        self._saved = (original, initialisers)
        here = self._here

        def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
            original(self, name, param)
            if here() and param is not None and param.device.type != "meta":
                meta = type(param)(param.to("meta"), requires_grad=param.requires_grad)
                meta.__dict__.update(param.__dict__)
                self._parameters[name] = meta

        def skip_on_meta(function: Callable[..., Any]) -> Callable[..., Any]:
            def initialise(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                return tensor if here() and tensor.is_meta else function(tensor, *args, **kwargs)

            return initialise

        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
        for name, function in initialisers.items():
            setattr(nn.init, name, skip_on_meta(function))

    def _restore(self) -> None:
        assert self._saved is not None
        original, initialisers = self._saved
        nn.Module.register_parameter = original  # type: ignore[method-assign]
        for name, function in initialisers.items():
            setattr(nn.init, name, function)
        self._saved = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._builds == 0:
                self._install()
            self._builds += 1
        self._thread.depth = getattr(self._thread, "depth", 0) + 1
        try:
            yield
        finally:
            self._thread.depth -= 1
            with self._lock:
                self._builds -= 1
                if self._builds == 0:
                    self._restore()


_parameters_on_meta = _MetaBuild()


def _assign(module: nn.Module, state: dict[str, torch.Tensor], *, strict: bool, device: torch.device,
            dtype: torch.dtype | None) -> None:
    tied = _tied_groups(module)
    expected = module.state_dict(keep_vars=True)
    for group in tied:  # a checkpoint saved with tied weights deduplicated names only one of them
        present = next((name for name in group if name in state), None)
        if present is not None:
            for name in group:
                state.setdefault(name, state[present])
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    mismatched = [
        (name, tuple(expected[name].shape), tuple(tensor.shape))
        for name, tensor in state.items()
        if name in expected and expected[name].shape != tensor.shape
    ]
    if strict and (missing or unexpected or mismatched):
        raise StateDictMismatchError(missing, unexpected, mismatched)
    for name, _, _ in mismatched:
        del state[name]
    module.load_state_dict(state, strict=False, assign=True)
    _materialize_missing(module, missing + [name for name, _, _ in mismatched], device, dtype)
    for group in tied:
        first = module.get_parameter(group[0])
        for name in group[1:]:
            owner, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(owner), attribute, first)
    _move_remaining(module, device, dtype)


def _tied_groups(module: nn.Module) -> list[list[str]]:
    by_identity: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        by_identity.setdefault(id(param), []).append(name)
    return [names for names in by_identity.values() if len(names) > 1]


def _materialize_missing(module: nn.Module, missing: list[str], device: torch.device,
                         dtype: torch.dtype | None) -> None:
    """Give keys the checkpoint did not fill (absent, or mis-shaped under ``strict=False``) real memory on
    ``device``, floating point in ``dtype`` like the loaded ones, so the model runs in one place and one
    precision: the module's own init where it owns only such tensors (a freshly added head, say), zeros
    otherwise, so nothing is left on meta. A model passed built has them already: they are moved along."""
    if not missing:
        return
    log.warning("fastload: %d key(s) the checkpoint did not fill were initialised: %s",
                len(missing), ", ".join(missing[:10]))
    wanted = set(missing)
    for prefix, submodule in module.named_modules():
        slots = [(table, name) for table in (submodule._parameters, submodule._buffers) for name in table
                 if table[name] is not None]
        empty = [(table, name) for table, name in slots if table[name].device.type == "meta"]
        for table, name in slots:
            old = table[name]
            assert old is not None
            if not old.is_meta and f"{prefix}.{name}".lstrip(".") not in wanted:
                continue
            kind = dtype_for(old, dtype)
            new = torch.zeros_like(old, device=device, dtype=kind) if old.is_meta else \
                old.detach().to(device=device, dtype=kind)
            table[name] = nn.Parameter(new, old.requires_grad) if isinstance(old, nn.Parameter) else new
        reset: Any = getattr(submodule, "reset_parameters", None)
        if empty and len(empty) == len(slots) and callable(reset):
            with torch.no_grad():
                reset()


def _move_remaining(module: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """Buffers computed at build time (non-persistent) still live on the CPU, in the build's dtype: move
    them along, and give floating ones ``dtype`` as ``module.to(dtype)`` would, or a bfloat16 model fails
    on its first float32 buffer (a rotary ``inv_freq``, say) with mixed dtypes."""
    for submodule in module.modules():
        for name, buffer in submodule._buffers.items():
            if buffer is not None and buffer.device.type != "meta":
                submodule._buffers[name] = buffer.to(device=device, dtype=dtype_for(buffer, dtype))
