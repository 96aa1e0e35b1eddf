"""The pinned pipeline on a real GPU: bit-identical to safetensors, one allocation per file, shards
through one pipeline, cold files read with O_DIRECT, both ways of pinning, and ``load_model`` taking
the device tensors as they are."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file

import fastload_core
from fastload_core.errors import LoaderSettingError, TruncatedFileError
from fastload_core.loader import cpu, cuda, pipeline
from fastload_core.loader.header import read_header
from fastload_core.report import LoadReport

from .helpers import write_stale_shard_checkpoint
from .test_api import mixed_file, same_bytes  # noqa: F401  (fixture)

gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _fresh_staging() -> Iterator[None]:
    """Each test starts and ends without process-wide pinned buffers (a test may change their size)."""
    cuda.release_staging()
    yield
    cuda.release_staging()


@gpu
def test_cuda_load_matches_safetensors(mixed_file: tuple[Path, dict[str, torch.Tensor]]) -> None:  # noqa: F811
    path, originals = mixed_file
    report = LoadReport(source="", device="")
    ours = fastload_core.load_state_dict(path, "cuda", report=report)
    theirs = safetensors.torch.load_file(path, device="cuda")
    assert report.strategy == "cuda-pipeline"
    for name in originals:
        assert ours[name].device == torch.device("cuda", torch.cuda.current_device())
        assert same_bytes(ours[name].cpu(), theirs[name].cpu()), name


@gpu
@pytest.mark.parametrize("pinned", ["alloc", "register"])
def test_multi_chunk_file_with_small_buffers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pinned: str) -> None:
    """Many chunks through a few 1 MiB buffers: every byte must still land where it belongs."""
    monkeypatch.setenv("FASTLOAD_GPU_BUFFER_MB", "1")
    monkeypatch.setenv("FASTLOAD_IO_THREADS", "2")
    monkeypatch.setenv("FASTLOAD_PINNED", pinned)
    tensors = {f"t{i}": torch.randn(300_000 + i) for i in range(8)}  # ~9.6 MB, odd sizes
    path = tmp_path / "big.safetensors"
    save_file(tensors, path)
    loaded = fastload_core.load_file(path, device="cuda:0")
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name].cpu(), tensor)
    assert len({t.untyped_storage().data_ptr() for t in loaded.values()}) == 1  # views of one allocation
    pool = cuda.staging_pool()
    assert pool.slot_bytes == 1 << 20 and 0 < pool.allocated_bytes <= 4 << 20  # 2 readers + 2 buffers
    halved = fastload_core.load_file(path, device="cuda:0", dtype=torch.float16)
    for name, tensor in tensors.items():
        assert halved[name].dtype == torch.float16 and halved[name].is_cuda
        assert torch.equal(halved[name].cpu(), tensor.to(torch.float16))


@gpu
def test_sharded_checkpoint_loads_through_one_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTLOAD_GPU_BUFFER_MB", "1")
    shards = {"a.safetensors": {f"a{i}": torch.randn(200_000 + i) for i in range(5)},
              "b.safetensors": {"b": torch.arange(10, dtype=torch.int64)},  # a small last shard
              "c.safetensors": {"c": torch.randn(3, 3).to(torch.bfloat16)}}
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, tmp_path / shard)
        weight_map.update(dict.fromkeys(tensors, shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    calls: list[int] = []
    original = cuda.run_pipeline
    monkeypatch.setattr(cuda, "run_pipeline", lambda chunks, *a: (calls.append(len(chunks)), original(chunks, *a)))
    report = LoadReport(source="", device="")
    loaded = fastload_core.load_state_dict(tmp_path, "cuda", report=report)
    assert len(calls) == 1  # all three files in one pipeline
    assert report.files == 3 and report.tensors == 7
    for tensors in shards.values():
        for name, tensor in tensors.items():
            assert same_bytes(loaded[name].cpu(), tensor), name
    assert len({loaded[name].untyped_storage().data_ptr() for name in loaded}) == 3  # one allocation per file


@gpu
def test_the_index_decides_which_shard_a_tensor_comes_from_on_cuda(tmp_path: Path) -> None:
    # The pipeline reads each shard's span of the tensors the index maps to it; a stale copy elsewhere is left.
    write_stale_shard_checkpoint(tmp_path, v=torch.arange(5.0))
    report = LoadReport(source="", device="")
    loaded = fastload_core.load_state_dict(tmp_path, "cuda", report=report)
    assert sorted(loaded) == ["v", "w"] and report.tensors == 2
    assert torch.equal(loaded["w"].cpu(), torch.ones(3)) and torch.equal(loaded["v"].cpu(), torch.arange(5.0))


@gpu
def test_a_cold_file_is_read_with_direct_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = {f"t{i}": torch.randn(500_000 + 7 * i) for i in range(6)}  # ~12 MB, an unaligned span
    path = tmp_path / "cold.safetensors"
    save_file(tensors, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if pipeline.file_resident_fraction(fd) >= 0.5:
            pytest.skip(f"the page cache kept {path}; cannot make it cold here")
    finally:
        os.close(fd)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError as exc:
        pytest.skip(f"no O_DIRECT on the file system of {tmp_path}: {exc}")
    opened: list[int | None] = []
    original = pipeline.direct_reopen

    def spy(fd: int, path: str) -> int | None:
        opened.append(original(fd, path))
        return opened[-1]

    monkeypatch.setattr(cuda, "direct_reopen", spy)
    loaded = fastload_core.load_file(path, device="cuda")
    assert len(opened) == 1 and opened[0] is not None  # read with O_DIRECT
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name].cpu(), tensor)


@gpu
def test_a_truncated_file_is_an_error_not_garbage(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"x": torch.randn(1_000_000)}, path)
    original_size = path.stat().st_size
    header = read_header(path)
    with open(path, "r+b") as file:
        file.truncate(original_size - 1000)
    with pytest.raises(TruncatedFileError, match="truncated"):
        fastload_core.load_file(path, device="cuda")
    assert header.file_size == original_size


@gpu
def test_load_model_to_cuda(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)).eval()
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    loaded = fastload_core.load_model(
        lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)), tmp_path / "m.safetensors", "cuda"
    ).eval()
    x = torch.randn(4, 8)
    assert all(t.device.type == "cuda" for t in [*loaded.parameters(), *loaded.buffers()])
    torch.testing.assert_close(loaded(x.cuda()).cpu(), model(x))


@gpu
def test_load_model_assigns_the_loaded_device_tensors_without_a_copy(tmp_path: Path) -> None:
    """Parameters are views of the file's one device allocation (assigned, not copied); with ``dtype``
    the conversion ran on the device."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16))
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    loaded = fastload_core.load_model(
        lambda: torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16)), tmp_path / "m.safetensors",
        "cuda")
    assert len({p.untyped_storage().data_ptr() for p in loaded.parameters()}) == 1
    halved = fastload_core.load_model(
        lambda: torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16)), tmp_path / "m.safetensors",
        "cuda", dtype=torch.float16)
    for (name, param), original in zip(halved.named_parameters(), model.parameters(), strict=True):
        assert param.dtype == torch.float16 and param.is_cuda, name
        assert torch.equal(param.detach().cpu(), original.detach().to(torch.float16))


@gpu
def test_release_staging_frees_the_buffers_and_loading_still_works(tmp_path: Path) -> None:
    save_file({"x": torch.randn(1000)}, tmp_path / "x.safetensors")
    fastload_core.load_file(tmp_path / "x.safetensors", device="cuda")
    assert cuda.staging_pool().allocated_bytes > 0
    cuda.release_staging()
    assert cuda.staging_pool().allocated_bytes == 0
    again = fastload_core.load_file(tmp_path / "x.safetensors", device="cuda")
    assert again["x"].is_cuda


def test_bad_settings_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTLOAD_PINNED", "sometimes")
    with pytest.raises(LoaderSettingError, match=r"FASTLOAD_PINNED='sometimes'.*alloc, register"):
        cuda.pinned_mode()
    for bad in ("lots", "0", "4096"):
        monkeypatch.setenv("FASTLOAD_GPU_BUFFER_MB", bad)
        with pytest.raises(LoaderSettingError, match=f"FASTLOAD_GPU_BUFFER_MB='{bad}'"):
            cuda.slot_bytes()
    monkeypatch.setenv("FASTLOAD_GPU_BUFFER_MB", "32")
    monkeypatch.setenv("FASTLOAD_PINNED", "register")
    assert (cuda.slot_bytes(), cuda.pinned_mode()) == (32 << 20, "register")
    for bad in ("many", "0"):
        monkeypatch.setenv("FASTLOAD_IO_THREADS", bad)
        with pytest.raises(LoaderSettingError, match=f"FASTLOAD_IO_THREADS='{bad}'"):
            cpu.io_threads()


def test_register_is_the_default_and_a_refused_registration_falls_back_to_alloc_for_good(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On the CPU, with the two CUDA calls replaced: the default pins by registration; the first refusal
    switches the process to allocation, logged at debug level, and no later buffer tries again."""
    monkeypatch.delenv("FASTLOAD_PINNED", raising=False)
    assert cuda.pinned_mode() == "register"
    monkeypatch.setattr(cuda, "_registration_refused", False)
    registered: list[tuple[int, int]] = []
    unregistered: list[int] = []
    answers = iter([0, 2])  # the first buffer registers, the second is refused (cudaErrorMemoryAllocation)

    def register(address: int, nbytes: int) -> int:
        registered.append((address, nbytes))
        return next(answers)

    monkeypatch.setattr(cuda, "_host_register", register)
    monkeypatch.setattr(cuda, "_host_unregister", unregistered.append)
    monkeypatch.setattr(cuda, "_pin_by_allocation", lambda nbytes: torch.full((nbytes,), 7, dtype=torch.uint8))
    pool = cuda.staging_pool(1 << 20)
    pool.ensure(3)
    with caplog.at_level(logging.DEBUG, logger="fastload"):
        slots = [pool.take() for _ in range(3)]
    buffers = [slot.buffer for slot in slots if slot.buffer is not None]
    assert [buffer.numel() for buffer in buffers] == [1 << 20] * 3
    assert [nbytes for _, nbytes in registered] == [1 << 20, 1 << 20]  # the third did not try again
    assert registered[0][0] == buffers[0].data_ptr()
    assert int(buffers[1][0]) == int(buffers[2][0]) == 7  # allocated the other way
    assert "cudaHostRegister" in caplog.text and "cudaHostAlloc instead" in caplog.text
    assert not [r for r in caplog.records if r.levelno > logging.DEBUG]
    for slot in slots:
        pool.give_back(slot, None)
    cuda.release_staging()
    assert unregistered == [registered[0][0]]


def test_registrations_are_issued_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU, with the CUDA calls replaced: readers pin side by side, but never register at once
    (the driver serialises registrations, and overlapping them made each 10x slower on an H200)."""
    monkeypatch.setattr(cuda, "_registration_refused", False)
    inside = peak = 0
    lock = threading.Lock()

    def register(address: int, nbytes: int) -> int:
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
        time.sleep(0.01)
        with lock:
            inside -= 1
        return 0

    monkeypatch.setattr(cuda, "_host_register", register)
    monkeypatch.setattr(cuda, "_host_unregister", lambda address: None)
    pool = cuda.staging_pool(1 << 20, mode="register")
    pool.ensure(6)
    slots: list[pipeline._Slot] = []
    takers = [threading.Thread(target=lambda: slots.append(pool.take())) for _ in range(6)]
    for taker in takers:
        taker.start()
    for taker in takers:
        taker.join()
    assert len(slots) == 6 and all(slot.buffer is not None for slot in slots)
    assert peak == 1
    for slot in slots:
        pool.give_back(slot, None)
    cuda.release_staging()  # while the CUDA calls are still replaced


def test_faulted_mapping_is_resident_before_registration() -> None:
    """The buffer the driver registers has every page faulted in already (by the reader, not the driver)."""
    from fastload_core.loader.pagecache import resident_fraction_at

    nbytes = 4 << 20
    mapping, tensor = cuda.faulted_mapping(nbytes)
    assert len(mapping) == tensor.numel() == nbytes and not bool(tensor.any())
    assert resident_fraction_at(tensor.data_ptr(), nbytes, windows=None) == 1.0
