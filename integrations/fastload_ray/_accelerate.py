"""``accelerate``: a Ray Serve deployment class whose weights come through fastload.

Ray builds a replica as ``__init__`` and then ``reconfigure(user_config)`` before the replica serves, and
calls ``reconfigure`` again whenever ``user_config`` changes (``serve deploy`` with only the config changed
keeps the replica). The weights therefore load in ``reconfigure``: that is where the replica is handed
``user_config["fastload"]``, and the same code swaps them in place later. The download starts earlier, at
the top of the wrapped ``__init__``, on a thread (``fastload_core.serving.start_warm``): the weights are
known there (``uri=``, or the ``user_config`` the replica was created with, which Ray's replica context
already carries), so the user's ``__init__`` and Ray's steps up to ``reconfigure`` overlap the download, and
``reconfigure`` waits for it, failing with the download's own error if it failed. The wrapper's ``reconfigure``
declares ``rank`` so that Ray calls it even for a deployment without ``user_config`` (Ray calls a
``reconfigure`` without ``rank`` only when there is a config); the user's own ``reconfigure`` is called just as
Ray would have called it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from fastload_core.errors import FastloadError
from fastload_core.model import load_model
from fastload_core.serving import (
    Warming,
    check_compile_cache_url,
    device_for_worker,
    hold_warmed,
    hold_weights,
    start_warm,
    warm,
)
from fastload_core.storage import Pin, redact

from ._memory import collect_if_unreferenced, reserve_object_store

log = logging.getLogger("fastload.ray")

C = TypeVar("C", bound=type)

CONFIG_KEY = "fastload"
CONFIG_FIELDS = ("uri", "revision")
TIERS = ("shm", "local_disk", "shared_fs")
_LOAD_OPTIONS = tuple(name for name in inspect.signature(load_model).parameters
                      if name not in ("model", "source", "device"))


class UserConfigError(FastloadError):
    """A deployment's fastload settings are missing or malformed; ``deployment`` names it."""

    def __init__(self, deployment: str, problem: str) -> None:
        self.deployment = deployment
        self.problem = problem
        super().__init__(f"deployment {deployment!r}: {problem}")


@dataclass(frozen=True)
class Target:
    """Which weights a replica serves: a ``user_config`` with the same target is a no-op."""

    uri: str
    revision: str | None


def accelerate(
    model: type[nn.Module] | Callable[[], nn.Module],
    *,
    uri: str | os.PathLike[str] | None = None,
    attr: str = "model",
    device: str | int | torch.device | None = None,
    prefetch: str | None = "shm",
    **load_options: Any,
) -> Callable[[C], C]:
    """Class decorator, written below ``@serve.deployment``: every replica loads ``model`` (a class or a
    zero-argument factory) through fastload into ``self.<attr>`` before it serves.

    The weights come from ``uri``, or from ``user_config["fastload"]["uri"]`` when ``uri`` is None; a
    ``user_config["fastload"]["revision"]`` pins an S3 VersionId or a cached version. ``device`` defaults
    to the replica's GPU when Ray gave it one, else the CPU. ``prefetch`` is the tier the weights are
    fetched into first (``"shm"``: replicas on a node download once and, on the CPU, share one mapping;
    None: the default tier). ``load_options`` (``dtype``, ``strict``, ``compile``, ``compile_cache``, ...)
    go to ``fastload_core.load_model``.

    A changed ``user_config["fastload"]`` swaps the weights in place: the new model is loaded completely
    while the old one keeps serving, then replaces it in one assignment, and the old one is freed. An
    unchanged one does nothing. Failures (no URI, a malformed config, weights that cannot be fetched or do
    not fit the model) fail the replica's start with one ``FastloadError``.
    """
    if isinstance(model, nn.Module):
        raise TypeError("fastload_ray.accelerate: pass the model's class or a zero-argument factory, not an "
                        "instance (each replica builds its own)")
    if not callable(model):
        raise TypeError(f"fastload_ray.accelerate: model must be an nn.Module class or a factory, not "
                        f"{type(model).__name__}")
    if not isinstance(attr, str) or not attr.isidentifier():
        raise ValueError(f"fastload_ray.accelerate: attr={attr!r} is not an attribute name")
    if uri is not None and not isinstance(uri, (str, os.PathLike)):
        raise TypeError(f"fastload_ray.accelerate: uri must be a string, not {type(uri).__name__}")
    if prefetch is not None and prefetch not in TIERS:
        raise ValueError(f"fastload_ray.accelerate: prefetch={prefetch!r}; expected one of {', '.join(TIERS)} "
                         "or None")
    if device is not None:
        torch.device(device)  # a malformed device fails here, at import, not in every replica
    unknown = sorted(set(load_options) - set(_LOAD_OPTIONS))
    if unknown:
        raise TypeError(f"fastload_ray.accelerate: unknown load option(s) {', '.join(unknown)}; "
                        f"fastload_core.load_model takes {', '.join(_LOAD_OPTIONS)}")
    if isinstance(load_options.get("compile_cache"), str):
        check_compile_cache_url(load_options["compile_cache"])  # a typo fails here, not as a cold compile later
    spec = _Spec(model, None if uri is None else os.fspath(uri), attr, device, prefetch, dict(load_options))

    def decorate(cls: C) -> C:
        if not inspect.isclass(cls):
            if type(cls).__name__ == "Deployment":
                raise TypeError("fastload_ray.accelerate must be written below @serve.deployment (it decorates "
                                "the class that the deployment then wraps)")
            raise TypeError(f"fastload_ray.accelerate decorates a class, not {type(cls).__name__}")
        return _wrap(cls, spec)  # type: ignore[return-value]

    return decorate


@dataclass(frozen=True)
class _Spec:
    model: type[nn.Module] | Callable[[], nn.Module]
    uri: str | None
    attr: str
    device: str | int | torch.device | None
    prefetch: str | None
    load_options: dict[str, Any]


def _wrap(cls: type, spec: _Spec) -> type:
    user_reconfigure = getattr(cls, "reconfigure", None)
    user_takes_rank = user_reconfigure is not None and "rank" in inspect.signature(user_reconfigure).parameters
    # A sync one runs where Ray would have run it: in a thread pool, unless the user turned Ray's off.
    user_reconfigure_is_sync = inspect.isfunction(user_reconfigure) and \
        not inspect.iscoroutinefunction(user_reconfigure)
    user_init: Callable[..., Any] = cls.__init__  # type: ignore[misc]  # the class's own, whatever it inherits

    def sync_init(self: Any, *args: Any, **kwargs: Any) -> Any:
        _weights(self, spec).start_early()  # before the user's own __init__ and whatever it imports or builds
        # returned, not dropped: Ray awaits a coroutine that __init__ returns
        return user_init(self, *args, **kwargs)

    async def async_init(self: Any, *args: Any, **kwargs: Any) -> None:
        _weights(self, spec).start_early()
        await user_init(self, *args, **kwargs)

    # An async __init__ (the user's, or @serve.ingress's wrapper's) needs an ``async def`` one: Ray's ingress
    # wrapper awaits the class's __init__ only if it is a coroutine function, and refuses a subclass (this
    # one, when written above @serve.ingress) whose __init__ is not.
    __init__ = async_init if inspect.iscoroutinefunction(user_init) else sync_init
    if user_init is not object.__init__:
        functools.update_wrapper(__init__, user_init)  # the user's signature and docstring
    __init__.__name__ = "__init__"
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"

    async def reconfigure(self: Any, user_config: Any, rank: Any = None) -> None:
        await _weights(self, spec).apply(self, user_config)
        if user_reconfigure is not None and (user_config is not None or user_takes_rank):
            call = functools.partial(user_reconfigure, self, user_config, **({"rank": rank} if user_takes_rank else {}))
            if user_reconfigure_is_sync and _sync_methods_in_threadpool():
                result = await asyncio.to_thread(call)
            else:
                result = call()
            if inspect.isawaitable(result):
                await result

    reconfigure.__qualname__ = f"{cls.__qualname__}.reconfigure"
    reconfigure.__doc__ = (user_reconfigure.__doc__ if user_reconfigure is not None else None) or \
        "Load (or swap to) the weights ``user_config['fastload']`` names, then run the class's own reconfigure."
    namespace = {"__init__": __init__, "reconfigure": reconfigure, "__module__": cls.__module__,
                 "__qualname__": cls.__qualname__, "__doc__": cls.__doc__, "__fastload_spec__": spec}
    return type(cls.__name__, (cls,), namespace)


def _weights(owner: Any, spec: _Spec) -> _ReplicaWeights:
    state = owner.__dict__.get("_fastload_weights")
    if state is None:
        state = _ReplicaWeights(spec, _deployment_name(type(owner).__name__))
        owner.__dict__["_fastload_weights"] = state
    return state


class _ReplicaWeights:
    """One replica's weights: what it serves, the pin that keeps their tier entry, and the swap."""

    def __init__(self, spec: _Spec, deployment: str) -> None:
        self.spec = spec
        self.deployment = deployment
        self.target: Target | None = None
        self.pin: Pin | None = None
        self.early: tuple[Target, Warming] | None = None  # the download __init__ started, until a load takes it
        self.loaded_early = False  # whether the weights served now came from that download (tests, logs)
        self._lock = asyncio.Lock()  # reconfigure calls never interleave their swaps

    def start_early(self) -> None:
        """Start downloading the weights the first ``reconfigure`` will load, if they are known already: in a
        replica, from ``uri=`` and the ``user_config`` Ray created it with. Anything wrong with the config is
        left for ``reconfigure`` to report (with the same message it always gives); a failed download is
        reported there too, by ``Warming.result``."""
        if self.early is not None or self.target is not None:
            return  # once per replica (a class hierarchy may run this __init__ twice)
        config = _initial_user_config()
        if config is _UNKNOWN:
            return  # not in a Ray replica: nothing says which config reconfigure will get
        try:
            target = self.target_for(config)
        except UserConfigError:
            return
        if self.spec.prefetch == "shm":
            _reserve_object_store_once()
        self.early = (target, start_warm(target.uri, tier=self.spec.prefetch, revision=target.revision))
        log.debug("fastload: deployment %s started fetching %s in __init__", self.deployment, redact(target.uri))

    def target_for(self, user_config: Any) -> Target:
        section: Any = None
        if isinstance(user_config, Mapping):
            section = user_config.get(CONFIG_KEY)
        elif user_config is not None and self.spec.uri is None:
            raise UserConfigError(self.deployment, f"user_config must be a dict with a {CONFIG_KEY!r} section, "
                                                   f"not {type(user_config).__name__}")
        if section is None:
            section = {}
        if not isinstance(section, Mapping):
            raise UserConfigError(self.deployment, f"user_config[{CONFIG_KEY!r}] must be a dict such as "
                                                   "{'uri': 's3://bucket/model/', 'revision': None}, not "
                                                   f"{type(section).__name__}")
        unknown = sorted(str(key) for key in section if key not in CONFIG_FIELDS)
        if unknown:
            raise UserConfigError(self.deployment, f"user_config[{CONFIG_KEY!r}] has unknown key(s) "
                                                   f"{', '.join(unknown)}; it takes {', '.join(CONFIG_FIELDS)}")
        uri, revision = section.get("uri"), section.get("revision")
        if uri is not None and (not isinstance(uri, str) or not uri.strip()):
            raise UserConfigError(self.deployment, f"user_config[{CONFIG_KEY!r}]['uri'] must be a non-empty "
                                                   f"string, not {uri!r}")
        if revision is not None and (not isinstance(revision, str) or not revision.strip()):
            raise UserConfigError(self.deployment, f"user_config[{CONFIG_KEY!r}]['revision'] must be a string "
                                                   f"or None, not {revision!r}")
        if uri is not None and self.spec.uri is not None and uri != self.spec.uri:
            raise UserConfigError(self.deployment, f"the weights are named twice: uri={redact(self.spec.uri)} "
                                                   f"in fastload_ray.accelerate and {redact(uri)} in user_config; "
                                                   "keep one (user_config can change without a restart)")
        chosen = uri if uri is not None else self.spec.uri
        if chosen is None:
            raise UserConfigError(self.deployment, "no weights to load: pass uri= to fastload_ray.accelerate or "
                                                   f"set user_config={{{CONFIG_KEY!r}: {{'uri': "
                                                   "'s3://bucket/model/'}} in @serve.deployment or the Serve "
                                                   "config file")
        return Target(chosen, revision)

    async def apply(self, owner: Any, user_config: Any) -> None:
        target = self.target_for(user_config)
        async with self._lock:
            if target == self.target:
                return  # Ray repeats the start-up config; a rank change alone keeps the weights
            early, self.early = self.early, None
            if early is not None and early[0] != target:
                early = None  # the replica was reconfigured before its first load: that download is not needed
            if self.spec.prefetch == "shm":
                _reserve_object_store_once()  # a no-op where __init__ did it already
            model, pin = await asyncio.to_thread(self._load, target, early[1] if early is not None else None)
            self.loaded_early = early is not None
            old = owner.__dict__.get(self.spec.attr) if self.target is not None else None
            old_pin = self.pin
            setattr(owner, self.spec.attr, model)  # one assignment: a request sees the old or the new model
            self.target, self.pin = target, pin
            del model
        if old_pin is not None:
            old_pin.release()
        if old is not None:
            ref = weakref.ref(old)
            del old
            collect_if_unreferenced(ref, f"{self.deployment}'s previous weights")
        log.info("fastload: deployment %s serves %s%s", self.deployment, redact(target.uri),
                 f" at revision {target.revision}" if target.revision else "")

    def _load(self, target: Target, early: Warming | None = None) -> tuple[nn.Module, Pin | None]:
        spec = self.spec
        device = torch.device(spec.device) if spec.device is not None else replica_device()
        if early is not None:
            # the download __init__ started; its failure (a WeightsUnavailableError naming the URI) is raised here
            pin = hold_warmed(early.result(), target.uri, revision=target.revision)
        elif spec.prefetch is not None:
            (warmed,) = warm(target.uri, tier=spec.prefetch, revision=target.revision)
            pin = hold_warmed(warmed, target.uri, revision=target.revision)  # the copy just warmed, no new lookup
        else:
            pin = hold_weights(target.uri, revision=target.revision)
        try:
            model = load_model(spec.model, pin.path, device, **spec.load_options)
        except BaseException:
            pin.release()
            raise
        if device.type != "cpu" or spec.load_options.get("copy"):
            pin.release()  # private copies: the tier entry may be evicted now
            return model, None
        return model, pin  # the model maps the entry's files: keep it in use while the model serves


def replica_device() -> torch.device:
    """The replica's GPU when Ray assigned it one (Ray narrows CUDA_VISIBLE_DEVICES to it), else the CPU."""
    import ray

    if ray.is_initialized() and not ray.get_gpu_ids():
        return torch.device("cpu")
    return device_for_worker(0, first=0)


def _sync_methods_in_threadpool() -> bool:
    """Ray Serve's ``RAY_SERVE_RUN_SYNC_IN_THREADPOOL`` (on by default): whether Ray runs a replica's sync
    methods, ``reconfigure`` among them, in a thread pool instead of on the replica's event loop. Read from
    Ray, which parses the variable its own way; on where a Ray version no longer has it."""
    try:
        from ray.serve._private import constants
    except ImportError:
        return True
    return bool(getattr(constants, "RAY_SERVE_RUN_SYNC_IN_THREADPOOL", True))


_reserved = False
_reserving = threading.Lock()  # __init__ and a later reconfigure may run on different threads


def _reserve_object_store_once() -> None:
    """Fit the shm tier beside Ray's object store, once per process, before any download or user code runs.

    It sets ``FASTLOAD_SHM_CAPACITY`` in the environment, so it runs on the thread that calls it, never on a
    download's thread: a setenv while other threads read the environment from C (torch's import does, and
    the user's ``__init__`` imports whatever it likes) is a data race in libc. It costs about 2 ms (one
    lookup of the node's resources in Ray's control store, measured in a local cluster)."""
    global _reserved
    with _reserving:
        if not _reserved:
            _reserved = True
            reserve_object_store()


_UNKNOWN: Any = object()


def _initial_user_config() -> Any:
    """The ``user_config`` this replica was created with (Ray's replica context carries the deployment's
    config from before ``__init__``; it hands ``user_config`` to ``reconfigure`` only after ``__init__``), or
    ``_UNKNOWN`` outside a Ray Serve replica or where a Ray version no longer carries it."""
    try:
        from ray import serve

        context = serve.get_replica_context()
    except Exception:  # not in a replica (tests, scripts), or no Ray Serve at all
        return _UNKNOWN
    config = getattr(context, "_deployment_config", None)
    return getattr(config, "user_config", _UNKNOWN) if config is not None else _UNKNOWN


def _deployment_name(fallback: str) -> str:
    try:
        from ray import serve

        return str(serve.get_replica_context().deployment)
    except Exception:  # outside a replica (tests, scripts): the class name says enough
        return fallback
