"""Naming: parse model URIs, redact credentials, and confine keys to a tier's root.

Everything that turns an outside string (a URI, an S3 key, a file name in a listing) into a path on this
machine goes through here, so the rules that keep a hostile listing from writing outside a tier live in
one place.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import BadURIError, UnsafeKeyError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@]*@")
# S3 and S3-compatible stores (Ceph RGW, MinIO) accept a little more than AWS's strict rules; stay permissive
# but never allow characters that change how the URI or a path is read.
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{1,254}$")
_MAX_COMPONENT = 255
_MAX_KEY = 1024


def redact(text: str) -> str:
    """``text`` with any ``user:password@`` part of a URL removed, for logs and error messages."""
    return _USERINFO.sub(r"\1***@", str(text))


def is_uri(source: str | os.PathLike[str]) -> bool:
    return isinstance(source, str) and "://" in source


@dataclass(frozen=True)
class ModelURI:
    """A parsed model URI. ``path`` is the object key or prefix for remote schemes, the absolute path for
    ``file``. ``bare`` marks a plain local path (served where it lies unless a tier is asked for)."""

    scheme: str
    netloc: str
    path: str
    bare: bool = False

    @property
    def is_prefix(self) -> bool:
        return self.scheme != "file" and (self.path == "" or self.path.endswith("/"))

    def __str__(self) -> str:
        if self.bare:
            return self.path
        if self.scheme == "file":
            return "file://" + self.path
        return f"{self.scheme}://{self.netloc}/{self.path}"

    def as_prefix(self) -> ModelURI:
        return ModelURI(self.scheme, self.netloc, self.path.rstrip("/") + "/", self.bare)

    @property
    def slug(self) -> str:
        """A stable, filesystem-safe directory name for this model in a tier: a readable tail plus a hash of
        the whole URI, so two URIs never share an entry and nothing in the URI can steer the path."""
        digest = hashlib.sha256(str(self).encode()).hexdigest()[:16]
        tail = PurePosixPath(self.path.rstrip("/")).name or self.netloc or "root"
        tail = re.sub(r"[^A-Za-z0-9._\-]", "_", tail)[:48].lstrip(".") or "model"
        return f"{self.scheme}-{tail}-{digest}"


def parse_uri(source: str | os.PathLike[str]) -> ModelURI:
    """Parse ``source``: ``s3://bucket/key``, ``s3://bucket/prefix/``, ``file:///abs/path``, another
    registered scheme (``scheme://netloc/path``), or a plain local path."""
    if not is_uri(source):
        path = os.path.abspath(os.fspath(source))
        return ModelURI("file", "", path, bare=True)
    text = str(source)
    shown = redact(text)
    match = _SCHEME.match(text)
    if not match:
        raise BadURIError(shown, "expected scheme://location, for example s3://bucket/models/m1/")
    scheme = match.group(1).lower()
    rest = text[match.end():]
    netloc, _, path = rest.partition("/")
    if "@" in netloc:
        raise BadURIError(shown, "credentials must not be embedded in the URI; use the standard AWS "
                                 "configuration (environment, ~/.aws, instance role) instead")
    if any(ch in text for ch in "\x00\r\n\t"):
        raise BadURIError(shown, "contains control characters")
    if scheme == "file":
        if netloc not in ("", "localhost"):
            raise BadURIError(shown, "file URIs name a local mount: file:///mnt/models/m1 (no host)")
        fs_path = urllib.parse.unquote("/" + path)
        _reject_dot_segments(shown, fs_path)
        return ModelURI("file", "", os.path.normpath(fs_path) if fs_path != "/" else "/")
    if not netloc:
        raise BadURIError(shown, f"{scheme} URIs need a bucket or host: {scheme}://bucket/key")
    if scheme == "s3":
        if not _BUCKET.match(netloc):
            raise BadURIError(shown, f"{netloc!r} is not a valid bucket name")
        if path.startswith("/"):
            raise BadURIError(shown, "key starts with '/'; write s3://bucket/key")
        if len(path) > _MAX_KEY:
            raise BadURIError(shown, f"key longer than {_MAX_KEY} bytes")
    _reject_dot_segments(shown, path)
    return ModelURI(scheme, netloc, path)


def _reject_dot_segments(shown: str, path: str) -> None:
    parts = path.strip("/").split("/")
    if any(part in (".", "..") for part in parts):
        raise BadURIError(shown, "'.' and '..' segments are not allowed; write the path they resolve to")
    if "//" in path.strip("/"):
        raise BadURIError(shown, "empty path segment ('//')")


def safe_relpath(name: str, *, uri: str | None = None) -> str:
    """Validate a file's name relative to a model root (an S3 key minus its prefix, a file in a directory)
    and return it unchanged. A listing is outside input: anything that could climb out of the tier, hide as
    a dotfile trick, or confuse a filesystem is refused instead of being "cleaned"."""
    if not name:
        raise UnsafeKeyError(name, "empty name", uri=uri)
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UnsafeKeyError(name, "absolute path", uri=uri)
    if "\\" in name:
        raise UnsafeKeyError(name, "backslash in name", uri=uri)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise UnsafeKeyError(name, "control character in name", uri=uri)
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafeKeyError(name, f"path segment {part!r} is not allowed", uri=uri)
        if len(part.encode()) > _MAX_COMPONENT:
            raise UnsafeKeyError(name, f"path segment longer than {_MAX_COMPONENT} bytes", uri=uri)
    if len(name.encode()) > _MAX_KEY:
        raise UnsafeKeyError(name, f"name longer than {_MAX_KEY} bytes", uri=uri)
    return name


def confine(root: Path, name: str, *, uri: str | None = None) -> Path:
    """``root / name`` after checking that no existing component of it is a symlink and that it resolves
    inside ``root``. Used for every path a tier writes or serves."""
    safe_relpath(name, uri=uri)
    candidate = root.joinpath(*name.split("/"))
    probe = root
    for part in name.split("/"):
        probe = probe / part
        if probe.is_symlink():
            raise UnsafeKeyError(name, f"{probe} is a symlink; tiers never follow links", uri=uri)
    real_root = os.path.realpath(root)
    real = os.path.realpath(candidate)
    if os.path.commonpath([real_root, real]) != real_root:
        raise UnsafeKeyError(name, f"resolves outside {root}", uri=uri)
    return candidate
