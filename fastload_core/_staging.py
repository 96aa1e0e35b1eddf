"""Private staging directories for writers that leave temporary files of their own.

safetensors' ``save_file`` writes a ``.tmpXXXXXX`` file beside the name it is given and renames it at the
end; killed half-way (an OOM kill, a SIGKILL from a supervisor), it leaves a file as large as the model.
fastload therefore has it write inside ``<folder>/.fastload-staging-<random>/``, a directory whose writer
holds an ``flock`` on it for its whole life. A later write into the same folder, and ``fastload cache gc``
for the converted-checkpoint cache, remove staging directories whose lock is free (the writer is gone; the
kernel drops the lock of a dead process) and that are older than a minute (which covers the instant between
creating a directory and locking it).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("fastload")

PREFIX = ".fastload-staging-"
STALE_AFTER = 60.0  # seconds


@contextlib.contextmanager
def staging_dir(parent: Path) -> Iterator[Path]:
    """A fresh private directory in ``parent`` (same filesystem, so its files can be renamed into place),
    locked while the block runs and removed after it; stale ones left by killed writers are swept first."""
    parent.mkdir(parents=True, exist_ok=True)
    sweep(parent)
    path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def sweep(parent: Path, *, max_age: float = STALE_AFTER) -> int:
    """Remove the staging directories in ``parent`` whose writer is gone and that are older than
    ``max_age`` seconds. Returns how many were removed."""
    removed = 0
    try:
        names = [name for name in os.listdir(parent) if name.startswith(PREFIX)]
    except (FileNotFoundError, NotADirectoryError):
        return 0
    now = time.time()
    for name in names:
        path = parent / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode) or now - st.st_mtime < max_age:
            continue  # a link or file under our prefix is not ours to touch; a young directory may be starting
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is still running
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
            log.info("removed %s, left by a killed writer", path)
        finally:
            os.close(fd)
    return removed
