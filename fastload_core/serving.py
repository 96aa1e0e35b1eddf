"""What every serving adapter does, once: pick a worker's device, hold its weights, warm a node, set the
compile-cache default.

The adapters (``fastload_bentoml``, ``fastload_ray``, ``fastload_torchserve``) translate their framework's
life cycle into these calls and own nothing else, so a fix here reaches all three. Nothing in this module
imports a serving framework.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from urllib.parse import urlsplit

import filelock
import torch

from . import storage
from .compile_cache.cache import URL_VARIABLE
from .compile_cache.errors import CacheURLError, CompileCacheError
from .compile_cache.registry import open_backend as open_compile_cache_backend
from .compile_cache.registry import schemes as compile_cache_schemes
from .errors import FastloadError
from .storage import Pin, redact
from .storage.base import tier_for_path

log = logging.getLogger("fastload.serving")

Source = str | os.PathLike[str]


class WeightsUnavailableError(FastloadError):
    """A worker's (or a node's) weights could not be fetched: nothing can be served without them.

    ``uri`` names the weights (credentials redacted) and ``problem`` what went wrong; the underlying
    ``StorageError`` (or ``OSError``) is the ``__cause__``.
    """

    def __init__(self, uri: str, problem: str) -> None:
        self.uri = uri
        self.problem = problem
        super().__init__(
            f"cannot fetch the weights at {uri}: {problem}. The service cannot start without them: check that "
            "the URI (and revision, if given) names an existing object or prefix and that this process can "
            "reach its origin (for s3://, AWS_ENDPOINT_URL and the AWS credentials)"
        )


def device_for_worker(index: int, *, first: int = 1, gpu_count: int | None = None) -> torch.device:
    """The device worker ``index`` should load onto: ``cuda:(index - first) % n`` over the ``n`` GPUs
    visible to it, else ``cpu``.

    Frameworks that start several workers with the same ``CUDA_VISIBLE_DEVICES`` (BentoML numbers its
    workers from 1) would otherwise put every worker on ``cuda:0``. ``gpu_count`` overrides
    ``torch.cuda.device_count()`` (tests fake 0, 1 or 2 GPUs with it).
    """
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"worker index must be an int, not {type(index).__name__}")
    if index < first:
        raise ValueError(f"worker index {index} is below the first index {first}; workers are numbered from "
                         f"{first}")
    count = torch.cuda.device_count() if gpu_count is None else gpu_count
    if count < 0:
        raise ValueError(f"gpu_count={count}: a number of GPUs cannot be negative")
    if count == 0:
        return torch.device("cpu")
    return torch.device("cuda", (index - first) % count)


def hold_weights(uri: Source, *, revision: str | None = None, tier: str | None = None) -> Pin:
    """Fetch ``uri`` (from the fastest tier that holds it, or into ``tier``) and pin it: the entry is never
    evicted while the returned ``Pin`` lives. A worker keeps the pin for its whole life, because the
    weights it maps are read from that entry until the process ends.

    Raises ``WeightsUnavailableError`` naming the URI when the weights cannot be had.
    """
    try:
        return storage.pin(uri, tier=tier, revision=revision)
    except (FastloadError, OSError) as exc:
        raise WeightsUnavailableError(redact(os.fspath(uri)), _problem(exc)) from exc


def hold_warmed(path: Source, uri: Source, *, revision: str | None = None) -> Pin:
    """Pin the entry that ``warm`` (or a ``Warming``) just returned ``path`` of, for a worker's whole life.

    Held by its path, not looked up again: a second lookup would count a second tier hit for one worker's
    load (the warm counted its own), doubling the hit figures. Should the entry have gone in between (evicted
    by another process), the version warmed is held through the tiers as ``hold_weights`` would; it is never
    another version. Raises ``WeightsUnavailableError`` naming the URI when the weights cannot be had."""
    try:
        return storage.pin_path(path)
    except storage.StorageError:
        return hold_weights(uri, revision=version_of(path) or revision)


def warm(uris: Source | Iterable[Source], *, tier: str | None = "shm",
         revision: str | None = None) -> list[Path]:
    """Prefetch models into ``tier`` once per node, before workers start (``tier=None``: the default tier).

    A model the tier cannot hold at all (a container's 64 MiB /dev/shm, or a node without the tier) is
    left in the tier below with one warning that says how to make room; the workers then read it from
    there. Returns the local paths. Raises ``WeightsUnavailableError`` naming the URI on failure.
    """
    items = [uris] if isinstance(uris, (str, os.PathLike)) else list(uris)
    return [_warm_one(item, tier, revision) for item in items]


class Warming:
    """A ``warm`` running on a thread of this process, started by ``start_warm``; ``result`` collects it.

    For an adapter whose framework builds the worker in steps (Ray: the class's ``__init__``, then
    ``reconfigure``): the download starts at the first step that knows the URI and overlaps whatever the
    worker does before it needs the weights. The thread always completes the warm one way or the other, so
    a waiter never hangs on a thread that died, and gets the warm's own error (a ``WeightsUnavailableError``
    naming the URI), exactly as a ``warm`` in its own thread would have raised it.
    """

    def __init__(self, uri: Source, *, tier: str | None = "shm", revision: str | None = None,
                 on_done: Callable[[Warming], None] | None = None) -> None:
        self.uri = os.fspath(uri)
        self.tier = tier
        self.revision = revision
        self._on_done = on_done
        self._future: Future[Path] = Future()
        self._future.set_running_or_notify_cancel()
        self.thread = threading.Thread(target=self._run, name="fastload-warm", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            (path,) = warm(self.uri, tier=self.tier, revision=self.revision)
        except BaseException as exc:  # handed to the waiter, whatever it is: nobody waits forever
            self._future.set_exception(exc)
        else:
            self._future.set_result(path)
        finally:
            if self._on_done is not None:
                try:
                    self._on_done(self)
                except Exception:
                    log.exception("%s: the background warm-up's completion callback failed", redact(self.uri))

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> Path:
        """Wait for the warm; the local path it published, or the warm's error raised here.
        ``TimeoutError`` if ``timeout`` seconds pass first."""
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The warm's error (None when it succeeded), after waiting for it as ``result`` does."""
        return self._future.exception(timeout)


def start_warm(uri: Source, *, tier: str | None = "shm", revision: str | None = None) -> Warming:
    """Start ``warm(uri, tier=..., revision=...)`` on a daemon thread of this process and return at once;
    ``Warming.result()`` waits for it. Nothing is checked before it returns: every error, a missing model
    included, comes out of ``result()``."""
    return Warming(uri, tier=tier, revision=revision)


def warm_in_background(uri: Source, *, tier: str | None = "shm", revision: str | None = None,
                       handoff: str | os.PathLike[str]) -> tuple[str, threading.Thread]:
    """``warm`` on a thread, for a process that starts workers next: their start-up (imports, framework) then
    overlaps the download instead of following it. Returns the version being warmed and the thread.

    Before returning it asks the origin for the model's current version (or ``revision``), so that weights
    that are not there still fail right here with ``WeightsUnavailableError`` naming the URI, and it locks
    the file ``handoff`` until the warm has finished. Workers call ``wait_for_warm(handoff)`` before they
    pin the weights: they wait for this one download instead of starting their own. If the warm fails, the
    lock is released all the same (with the error logged) and the workers fetch for themselves.
    """
    shown = redact(os.fspath(uri))
    try:
        version = storage.default_store().resolve(uri, revision=revision).version
    except (FastloadError, OSError) as exc:
        raise WeightsUnavailableError(shown, _problem(exc)) from exc
    lock = filelock.FileLock(os.fspath(handoff), thread_local=False)  # released by the thread
    lock.acquire()

    def finished(warming: Warming) -> None:
        try:
            error = warming.exception()
            if error is not None:  # the workers will try for themselves and fail with their own error
                log.warning("%s: the background warm-up failed (%s); workers fetch the weights themselves", shown,
                            error)
        finally:
            lock.release()

    warming = Warming(uri, tier=tier, revision=revision, on_done=finished)
    return version, warming.thread


def wait_for_warm(handoff: str | os.PathLike[str], *, timeout: float | None = None) -> bool:
    """Wait until the ``warm_in_background`` that locked ``handoff`` has finished (at once if it has, or if
    its process is gone: the lock dies with it). False if ``timeout`` seconds passed first."""
    lock = filelock.FileLock(os.fspath(handoff), thread_local=False)
    try:
        lock.acquire(timeout=-1 if timeout is None else timeout)
    except filelock.Timeout:
        return False
    lock.release()
    return True


def version_of(path: Source) -> str | None:
    """The version digest of the tier entry that holds ``path`` (a path ``warm`` or ``hold_weights`` handed
    out), None for a path outside every tier. Passed as ``revision=`` it selects exactly that version with
    no request to the origin: how an adapter makes every worker serve the version warmed for the node."""
    found = tier_for_path(storage.default_store().tiers, Path(path))
    return found[2] if found else None


def set_default_compile_cache(url: str | None) -> None:
    """Make ``url`` the compile cache that ``fastload_core.compile`` and ``load_model(compile=True)`` use
    in this process when no ``compile_cache`` is passed (``None``: back to the default directory).

    It sets the ``FASTLOAD_COMPILE_CACHE`` environment variable, so processes this one starts (inductor's
    compile workers, a framework's worker processes) inherit the same default. Raises ``CacheURLError``
    for a URL no compile-cache backend serves (see ``check_compile_cache_url``).
    """
    if url is None:
        os.environ.pop(URL_VARIABLE, None)
        return
    os.environ[URL_VARIABLE] = check_compile_cache_url(url)


def check_compile_cache_url(url: str) -> str:
    """``url`` if a compile-cache backend serves its scheme and can be built here, else ``CacheURLError``
    naming the problem (the schemes on offer, a malformed URL, a library the backend needs and this
    environment lacks: redis-py, boto3). Adapters call it where their configuration is read, so a mistake
    fails the deployment at start rather than in every worker's compile. Connects to nothing: building a
    backend makes its client, which connects on first use."""
    if not isinstance(url, str):
        raise TypeError(f"a compile-cache URL is a string such as 'redis://cache:6379/0', not {type(url).__name__}")
    scheme = urlsplit(url).scheme.lower()
    offered = compile_cache_schemes()
    if not scheme:
        raise CacheURLError(url, "has no scheme; use e.g. redis://cache:6379/0 or file:///var/cache/compile",
                            offered)
    if scheme not in offered:
        raise CacheURLError(url, f"no compile-cache backend serves {scheme}://", offered)
    try:
        open_compile_cache_backend(url).close()
    except CacheURLError:
        raise
    except CompileCacheError as exc:
        raise CacheURLError(url, str(exc).removeprefix(f"{redact(url)}: ")) from None
    return url


def _warm_one(uri: Source, tier: str | None, revision: str | None) -> Path:
    shown = redact(os.fspath(uri))
    store = storage.default_store()
    names = [t.name for t in store.tiers]
    if tier is not None and tier not in names:
        log.warning("%s: this node has no %r tier (it has %s); workers will read the weights from %s. Set "
                    "FASTLOAD_SHM_DIR (or FASTLOAD_SHARED_DIR) to enable it", shown, tier, ", ".join(names),
                    store.default_tier)
        tier = None
    # Straight into the tier asked for: a cold fetch lands in RAM first and the slower tiers (local disk) are
    # written through from that copy on a thread of their own, after this returns. (Filling the default tier
    # first and promoting from it made the workers wait for a disk write, an fsync and a second verified copy.)
    # A tier too small for the model is skipped by the store with one warning, and the model is served from
    # the next tier down.
    with hold_weights(uri, revision=revision, tier=tier) as path:
        return path


def _problem(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.rstrip(".")


__all__ = [
    "Warming",
    "WeightsUnavailableError",
    "check_compile_cache_url",
    "device_for_worker",
    "hold_warmed",
    "hold_weights",
    "set_default_compile_cache",
    "start_warm",
    "version_of",
    "wait_for_warm",
    "warm",
    "warm_in_background",
]
