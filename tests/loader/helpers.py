"""Builders for hand-made (often broken) safetensors files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_raw(path: Path, header: object | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    """Write a file with an arbitrary header: a dict is JSON-encoded, bytes go in verbatim."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    return path


def write_stale_shard_checkpoint(root: Path, v: torch.Tensor) -> None:
    """A sharded checkpoint whose index maps ``w`` (ones(3)) to the first shard and ``v`` to the second,
    while the second still holds a zeroed ``w`` and a ``stale`` tensor no index entry names (as a re-shard
    leaves them): a loader that takes every shard's tensors, or takes them in name order, gets ``w`` wrong."""
    save_file({"w": torch.ones(3)}, root / "model-00001-of-00002.safetensors")
    save_file({"w": torch.zeros(3), "v": v, "stale": torch.ones(1000)}, root / "model-00002-of-00002.safetensors")
    weight_map = {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
