"""Bad headers end in a FastloadError that names the file and the problem — never anything else."""

from __future__ import annotations

import contextlib
import gc
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import fastload_core
from fastload_core.errors import CheckpointError, HeaderError, TruncatedFileError, UnsupportedDtypeError
from fastload_core.loader import header as header_module
from fastload_core.loader.header import MAX_HEADER_BYTES, parse_header, read_header

from .helpers import write_raw

F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


def test_valid_header_lists_tensors_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    save_file({"b": torch.zeros(3), "a": torch.ones(2, dtype=torch.int64)}, path, metadata={"m": "1"})
    header = read_header(path)
    assert [entry.start for entry in header.tensors] == sorted(entry.start for entry in header.tensors)
    assert {entry.name: entry.shape for entry in header.tensors} == {"a": (2,), "b": (3,)}
    assert header.metadata == {"m": "1"}
    assert header.data_bytes == 3 * 4 + 2 * 8
    assert header.file_size == path.stat().st_size


@pytest.mark.parametrize(
    ("content", "error", "fragment"),
    [
        (b"", TruncatedFileError, "too short"),
        (b"\x01\x02\x03", TruncatedFileError, "too short"),
        (struct.pack("<Q", 1000) + b"{}", TruncatedFileError, "past the end"),
        (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", HeaderError, "exceeds"),
        (struct.pack("<Q", 2**64 - 1) + b"{}", HeaderError, "exceeds"),
        (struct.pack("<Q", 5) + b"{nope", HeaderError, "not valid UTF-8 JSON"),
        (struct.pack("<Q", 2) + b"\xff\xfe", HeaderError, "not valid UTF-8 JSON"),
        (struct.pack("<Q", 2) + b"[]", HeaderError, "must be a JSON object"),
    ],
)
def test_broken_prefix_or_json(tmp_path: Path, content: bytes, error: type[Exception], fragment: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(error, match=fragment) as info:
        read_header(path)
    assert info.value.path == str(path)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("entries", "data", "error", "fragment"),
    [
        ({"t": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\0", UnsupportedDtypeError, "'Q7'"),
        ({"t": {"shape": [1], "data_offsets": [0, 1]}}, b"\0", HeaderError, "no dtype"),
        ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, HeaderError, "shape"),
        ({"t": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, HeaderError, "shape"),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4, HeaderError, "data_offsets"),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, HeaderError, "out of order"),
        ({"t": F32_2x2}, b"\0" * 8, TruncatedFileError, "truncated"),
        ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16, HeaderError, "needs 12 bytes"),
        ({"t": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, b"\0" * 16, HeaderError, "needs"),
        ({"a": F32_2x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16, HeaderError,
         "overlap"),
        ({"t": [1, 2]}, b"", HeaderError, "must be an object"),
        ({"__metadata__": {"k": 1}}, b"", HeaderError, "__metadata__"),
    ],
)
def test_bad_tensor_entries(
    tmp_path: Path, entries: dict[str, object], data: bytes, error: type[Exception], fragment: str
) -> None:
    path = write_raw(tmp_path / "bad.safetensors", entries, data)
    with pytest.raises(error, match=fragment):
        read_header(path)


def test_unknown_dtype_error_carries_the_dtype_and_the_supported_list(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "x.safetensors", {"t": {"dtype": "F128", "shape": [], "data_offsets": [0, 16]}},
                     b"\0" * 16)
    with pytest.raises(UnsupportedDtypeError) as info:
        read_header(path)
    assert info.value.dtype == "F128"
    assert "BF16" in str(info.value) and "x.safetensors" in str(info.value)


def test_zero_sized_tensors_may_share_an_offset(tmp_path: Path) -> None:
    empty = {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}
    path = write_raw(tmp_path / "e.safetensors", {"a": empty, "b": empty, "c": F32_2x2}, b"\0" * 16)
    assert {entry.name for entry in read_header(path).tensors} == {"a", "b", "c"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)
entry_values = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X", 3]),
        "shape": st.lists(st.integers(-2, 6) | st.sampled_from([2**31, 2**62, 2**63, 2**64]), max_size=3)
        | json_values,
        "data_offsets": st.lists(st.integers(-2, 80), min_size=0, max_size=3) | json_values,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entries=st.dictionaries(st.text(max_size=4), entry_values | json_values, max_size=4),
    file_size=st.integers(0, 200),
)
def test_parser_accepts_or_raises_checkpoint_error(entries: dict[str, object], file_size: int) -> None:
    """Whatever the header says, parsing either yields in-bounds tensors or a CheckpointError."""
    raw = json.dumps(entries).encode()
    try:
        header = parse_header("fuzz.safetensors", raw, 8 + len(raw) + file_size)
    except CheckpointError:
        return
    previous_end = header.data_start
    for entry in header.tensors:
        assert header.data_start <= entry.start <= entry.end <= header.file_size
        assert entry.nbytes == torch.Size(entry.shape).numel() * entry.dtype.itemsize
        if entry.nbytes:
            assert entry.start >= previous_end
            previous_end = entry.end


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=64))
def test_arbitrary_bytes_never_crash_the_reader(tmp_path_factory: pytest.TempPathFactory, blob: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "blob.safetensors"
    path.write_bytes(blob)
    with contextlib.suppress(CheckpointError):
        read_header(path)


# --- what safetensors refuses, fastload refuses too (issue 11.8) ---------------------------------------------

DEEP = 100_000


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'{"t": ' + json.dumps(F32_2x2).encode() + b', "t": ' + json.dumps(F32_2x2).encode() + b"}", "'t' twice"),
        (b'{"__metadata__": {"a": "1"}, "__metadata__": {"a": "2"}}', "'__metadata__' twice"),
        (b'{"t": {"dtype": "F32", "dtype": "F16", "shape": [], "data_offsets": [0, 4]}}', "'dtype' twice"),
        (b'{"t": ' + b"[" * DEEP + b"]" * DEEP + b"}", "nests"),
        (b'{"t": {"dtype": "F32", "shape": [4611686018427387904, 4611686018427387904, 0], "data_offsets": [0, 0]}}',
         "overflows"),
    ],
)
def test_what_safetensors_refuses_is_a_header_error(tmp_path: Path, raw: bytes, fragment: str) -> None:
    path = write_raw(tmp_path / "bad.safetensors", raw, b"\0" * 16)
    with pytest.raises(HeaderError, match=fragment):
        read_header(path)
    with pytest.raises(HeaderError, match=fragment):
        fastload_core.load_file(path)


def test_a_deeply_nested_sharded_index_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * DEEP + "]" * DEEP + "}")
    with pytest.raises(CheckpointError, match="too deeply"):
        fastload_core.load_state_dict(tmp_path)


def test_inspect_reports_a_hostile_header_without_a_traceback(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "deep.safetensors", b'{"t": ' + b"[" * DEEP + b"]" * DEEP + b"}")
    done = subprocess.run([sys.executable, "-m", "fastload_core", "inspect", str(path)], capture_output=True,
                          text=True, check=False, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "nests arrays or objects too deeply" in done.stderr


names = st.sampled_from(["a", "b", "__metadata__"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=st.lists(st.tuples(names, entry_values | json_values), max_size=4), file_size=st.integers(0, 64))
def test_a_name_given_twice_is_always_refused(pairs: list[tuple[str, object]], file_size: int) -> None:
    """Headers written key by key, so names may repeat: a repeated name is a HeaderError, never "the last"."""
    raw = ("{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}").encode()
    keys = [k for k, _ in pairs]
    try:
        parse_header("fuzz.safetensors", raw, 8 + len(raw) + file_size)
    except HeaderError as exc:
        if len(set(keys)) != len(keys):
            assert "twice" in str(exc) or "nests" in str(exc)
        return
    except CheckpointError:
        assert len(set(keys)) == len(keys)
        return
    assert len(set(keys)) == len(keys)


@settings(max_examples=50, deadline=None)
@given(depth=st.integers(1, 200_000), opener=st.sampled_from(["[", '{"k": ']))
def test_any_nesting_depth_parses_or_is_a_checkpoint_error(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    raw = ('{"t": ' + opener * depth + ("0" if opener == '{"k": ' else "") + closer * depth + "}").encode()
    with contextlib.suppress(CheckpointError):
        parse_header("deep.safetensors", raw, 8 + len(raw))


def test_parsing_pauses_the_garbage_collector_and_restores_it(tmp_path: Path) -> None:
    """A big header's allocation burst must not trigger the first full collection of a fresh process
    inside the load; and the collector's state is the caller's again afterwards, also on errors."""
    states: list[bool] = []
    original_loads = header_module.json.loads

    def spying_loads(text: str, **kwargs: Any) -> object:
        states.append(gc.isenabled())
        return original_loads(text, **kwargs)

    raw = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(header_module.json, "loads", spying_loads)
        assert gc.isenabled()
        parse_header(tmp_path / "m.safetensors", raw, 8 + len(raw) + 4)
        assert gc.isenabled() and states == [False]
        with pytest.raises(HeaderError):
            parse_header(tmp_path / "m.safetensors", b"[1]", 100)
        assert gc.isenabled()
        gc.disable()
        try:
            parse_header(tmp_path / "m.safetensors", raw, 8 + len(raw) + 4)
            assert not gc.isenabled()  # a caller that had it off keeps it off
        finally:
            gc.enable()


@pytest.mark.parametrize(
    "entry",
    [
        # 400,000 dimensions of 2: multiplying them all out (and printing the product) took seconds and ended in
        # Python's int-to-str limit; the running product passes 2**63 after 63 of them.
        {"dtype": "F32", "shape": [2] * 400_000, "data_offsets": [0, 16]},
        # past the 4300 digits Python's JSON parser turns into an int: its ValueError, not a JSONDecodeError
        b'{"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 16]}',
    ],
    ids=["huge-rank", "5000-digit-dim"],
)
def test_a_hostile_shape_is_a_header_error(tmp_path: Path, entry: dict[str, object] | bytes) -> None:
    raw = b'{"w": ' + (entry if isinstance(entry, bytes) else json.dumps(entry).encode()) + b"}"
    path = write_raw(tmp_path / "hostile.safetensors", raw, bytes(16))
    with pytest.raises(HeaderError):
        read_header(path)
