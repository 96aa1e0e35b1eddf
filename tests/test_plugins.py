"""Plugins from the ``fastload`` entry-point group, the switches that control them, and isolation."""

from __future__ import annotations

import logging
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fastload_core
from fastload_core.cli import main
from fastload_core.errors import UnsupportedFormatError
from fastload_core.plugins import BUILTIN_PLUGINS, get_plugin_manager, plugin_infos, reset_plugin_manager

NPZ_PLUGIN = '''
from pathlib import Path
import numpy as np, torch
from fastload_core import hookimpl

class NpzFormat:
    name = "numpy-npz"
    def matches(self, path):
        return path.suffix == ".npz"
    def read_state_dict(self, path):
        with np.load(path, allow_pickle=False) as archive:
            return {key: torch.from_numpy(archive[key].copy()) for key in archive.files}

@hookimpl
def register_checkpoint_formats(register):
    register(NpzFormat())
'''

RECORDER_PLUGIN = '''
from fastload_core import hookimpl
REPORTS = []

@hookimpl
def after_load(report):
    REPORTS.append(report)

@hookimpl
def before_load(source, device):
    raise RuntimeError("a broken hook must not break loading")
'''


def install_plugin(root: Path, name: str, module: str, source: str | None) -> None:
    """A real distribution on sys.path: a dist-info with an entry point, and its module."""
    dist = root / f"{name}-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[fastload]\n{name} = {module}\n")
    if source is not None:
        (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "site"
    root.mkdir()
    install_plugin(root, "npz-format", "fl_test_npz", NPZ_PLUGIN)
    install_plugin(root, "recorder", "fl_test_recorder", RECORDER_PLUGIN)
    install_plugin(root, "broken", "fl_test_missing_module", None)
    monkeypatch.syspath_prepend(str(root))
    yield root
    for module in ("fl_test_npz", "fl_test_recorder"):
        sys.modules.pop(module, None)


def test_entry_point_plugins_load_and_a_broken_one_is_skipped(
    plugin_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fastload.plugins"):
        names = {info.name: info for info in plugin_infos()}
    assert {"npz-format", "recorder", "fastload.torch_pickle"} <= set(names)
    assert "broken" not in names
    assert "'broken'" in caplog.text and "skipped" in caplog.text
    assert names["npz-format"].hooks == ("register_checkpoint_formats",)
    assert names["npz-format"].source == "npz-format"
    assert names["fastload.torch_pickle"].source == "builtin"


def test_a_plugin_format_feeds_the_fast_path(plugin_dir: Path, tmp_path: Path) -> None:
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    np.savez(tmp_path / "weights.npz", **weights)
    loaded = fastload_core.load_state_dict(tmp_path / "weights.npz")
    assert torch.equal(loaded["w"], torch.arange(6.0).reshape(2, 3))


def test_hooks_get_the_report_and_a_raising_hook_is_isolated(
    plugin_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "a.safetensors"
    save_file({"a": torch.zeros(10)}, path)
    with caplog.at_level(logging.WARNING, logger="fastload.plugins"):
        fastload_core.load_file(path)
    import fl_test_recorder  # type: ignore[import-not-found]

    assert [(r.source, r.nbytes, r.tensors) for r in fl_test_recorder.REPORTS] == [(str(path), 40, 1)]
    assert "raised in before_load" in caplog.text


def test_fastload_plugins_selects_and_disable_removes(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTLOAD_PLUGINS", "npz-format")
    reset_plugin_manager()
    loaded = {name for name, _ in get_plugin_manager().list_name_plugin()}
    assert loaded == {"npz-format"} | set(BUILTIN_PLUGINS)  # built-ins are not third-party plugins

    monkeypatch.delenv("FASTLOAD_PLUGINS")
    monkeypatch.setenv("FASTLOAD_DISABLE_PLUGINS", "recorder, fastload.torch_pickle")
    reset_plugin_manager()
    loaded = {name for name, _ in get_plugin_manager().list_name_plugin()}
    assert "recorder" not in loaded and "fastload.torch_pickle" not in loaded and "npz-format" in loaded


def test_a_broken_builtin_is_skipped_too(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(BUILTIN_PLUGINS, "fastload.broken", "fastload_core.no_such_module")
    with caplog.at_level(logging.WARNING, logger="fastload.plugins"):
        loaded = {name for name, _ in get_plugin_manager().list_name_plugin()}
    assert "fastload.broken" not in loaded and "fastload.torch_pickle" in loaded
    assert "no_such_module" in caplog.text


def test_disabling_the_pickle_reader_refuses_pickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTLOAD_DISABLE_PLUGINS", "fastload.torch_pickle")
    reset_plugin_manager()
    torch.save({"w": torch.zeros(1)}, tmp_path / "m.pt")
    with pytest.raises(UnsupportedFormatError, match=r"formats: none"):
        fastload_core.load_state_dict(tmp_path / "m.pt")


def test_cli_lists_plugins_and_hooks(plugin_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "recorder  (recorder)" in out
    assert "after_load" in out and "before_load" in out
    assert "fastload.torch_pickle  (builtin)" in out
