"""Features that need a newer torch than the core say so in one FastloadError; the core keeps working."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fastload_core
from fastload_core._compat import COMPILE_CACHE_MINIMUM, CORE_MINIMUM, require_torch, torch_version
from fastload_core.compile_cache.commands import add_commands
from fastload_core.errors import FastloadError, TorchVersionError


@pytest.mark.parametrize(("version", "parsed"), [("2.13.0+cpu", (2, 13)), ("2.7.0a0+git1234", (2, 7)),
                                                 ("2.1.2", (2, 1)), ("3.0.0", (3, 0))])
def test_torch_version(monkeypatch: pytest.MonkeyPatch, version: str, parsed: tuple[int, int]) -> None:
    monkeypatch.setattr(torch, "__version__", version)
    assert torch_version() == parsed


def test_the_installed_torch_has_every_feature() -> None:
    assert torch_version() >= COMPILE_CACHE_MINIMUM >= CORE_MINIMUM
    require_torch("anything the compile cache needs", COMPILE_CACHE_MINIMUM)  # does not raise


def test_an_older_torch_gets_one_clear_error_from_the_compile_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    model = torch.nn.Linear(4, 4)
    with pytest.raises(TorchVersionError) as raised:
        fastload_core.compile(model, cache=(tmp_path / "cc").as_uri())
    error = raised.value
    assert isinstance(error, FastloadError) and error.installed == "2.5.1+cu121" and error.required == (2, 7)
    assert "the compile cache" in str(error) and "torch >= 2.7" in str(error) and "2.5.1" in str(error)
    assert "pip install 'torch>=2.7'" in str(error)
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    with pytest.raises(TorchVersionError):
        fastload_core.load_model(torch.nn.Linear(4, 4), tmp_path / "m.safetensors", compile=True)
    loaded = fastload_core.load_model(torch.nn.Linear(4, 4), tmp_path / "m.safetensors")  # the core still loads
    assert torch.equal(loaded.weight, model.weight)
    assert not list(tmp_path.glob("cc*"))  # nothing was started


def test_doctor_says_the_compile_cache_needs_a_newer_torch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch, "__version__", "2.6.0")
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["doctor", "--cache", (tmp_path / "cc").as_uri()])
    assert args.func(args) == 1
    assert "FAIL toolchain: torch 2.6.0: the compile cache needs torch >= 2.7" in capsys.readouterr().out
