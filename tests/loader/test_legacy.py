"""Legacy torch.save checkpoints: read with weights_only=True, converted once, then the fast path."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

import fastload_core
from fastload_core.errors import CheckpointError, UnsupportedFormatError
from fastload_core.report import LoadReport


def load_with_report(path: Path) -> tuple[dict[str, torch.Tensor], LoadReport]:
    report = LoadReport(source="", device="")
    return fastload_core.load_state_dict(path, report=report), report


def test_pickled_state_dict_is_converted_once(tmp_path: Path) -> None:
    state = {"w": torch.randn(4, 4), "b": torch.arange(3)}
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    first, first_report = load_with_report(path)
    converted = list((Path(os.environ["FASTLOAD_CACHE_DIR"]) / "converted").glob("*.safetensors"))
    assert len(converted) == 1
    assert first_report.strategy == "cpu-mmap+converted" and "convert-legacy" in first_report.stages
    mtime = converted[0].stat().st_mtime_ns
    second, _ = load_with_report(path)
    assert converted[0].stat().st_mtime_ns == mtime  # reused, not rewritten
    for name in state:
        assert torch.equal(first[name], state[name]) and torch.equal(second[name], state[name])
    assert fastload_core.read_metadata(converted[0]) == {
        "fastload_source": "pytorch_model.bin",
        "fastload_format": "torch-pickle",
    }


def test_changed_source_is_converted_again(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(2)}, path)
    fastload_core.load_state_dict(path)
    torch.save({"w": torch.ones(3)}, path)
    os.utime(path, ns=(1, 1))
    assert torch.equal(fastload_core.load_state_dict(path)["w"], torch.ones(3))


def test_nested_state_dict_and_shared_storage(tmp_path: Path) -> None:
    """Training checkpoints nest the weights; tied tensors share storage, which safetensors refuses."""
    shared = torch.randn(6)
    state = {"embed": shared, "head": shared, "half": shared[:3], "t": torch.randn(3, 2).t()}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    loaded = fastload_core.load_state_dict(path)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


def test_directory_with_only_a_pickle(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    assert torch.equal(fastload_core.load_state_dict(tmp_path)["w"], torch.ones(2))


class Payload:
    """Anything a pickle would construct (and could run code from) on load."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this must never run",))


def test_code_in_a_checkpoint_is_never_executed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        fastload_core.load_state_dict(path)
    assert "this must never run" not in capsys.readouterr().out


def test_legacy_non_zip_pickle_is_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "old.bin"
    with open(path, "wb") as file:
        pickle.dump(Payload(), file)
    with pytest.raises(CheckpointError):
        fastload_core.load_state_dict(path)


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        fastload_core.load_state_dict(path)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match=r"not a readable torch\.save checkpoint"):
        fastload_core.load_state_dict(path)


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"\x08\x07")
    with pytest.raises(UnsupportedFormatError, match="torch-pickle"):
        fastload_core.load_state_dict(path)
