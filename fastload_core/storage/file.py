"""The ``file://`` origin: a model on a mounted filesystem (a CephFS/NFS share, a local directory).

A shared mount is slow and far away compared with local disk or /dev/shm, so a ``file://`` model is copied
into the target tier like any remote. A file's identity is its size and mtime: a rewritten file becomes a
new version. Symlinks are followed only if they stay inside the model's directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import Journal, Origin
from .copy import copy_manifest
from .errors import OriginError, UnsafeKeyError
from .meta import Checksums, Manifest, RemoteFile
from .progress import Progress
from .uri import ModelURI, parse_uri, safe_relpath


class FileOrigin(Origin):
    scheme = "file"

    def resolve(self, uri: ModelURI, revision: str | None) -> Manifest:
        root = Path(uri.path)
        shown = str(uri)
        if revision is not None:  # taking the files as they are now would hand out another version silently
            raise OriginError(shown, f"a path has no revisions, so none is {revision!r}; fetch without one",
                              code="NoSuchVersion")
        if root.is_file():
            stat = root.stat()
            name = safe_relpath(root.name, uri=shown)
            item = RemoteFile(name, stat.st_size, "", identity=f"{stat.st_size}-{stat.st_mtime_ns}")
            return Manifest(shown, (item,), single=True)
        if not root.is_dir():
            raise OriginError(shown, "no such file or directory; check the path and that the mount is up",
                              code="NotFound")
        real_root = os.path.realpath(root)
        files: list[RemoteFile] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not _links_out(Path(dirpath) / d, real_root, shown))
            for filename in sorted(filenames):
                path = Path(dirpath) / filename
                _links_out(path, real_root, shown)
                relative = path.relative_to(root).as_posix()
                safe_relpath(relative, uri=shown)
                stat = path.stat()
                files.append(RemoteFile(relative, stat.st_size, relative,
                                        identity=f"{stat.st_size}-{stat.st_mtime_ns}"))
        if not files:
            raise OriginError(shown, "directory is empty", code="NotFound")
        return Manifest(shown, tuple(files), single=False)

    def download(self, manifest: Manifest, dest: Path, *, journal: Journal, progress: Progress) -> Checksums:
        root = Path(parse_uri(manifest.uri).path)
        return copy_manifest(manifest, root, dest, expected={}, progress=progress)


def _links_out(path: Path, real_root: str, shown: str) -> bool:
    """Refuse a symlink whose target leaves the model directory; returns False for anything acceptable."""
    if path.is_symlink():
        target = os.path.realpath(path)
        if os.path.commonpath([real_root, target]) != real_root:
            raise UnsafeKeyError(str(path), f"symlink points outside the model directory (to {target})",
                                 uri=shown)
    return False
