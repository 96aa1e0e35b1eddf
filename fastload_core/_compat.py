"""Which torch a feature needs: fastload installs beside the torch a service already runs.

The core (loader, storage, ``load_model``) needs torch 2.1: ``torch.load(mmap=True)`` and
``Module.load_state_dict(assign=True)`` both arrived there, and pyproject.toml declares ``torch>=2.1``.
Features built on newer APIs check here where they start, so an older torch gets one clear
``TorchVersionError`` naming the feature and the fix instead of an ``AttributeError`` deep inside.
"""

from __future__ import annotations

import re

from .errors import TorchVersionError

CORE_MINIMUM = (2, 1)
# torch.compiler.save_cache_artifacts / load_cache_artifacts (the portable "mega-cache"): torch 2.7.
COMPILE_CACHE_MINIMUM = (2, 7)

__all__ = ["COMPILE_CACHE_MINIMUM", "CORE_MINIMUM", "TorchVersionError", "require_torch", "torch_version"]


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch; read when called, so a test can stand in another."""
    import torch

    installed = str(torch.__version__)
    match = re.match(r"(\d+)\.(\d+)", installed)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def require_torch(feature: str, minimum: tuple[int, int]) -> None:
    """Raise ``TorchVersionError`` unless the installed torch is at least ``minimum``."""
    if torch_version() < minimum:
        import torch

        raise TorchVersionError(feature, str(torch.__version__), minimum, CORE_MINIMUM)
