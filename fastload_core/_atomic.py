"""Publishing a file so that readers see the old version or the whole new one, never a torn one."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

_READ_BITS = stat.S_IRGRP | stat.S_IROTH


def publish_file(
    target: Path, write: Callable[[Path], object], *, readable_like: str | os.PathLike[str] | None = None
) -> None:
    """Have ``write`` fill a unique temporary file beside ``target``, fsync it, rename it over ``target``.

    A crash at any point leaves ``target`` as it was (plus, at worst, a dot-named temporary file);
    the rename is atomic on one filesystem, and the fsync makes the bytes durable before the name is.

    The file gets the mode of any file this process creates (0644 under the usual umask 022), so
    workers under another user and readers on a shared mount can open it; with ``readable_like``
    (the file it was made from) it is readable by whoever can read that source, no one else: a
    0600 source gives 0600. The mode is set before a byte is written, so there is no moment in
    which a private source's bytes are readable by others.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary, descriptor = _create_unique(target)
    try:
        try:
            # Created 0666: what the kernel left (umask, a default ACL) is what a new file may have.
            mode = stat.S_IMODE(os.fstat(descriptor).st_mode) & mode_like(readable_like)
            os.fchmod(descriptor, mode)
        finally:
            os.close(descriptor)
        write(temporary)
        # Writers may recreate the file with their own mode (safetensors' save_file makes it 0600).
        os.chmod(temporary, mode, follow_symlinks=False)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def mode_like(source: str | os.PathLike[str] | None) -> int:
    """The permission bits a file made from ``source`` may have; the umask takes its share too.
    The owner reads and writes; group and others read only where they can read ``source``
    (None: no source, 0666 before the umask, as for any new file)."""
    if source is None:
        return 0o666
    return readable_like_mode(os.stat(source).st_mode)


def readable_like_mode(source_mode: int) -> int:
    """``mode_like`` for a source already open (its ``st_mode``): a 0600 source gives 0600, 0644 gives 0644."""
    return stat.S_IRUSR | stat.S_IWUSR | (source_mode & _READ_BITS)


def _create_unique(target: Path) -> tuple[Path, int]:
    """Create a new empty file beside ``target`` under a name nobody else uses. Unlike
    ``tempfile.mkstemp`` (always 0600), it is created 0666 so the kernel applies the umask and any
    default ACL of the directory, as for any file the user creates."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        temporary = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            return temporary, os.open(temporary, flags, 0o666)
        except FileExistsError:
            continue
