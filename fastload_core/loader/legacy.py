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
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from ..hookspecs import hookimpl
from .formats import CheckpointFormat

if TYPE_CHECKING:
    import torch

_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")


class TorchPickleFormat:
    name = "torch-pickle"

    def matches(self, path: Path) -> bool:
        return path.suffix in _SUFFIXES

    def read_state_dict(self, path: Path) -> dict[str, torch.Tensor]:
        import torch  # here, not above: every process that builds the plugin manager imports this module, and
        # a plain `fastload.fetch` from S3 has no use for torch (2-5 s to import on a busy 2-core machine)

        try:
            with warnings.catch_warnings():
                # Old checkpoints use other pickle protocols; torch warns but reads them fine.
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
        except pickle.UnpicklingError as exc:
            found = _GLOBAL.search(str(exc))
            if found is None:
                raise CheckpointError(path, f"not a readable torch.save checkpoint: {_first_line(exc)}") from None
            raise CheckpointError(
                path,
                f"refused to unpickle: it would import {found.group(1)}, which is not a tensor or a plain "
                "container, and importing or calling it could run code. fastload reads checkpoints with "
                "weights_only=True and never runs code from them. Re-save it as a plain state_dict of tensors "
                "(torch.save(model.state_dict(), path)) or as safetensors.",
            ) from None
        except (RuntimeError, EOFError, ValueError) as exc:
            raise CheckpointError(path, f"not a readable torch.save checkpoint: {_first_line(exc)}") from None
        return _find_state_dict(path, loaded)


# torch 2.6+ says "Unsupported global: GLOBAL mod.name was not an allowed global" or "Trying to load
# unsupported GLOBAL mod.name whose module mod is blocked", after a paragraph suggesting weights_only=False.
_GLOBAL = re.compile(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", re.IGNORECASE)
# torch's advice to turn the safety off, which fastload never passes on.
_ADVICE = re.compile(r"weights.only|trusted source|Check the documentation", re.IGNORECASE)


def _first_line(exc: Exception) -> str:
    """torch's unpickling errors run to a page and advise turning weights_only off; keep only the line that
    names the cause."""
    lines = [re.sub(r"^\(\d\)\s*", "", line.strip()) for line in str(exc).splitlines()]
    causes = [line for line in lines if line and not _ADVICE.search(line)]
    return causes[0] if causes else "the unpickler refused it"


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(4) == b"PK\x03\x04"


def _find_state_dict(path: Path, loaded: object) -> dict[str, torch.Tensor]:
    import torch

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
