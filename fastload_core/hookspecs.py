"""The plugin surface of fastload: every hook a plugin may implement.

Built-in checkpoint formats, URI schemes and compile-cache backends register through these same
hooks, so a third-party plugin is never second-class. Registration hooks receive a ``register``
callback; event hooks receive keyword arguments and their return value is ignored. Every event that
starts something (``before_load``, ``on_fetch_start``) is followed by exactly one event that
finishes it, on every path, carrying ``error`` (None on success), so metrics and traces balance
when a load or a fetch fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .compile_cache.base import CompileCacheBackend
    from .compile_cache.compiler import CompileReport
    from .loader.formats import CheckpointFormat
    from .report import LoadReport
    from .storage.base import Origin

hookspec = pluggy.HookspecMarker("fastload")
hookimpl = pluggy.HookimplMarker("fastload")


# --- loading -----------------------------------------------------------------------------------
@hookspec
def register_checkpoint_formats(register: Callable[[CheckpointFormat], None]) -> None:
    """Call ``register(fmt)`` with ``CheckpointFormat`` objects that turn other formats into state dicts."""


@hookspec
def before_load(source: str, device: str) -> None:
    """Called before a checkpoint is loaded."""


@hookspec
def after_load(report: LoadReport, error: BaseException | None) -> None:
    """Called once after every ``before_load``, with what it cost; ``error`` is what failed it, or None."""


# --- storage -----------------------------------------------------------------------------------
@hookspec
def register_storage_schemes(register: Callable[[str, Callable[[], Origin]], None]) -> None:
    """Register URI schemes: ``register(scheme, factory)``; ``factory()`` returns a ``storage.Origin``."""


@hookspec
def on_tier_hit(uri: str, tier: str, path: str) -> None:
    """A model was found in a tier (``path`` is what fetch hands out)."""


@hookspec
def on_tier_miss(uri: str, tier: str) -> None:
    """A model was not in a tier and is fetched from the next one down."""


@hookspec
def on_tier_full(uri: str, tier: str, nbytes: int) -> None:
    """A tier could not make room for a model, which is served from the next tier down instead."""


@hookspec
def on_fetch_start(uri: str, tier: str, nbytes: int) -> None:
    """A fetch into a tier began (from the origin, or a promotion from a slower tier)."""


@hookspec
def on_fetch_finish(uri: str, tier: str, nbytes: int, seconds: float, error: BaseException | None) -> None:
    """Once after every ``on_fetch_start``: published (``error`` None), or failed with ``error``."""


@hookspec
def on_evict(tier: str, key: str, nbytes: int) -> None:
    """An entry (``slug/version``) was removed from a tier to make room, by gc, or by ``cache rm``."""


@hookspec
def on_peer_fetch(uri: str, peer: str, nbytes: int, seconds: float, error: BaseException | None) -> None:
    """A fill tried a peer's ``fastload serve`` (``peer`` is its address): got ``nbytes``, or failed with ``error``."""


@hookspec
def on_serve_request(method: str, status: int, nbytes: int, source: str) -> None:
    """``fastload serve`` answered a request; ``source`` says where the bytes came from: ``hit`` (a tier),
    ``miss`` (fetched for this request), ``peer`` (a peer's metadata or files), ``busy`` (a peer fill refused:
    every upload slot taken, ``--max-uploads``), ``list``, ``denied``, ``error``."""


# --- compile cache -----------------------------------------------------------------------------
@hookspec
def register_compile_cache_backends(register: Callable[[str, Callable[[str], CompileCacheBackend]], None]) -> None:
    """Call ``register(scheme, factory)``; ``factory(url)`` returns that scheme's ``CompileCacheBackend``."""


@hookspec
def after_compile(report: CompileReport) -> None:
    """A compiled model's first call finished: ``report.status`` says whether the cache hit."""
