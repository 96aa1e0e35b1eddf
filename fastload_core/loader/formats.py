"""Other checkpoint formats, converted once to safetensors so every later load takes the fast path.

Formats come from the ``register_checkpoint_formats`` hook; the built-in one reads ``torch.save``
pickles with ``weights_only=True``. Conversion is keyed by the source's path, size and mtime, runs
once per node under a file lock, and publishes with an atomic rename: a crash mid-way leaves no
file that looks valid.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .. import config, plugins
from .._atomic import publish_file
from .._safefs import UnsafePath, check_path, secure_dir
from .._staging import staging_dir
from ..errors import CheckpointError, PluginError, UnsupportedFormatError

if TYPE_CHECKING:  # imported where used: the plugin manager imports this module in processes that only fetch
    import torch


@runtime_checkable
class CheckpointFormat(Protocol):
    name: str

    def matches(self, path: Path) -> bool:
        """Whether this format reads ``path`` (by suffix or by sniffing its first bytes)."""
        ...

    def read_state_dict(self, path: Path) -> dict[str, torch.Tensor]:
        """Read the checkpoint without executing anything stored in it."""
        ...


def accept_format(fmt: object) -> CheckpointFormat:
    """The contract of ``register_checkpoint_formats``: ``register(fmt)`` with one ``CheckpointFormat``."""
    if not isinstance(fmt, CheckpointFormat) or not isinstance(fmt.name, str):
        raise PluginError(f"register_checkpoint_formats got {fmt!r}; register one object with a str "
                          "`name` and `matches(path)` and `read_state_dict(path)` methods")
    return fmt


def registered_formats() -> list[CheckpointFormat]:
    """The formats plugins registered, in the order they are tried (the last registered plugin first)."""
    return [registration.value for registration in plugins.collect("register_checkpoint_formats", accept_format)]


def find_format(path: Path) -> CheckpointFormat | None:
    return next((fmt for fmt in registered_formats() if fmt.matches(path)), None)


def converted_path(path: Path) -> Path:
    """The safetensors copy of checkpoint ``path``, converting it on first use. The cache folder, the copy
    and its lock are checked without following links (see ``_safefs``): a link planted at the copy's name
    would otherwise serve whatever it points to as this checkpoint's weights."""
    stat = path.stat()
    identity = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0v1"
    name = f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.safetensors"
    try:
        folder = secure_dir(config.cache_dir(), ["converted"], create=True)
        target = folder / name
        if check_path(target, want="file") is not None:
            return target
        check_path(folder / (name + ".lock"), want="file")
        import filelock  # here, not at the top: importing it costs more than loading a warm file

        with filelock.FileLock(str(target) + ".lock"):
            if check_path(target, want="file") is None:
                convert(path, target)
    except UnsafePath as exc:
        raise CheckpointError(exc.path, f"{exc.problem} (fastload's converted-checkpoint cache)") from None
    return target


def convert(source: Path, target: Path) -> dict[str, torch.Tensor]:
    """Read ``source`` with the format that claims it and write it to ``target`` as safetensors."""
    fmt = find_format(source)
    if fmt is None:
        names = ", ".join(f.name for f in registered_formats()) or "none"
        raise UnsupportedFormatError(
            source, f"not a safetensors file and no registered checkpoint format reads it (formats: {names})"
        )
    state = untangle(fmt.read_state_dict(source))
    metadata = {"fastload_source": source.name, "fastload_format": fmt.name}
    write_safetensors(state, target, metadata, readable_like=source)
    return state


def write_safetensors(
    tensors: dict[str, torch.Tensor], target: Path, metadata: dict[str, str], *, readable_like: Path | None = None
) -> None:
    """Write ``tensors`` to ``target`` atomically: unique temp file, fsync, rename. ``readable_like``: the
    checkpoint they came from; the copy is readable by whoever can read it, no one else. The writing
    happens in a locked staging directory beside ``target`` (see ``_staging``): safetensors leaves its own
    full-size temporary file when killed, and a later write or ``fastload cache gc`` then finds and
    removes it."""
    from safetensors.torch import save_file

    with staging_dir(target.parent) as staging:
        staged = staging / target.name
        publish_file(staged, lambda temporary: save_file(tensors, temporary, metadata=metadata),
                     readable_like=readable_like)
        os.replace(staged, target)


def untangle(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors stores no aliasing: give each shared or strided tensor its own contiguous bytes."""
    import torch

    seen: set[tuple[int, int]] = set()
    result = {}
    for name, tensor in state_dict.items():
        storage_key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        shared = storage_key in seen and tensor.numel() > 0
        seen.add(storage_key)
        result[name] = tensor.clone(memory_format=torch.contiguous_format) if shared else tensor.contiguous()
    return result
