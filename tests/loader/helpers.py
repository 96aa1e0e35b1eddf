"""Builders for hand-made (often broken) safetensors files."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def write_raw(path: Path, header: object | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    """Write a file with an arbitrary header: a dict is JSON-encoded, bytes go in verbatim."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    return path
