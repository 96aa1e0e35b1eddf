"""Other checkpoint formats, converted once to safetensors so every later load takes the fast path.

Formats come from the ``register_checkpoint_formats`` hook; the built-in one reads ``torch.save``
pickles with ``weights_only=True``. Conversion is keyed by the source's path, size and mtime, runs
once per node under a file lock, and publishes with an atomic rename: a crash mid-way leaves no
file that looks valid.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from .. import config, plugins
from .._atomic import publish_file
from ..errors import CheckpointError, UnsupportedFormatError


@runtime_checkable
class CheckpointFormat(Protocol):
    name: str

    def matches(self, path: Path) -> bool:
        """Whether this format reads ``path`` (by suffix or by sniffing its first bytes)."""
        ...

    def read_state_dict(self, path: Path) -> dict[str, torch.Tensor]:
        """Read the checkpoint without executing anything stored in it."""
        ...


def registered_formats() -> list[CheckpointFormat]:
    formats = []
    for args in plugins.collect("register_checkpoint_formats"):
        if len(args) != 1 or not isinstance(args[0], CheckpointFormat):
            raise CheckpointError("<plugin>", f"register_checkpoint_formats got {args!r}; register one format object")
        formats.append(args[0])
    return formats


def find_format(path: Path) -> CheckpointFormat | None:
    return next((fmt for fmt in registered_formats() if fmt.matches(path)), None)


def converted_path(path: Path) -> Path:
    """The safetensors copy of checkpoint ``path``, converting it on first use."""
    stat = path.stat()
    identity = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0v1"
    target = config.cache_dir() / "converted" / f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.safetensors"
    if target.exists():
        return target
    import filelock  # here, not at the top: importing it costs more than loading a warm file

    target.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(target) + ".lock"):
        if not target.exists():
            convert(path, target)
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
    """Write ``tensors`` to ``target`` atomically: unique temp file, fsync, rename. ``readable_like``:
    the checkpoint they came from; the copy is readable by whoever can read it, no one else."""
    from safetensors.torch import save_file

    publish_file(target, lambda temporary: save_file(tensors, temporary, metadata=metadata),
                 readable_like=readable_like)


def untangle(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors stores no aliasing: give each shared or strided tensor its own contiguous bytes."""
    seen: set[tuple[int, int]] = set()
    result = {}
    for name, tensor in state_dict.items():
        storage_key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        shared = storage_key in seen and tensor.numel() > 0
        seen.add(storage_key)
        result[name] = tensor.clone(memory_format=torch.contiguous_format) if shared else tensor.contiguous()
    return result
