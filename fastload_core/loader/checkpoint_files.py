"""Which files of a model directory make up its checkpoint, and which tensors each of them contributes.

Shared by the local loader (``api``) and the streamed one (``streaming``), so that the first load of a URI,
streamed while it downloads, and every later one, from the cached files, take the same tensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Collection
from pathlib import Path

from ..errors import CheckpointError, MissingShardError
from .header import Header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def choose_files(
    where: str | os.PathLike[str], names: Collection[str], read_index: Callable[[], bytes]
) -> list[tuple[str, set[str] | None]] | None:
    """Which of the files directly in the model directory ``where`` (``names``) make up its checkpoint:
    the shards its index names, else ``model.safetensors``, else its only ``.safetensors`` file. Each comes
    with the tensor names the index maps to it (None: all of its tensors), which are all that is taken from
    it (``indexed_part``). None when the names cannot tell (no ``.safetensors`` file, or several and neither
    an index nor ``model.safetensors``): the local loader then looks inside the files, or refuses.

    Decided by file names alone, and ``read_index`` called only when there is an index, so that a streamed
    load can decide from a download's manifest before its files have landed: the first load of a URI and
    every later one, from the cached files, take the same tensors."""
    if INDEX_NAME in names:
        index = os.path.join(where, INDEX_NAME)
        shards = _index_shards(index, read_index())
        missing = sorted(shard for shard in shards if shard not in names)
        if missing:
            raise MissingShardError(index, f"names shard(s) {missing} that are not in {os.fspath(where)}")
        return [(shard, tensor_names) for shard, tensor_names in sorted(shards.items())]
    if SINGLE_NAME in names:
        return [(SINGLE_NAME, None)]
    candidates = [name for name in names if name.endswith(".safetensors")]
    return [(candidates[0], None)] if len(candidates) == 1 else None


def _index_shards(index: str, text: bytes) -> dict[str, set[str]]:
    """The shard files a sharded index's ``weight_map`` names, each with the tensor names mapped to it."""
    try:
        weight_map = json.loads(text)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(index, f"not a valid sharded index: {exc!r:.300}") from None
    except RecursionError:
        raise CheckpointError(index, "not a valid sharded index: it nests arrays or objects too deeply") from None
    expected: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(index, f"tensor {name!r} maps to {shard!r:.200}; a shard must be a file name, "
                                         "not a path")
        expected.setdefault(shard, set()).add(name)
    return expected


def indexed_part(path: str | os.PathLike[str], header: Header, expected: set[str] | None) -> Header:
    """``header`` narrowed to the tensors the index maps to this shard (``expected``; None: all of them).

    The index decides, as in transformers: a tensor a shard holds but the index maps elsewhere (a stale
    shard left by a re-shard, say) is not taken, so which copy of a name is loaded never depends on the
    order of file names. A tensor the index maps here that the shard lacks is an error naming it."""
    if expected is None:
        return header
    held = {entry.name for entry in header.tensors}
    if absent := expected - held:
        raise CheckpointError(path, f"the index maps {sorted(absent)[:5]} to this shard but it lacks them")
    if len(held) == len(expected):
        return header
    return dataclasses.replace(header, tensors=tuple(entry for entry in header.tensors if entry.name in expected))
