"""Settings that come from the environment, read when used so tests and workers can change them."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """Root of fastload's on-disk cache (converted checkpoints, the local-disk tier, compile artifacts)."""
    configured = os.environ.get("FASTLOAD_CACHE_DIR")
    return Path(configured) if configured else Path(platformdirs.user_cache_dir("fastload"))
