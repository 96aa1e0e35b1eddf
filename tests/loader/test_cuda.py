"""The pinned pipeline on a real GPU: bit-identical to safetensors, one allocation per file."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file

import fastload_core
from fastload_core.loader import cuda
from fastload_core.report import LoadReport

from .test_api import mixed_file, same_bytes  # noqa: F401  (fixture)

pytestmark = pytest.mark.gpu


def test_cuda_load_matches_safetensors(mixed_file: tuple[Path, dict[str, torch.Tensor]]) -> None:  # noqa: F811
    path, originals = mixed_file
    report = LoadReport(source="", device="")
    ours = fastload_core.load_state_dict(path, "cuda", report=report)
    theirs = safetensors.torch.load_file(path, device="cuda")
    assert report.strategy == "cuda-pipeline"
    for name in originals:
        assert ours[name].device.type == "cuda"
        assert same_bytes(ours[name].cpu(), theirs[name].cpu()), name


def test_multi_chunk_file_with_small_ring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many chunks through two 1 MiB buffers: every byte must still land where it belongs."""
    monkeypatch.setattr(cuda, "STAGING_BYTES", 1 << 20)
    monkeypatch.setattr(cuda, "STAGING_BUFFERS", 2)
    tensors = {f"t{i}": torch.randn(300_000 + i) for i in range(8)}  # ~9.6 MB, odd sizes
    path = tmp_path / "big.safetensors"
    save_file(tensors, path)
    loaded = fastload_core.load_file(path, device="cuda:0")
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name].cpu(), tensor)
    assert len({t.untyped_storage().data_ptr() for t in loaded.values()}) == 1  # views of one allocation
    halved = fastload_core.load_file(path, device="cuda:0", dtype=torch.float16)
    for name, tensor in tensors.items():
        assert halved[name].dtype == torch.float16
        assert torch.equal(halved[name].cpu(), tensor.to(torch.float16))


def test_load_model_to_cuda(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)).eval()
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    loaded = fastload_core.load_model(
        lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)), tmp_path / "m.safetensors", "cuda"
    ).eval()
    x = torch.randn(4, 8)
    assert all(t.device.type == "cuda" for t in [*loaded.parameters(), *loaded.buffers()])
    torch.testing.assert_close(loaded(x.cuda()).cpu(), model(x))
