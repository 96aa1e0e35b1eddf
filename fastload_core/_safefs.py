"""Walking a directory fastload owns without following symlinks.

A cache directory can be reachable by others: ``/dev/shm`` is writable by every user, and a shared mount by
every node. If fastload followed a link planted there, an entry's writes could land anywhere and a forged
entry could be served as a model. So below a cache root every path is opened one component at a time,
relative to its parent's descriptor, with ``O_NOFOLLOW``; each component must be a directory or a regular
file owned by the user running fastload (or root); a directory that every user may write to must carry the
sticky bit (as /dev/shm does), so that nobody else can rename what fastload put there.

Why that is enough against races: a check is only defeated by swapping a path component between the check
and its use, which needs write access to the directory holding it, and those directories are owned by the
user or root and not writable by strangers. The cache root itself is taken as configured (an administrator
may point it through a link); only its owner and permissions are checked.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(Exception):
    """A path under a cache root is a link, not a regular file or directory, or belongs to someone else.
    Internal: the storage and loader layers turn it into their own ``FastloadError``."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path} {problem}")


def _trusted(uid: int) -> bool:
    return uid in (0, os.geteuid())


def problem_with(st: os.stat_result, *, want: str | None = None) -> str | None:
    """Why a path with this ``lstat`` result must not be used (None when it may). ``want`` is ``"dir"``,
    ``"file"`` or None for either."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "is a symbolic link; fastload never follows links inside its cache: remove it"
    kinds = {"dir": stat.S_ISDIR(mode), "file": stat.S_ISREG(mode)}
    if want is not None and not kinds[want]:
        return f"is not a {'directory' if want == 'dir' else 'regular file'}: remove it"
    if not any(kinds.values()):
        return "is neither a regular file nor a directory: remove it"
    if not _trusted(st.st_uid):
        return (f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}) or root; another user "
                "may have planted it: remove it")
    if stat.S_ISDIR(mode) and mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        return "is a directory every user may write to (mode o+w without the sticky bit): chmod o-w it"
    return None


def check(st: os.stat_result, path: str | os.PathLike[str], *, want: str | None = None) -> None:
    problem = problem_with(st, want=want)
    if problem is not None:
        raise UnsafePath(path, problem)


def check_path(path: str | os.PathLike[str], *, want: str | None = None) -> os.stat_result | None:
    """``lstat`` ``path`` and check it; None when it does not exist."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    check(st, path, want=want)
    return st


def _refused(parent_fd: int, name: str, shown: Path, exc: OSError, want: str) -> UnsafePath:
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except OSError:
        return UnsafePath(shown, f"cannot be opened ({exc.strerror})")
    return UnsafePath(shown, problem_with(st, want=want) or f"cannot be opened ({exc.strerror})")


def open_root(root: Path, *, create: bool = False) -> int:
    """A descriptor of the cache root (links in its configured path are the administrator's choice)."""
    if create:
        root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        check(os.fstat(fd), root, want="dir")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_dir(base: Path, parts: Sequence[str], *, create: bool = False) -> int:
    """A descriptor of ``base/parts...``: every component below ``base`` opened relative to its parent with
    ``O_NOFOLLOW`` and checked, created (mode 0755) where missing when ``create``. Raises ``UnsafePath``,
    or ``FileNotFoundError`` for a missing component when not creating."""
    fd = open_root(base, create=create)
    shown = base
    try:
        for part in parts:
            shown = shown / part
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    raise _refused(fd, part, shown, exc, "dir") from None
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _refused(fd, part, shown, exc, "dir") from None
                raise
            os.close(fd)
            fd = child
            check(os.fstat(fd), shown, want="dir")
    except BaseException:
        os.close(fd)
        raise
    return fd


def secure_dir(base: Path, parts: Sequence[str], *, create: bool = False) -> Path:
    """``base/parts...`` after ``open_dir`` checked (and, with ``create``, made) every component."""
    os.close(open_dir(base, parts, create=create))
    return base.joinpath(*parts)


def open_file(path: str | os.PathLike[str], flags: int, mode: int = 0o644, *, dir_fd: int | None = None) -> int:
    """``os.open`` with ``O_NOFOLLOW``, then check that what was opened is a regular file fastload may trust."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise UnsafePath(path, problem_with(os.stat(path, dir_fd=dir_fd, follow_symlinks=False), want="file")
                         or "cannot be opened") from None
    try:
        check(os.fstat(fd), path, want="file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def scan_tree(dir_fd: int, shown: Path, prefix: str = "") -> dict[str, int]:
    """Sizes of every regular file under the open directory ``dir_fd`` by relative name, refusing links,
    special files and files of other owners anywhere in it (without following anything)."""
    sizes: dict[str, int] = {}
    with os.scandir(dir_fd) as scan:
        children = [(entry.name, entry.stat(follow_symlinks=False)) for entry in scan]
    for name, st in children:
        check(st, shown / name)
        if stat.S_ISDIR(st.st_mode):
            child = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                sizes.update(scan_tree(child, shown / name, f"{prefix}{name}/"))
            finally:
                os.close(child)
        else:
            sizes[prefix + name] = st.st_size
    return sizes
