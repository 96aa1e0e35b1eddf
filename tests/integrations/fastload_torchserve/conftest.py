"""Fixtures for the TorchServe adapter: an extracted-archive directory built from examples/torchserve, as
TorchServe lays one out for a worker (model.py, the weights, model-config.yaml), and TorchServe's own
``MockContext`` pointing at it."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

pytest.importorskip("ts", reason="the TorchServe adapter's tests need torchserve (scripts/setup.sh ...,torchserve)")

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "torchserve"


@pytest.fixture
def example_weights(tmp_path: Path) -> Path:
    """examples/torchserve/make_weights.py's output: model.safetensors and model.pth (the same weights)."""
    out = tmp_path / "weights"
    saved = list(sys.path)
    sys.path.insert(0, str(EXAMPLE))
    try:
        import make_weights

        make_weights.main(out)
    finally:
        sys.path[:] = saved  # make_weights.py puts its own directory on sys.path too
        sys.modules.pop("make_weights", None)
        sys.modules.pop("model", None)  # make_weights imported the example's model.py under that name
    return out


def reference_outputs(weights: Path, inputs: torch.Tensor) -> torch.Tensor:
    """The example model run the stock way: built normally, weights copied in with load_state_dict."""
    from safetensors.torch import load_file

    saved = list(sys.path)
    sys.path.insert(0, str(EXAMPLE))
    try:
        import model as example_model

        reference = example_model.TinyClassifier()
    finally:
        sys.path[:] = saved
        sys.modules.pop("model", None)
    reference.load_state_dict(load_file(weights / "model.safetensors"))
    with torch.inference_mode():
        return reference.eval()(inputs)


@pytest.fixture
def model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An extracted archive holding the example's model.py, on sys.path as TorchServe puts it."""
    directory = tmp_path / "archive"
    directory.mkdir()
    shutil.copy(EXAMPLE / "model.py", directory / "model.py")
    monkeypatch.syspath_prepend(str(directory))
    sys.modules.pop("model", None)  # BaseHandler imports modelFile by name; each test has its own
    yield directory
    sys.modules.pop("model", None)


MakeContext = Callable[..., Any]


@pytest.fixture
def make_context(model_dir: Path) -> MakeContext:
    """``make_context(config=None, serialized=None)``: TorchServe's MockContext for ``model_dir``, with
    ``config`` written as its model-config.yaml and ``serialized`` as the manifest's serializedFile."""
    from ts.torch_handler.unit_tests.test_utils.mock_context import MockContext

    def make(config: dict[str, Any] | None = None, serialized: str | None = None, model_file: str = "model.py") -> Any:
        config_name = None
        if config is not None:
            (model_dir / "model-config.yaml").write_text(yaml.safe_dump(config))
            config_name = "model-config.yaml"
        context = MockContext(model_pt_file=serialized, model_dir=str(model_dir), model_file=model_file,
                              model_name="tiny", model_yaml_config_file=config_name)
        context.manifest["model"]["modelName"] = "tiny"  # as in a real archive's MANIFEST.json
        return context

    return make
