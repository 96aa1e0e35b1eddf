"""The built-in reader for ``torch.save`` checkpoints (``.bin``, ``.pt``, ``.pth``).

Pickles can run arbitrary code, so they are opened with ``weights_only=True`` only: a checkpoint
that needs anything beyond tensors and plain containers is refused, never executed.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..hookspecs import hookimpl
from .formats import CheckpointFormat

_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")


class TorchPickleFormat:
    name = "torch-pickle"

    def matches(self, path: Path) -> bool:
        return path.suffix in _SUFFIXES

    def read_state_dict(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                path,
                "refused to unpickle: it holds objects beyond tensors and containers, and fastload never "
                f"runs code from a checkpoint (weights_only=True). Save a plain state_dict instead. ({exc})",
            ) from None
        except (RuntimeError, EOFError, ValueError) as exc:
            raise CheckpointError(path, f"not a readable torch.save checkpoint: {exc}") from None
        return _find_state_dict(path, loaded)


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(4) == b"PK\x03\x04"


def _find_state_dict(path: Path, loaded: object) -> dict[str, torch.Tensor]:
    if isinstance(loaded, dict):
        if loaded and all(isinstance(value, torch.Tensor) for value in loaded.values()):
            return loaded
        for key in _NESTED_KEYS:
            if isinstance(loaded.get(key), dict):
                return _find_state_dict(path, loaded[key])
        if not loaded:
            return {}
    kind = f"a dict with keys {sorted(map(str, loaded))[:8]}" if isinstance(loaded, dict) else type(loaded).__name__
    raise CheckpointError(
        path, f"holds {kind}, not a state dict of tensors; save model.state_dict() (or nest it under 'state_dict')"
    )


@hookimpl
def register_checkpoint_formats(register: Callable[[CheckpointFormat], None]) -> None:
    register(TorchPickleFormat())
