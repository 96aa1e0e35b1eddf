"""Settings that come from the environment, read when used so tests and workers can change them."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of fastload's on-disk cache (converted checkpoints, the local-disk tier, compile artifacts)."""
    configured = os.environ.get("FASTLOAD_CACHE_DIR")
    if configured:
        return Path(configured)
    import platformdirs  # only where the directory is not configured; it is not free to import

    return Path(platformdirs.user_cache_dir("fastload"))
