"""BentoML's life cycle mapped onto ``fastload_core.serving``: a descriptor for weights, a class decorator
for the rest.

Where BentoML 1.4 lets us in (see DESIGN.md): a ``@bentoml.on_deployment`` function runs once in the
``bentoml serve`` process before any worker starts (the node-wide prefetch); each worker builds the
service class (``__init__``) with ``bentoml.server_context.worker_index`` set, from 1; ``/readyz`` asks
the worker's ``__is_ready__``. Everything else is the core's.
"""

from __future__ import annotations

import atexit
import functools
import gc
import hashlib
import inspect
import logging
import os
import shutil
import stat
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, overload

import bentoml
import torch
from bentoml.exceptions import BentoMLException

from fastload_core import serving
from fastload_core.storage import Pin, parse_uri
from fastload_core.storage.settings import TIER_ORDER

log = logging.getLogger("fastload.bentoml")

C = TypeVar("C")

_READY = "_fastload_ready"
# BentoML runs a service's deployment hooks in dir() order, that is sorted by name: "~" sorts after every
# identifier, so the service's own hooks (which may put the weights in place or set credentials) run first.
_HOOK = "~fastload_prefetch"


class WeightsUnavailableError(serving.WeightsUnavailableError, BentoMLException):
    """``serving.WeightsUnavailableError`` that BentoML's command line also understands: ``bentoml serve``
    prints the message and exits 1 instead of dumping a traceback."""


class Weights:
    """A model's weights as a class attribute of a BentoML service::

        weights = fastload_bentoml.Weights("s3://models/minilm/", revision=None)

    Read on an instance (``self.weights``) it is the local ``pathlib.Path`` of the copy in the fastest
    tier (a file for a single object, a directory for a prefix), fetched if no tier holds it yet. The
    entry stays pinned for the life of the worker process, so eviction never removes weights a worker
    maps. Read on the class it is this descriptor. A plain descriptor rather than a ``bentoml.models``
    class: those must exist in BentoML's model store, which breaks ``bentoml build`` of a service whose
    weights live elsewhere ("Unknown model registry").
    """

    def __init__(self, uri: str | os.PathLike[str], *, revision: str | None = None) -> None:
        if not isinstance(uri, (str, os.PathLike)) or not os.fspath(uri):
            raise TypeError(f"Weights needs a URI or path such as 's3://models/minilm/', not {uri!r}")
        if revision is not None and (not isinstance(revision, str) or not revision):
            raise TypeError(f"Weights revision must be a non-empty string or None, not {revision!r}")
        self.uri = os.fspath(uri)
        self.revision = revision
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> Weights: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> Path: ...

    def __get__(self, instance: object | None, owner: type | None = None) -> Weights | Path:
        if instance is None:
            return self
        return self.hold().path

    def hold(self) -> Pin:
        """The pin this process holds on the weights (taken on first use, kept until the process ends).

        Without an explicit ``revision``, a worker takes the version the deployment hook warmed (passed
        down in an environment variable): every worker serves the same version even if the origin
        changes meanwhile, and none of them asks the origin again. Should that version have left every
        tier (a worker restarted much later), it falls back to the origin's current one, with a warning.
        """
        key = (self.uri, self.revision)
        with _held_lock:  # only to find this key's lock: one model's download never waits for another's
            key_lock = _held_locks.setdefault(key, threading.Lock())
        with key_lock:
            pinned = _held.get(key)
            if pinned is None or not pinned.held:
                pinned = _held[key] = self._pin()
            return pinned

    def _pin(self) -> Pin:
        handoff, warmed = os.environ.get(self.handoff_variable), os.environ.get(self.version_variable)
        if handoff is None and warmed is None:  # a dependency's worker? BentoML made its environment before the hook
            handoff, warmed = _handed_down(self.version_variable)
        if handoff:  # the deployment hook's download may still be running: wait for it, do not start another
            serving.wait_for_warm(handoff)
        warmed = warmed if self.revision is None else None
        if warmed:
            try:
                return serving.hold_weights(self.uri, revision=warmed)
            except serving.WeightsUnavailableError as exc:
                log.warning("%s: the version warmed for this deployment (%s) is no longer cached (%s); using "
                            "the origin's current version", exc.uri, warmed, exc.problem)
        return _bentoml_error(serving.hold_weights, self.uri, revision=self.revision)

    @property
    def version_variable(self) -> str:
        """The environment variable through which the deployment hook tells workers what it warmed."""
        digest = hashlib.sha256(f"{self.uri}\0{self.revision or ''}".encode()).hexdigest()[:16]
        return f"FASTLOAD_BENTOML_WARMED_{digest.upper()}"

    @property
    def handoff_variable(self) -> str:
        """The environment variable naming the lock file held while the deployment hook warms the weights."""
        return self.version_variable.replace("_WARMED_", "_WARMING_")

    def __repr__(self) -> str:
        revision = f", revision={self.revision!r}" if self.revision is not None else ""
        return f"Weights({self.uri!r}{revision})"


_held_lock = threading.Lock()
_held_locks: dict[tuple[str, str | None], threading.Lock] = {}
_held: dict[tuple[str, str | None], Pin] = {}


def worker_device() -> torch.device:
    """The ``torch.device`` this worker should load onto: ``cuda:{(i - 1) % n}`` for worker index ``i``
    (``bentoml.server_context.worker_index``, from 1) over the ``n`` GPUs visible to it, else ``cpu``.

    BentoML gives every worker of a service the same ``CUDA_VISIBLE_DEVICES``, so without this every
    worker would load onto ``cuda:0``. Outside ``bentoml serve`` (no worker index) it is worker 1's.
    """
    return serving.device_for_worker(bentoml.server_context.worker_index or 1, first=1)


@overload
def accelerate(cls: type[C], /) -> type[C]: ...


@overload
def accelerate(*, prefetch: str | None = "shm", compile_cache: str | None = None) -> Callable[[type[C]], type[C]]: ...


def accelerate(
    cls: type[C] | None = None, /, *, prefetch: str | None = "shm", compile_cache: str | None = None
) -> type[C] | Callable[[type[C]], type[C]]:
    """Class decorator for a BentoML service, written below ``@bentoml.service``. It

    - prefetches every ``Weights`` of the class into the ``prefetch`` tier (``"shm"``: /dev/shm;
      ``None``: no prefetch) once per ``bentoml serve``, before workers start, through a
      ``@bentoml.on_deployment`` function; ``bentoml serve`` fails right there, with one message
      naming the URI, when weights cannot be fetched;
    - keeps ``__is_ready__`` false until the worker's ``__init__`` has finished (and the class's own
      ``__is_ready__``, if it has one, returns true), so ``/readyz`` never counts a half-loaded worker
      (a subclass's ``__init__`` that does not call this class's is ready once it has returned);
    - makes ``compile_cache`` the default of ``fastload_core.compile`` / ``load_model(compile=True)``
      in each worker.
    """
    if prefetch is not None and prefetch not in TIER_ORDER:
        raise ValueError(f"accelerate(prefetch={prefetch!r}): expected one of {', '.join(TIER_ORDER)}, or None")
    if compile_cache is not None:
        serving.check_compile_cache_url(compile_cache)

    def decorate(target: type[C]) -> type[C]:
        if isinstance(target, bentoml.Service):
            raise TypeError(
                "fastload_bentoml.accelerate must be written below @bentoml.service (it decorates the class, "
                "which @bentoml.service then turns into a Service)"
            )
        if not inspect.isclass(target):
            raise TypeError(f"fastload_bentoml.accelerate decorates a class, not {target!r}")
        _wrap_init(target, compile_cache)
        _wrap_is_ready(target)
        if prefetch is not None:
            setattr(target, _HOOK, _prefetch_hook(target, prefetch))
        return target

    return decorate(cls) if cls is not None else decorate


def weights_of(cls: type) -> list[Weights]:
    """The ``Weights`` attributes of a service class (its bases included), in definition order."""
    found: dict[str, Weights] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, Weights):
                found[name] = value
    return list(found.values())


def _wrap_init(cls: type, compile_cache: str | None) -> None:
    original = cls.__init__  # type: ignore[misc]  # the class's own, wrapped on the class

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        setattr(self, _READY, False)
        if compile_cache is not None:
            serving.set_default_compile_cache(compile_cache)
        original(self, *args, **kwargs)
        setattr(self, _READY, True)

    cls.__init__ = __init__  # type: ignore[misc]


def _wrap_is_ready(cls: type) -> None:
    # The flag is missing where a subclass's own __init__ did not call the wrapped one: BentoML builds the
    # instance in the worker's start-up, before it serves /readyz, so an instance it asks has been built.
    own = getattr(cls, "__is_ready__", None)
    if own is None:

        def __is_ready__(self: Any) -> bool:
            return bool(getattr(self, _READY, True))

        cls.__is_ready__ = __is_ready__  # type: ignore[attr-defined]
    elif inspect.iscoroutinefunction(own):

        async def __is_ready_async__(self: Any) -> bool:
            return bool(getattr(self, _READY, True)) and bool(await own(self))

        cls.__is_ready__ = functools.wraps(own)(__is_ready_async__)  # type: ignore[attr-defined]
    else:

        def __is_ready_sync__(self: Any) -> bool:
            return bool(getattr(self, _READY, True)) and bool(own(self))

        cls.__is_ready__ = functools.wraps(own)(__is_ready_sync__)  # type: ignore[attr-defined]


def _prefetch_hook(cls: type, tier: str) -> classmethod[Any, [], None]:
    def fastload_prefetch(served: type) -> None:
        """Start warming the service's weights on this node before BentoML starts its workers.

        The weights' existence and version are checked here (a missing model fails ``bentoml serve`` at
        once); the download runs on a thread of the serve process while BentoML starts the workers, whose
        imports and framework start-up overlap it. Each worker then waits for that download (a file lock
        named in its environment) before it maps the weights.

        A class method, so that ``served`` is the class BentoML serves: a subclass of the decorated class
        has its own ``Weights`` and its own ``bentoml.Service``."""
        _apply_service_envs(served)
        _share_metrics_with_workers()
        handoffs = _own_handoff_dir()
        for weights in weights_of(served):
            if parse_uri(weights.uri).bare:
                # A local path is read in place by the workers (hold_weights): checked here, never copied.
                _bentoml_error(serving.hold_weights, weights.uri, revision=weights.revision).release()
                continue
            handoff = handoffs / f"{weights.version_variable}.lock"
            running = _warming.get(weights.version_variable)
            if running is not None and running.is_alive():
                continue  # another service of this ``bentoml serve`` is warming the same weights
            version, _warming[weights.version_variable] = _bentoml_error(
                serving.warm_in_background, weights.uri, tier=tier, revision=weights.revision, handoff=handoff)
            # BentoML starts a service's workers with this process's environment; a dependency's (a service
            # another one names in bentoml.depends) it prepares before this hook runs, so they find the same
            # in the directory named after this process (_handed_down)
            os.environ[weights.version_variable] = version
            os.environ[weights.handoff_variable] = str(handoff)
            (handoffs / f"{weights.version_variable}.version").write_text(version)

    fastload_prefetch.__qualname__ = f"{cls.__qualname__}.{_HOOK}"
    return classmethod(bentoml.on_deployment(fastload_prefetch).__func__)


# The deployment hooks' downloads under way in this process. Only a running one is reused: a later
# bentoml.serve() in the same process (whose variables and handoff directory outlive the first's stop())
# asks the origin again.
_warming: dict[str, threading.Thread] = {}


def _apply_service_envs(served: type) -> None:
    """Set the ``envs=`` of ``served``'s ``bentoml.Service`` that this process has not set (BentoML's own
    precedence for its workers).

    BentoML passes them to the service's workers only, while the deployment hook runs in the serve process:
    without this, a ``FASTLOAD_SHM_DIR`` or ``AWS_*`` given there would make the hook warm another place
    (or fail), and the workers download again. They stay set, not restored when the hook returns: the
    download goes on in a thread afterwards, and the store follows the environment. BentoML keeps no link
    from the class to its ``Service``, which refers to the class, so the garbage collector finds it."""
    services = [r for r in gc.get_referrers(served) if isinstance(r, bentoml.Service) and r.inner is served]
    for service in services[:1]:
        for variable in service.envs:
            if variable.stage != "build" and variable.value and variable.name not in os.environ:
                os.environ[variable.name] = variable.value


def _handoff_dir(pid: int | None = None) -> Path:
    """Where the ``bentoml serve`` process ``pid`` (this one by default) leaves its deployment hooks' handoffs:
    named after it, so its workers find it from their parent's pid alone. Private to this user."""
    return Path(tempfile.gettempdir()) / f"fastload-bentoml-{os.getuid()}-{pid or os.getpid()}"


@functools.cache
def _own_handoff_dir() -> Path:
    """This process's handoff directory, made fresh (a stale one of an earlier process with the same pid is
    ours to remove) and removed at exit."""
    path = _handoff_dir()
    if path.is_symlink() or (path.exists() and path.stat().st_uid != os.getuid()):
        raise BentoMLException(f"{path} exists and is not this user's directory; remove it")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    atexit.register(shutil.rmtree, path, True)
    return path


def _handed_down(version_variable: str) -> tuple[str | None, str | None]:
    """The handoff lock and the warmed version the serve process (this worker's parent) left for these weights,
    when it did: (None, None) outside ``bentoml serve`` or without a prefetch."""
    directory = _handoff_dir(os.getppid())
    try:
        info = directory.lstat()
    except FileNotFoundError:
        return None, None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        return None, None
    try:
        version = (directory / f"{version_variable}.version").read_text()
    except FileNotFoundError:
        return None, None
    return str(directory / f"{version_variable}.lock"), version


def _share_metrics_with_workers() -> None:
    """The prefetch runs in the ``bentoml serve`` process, which BentoML does not put in Prometheus
    multiprocess mode (only its workers get ``PROMETHEUS_MULTIPROC_DIR``). The download it counts would
    then be missing from ``/metrics``, which the workers serve from that directory; so the serve process
    writes its fastload metrics there too, when ``prometheus_client`` has not been imported yet (the
    mode is fixed at import)."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return
    try:
        from bentoml._internal.configuration.containers import BentoMLContainer

        directory = BentoMLContainer.prometheus_multiproc_dir.get()
    except Exception as exc:  # a BentoML without that setting: metrics stay per process
        log.debug("no Prometheus multiprocess directory from BentoML (%r)", exc)
        return
    if "prometheus_client" in sys.modules:
        log.debug("prometheus_client already imported in the serve process; its fetch metrics stay local")
        return
    if os.path.isdir(directory):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory


_R = TypeVar("_R")


def _bentoml_error(function: Callable[..., _R], *args: Any, **kwargs: Any) -> _R:
    try:
        return function(*args, **kwargs)
    except serving.WeightsUnavailableError as exc:
        if isinstance(exc, BentoMLException):
            raise
        raise WeightsUnavailableError(exc.uri, exc.problem) from exc.__cause__


__all__ = ["Weights", "WeightsUnavailableError", "accelerate", "weights_of", "worker_device"]
