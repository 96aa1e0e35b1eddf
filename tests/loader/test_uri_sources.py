"""URIs through the tiered store: pinned while mapped, streamed where the load copies anyway."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import fastload_core
from fastload_core.report import LoadReport
from fastload_core.storage import default_store, writethrough
from fastload_devservices.s3 import BUCKET

from .helpers import write_stale_shard_checkpoint


def upload_model(s3: Any, tmp_path: Path, key: str) -> dict[str, torch.Tensor]:
    tensors = {f"layer.{i}": torch.randn(128, 64) for i in range(6)}
    save_file(tensors, tmp_path / "model.safetensors")
    s3.upload_file(str(tmp_path / "model.safetensors"), BUCKET, key)
    return tensors


def in_use_entries() -> list[str]:
    return [f"{info.entry.slug}/{info.entry.version}" for info in default_store().ls() if info.in_use]


@pytest.mark.s3
def test_a_mapped_uri_stays_pinned_until_its_tensors_are_gone(s3: Any, tmp_path: Path) -> None:
    expected = upload_model(s3, tmp_path, "m1/model.safetensors")
    loaded = fastload_core.load_file(f"s3://{BUCKET}/m1/model.safetensors")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())
    assert len(in_use_entries()) == 1
    removed, busy = default_store().rm(f"s3://{BUCKET}/m1/model.safetensors")
    assert removed == [] and len(busy) >= 1  # eviction skips what a process has mapped
    del loaded
    gc.collect()
    assert in_use_entries() == []


@pytest.mark.s3
def test_a_cold_uri_is_streamed_when_the_load_copies(s3: Any, tmp_path: Path) -> None:
    expected = upload_model(s3, tmp_path, "m2/model.safetensors")
    uri = f"s3://{BUCKET}/m2/"
    cold, warm = LoadReport(source="", device=""), LoadReport(source="", device="")
    first = fastload_core.load_state_dict(uri, copy=True, report=cold)
    second = fastload_core.load_state_dict(uri, copy=True, report=warm)
    assert cold.strategy == "stream+cpu-copy" and warm.strategy == "cpu-copy"
    assert cold.nbytes == warm.nbytes == sum(t.numel() * 4 for t in expected.values())
    for name, tensor in expected.items():
        assert torch.equal(first[name], tensor) and torch.equal(second[name], tensor)
    writethrough.wait(timeout=60)  # the cold load landed in RAM; its copy onto local disk reads the entry
    assert in_use_entries() == []  # private copies hold no pin


@pytest.mark.s3
def test_load_model_from_a_uri(s3: Any, tmp_path: Path) -> None:
    model = torch.nn.Linear(16, 4)
    save_file(model.state_dict(), tmp_path / "model.safetensors", metadata={"format": "pt"})
    s3.upload_file(str(tmp_path / "model.safetensors"), BUCKET, "lin/model.safetensors")
    loaded = fastload_core.load_model(lambda: torch.nn.Linear(16, 4), f"s3://{BUCKET}/lin/")
    x = torch.randn(2, 16)
    assert torch.equal(loaded(x), model(x))
    assert fastload_core.read_metadata(f"s3://{BUCKET}/lin/model.safetensors") == {"format": "pt"}


def test_file_uri_of_a_local_checkpoint(tmp_path: Path) -> None:
    save_file({"w": torch.arange(5.0)}, tmp_path / "model.safetensors")
    loaded = fastload_core.load_file(f"file://{tmp_path}/model.safetensors")
    assert torch.equal(loaded["w"], torch.arange(5.0))


def test_a_cold_stream_and_a_warm_load_choose_the_same_files(tmp_path: Path) -> None:
    # model.safetensors beside another .safetensors (a consolidated copy, say): a local load takes
    # model.safetensors only, and so must the streamed first load of the same directory.
    repo = tmp_path / "repo"
    repo.mkdir()
    save_file({"w": torch.ones(4)}, repo / "model.safetensors")
    save_file({"layers.w_orig": torch.zeros(4)}, repo / "consolidated.safetensors")
    cold_report, warm_report = LoadReport(source="", device=""), LoadReport(source="", device="")
    cold = fastload_core.load_state_dict(f"file://{repo}", copy=True, report=cold_report)
    warm = fastload_core.load_state_dict(f"file://{repo}", copy=True, report=warm_report)
    assert cold_report.strategy == "stream+cpu-copy" and warm_report.strategy == "cpu-copy"
    assert sorted(cold) == sorted(warm) == ["w"]
    assert torch.equal(cold["w"], torch.ones(4)) and cold_report.nbytes == warm_report.nbytes == 16
    writethrough.wait(timeout=60)


def test_a_cold_stream_follows_the_shard_index(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    write_stale_shard_checkpoint(repo, v=torch.ones(2))
    report = LoadReport(source="", device="")
    cold = fastload_core.load_state_dict(f"file://{repo}", copy=True, report=report)
    assert report.strategy == "stream+cpu-copy"
    warm = fastload_core.load_state_dict(f"file://{repo}", copy=True)
    for loaded in (cold, warm):
        assert sorted(loaded) == ["v", "w"] and torch.equal(loaded["w"], torch.ones(3))
    writethrough.wait(timeout=60)
