"""load_file / load_state_dict: bit-identical to safetensors, on every path, for every dtype."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file

import fastload_core
from fastload_core.errors import CheckpointError, MissingShardError
from fastload_core.loader.header import DTYPES
from fastload_core.report import LoadReport

from .helpers import write_raw, write_stale_shard_checkpoint

# Every dtype safetensors itself writes and reads with this torch.
CONFORMANCE_DTYPES = sorted(set(safetensors.torch._TYPES) & set(DTYPES))


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bytes reinterpreted as ``dtype``: NaNs and odd bit patterns included, on purpose."""
    generator = torch.Generator().manual_seed(seed)
    count = torch.Size(shape).numel() * dtype.itemsize
    raw = torch.randint(0, 256, (count,), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (torch.equal treats NaN != NaN and -0.0 == 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)))


@pytest.fixture
def mixed_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Every conformance dtype, with scalars, empty tensors and odd sizes that misalign later tensors."""
    tensors: dict[str, torch.Tensor] = {}
    shapes = [(), (0,), (3,), (2, 0, 4), (5, 7), (1, 1, 3)]
    for index, name in enumerate(CONFORMANCE_DTYPES):
        dtype = DTYPES[name]
        for shape_index, shape in enumerate(shapes):
            tensors[f"{name}.{shape_index}"] = random_tensor(dtype, shape, seed=index * 10 + shape_index)
    names = list(tensors)
    random.Random(7).shuffle(names)  # insertion order != name order != file order
    path = tmp_path / "mixed.safetensors"
    save_file({name: tensors[name] for name in names}, path, metadata={"format": "pt", "note": "conformance"})
    return path, tensors


@pytest.mark.parametrize("options", [{}, {"copy": True}, {"lazy": True}], ids=["mmap", "copy", "lazy"])
def test_conformance_with_safetensors_for_every_dtype(
    mixed_file: tuple[Path, dict[str, torch.Tensor]], options: dict[str, bool]
) -> None:
    path, originals = mixed_file
    ours = fastload_core.load_file(path, **options)
    theirs = safetensors.torch.load_file(path)
    assert set(ours) == set(theirs) == set(originals)
    for name in originals:
        assert same_bytes(ours[name], theirs[name]), name
        assert same_bytes(ours[name], originals[name]), name


def test_misaligned_tensors_are_loaded_exactly(tmp_path: Path) -> None:
    """A 3-byte U8 tensor first pushes the F64 tensor after it off its natural alignment."""
    path = tmp_path / "odd.safetensors"
    odd = torch.tensor([1, 2, 3], dtype=torch.uint8)
    wide = torch.arange(5, dtype=torch.float64)
    save_file({"a_odd": odd, "b_wide": wide}, path)
    assert fastload_core.read_metadata(path) is None
    loaded = fastload_core.load_file(path)
    assert same_bytes(loaded["a_odd"], odd) and same_bytes(loaded["b_wide"], wide)


def test_read_metadata(mixed_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    assert fastload_core.read_metadata(mixed_file[0]) == {"format": "pt", "note": "conformance"}


def test_writing_to_a_zero_copy_tensor_copies_on_write(tmp_path: Path) -> None:
    """The mapping is private: a caller's write changes its own tensor, never the cached file."""
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(4096)}, path)
    before = path.read_bytes()
    first = fastload_core.load_file(path)["w"]
    first.add_(1)
    assert torch.all(first == 1)
    assert path.read_bytes() == before
    assert torch.all(fastload_core.load_file(path)["w"] == 0)


def test_copy_true_gives_private_memory_independent_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(10.0)}, path)
    private = fastload_core.load_file(path, copy=True)["w"]
    path.unlink()
    assert torch.equal(private, torch.arange(10.0))


def test_dtype_converts_floating_tensors_only(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    save_file({"f": torch.randn(3), "i": torch.arange(3)}, path)
    loaded = fastload_core.load_file(path, dtype=torch.bfloat16)
    assert loaded["f"].dtype == torch.bfloat16 and loaded["i"].dtype == torch.int64


def test_report_and_hooks_see_every_load(tmp_path: Path) -> None:
    path = tmp_path / "r.safetensors"
    save_file({"a": torch.zeros(1000), "b": torch.zeros(24)}, path)
    report = LoadReport(source="", device="")
    fastload_core.load_state_dict(path, report=report)
    assert (report.files, report.tensors, report.nbytes) == (1, 2, 4096)
    assert report.strategy == "cpu-mmap"
    assert {"header", "read", "views"} <= set(report.stages)
    assert report.seconds > 0 and report.gbps > 0
    assert "2 tensors in 1 file(s)" in report.summary()


def test_sharded_index(tmp_path: Path) -> None:
    first, second = {"a": torch.randn(3)}, {"b": torch.randn(2, 2), "c": torch.arange(4)}
    save_file(first, tmp_path / "model-00001-of-00002.safetensors")
    save_file(second, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
                  "c": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    report = LoadReport(source="", device="")
    loaded = fastload_core.load_state_dict(tmp_path, report=report)
    assert report.files == 2
    for name, tensor in {**first, **second}.items():
        assert torch.equal(loaded[name], tensor)


def test_the_index_decides_which_shard_a_tensor_comes_from(tmp_path: Path) -> None:
    # A stale second shard that still holds "w" (as after a re-shard) must not override the shard the index
    # maps "w" to, whatever the file names' order; a tensor no index entry names is not loaded.
    write_stale_shard_checkpoint(tmp_path, v=torch.ones(2))
    for copy in (False, True):
        report = LoadReport(source="", device="")
        loaded = fastload_core.load_state_dict(tmp_path, copy=copy, report=report)
        assert sorted(loaded) == ["v", "w"]
        assert torch.equal(loaded["w"], torch.ones(3)) and torch.equal(loaded["v"], torch.ones(2))
        assert report.tensors == 2 and report.nbytes == 3 * 4 + 2 * 4


def test_missing_shard_is_named(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(1)}, tmp_path / "one.safetensors")
    weight_map = {"a": "one.safetensors", "b": "two.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(MissingShardError, match=r"two\.safetensors"):
        fastload_core.load_state_dict(tmp_path)


def test_shard_lacking_an_indexed_tensor_is_an_error(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(1)}, tmp_path / "one.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"zz": "one.safetensors"}}))
    with pytest.raises(CheckpointError, match="zz"):
        fastload_core.load_state_dict(tmp_path)


def test_index_may_not_point_outside_its_directory(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(CheckpointError, match="file name"):
        fastload_core.load_state_dict(tmp_path)


def test_directory_resolution(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "weights.safetensors")
    assert torch.equal(fastload_core.load_state_dict(tmp_path)["a"], torch.ones(2))
    save_file({"b": torch.ones(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="cannot tell which"):
        fastload_core.load_state_dict(tmp_path)
    save_file({"c": torch.ones(2)}, tmp_path / "model.safetensors")
    assert set(fastload_core.load_state_dict(tmp_path)) == {"c"}


def test_load_file_rejects_directories_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="directory"):
        fastload_core.load_file(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        fastload_core.load_file(tmp_path / "absent.safetensors")


def test_truncated_file_is_reported_not_crashed(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    for options in ({}, {"copy": True}):
        with pytest.raises(CheckpointError, match="truncated"):
            fastload_core.load_file(path, **options)


def test_lazy_cannot_target_a_device(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "e.safetensors", {})
    with pytest.raises(ValueError, match="lazy=True"):
        fastload_core.load_file(path, device="meta", lazy=True)


def test_empty_checkpoint(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "e.safetensors", {"__metadata__": {"a": "b"}})
    assert fastload_core.load_file(path) == {}
    assert fastload_core.load_file(path, copy=True) == {}


def test_a_local_load_runs_with_the_collector_paused_and_gives_it_back(tmp_path: Path) -> None:
    """A full collection in the middle of a load is pure cost (everything it allocates stays live): the
    collector is off while the files are mapped and their views made, and on again afterwards, also
    when the load fails."""
    import gc

    from fastload_core.loader import api

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(4)}, str(path))
    seen: list[bool] = []
    original = api._load_one

    def spying_load_one(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        seen.append(gc.isenabled())
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api, "_load_one", spying_load_one)
        assert gc.isenabled()
        assert torch.equal(fastload_core.load_file(path)["w"], torch.ones(4))
        assert seen == [False] and gc.isenabled()
        with pytest.raises(CheckpointError):
            fastload_core.load_file(tmp_path / "missing.safetensors")
        assert gc.isenabled()
