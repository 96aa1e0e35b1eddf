"""The synthetic checkpoint is a real, consistent model: both files hold the same tensors, and the
module class loads them through ``load_model`` exactly as ``Model()`` + ``load_state_dict`` does."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as st_load_file

from fastload_core import load_model
from fastload_core.bench.checkpoints import (
    SyntheticTransformer,
    TransformerConfig,
    config_from_file,
    ensure_checkpoint,
)

SIZE = 8 << 20


@pytest.mark.parametrize("size", [1 << 20, 8 << 20, 256 << 20, 2 << 30])
def test_config_fills_the_requested_size_with_many_mixed_tensors(size: int) -> None:
    config = TransformerConfig.for_size(size)
    assert size - 2 * config.hidden * config.itemsize < config.nbytes <= size  # within one embedding row pair
    assert config.layers >= 8 and config.tensor_count >= 8 * 16
    embedding = config.vocab * config.hidden * config.itemsize
    assert 0.05 < embedding * 2 / config.nbytes < 0.3  # embeddings are a share, not the whole file


def test_load_model_matches_torch_load(tmp_path: Path) -> None:
    checkpoint = ensure_checkpoint(tmp_path, SIZE, "fp16")
    config = config_from_file(checkpoint.safetensors)
    assert config == checkpoint.config and config.dtype == "fp16"

    pickled = torch.load(checkpoint.pickle, weights_only=True)
    assert pickled.keys() == st_load_file(str(checkpoint.safetensors)).keys()
    assert sum(t.numel() * t.element_size() for t in pickled.values()) == config.nbytes
    assert len(pickled) == config.tensor_count

    model = load_model(partial(SyntheticTransformer, config), checkpoint.safetensors)
    state = model.state_dict()
    assert state.keys() == pickled.keys()
    for name, tensor in pickled.items():
        assert state[name].dtype == torch.float16
        assert torch.equal(state[name], tensor), name

    reference = SyntheticTransformer(config)
    reference.load_state_dict(pickled)
    tokens = torch.randint(0, config.vocab, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(tokens), reference(tokens))


def test_existing_checkpoint_is_reused_not_rewritten(tmp_path: Path) -> None:
    first = ensure_checkpoint(tmp_path, 1 << 20)
    stamp = first.safetensors.stat().st_mtime_ns
    second = ensure_checkpoint(tmp_path, 1 << 20)
    assert second == first and second.safetensors.stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".*.tmp"))
