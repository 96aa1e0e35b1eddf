"""``compile(..., export=True)``: serve an exportable model from an AOTInductor package.

Why a second path: two thirds of a warm replica's start through ``torch.compile`` is importing dynamo
and inductor (issue 13), which no restored entry can skip. An AOTInductor package (``torch.export``
+ ``aoti_compile_and_package``) is a shared library plus a small archive, run by torch's C++ runner
(``torch._C._aoti.AOTIModelPackageLoader``), which needs neither: measured on the 2-core CPU machine,
a small MLP's package loaded and ran its first call in 0.02 s in a fresh process, against seconds for
``torch.compile()``'s imports alone. This module therefore imports nothing from ``torch._dynamo`` or
``torch._inductor`` on a hit; only a miss (which exports and compiles) does.

What keeps it correct:

- The key is the torch.compile path's key (torch build, device, compile options, model code and
  layout, the example's shapes/dtypes/strides, grad mode) plus ``serve=aoti-package``, so the two
  paths never read each other's entries.
- Weights are not in the package: the model is exported with its parameters and buffers as inputs
  (``torch.func.functional_call``), and every call passes the live model's tensors, because the key
  describes their layout, not their values: two replicas of one architecture with different weights
  share an entry, and each computes with its own. (Keeping them as graph constants and swapping them
  in with ``load_constants`` is not enough: AOTInductor folds expressions of constants, e.g. a bias
  plus a buffer, into the library at build time, and those kept the building replica's values.)
- The package has no guards of its own, so every call is checked against the example's signature
  (structure, each tensor's shape, dtype, device and strides, plain values) and the grad mode (the
  runner records no autograd graph). Anything else goes to an ordinary ``fastload_core.compile`` of the
  same model, made on first need, with one warning.
- Whatever stops the package from being built or used (a model ``torch.export`` rejects, grad mode on,
  ``dynamic=True``, freezing, another backend, a package the runner refuses, a CUDA model without
  ``FASTLOAD_EXPORT_ON_CUDA=1``) falls back to the torch.compile path, and the report says which path
  served and why.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree

from .cache import inductor_cache_dir
from .keys import derive_key

if TYPE_CHECKING:
    from .cache import CompileCache
    from .compiler import CompileReport

log = logging.getLogger("fastload.compile_cache")

#: The one file an exported entry carries.
PACKAGE = "model.pt2"
#: What ``CompileReport.served_by`` says for each path.
SERVED_BY_PACKAGE = "aoti-package"
SERVED_BY_COMPILE = "torch.compile"
#: Set to 1 to serve CUDA models from packages. Off by default because a failure there is a crash, not an
#: error: on torch 2.11.0+cu130 (an H200, driver 580.159.04, 2026-11-28) the package loader segfaulted the
#: process on a package built a moment before, in fastload's GPU test and in torch's own
#: ``aoti_load_package`` of a two-layer model alike. A replica that dies on start-up is worse than one
#: that compiles, so CUDA models take the torch.compile path unless the operator has seen
#: ``test_gpu_fresh_replica_is_served_by_the_package`` pass on their torch build.
EXPORT_ON_CUDA_ENV = "FASTLOAD_EXPORT_ON_CUDA"


class ExportUnsupported(Exception):
    """This model or call cannot be served from a package; the message says why (for the report)."""


def unsupported_reason(compile_kwargs: Mapping[str, Any], has_examples: bool, has_more: bool,
                       on_cuda: bool) -> str | None:
    """Why the package path cannot serve this ``compile()`` call, or None if it can try. ``on_cuda``: the
    package would run on CUDA (``touches_cuda``)."""
    options = compile_kwargs.get("options") or {}
    if on_cuda and os.environ.get(EXPORT_ON_CUDA_ENV) != "1":
        return (f"packages on CUDA are off unless {EXPORT_ON_CUDA_ENV}=1: torch 2.11.0+cu130's package loader "
                "crashed the process (segfault) in fastload's GPU check; set it where "
                "tests/compile_cache/test_exported.py's GPU test passes on your torch build")
    if not has_examples:
        return "export=True needs example_inputs (the package is built for their signature)"
    if has_more:
        return "export=True serves one signature; more_example_inputs go through torch.compile"
    if compile_kwargs.get("backend", "inductor") != "inductor":
        return f"backend {compile_kwargs.get('backend')!r} is not inductor"
    if compile_kwargs.get("dynamic"):
        return "dynamic=True: the package is built for static shapes"
    if _freezing(options):
        return "freezing folds weights into the package, which would then ignore the live model's weights"
    if torch.is_grad_enabled():
        return ("grad mode is on: the package's runner records no autograd graph; call compile() under "
                "torch.inference_mode() or torch.no_grad() to serve from a package")
    return None


def _freezing(options: Mapping[str, Any]) -> bool:
    # Not torch._inductor.config: importing it imports dynamo (3.4 s here), which this path exists to skip.
    if "freezing" in options:
        return bool(options["freezing"])
    return os.environ.get("TORCHINDUCTOR_FREEZING", "0") == "1"


class Signature:
    """What a call must look like for the package to serve it: a pytree spec and each leaf's description."""

    def __init__(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        leaves, self.spec = pytree.tree_flatten((args, dict(kwargs)))
        self.leaves = tuple(_describe(leaf) for leaf in leaves)

    def matches(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[torch.Tensor] | None:
        """The call's tensors in the package's order if it matches, else None."""
        leaves, spec = pytree.tree_flatten((args, dict(kwargs)))
        if spec != self.spec or len(leaves) != len(self.leaves):
            return None
        tensors = []
        for leaf, expected in zip(leaves, self.leaves, strict=True):
            if _describe(leaf) != expected:
                return None
            if isinstance(leaf, torch.Tensor):
                tensors.append(leaf)
        return tensors


def _describe(leaf: Any) -> tuple[Any, ...]:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride())
    # torch.export specialises on plain values: the package is only right for this exact value.
    return ("value", type(leaf), leaf)


class PackagedModel(torch.nn.Module):
    """A model served by an AOTInductor package for its example's signature, by torch.compile otherwise.

    ``_orig_mod`` is the user's model (as on torch.compile's wrapper), so ``state_dict()`` and
    attributes work as before. Its parameters and buffers are passed to the package on every call:
    change them in place (``load_state_dict``) and the package computes with the new values; a
    parameter object replaced afterwards (``load_state_dict(assign=True)``) is not seen.
    """

    def __init__(self, model: torch.nn.Module, runner: Any, signature: Signature,
                 fallback: Callable[[], Callable[..., Any]]) -> None:
        super().__init__()
        self._orig_mod = model
        self._runner = runner
        self._signature = signature
        self._out_spec = pytree.treespec_loads(runner.get_call_spec()[1])
        self._weights = list(weights_of(model).values())
        self._make_fallback = fallback
        self._fallback: Callable[..., Any] | None = None
        self._fallback_lock = threading.Lock()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        tensors = None if torch.is_grad_enabled() else self._signature.matches(args, kwargs)
        if tensors is None:
            return self._compiled()(*args, **kwargs)
        return pytree.tree_unflatten(self._runner.boxed_run([*self._weights, *tensors]), self._out_spec)

    def _compiled(self) -> Callable[..., Any]:
        with self._fallback_lock:
            if self._fallback is None:
                log.warning("compile cache: a call outside the exported signature (other shapes, dtypes, "
                            "strides or values, or grad mode on) is served by torch.compile of the same "
                            "model, compiled now")
                self._fallback = self._make_fallback()
            return self._fallback


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers in a fixed order: the package's leading inputs.

    The order is ``named_parameters()`` then ``named_buffers()`` (tied tensors once), which the key's
    layout digest pins, so the replica that built the package and one that loads it agree.
    """
    named = {name: tensor.detach() for name, tensor in model.named_parameters()}
    named.update((name, tensor.detach()) for name, tensor in model.named_buffers())
    return named


class _WeightsAsInputs(torch.nn.Module):
    """What gets exported: the model with its weights as the first argument instead of as attributes."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.names = names
        self.wrapped = [model]  # in a list, not a submodule: its tensors must not become graph constants

    def forward(self, weights: list[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        tensors = dict(zip(self.names, weights, strict=True))
        return torch.func.functional_call(self.wrapped[0], tensors, args, kwargs)


def touches_cuda(model: torch.nn.Module, example_inputs: Any) -> bool:
    """Whether a package of ``model`` traced on ``example_inputs`` would hold CUDA kernels: the package is built
    for the devices of every tensor it traces, weights and inputs alike (a weightless model on CUDA inputs, or
    a model with one layer offloaded to the CPU, counts)."""
    tensors = [*weights_of(model).values(), *pytree.tree_leaves(example_inputs)]
    return any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in tensors)


def load_runner(path: Path, model: torch.nn.Module) -> Any:
    """Load a package with the C++ runner on the model's device; ExportUnsupported if it cannot."""
    device = next((t.device for t in weights_of(model).values()), torch.device("cpu"))
    index = device.index if device.index is not None else -1  # cuda:1 stays cuda:1; -1: the default
    try:
        # (path, model name, run_single_threaded, num_runners, device_index)
        return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, index)
    except Exception as exc:
        raise ExportUnsupported(f"the AOTInductor runner could not load the package: {exc!r}") from None


def build_package(model: torch.nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any],
                  options: Mapping[str, Any], dest: Path, stages: dict[str, float]) -> None:
    """``torch.export`` the model on the example and compile it into ``dest`` (an AOTInductor package).

    The build runs in a private directory as inductor's cache, removed afterwards, so the per-key
    directory (and the stored entry) holds the package alone.
    """
    mark = time.perf_counter()
    try:
        with _torch_internal_deprecations():
            weights = weights_of(model)
            exported = torch.export.export(_WeightsAsInputs(model, list(weights)),
                                           (list(weights.values()), *args), dict(kwargs))
    except Exception as exc:
        raise ExportUnsupported(f"torch.export could not export the model: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    stages["export"] = time.perf_counter() - mark
    from torch._inductor import aoti_compile_and_package

    try:
        dest.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=".restore-aoti-", dir=dest.parent))  # gc'd like a restore's
    except OSError as exc:
        raise ExportUnsupported(f"could not make a build directory next to {dest}: {exc!r}") from None
    mark = time.perf_counter()
    try:
        with inductor_cache_dir(build), _torch_internal_deprecations():
            built = aoti_compile_and_package(exported, package_path=str(build / PACKAGE),
                                             inductor_configs=dict(options))
        os.replace(built, dest / PACKAGE)
    except Exception as exc:
        raise ExportUnsupported(f"AOTInductor could not compile the exported model: {exc!r}") from None
    finally:
        shutil.rmtree(build, ignore_errors=True)
        stages["aoti_compile"] = time.perf_counter() - mark


@contextmanager
def _torch_internal_deprecations() -> Iterator[None]:
    """Silence torch's own pytree deprecation, raised from inside the AOTInductor build (torch 2.13).

    It is torch calling its own deprecated API, nothing the user can act on; where warnings are errors
    (``-W error``, pytest's ``filterwarnings = error``) it would fail the build.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
        yield


def compile_packaged(model: torch.nn.Module, cache: CompileCache, compile_kwargs: Mapping[str, Any],
                     args: tuple[Any, ...], kwargs: dict[str, Any], extra: str,
                     fallback: Callable[[], Callable[..., Any]], report_type: type[CompileReport],
                     ) -> tuple[PackagedModel, CompileReport]:
    """Restore or build the package for this key, load it, run the first call; ExportUnsupported if not.

    A package that is restored but cannot be used (the runner refuses it) is rebuilt and the entry
    replaced, as a corrupt entry is.
    """
    stages: dict[str, float] = {}
    mark = time.perf_counter()
    try:
        key = derive_key(model, args=args, kwargs=kwargs, compile_kwargs=compile_kwargs, extra=extra,
                         serve=SERVED_BY_PACKAGE)
    except Exception as exc:
        raise ExportUnsupported(f"could not derive a cache key: {exc!r}") from None
    workdir = cache.workdir(key)
    report = report_type(key=key.digest, cache_url=cache.url, fields=key.fields, workdir=str(workdir),
                         served_by=SERVED_BY_PACKAGE)
    stages["key"] = time.perf_counter() - mark
    lookup = cache.restore(key, workdir)
    report.lookup = lookup.status
    report.entry_bytes = lookup.entry_bytes
    stages["fetch"], stages["unpack"] = lookup.fetch_s, lookup.unpack_s
    if lookup.message:
        report.notes.append(lookup.message)
    runner = None
    package = workdir / PACKAGE
    if lookup.status in ("restored", "local") and package.is_file():
        mark = time.perf_counter()
        try:
            runner = load_runner(package, model)
        except ExportUnsupported as exc:
            message = f"compile cache {cache.url}: restored package {key.digest} is unusable: {exc}; rebuilding"
            log.warning("%s", message)
            report.notes.append(message)
        stages["load_package"] = time.perf_counter() - mark
    if runner is not None:
        report.status = "hit"
        report.source = cache.url if lookup.status == "restored" else "local"
        if lookup.restored is not None:
            report.restored_files, report.restored_bytes = lookup.restored.files, lookup.restored.nbytes
    else:
        build_package(model, args, kwargs, compile_kwargs.get("options") or {}, workdir, stages)
        mark = time.perf_counter()
        runner = load_runner(package, model)
        stages["load_package"] = time.perf_counter() - mark
        report.status = "miss"
        if lookup.status == "unavailable":
            report.store = "skipped (cache unavailable)"
        else:
            overwrite = lookup.status in ("corrupt", "mismatch", "restored", "local")
            saved = cache.save(key, workdir, None, overwrite=overwrite)
            report.store, report.stored, report.entry_bytes = saved.status, saved.status == "stored", saved.entry_bytes
            stages["pack"], stages["store"] = saved.pack_s, saved.store_s
            if saved.message:
                report.notes.append(saved.message)
    served = PackagedModel(model, runner, Signature(args, kwargs), fallback)
    mark = time.perf_counter()
    served(*args, **kwargs)
    stages["first_call"] = time.perf_counter() - mark
    report.stages = stages
    return served, report
