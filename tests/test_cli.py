"""The command line: real files in, real files out, clear errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastload_core.cli import main


def test_convert_writes_an_equal_safetensors_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = {"w": torch.randn(3, 3), "step": torch.tensor(7)}
    torch.save(state, tmp_path / "model.pt")
    assert main(["convert", str(tmp_path / "model.pt"), str(tmp_path / "out" / "model.safetensors")]) == 0
    converted = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(converted[k], v) for k, v in state.items()) and set(converted) == set(state)
    assert "2 tensors" in capsys.readouterr().out


def test_inspect_lists_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    save_file({"layer.weight": torch.zeros(2, 3, dtype=torch.bfloat16)}, tmp_path / "m.safetensors", {"k": "v"})
    assert main(["inspect", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "layer.weight" in out and "BF16" in out and "[2, 3]" in out and "metadata k = v" in out


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 20)
    result = subprocess.run(
        [sys.executable, "-m", "fastload_core", "inspect", str(tmp_path / "junk.safetensors")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("fastload: error: ") and "exceeds" in result.stderr
    assert "Traceback" not in result.stderr
