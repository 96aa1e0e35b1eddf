"""Parse and validate a safetensors header before a single tensor byte is touched.

Every number in the header is checked against the real file size first, so a corrupt or hostile
file produces a ``HeaderError`` naming the problem instead of a huge allocation, a hang or a crash.
"""

from __future__ import annotations

import gc
import json
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import torch

from ..errors import HeaderError, TruncatedFileError, UnsupportedDtypeError

# safetensors' own limit: headers hold names and shapes, never data.
MAX_HEADER_BYTES = 100_000_000
# torch counts elements in a signed 64-bit integer; a shape whose running product passes it is refused (as
# safetensors refuses one that overflows its usize), even when a later zero would make the product 0.
MAX_ELEMENTS = 2**63 - 1

# Every dtype name the safetensors format defines, mapped to torch where this torch build has it.
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2": "float8_e5m2", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
}  # fmt: skip
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in _DTYPE_NAMES.items() if hasattr(torch, attr)
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    path: str
    file_size: int
    data_start: int
    tensors: tuple[TensorEntry, ...]  # in file order
    metadata: dict[str, str] | None

    @property
    def data_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.tensors)

    @property
    def span(self) -> tuple[int, int]:
        """File offsets from the first tensor byte to past the last one: what a loader must read."""
        if not self.tensors:
            return self.data_start, self.data_start
        return self.tensors[0].start, max(entry.end for entry in self.tensors)


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of the safetensors file at ``path``."""
    with open(path, "rb") as file:
        return read_header_from(file, path)


def read_header_from(file: BinaryIO, path: str | os.PathLike[str]) -> Header:
    """Validate the header of an open file: loading then reads the same inode, even if ``path``
    is replaced by a newer version in the meantime."""
    file_size = os.fstat(file.fileno()).st_size
    header_len = header_length(path, os.pread(file.fileno(), 8, 0), file_size)
    raw = os.pread(file.fileno(), header_len, 8)
    return parse_header(path, raw, file_size)


def header_length(path: str | os.PathLike[str], prefix: bytes, file_size: int) -> int:
    """The header length the file's first 8 bytes give, checked before anything that size is read or waited
    for (a hostile or damaged length must be an error that names the file, not a huge allocation)."""
    if len(prefix) < 8:
        raise TruncatedFileError(path, f"only {file_size} bytes: too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES:
        raise HeaderError(
            path,
            f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit; "
            "the file is corrupt or not a safetensors file",
        )
    if 8 + header_len > file_size:
        raise TruncatedFileError(
            path,
            f"header length {header_len} runs past the end of the {file_size}-byte file; "
            "the file is truncated or not a safetensors file",
        )
    return int(header_len)


def parse_header(path: str | os.PathLike[str], raw: bytes, file_size: int) -> Header:
    """Validate the JSON header ``raw`` of a file of ``file_size`` bytes.

    The cyclic garbage collector is paused meanwhile: a header of hundreds of tensors allocates
    thousands of acyclic dicts and lists, and in a fresh process that burst is what triggers the
    first full collection over the ~170k objects ``import torch`` left (about 0.1 s on 2 cores),
    inside the load. The collection still happens, at the process's next burst of allocations.
    """
    with gc_paused():
        return _parse_header(path, raw, file_size)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a burst of acyclic allocations, then give the caller back
    the state it had (a caller that had it off keeps it off)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _parse_header(path: str | os.PathLike[str], raw: bytes, file_size: int) -> Header:
    data_start = 8 + len(raw)
    try:
        document = loads_strict(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(path, f"header is not valid UTF-8 JSON ({exc}); the file is corrupt") from None
    except DuplicateKeyError as exc:
        raise HeaderError(path, f"header names {exc.key!r} twice; safetensors refuses such a file and so does "
                                "fastload (which copy would be meant?)") from None
    except ValueError as exc:  # json's other refusal: an integer past Python's int-to-str digit limit
        raise HeaderError(path, f"header holds a number too long to be a size or offset ({exc}); the file is "
                                "corrupt or hostile") from None
    except RecursionError:
        raise HeaderError(path, "header nests arrays or objects too deeply to be a safetensors header; the file "
                                "is corrupt or hostile") from None
    if not isinstance(document, dict):
        raise HeaderError(path, f"header must be a JSON object, found {type(document).__name__}")
    metadata = document.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise HeaderError(path, "__metadata__ must map strings to strings")
    data_len = file_size - data_start
    entries = [_parse_entry(path, name, value, data_start, data_len) for name, value in document.items()]
    entries.sort(key=lambda entry: (entry.start, entry.end))
    previous: TensorEntry | None = None
    for entry in entries:
        if previous is not None and entry.start < previous.end:
            raise HeaderError(
                path,
                f"tensors {previous.name!r} and {entry.name!r} overlap "
                f"(bytes {previous.start - data_start}-{previous.end - data_start} and "
                f"{entry.start - data_start}-{entry.end - data_start})",
            )
        if entry.nbytes:
            previous = entry
    return Header(str(path), file_size, data_start, tuple(entries), metadata)


def _parse_entry(
    path: str | os.PathLike[str], name: str, value: object, data_start: int, data_len: int
) -> TensorEntry:
    if not isinstance(value, dict):
        raise HeaderError(path, f"entry for tensor {name!r} must be an object, found {value!r:.80}")
    dtype_name, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if not isinstance(dtype_name, str):
        raise HeaderError(path, f"tensor {name!r} has no dtype string")
    if dtype_name not in DTYPES:
        known = "unknown to safetensors" if dtype_name not in _DTYPE_NAMES else "not supported by this torch"
        raise UnsupportedDtypeError(
            path,
            f"tensor {name!r} has dtype {dtype_name!r}, {known} (torch {torch.__version__}); "
            f"supported: {', '.join(DTYPES)}",
            dtype_name,
        )
    if not (isinstance(shape, list) and all(_is_count(dim) for dim in shape)):
        raise HeaderError(path, f"tensor {name!r} has shape {shape!r:.80}; expected a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise HeaderError(path, f"tensor {name!r} has data_offsets {offsets!r:.80}; expected [begin, end]")
    begin, end = offsets
    if begin > end or end > data_len:
        if end > data_len and begin <= end:
            raise TruncatedFileError(
                path,
                f"tensor {name!r} ends at byte {end} of the data section, but the file holds only "
                f"{data_len} data bytes; the file is truncated",
            )
        raise HeaderError(path, f"tensor {name!r} has data_offsets [{begin}, {end}] out of order")
    # The overflow check comes first and stops at the first dimension past the limit: a hostile shape of
    # hundreds of thousands of 2s would otherwise be multiplied out into an integer too long to even print.
    elements = 1
    for dim in shape:  # in order, as torch and safetensors multiply: a later 0 does not undo an overflow
        elements *= dim
        if elements > MAX_ELEMENTS:
            raise HeaderError(path, f"tensor {name!r} has a shape of {len(shape)} dimensions, {shape[:8]!r:.120}, "
                                    "which needs more elements than a 64-bit integer counts (it overflows); the "
                                    "file is corrupt or hostile")
    dtype = DTYPES[dtype_name]
    expected = elements * dtype.itemsize
    if expected != end - begin:
        raise HeaderError(
            path,
            f"tensor {name!r} of shape {shape!r:.120} and dtype {dtype_name} needs {expected} bytes "
            f"but its data_offsets span {end - begin}",
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


class DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"duplicate key {key!r}")


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKeyError(key)
        result[key] = value
    return result


def loads_strict(text: str) -> object:
    """``json.loads`` that refuses a key given twice in one object (Python keeps the last silently; serde,
    which safetensors uses, refuses the file). Deep nesting still raises ``RecursionError``: callers turn it
    into their own error."""
    return json.loads(text, object_pairs_hook=_unique_pairs)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
