"""fastload: fast cold starts for PyTorch models in serving frameworks."""

from __future__ import annotations

from . import errors
from .errors import FastloadError

__all__ = ["FastloadError", "errors"]
__version__ = "0.1.0"
