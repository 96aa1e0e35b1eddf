"""Plugins from the ``fastload`` entry-point group, the switches that control them, and isolation."""

from __future__ import annotations

import logging
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fastload_core
from fastload_core import LoadReport, hookimpl, plugins
from fastload_core.cli import main
from fastload_core.compile_cache.directory import DirectoryBackend
from fastload_core.compile_cache.registry import backend_factories
from fastload_core.errors import PluginError, UnsupportedFormatError
from fastload_core.loader.formats import registered_formats
from fastload_core.plugins import (
    BUILTIN_HOOKS,
    BUILTIN_PLUGINS,
    get_plugin_manager,
    plugin_infos,
    reset_plugin_manager,
)
from fastload_core.storage import Journal, Manifest, ModelURI, Origin, OriginError, fetch
from fastload_core.storage.meta import Checksums
from fastload_core.storage.progress import Progress
from fastload_core.storage.store import registered_origins

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
    manager = get_plugin_manager()
    loaded = {name for name, plugin in manager.list_name_plugin() if plugin is not None}
    assert "recorder" not in loaded and "fastload.torch_pickle" not in loaded and "npz-format" in loaded
    assert manager.is_blocked("recorder") and manager.is_blocked("fastload.torch_pickle")  # pluggy's blocking
    assert "fl_test_recorder" not in sys.modules  # a disabled plugin is not even imported
    assert manager.register(object(), name="recorder") is None  # nor can it be registered later
    assert "recorder" not in {info.name for info in plugin_infos()}


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


# --- nothing is imported or scanned before a plugin could hear an event ----------------------------

def test_the_builtin_hook_table_is_what_the_builtins_implement() -> None:
    manager = get_plugin_manager()
    for name in BUILTIN_PLUGINS:
        callers = manager.get_hookcallers(manager.get_plugin(name)) or []
        assert {caller.name for caller in callers} == BUILTIN_HOOKS[name], name


def test_an_event_no_plugin_implements_builds_no_manager(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_file({"a": torch.zeros(2)}, path)
    fastload_core.load_file(path)
    assert plugins._manager is None  # before_load/after_load: no built-in has them, no plugin installed
    plugins.notify("on_tier_hit", uri="s3://b/m", tier="shm", path=str(path))  # the metrics built-in has it
    assert plugins._manager is not None


def test_a_plugin_on_a_path_added_after_a_load_hears_the_next_load(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.safetensors"
    save_file({"a": torch.zeros(2)}, path)
    fastload_core.load_file(path)
    root = tmp_path / "later"
    install_plugin(root, "recorder", "fl_test_recorder", RECORDER_PLUGIN)
    monkeypatch.syspath_prepend(str(root))
    try:
        fastload_core.load_file(path)
        import fl_test_recorder

        assert [r.source for r in fl_test_recorder.REPORTS] == [str(path)]
    finally:
        sys.modules.pop("fl_test_recorder", None)


def test_the_entry_point_scan_errs_only_towards_plugins(tmp_path: Path) -> None:
    def may_exist(*entries: Path) -> bool:
        return plugins._entry_points_may_exist(tuple(map(str, entries)))

    plain = tmp_path / "plain"
    (plain / "tool-1.0.dist-info").mkdir(parents=True)  # no entry_points.txt, like most distributions
    (plain / "cli-1.0.dist-info").mkdir()
    (plain / "cli-1.0.dist-info" / "entry_points.txt").write_text("[console_scripts]\nfastload = x:main\n")
    (plain / "old-1.0.egg-info").write_text("Metadata-Version: 1.0\n")  # an .egg-info file, not a directory
    assert not may_exist(plain, tmp_path / "missing")
    with_plugin = tmp_path / "with"
    install_plugin(with_plugin, "npz-format", "fl_test_npz", None)
    assert may_exist(plain, with_plugin)
    odd = tmp_path / "odd"
    (odd / "ODD-1.0.EGG-INFO").mkdir(parents=True)
    (odd / "ODD-1.0.EGG-INFO" / "entry_points.txt").write_text("  [[fastload]]  \nodd = odd\n")
    assert may_exist(odd)
    archive = tmp_path / "site.zip"
    archive.write_bytes(b"PK\x05\x06" + bytes(18))  # distributions may hide in a zip: not looked into
    assert may_exist(plain, archive)


def test_fastload_plugins_set_empty_means_no_third_party_listener(plugin_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert plugins._may_be_implemented("before_load")
    monkeypatch.setenv("FASTLOAD_PLUGINS", "")
    assert not plugins._may_be_implemented("before_load")
    assert plugins._may_be_implemented("on_evict")  # the metrics built-in
    monkeypatch.setenv("FASTLOAD_DISABLE_PLUGINS", "fastload.metrics")
    assert not plugins._may_be_implemented("on_evict")


# --- hooks are called through pluggy, each implementation isolated -------------------------------

class _Timing:
    """A new-style wrapper around every other after_load implementation."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl(wrapper=True)
    def after_load(self, report: LoadReport, error: BaseException | None) -> Iterator[None]:
        self.calls.append("setup")
        result = yield
        self.calls.append(f"teardown {result!r}")
        return result


class _OldStyle:
    def __init__(self) -> None:
        self.outcomes: list[object] = []

    @hookimpl(hookwrapper=True)
    def after_load(self, report: LoadReport) -> Iterator[None]:
        outcome = yield
        self.outcomes.append(outcome.get_result())


class _Plain:
    def __init__(self, log: list[str], fail: bool = False) -> None:
        self.log = log
        self.fail = fail

    @hookimpl
    def after_load(self, report: LoadReport) -> None:
        self.log.append("plain")
        if self.fail:
            raise RuntimeError("plain hook broke")


class _BrokenWrapper:
    @hookimpl(wrapper=True)
    def after_load(self, report: LoadReport) -> Iterator[None]:
        raise RuntimeError("wrapper setup broke")
        yield  # pragma: no cover


class _BrokenTeardown:
    @hookimpl(wrapper=True)
    def after_load(self, report: LoadReport) -> Iterator[None]:
        yield
        raise RuntimeError("wrapper teardown broke")


def test_wrapper_plugins_run_around_the_others(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_file({"a": torch.zeros(2)}, path)
    manager = get_plugin_manager()
    calls: list[str] = []
    timing, old_style = _Timing(), _OldStyle()
    manager.register(_Plain(calls), name="plain")
    manager.register(timing, name="timing")
    manager.register(old_style, name="old-style")
    fastload_core.load_file(path)
    assert timing.calls == ["setup", "teardown []"]  # the event's (empty) result list, after the others
    assert calls == ["plain"] and old_style.outcomes == [[]]


def test_a_raising_hook_or_wrapper_does_not_stop_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "a.safetensors"
    save_file({"a": torch.zeros(2)}, path)
    manager = get_plugin_manager()
    calls: list[str] = []
    timing = _Timing()
    manager.register(_Plain(calls), name="first")
    manager.register(_Plain(calls, fail=True), name="raiser")
    manager.register(_BrokenWrapper(), name="broken-setup")
    manager.register(_BrokenTeardown(), name="broken-teardown")
    manager.register(timing, name="timing")
    with caplog.at_level(logging.WARNING, logger="fastload.plugins"):
        assert torch.equal(fastload_core.load_file(path)["a"], torch.zeros(2))
    assert calls == ["plain", "plain"]  # the raiser's neighbour still ran
    assert timing.calls == ["setup", "teardown []"]
    for name, problem in (("raiser", "plain hook broke"), ("broken-setup", "wrapper setup broke"),
                          ("broken-teardown", "wrapper teardown broke")):
        assert f"fastload plugin {name!r} raised in after_load" in caplog.text and problem in caplog.text


class _Origin(Origin):
    scheme = "file"

    def resolve(self, uri: ModelURI, revision: str | None) -> Manifest:
        raise OriginError(str(uri), "served by the replacement plugin", code="Replaced")

    def download(self, manifest: Manifest, dest: Path, *, journal: Journal, progress: Progress) -> Checksums:
        raise AssertionError("never reached")


class _Sloppy:
    """Registers one good thing per hook and one that breaks each hook's contract."""

    @hookimpl
    def register_checkpoint_formats(self, register: Any) -> None:
        register("not a format")
        register(_NpzFormat())

    @hookimpl
    def register_storage_schemes(self, register: Any) -> None:
        register(42, _Origin)
        register("file")  # a factory is missing
        register("file", _Origin)  # replaces the built-in file:// (a plugin's claim comes first)

    @hookimpl
    def register_compile_cache_backends(self, register: Any) -> None:
        register("mem", "not callable")
        register("mem2", DirectoryBackend)


class _NpzFormat:
    name = "numpy-npz"

    def matches(self, path: Path) -> bool:
        return path.suffix == ".npz"

    def read_state_dict(self, path: Path) -> dict[str, torch.Tensor]:
        with np.load(path, allow_pickle=False) as archive:
            return {key: torch.from_numpy(archive[key].copy()) for key in archive.files}


def test_a_registration_that_breaks_the_contract_is_logged_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    get_plugin_manager().register(_Sloppy(), name="sloppy")
    with caplog.at_level(logging.WARNING, logger="fastload.plugins"):
        formats = registered_formats()
        origins = registered_origins()
        backends = backend_factories()
    assert [f.name for f in formats] == ["numpy-npz", "torch-pickle"]  # the good one, tried first
    assert origins["file"] == ("sloppy", _Origin) and origins["s3"][0] == "fastload.storage"
    assert "mem" not in backends and backends["mem2"] is DirectoryBackend and "redis" in backends
    warnings = [r.getMessage() for r in caplog.records if "broke the contract" in r.getMessage()]
    assert len(warnings) == 4 and all("'sloppy'" in w and "PluginError(" in w for w in warnings)
    assert any("'not a format'" in w for w in warnings) and any("got scheme 42" in w for w in warnings)
    assert any("missing a required argument: 'factory'" in w for w in warnings)
    np.savez(tmp_path / "w.npz", w=np.ones(2, dtype=np.float32))
    assert torch.equal(fastload_core.load_state_dict(tmp_path / "w.npz")["w"], torch.ones(2))
    with pytest.raises(OriginError, match="replacement plugin"):
        fetch(f"file://{tmp_path}")


class _NotAnOrigin:
    @hookimpl
    def register_storage_schemes(self, register: Any) -> None:
        register("odd", lambda: object())


def test_a_factory_that_breaks_the_contract_at_use_is_a_plugin_error() -> None:
    get_plugin_manager().register(_NotAnOrigin(), name="odd-plugin")
    with pytest.raises(PluginError, match=r"odd:// registered by plugin 'odd-plugin' built object"):
        fetch("odd://bucket/model")
