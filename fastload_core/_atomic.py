"""Publishing a file so that readers see the old version or the whole new one, never a torn one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def publish_file(target: Path, write: Callable[[Path], object]) -> None:
    """Have ``write`` fill a unique temporary file beside ``target``, fsync it, rename it over ``target``.

    A crash at any point leaves ``target`` as it was (plus, at worst, a dot-named temporary file);
    the rename is atomic on one filesystem, and the fsync makes the bytes durable before the name is.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(descriptor)
    temporary = Path(name)
    try:
        write(temporary)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
