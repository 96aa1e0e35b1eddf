"""The built-in reader for ``torch.save`` checkpoints (``.bin``, ``.pt``, ``.pth``).

Pickles can run arbitrary code, so they are opened with ``weights_only=True`` only: a checkpoint
that needs anything beyond tensors and plain containers is refused, never executed.
"""

from __future__ import annotations

import pickle
import re
import warnings
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
            with warnings.catch_warnings():
                # Old checkpoints use other pickle protocols; torch warns but reads them fine.
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
        except pickle.UnpicklingError as exc:
            if "Unsupported global" not in str(exc):
                raise CheckpointError(path, f"not a readable torch.save checkpoint: {_first_line(exc)}") from None
            raise CheckpointError(
                path,
                "refused to unpickle: it holds objects beyond tensors and containers, and fastload never runs "
                f"code from a checkpoint (weights_only=True). Save a plain state_dict instead. ({_first_line(exc)})",
            ) from None
        except (RuntimeError, EOFError, ValueError) as exc:
            raise CheckpointError(path, f"not a readable torch.save checkpoint: {_first_line(exc)}") from None
        return _find_state_dict(path, loaded)


def _first_line(exc: Exception) -> str:
    """torch's unpickling errors run to a page; the phrase that names the cause is enough."""
    cause = re.search(r"Unsupported[^\n]*", str(exc))
    return cause.group(0).strip() if cause else str(exc).strip().splitlines()[0]


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
