"""The key changes with anything that makes an artifact wrong, and with nothing else."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

from fastload_core.compile_cache.keys import CompileKey, code_digest, derive_key


class Small(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


def _key(model: Any, x: torch.Tensor | None = None, extra: str = "", **compile_kwargs: Any) -> CompileKey:
    return derive_key(model, args=(torch.randn(2, 8) if x is None else x,), kwargs={},
                      compile_kwargs=compile_kwargs, extra=extra)


def test_replicas_with_different_weights_share_a_key() -> None:
    torch.manual_seed(0)
    a = Small()
    torch.manual_seed(1)
    b = Small()
    assert _key(a) == _key(b)
    assert _key(a).digest.startswith("v1-")


def test_what_the_key_records_is_readable() -> None:
    fields = _key(Small()).fields
    assert fields["torch"] == torch.__version__
    assert fields["device"] == "cpu"
    assert fields["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    assert fields["threads"] == str(torch.get_num_threads())
    assert fields["model"].endswith("Small")


def test_another_torch_version_is_another_key(monkeypatch: pytest.MonkeyPatch) -> None:
    here = _key(Small())
    monkeypatch.setattr(torch, "__version__", "2.12.0+cpu")
    there = _key(Small())
    assert there.digest != here.digest
    assert there.fields["torch"] == "2.12.0+cpu"


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda: _key(Small(dim=8), torch.randn(4, 8)), id="input-shape"),
        pytest.param(lambda: _key(Small(dim=8), torch.randn(2, 8, dtype=torch.float64)), id="input-dtype"),
        pytest.param(lambda: _key(Small(dim=8), extra="adapter-7"), id="extra"),
        pytest.param(lambda: _key(Small(dim=8), mode="max-autotune"), id="compile-mode"),
        pytest.param(lambda: _key(Small(dim=8), options={"freezing": False}), id="compile-options"),
        pytest.param(lambda: _key(Small(dim=8), dynamic=True), id="dynamic"),
        pytest.param(lambda: _key(Small(dim=8).double(), torch.randn(2, 8)), id="param-dtype"),
    ],
)
def test_anything_that_changes_the_artifact_changes_the_key(change: Any) -> None:
    assert change().digest != _key(Small(dim=8)).digest


def test_layout_train_mode_thread_count_and_grad_mode_change_the_key() -> None:
    base = _key(Small(dim=8))
    assert _key(Small(dim=8).eval()).digest != base.digest
    assert derive_key(Small(dim=16), args=(torch.randn(2, 16),), kwargs={}, compile_kwargs={}).digest \
        != base.digest
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert _key(Small(dim=8)).digest != base.digest
    finally:
        torch.set_num_threads(threads)
    with torch.inference_mode():
        assert _key(Small(dim=8)).digest != base.digest


def test_compile_env_changes_the_key_but_cache_dirs_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    base = _key(Small())
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")
    assert _key(Small()).digest == base.digest
    monkeypatch.setenv("TORCHINDUCTOR_MAX_AUTOTUNE", "1")
    assert _key(Small()).digest != base.digest


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("fastload_key_probe", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_editing_the_models_source_file_changes_the_key(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    body = (
        "import torch\n"
        "def helper(x):\n    return x * {factor}\n"
        "class Probe(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.linear = torch.nn.Linear(8, 8)\n"
        "    def forward(self, x):\n        return helper(self.linear(x))\n"
    )
    source.write_text(body.format(factor=2))
    before = code_digest(_load(source).Probe())
    source.write_text(body.format(factor=2))
    assert code_digest(_load(source).Probe()) == before
    source.write_text(body.format(factor=3))  # only a helper beside the class changed
    assert code_digest(_load(source).Probe()) != before


def test_functions_are_keyed_by_their_code() -> None:
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    def triple(x: torch.Tensor) -> torch.Tensor:
        return x * 3

    assert _key(double).digest == _key(double).digest
    assert _key(double).digest != _key(triple).digest
    assert _key(double).fields["model_layout"] == "-"


def test_freezing_keys_on_weight_values_too() -> None:
    torch.manual_seed(0)
    a = Small()
    torch.manual_seed(1)
    b = Small()
    assert _key(a, options={"freezing": True}).digest != _key(b, options={"freezing": True}).digest


# --- review: the key covers module order and non-tensor settings, which an AOTI package bakes in ---


class _Activation(nn.Module):
    """An activation kept as a ``functools.partial``, as model code often holds one."""

    def __init__(self, approximate: str) -> None:
        super().__init__()
        self.act = functools.partial(nn.functional.gelu, approximate=approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)


def _mlp(first: nn.Module, second: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), first, nn.Linear(8, 8), second).eval()


def _package_key(model: nn.Module) -> CompileKey:
    return derive_key(model, args=(torch.randn(2, 8),), kwargs={}, compile_kwargs={}, serve="aoti-package")


@pytest.mark.parametrize(
    ("one", "other"),
    [
        pytest.param(lambda: _mlp(nn.ReLU(), nn.GELU()), lambda: _mlp(nn.GELU(), nn.ReLU()), id="module-order"),
        pytest.param(lambda: _mlp(nn.LeakyReLU(0.1), nn.ReLU()), lambda: _mlp(nn.LeakyReLU(0.5), nn.ReLU()),
                     id="negative-slope"),
        pytest.param(lambda: _mlp(nn.LayerNorm(8, eps=1e-5), nn.ReLU()),
                     lambda: _mlp(nn.LayerNorm(8, eps=10.0), nn.ReLU()), id="layernorm-eps"),
        pytest.param(lambda: _mlp(nn.GELU(), nn.ReLU()), lambda: _mlp(nn.GELU("tanh"), nn.ReLU()),
                     id="gelu-approximate"),
        pytest.param(lambda: _mlp(_Activation(approximate="tanh"), nn.ReLU()),
                     lambda: _mlp(_Activation(approximate="none"), nn.ReLU()), id="partial-keywords"),
    ],
)
def test_models_that_compute_differently_get_different_package_keys(one: Any, other: Any) -> None:
    # A restored AOTInductor package is run without any graph check: equal keys would run one model's code
    # for the other.
    assert _package_key(one()).digest != _package_key(other()).digest
    assert _key(one()).digest != _key(other()).digest


def test_identical_models_built_twice_share_a_key() -> None:
    build = lambda: _mlp(nn.LeakyReLU(0.1), nn.LayerNorm(8, eps=1e-5))  # noqa: E731
    assert _package_key(build()).digest == _package_key(build()).digest


class _Settings:
    """A non-tensor attribute whose default repr holds its address, which must not reach the key."""


class WithObject(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.settings = _Settings()
        self.scale = 2.0
        self.linear = nn.Linear(8, 8)

    def extra_repr(self) -> str:
        return f"settings={self.settings!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


def test_object_addresses_do_not_reach_the_key_but_plain_settings_do() -> None:
    assert _package_key(WithObject()).digest == _package_key(WithObject()).digest
    scaled = WithObject()
    scaled.scale = 3.0
    assert _package_key(scaled).digest != _package_key(WithObject()).digest


def test_the_structure_part_of_the_key_is_the_same_in_a_fresh_process() -> None:
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from torch import nn\n"
        "from fastload_core.compile_cache.keys import structure_digest\n"
        "m = nn.Sequential(nn.Linear(8, 8), nn.LeakyReLU(0.1), nn.LayerNorm(8, eps=1e-5), nn.GELU('tanh'),\n"
        "                  nn.Dropout(0.25), nn.MultiheadAttention(8, 2, batch_first=True))\n"
        "print(structure_digest(m))\n"
    )
    from fastload_core.compile_cache.keys import structure_digest

    here = structure_digest(nn.Sequential(nn.Linear(8, 8), nn.LeakyReLU(0.1), nn.LayerNorm(8, eps=1e-5),
                                          nn.GELU("tanh"), nn.Dropout(0.25),
                                          nn.MultiheadAttention(8, 2, batch_first=True)))
    root = Path(__file__).resolve().parents[2]
    there = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                           check=True, timeout=120).stdout.strip()
    assert there == here
