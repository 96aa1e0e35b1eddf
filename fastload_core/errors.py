"""The exception tree: every failure fastload raises is a ``FastloadError``.

Callers that only want "did fastload fail?" catch the base class; the subclasses carry the context
(file, tensor name, URI, ...) needed to act on the failure without parsing the message.
"""

from __future__ import annotations

import os


class FastloadError(Exception):
    """Base class of all fastload errors."""


class CheckpointError(FastloadError):
    """A checkpoint file is unusable; ``path`` names it."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class TruncatedFileError(CheckpointError):
    """The file ends before the data its header promises (an interrupted download or copy)."""


class HeaderError(CheckpointError):
    """The safetensors header is malformed: bad length, invalid JSON, or a bad tensor entry."""


class UnsupportedDtypeError(CheckpointError):
    """A tensor's dtype is unknown to safetensors or cannot be held by this build of torch."""

    def __init__(self, path: str | os.PathLike[str], problem: str, dtype: str) -> None:
        self.dtype = dtype
        super().__init__(path, problem)


class MissingShardError(CheckpointError):
    """A sharded index names a shard file that is not there."""


class UnsupportedFormatError(CheckpointError):
    """No registered loader understands this checkpoint format."""


class DeviceError(FastloadError):
    """The requested device cannot be used here (no CUDA in this torch or on this machine, an index past
    the visible GPUs, a malformed name); ``device`` names it."""

    def __init__(self, device: object, problem: str) -> None:
        self.device = str(device)
        self.problem = problem
        super().__init__(f"device {self.device!r}: {problem}")


class StateDictMismatchError(FastloadError):
    """``load_model(strict=True)`` found missing or unexpected keys, or shapes that do not fit."""

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        parts = []
        if missing:
            parts.append(f"missing keys (in the model, not the checkpoint): {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys (in the checkpoint, not the model): {_preview(unexpected)}")
        if mismatched:
            shown = [f"{name}: model {m} vs checkpoint {c}" for name, m, c in mismatched]
            parts.append(f"shape mismatches: {_preview(shown)}")
        parts.append("pass strict=False to load the keys that match")
        super().__init__("; ".join(parts))


class TorchVersionError(FastloadError):
    """The installed torch is older than a feature needs; ``feature``, ``installed`` and ``required`` say which."""

    def __init__(self, feature: str, installed: str, required: tuple[int, int], core: tuple[int, int]) -> None:
        self.feature = feature
        self.installed = installed
        self.required = required
        need = ".".join(map(str, required))
        super().__init__(
            f"{feature} needs torch >= {need}, but torch {installed} is installed; upgrade torch "
            f"(pip install 'torch>={need}'), or go without it (the rest of fastload works from torch "
            f"{'.'.join(map(str, core))})"
        )


class PluginError(FastloadError):
    """A plugin broke the contract of a hook it implements."""


def _preview(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


class LoaderSettingError(FastloadError, ValueError):
    """A ``FASTLOAD_*`` loader setting in the environment has a value the loader cannot use; the
    message names the variable, the value and what it accepts."""
