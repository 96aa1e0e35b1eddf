"""The packed entry: a small header, then a gzip'd tar of what lets a fresh process skip compiling.

Layout::

    b"FLCC" | u16 format | u32 header length | sha256 of the rest | header (JSON) | payload (tar.gz)

The payload holds ``mega.bin`` (torch's portable mega-cache, from ``torch.compiler.save_cache_artifacts``)
and ``inductor/...``, the inductor cache directory the compile wrote: FX-graph and AOTAutograd cache
entries plus the built kernels (``.so`` on CPU, Triton cubins on GPU). The mega-cache alone is not
enough on CPU: it holds generated C++ source, and inductor rebuilds the libraries from it, which is
most of the cold-start time.

The checksum covers header and payload, and the header records the key's fields, so truncation, bit
rot or an entry stored under the wrong key are caught before a single file is written.

A checksum stops accidents, not people: anyone who can write to a shared Redis or bucket can store an
entry whose checksum is right and whose kernels (or pickled mega-cache) run their code in every replica
that restores it. With ``FASTLOAD_COMPILE_CACHE_SECRET`` set, the checksum slot holds an HMAC-SHA256
under that secret instead and the header says ``"signed": true``; an entry that is unsigned or signed
with another secret is then corrupt (a miss, replaced after the compile) and is rejected before a byte
of its payload is unpacked or unpickled. A process without the secret cannot check a signed entry and
treats it as built for another configuration, so set the secret on every replica or on none.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import shutil
import struct
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CorruptEntryError
from .keys import FORMAT_VERSION, CompileKey

#: A shared secret; when set, entries are signed on save and unsigned or wrongly signed ones are refused.
SECRET_VARIABLE = "FASTLOAD_COMPILE_CACHE_SECRET"
MAGIC = b"FLCC"
_PREFIX = struct.Struct(">4sHI32s")
#: Enough bytes to read any header we write; listings fetch only this much of each entry.
HEADER_PROBE_BYTES = 64 * 1024
_MEGA = "mega.bin"
_INDUCTOR = "inductor"


class EntryMismatchError(CorruptEntryError):
    """The entry is intact but was built for something else (another torch version, another key)."""


@dataclass(frozen=True)
class Restored:
    """What an unpacked entry put on disk."""

    files: int
    nbytes: int
    mega: bytes | None
    header: dict[str, Any] = field(repr=False)


def pack(key: CompileKey, inductor_dir: Path, mega: bytes | None) -> bytes:
    """Pack an inductor cache directory and the mega-cache bytes into one verifiable entry."""
    payload = io.BytesIO()
    files = total = 0
    # Level 3: compiled kernels shrink about 3x; higher levels cost seconds on GPU-sized entries.
    with tarfile.open(fileobj=payload, mode="w:gz", compresslevel=3) as tar:
        if mega is not None:
            info = tarfile.TarInfo(_MEGA)
            info.size = len(mega)
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(mega))
        for path in _cache_files(inductor_dir):
            relative = path.relative_to(inductor_dir).as_posix()
            tar.add(path, arcname=f"{_INDUCTOR}/{relative}", recursive=False)
            files += 1
            total += path.stat().st_size
    header = {
        "format": FORMAT_VERSION,
        "key": key.digest,
        "fields": dict(key.fields),
        "created": time.time(),
        "files": files,
        "inductor_bytes": total,
        "mega_bytes": len(mega) if mega is not None else 0,
    }
    return assemble(header, payload.getvalue())


def signing_secret() -> bytes | None:
    """The secret entries are signed and checked with, or None (read on every use, so tests and operators
    can change it without a restart)."""
    secret = os.environ.get(SECRET_VARIABLE, "")
    return secret.encode() if secret else None


def assemble(header: dict[str, Any], payload: bytes) -> bytes:
    """Prefix, header and payload, with the checksum (or, with a secret, the signature) over everything
    after the prefix."""
    secret = signing_secret()
    encoded = json.dumps({**header, "payload_size": len(payload), "signed": secret is not None},
                         sort_keys=True).encode()
    digest = hashlib.sha256(encoded) if secret is None else hmac.new(secret, encoded, hashlib.sha256)
    digest.update(payload)
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(encoded), digest.digest()) + encoded + payload


def _check_integrity(blob: bytes, header: dict[str, Any], key: str) -> None:
    """The checksum, or with a secret set the signature, over everything after the prefix."""
    secret = signing_secret()
    signed = header.get("signed") is True
    if secret is None and signed:
        raise EntryMismatchError(key, f"the entry is signed and {SECRET_VARIABLE} is not set here, so it "
                                      "cannot be checked")
    if secret is None:
        if hashlib.sha256(memoryview(blob)[_PREFIX.size:]).digest() != header["_sha256"]:
            raise CorruptEntryError(key, "sha256 does not match: the entry was altered or damaged")
        return
    if not signed:
        raise CorruptEntryError(key, f"the entry is unsigned and {SECRET_VARIABLE} is set: not loading it")
    expected = hmac.new(secret, memoryview(blob)[_PREFIX.size:], hashlib.sha256).digest()
    if not hmac.compare_digest(expected, header["_sha256"]):
        raise CorruptEntryError(key, "the signature does not match: the entry was altered, damaged or signed "
                                     f"with another {SECRET_VARIABLE}")


def read_header(blob: bytes, key: str = "?") -> dict[str, Any]:
    """Parse the header from the start of an entry (the whole entry is not needed)."""
    if blob[: len(MAGIC)] != MAGIC[: len(blob)]:
        raise CorruptEntryError(key, f"bad magic {blob[:4]!r}: not a fastload compile-cache entry")
    if len(blob) < _PREFIX.size:
        raise CorruptEntryError(key, f"only {len(blob)} bytes, shorter than the entry prefix")
    _, version, length, digest = _PREFIX.unpack_from(blob)
    if version != FORMAT_VERSION:
        raise EntryMismatchError(key, f"entry format {version}, this fastload reads format {FORMAT_VERSION}")
    end = _PREFIX.size + length
    if len(blob) < end:
        raise CorruptEntryError(key, f"header of {length} bytes is cut short at {len(blob)} bytes")
    try:
        header = json.loads(blob[_PREFIX.size:end])
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than Python can parse
        raise CorruptEntryError(key, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CorruptEntryError(key, "header is not a JSON object")
    header["_payload_offset"] = end
    header["_sha256"] = digest
    return header


def verify(blob: bytes, key: CompileKey) -> dict[str, Any]:
    """Check length, checksum or signature, and that the entry was built for exactly this key's fields."""
    header = read_header(blob, key.digest)
    payload_size = len(blob) - header["_payload_offset"]
    if payload_size != header.get("payload_size"):
        expected = header.get("payload_size")
        raise CorruptEntryError(key.digest, f"payload is {payload_size} bytes, header says {expected} "
                                            "(truncated?)")
    _check_integrity(blob, header, key.digest)
    recorded = header.get("fields") or {}
    if not isinstance(recorded, dict):  # checksum-valid but not what pack() writes: never compare into it
        raise CorruptEntryError(key.digest, f"header fields are a JSON {type(recorded).__name__}, not an object")
    differing = sorted(name for name in set(recorded) | set(key.fields)
                       if recorded.get(name) != key.fields.get(name))
    if header.get("key") != key.digest or differing:
        shown = ", ".join(f"{name}: entry {recorded.get(name)!r} vs here {key.fields.get(name)!r}"
                          for name in differing[:4])
        raise EntryMismatchError(key.digest, f"built for another configuration ({shown or 'key differs'})")
    return header


def unpack(blob: bytes, key: CompileKey, dest: Path) -> Restored:
    """Verify an entry, then publish its inductor files into ``dest`` and return the mega-cache bytes.

    Files are extracted to a private sibling directory first and then renamed into place one by one,
    so another process using ``dest`` at the same moment sees each file either absent or complete.
    Inductor names its files by content hash, so replacing one that exists changes nothing.
    """
    header = verify(blob, key)
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=dest.parent))
    try:
        payload = io.BytesIO(memoryview(blob)[header["_payload_offset"]:])
        try:
            with tarfile.open(fileobj=payload, mode="r:gz") as tar:
                # "data" rejects absolute names, "..", links that leave the directory and device files.
                tar.extractall(staging, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise CorruptEntryError(key.digest, f"payload does not unpack safely: {exc}") from None
        mega_path = staging / _MEGA
        mega = mega_path.read_bytes() if mega_path.is_file() else None
        files = total = 0
        root = staging / _INDUCTOR
        for path in _cache_files(root) if root.is_dir() else []:
            target = dest / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            total += path.stat().st_size
            os.replace(path, target)
            files += 1
        return Restored(files=files, nbytes=total, mega=mega, header=header)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _cache_files(root: Path) -> Iterator[Path]:
    """Files worth carrying: everything but lock files and other processes' half-written temp files."""
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d != "locks" and not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or name.endswith((".lock", ".tmp")):
                continue
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                yield path
