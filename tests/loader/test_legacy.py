"""Legacy torch.save checkpoints: read with weights_only=True, converted once, then the fast path."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fastload_core
from fastload_core.errors import CheckpointError, UnsupportedFormatError
from fastload_core.report import LoadReport


def load_with_report(path: Path) -> tuple[dict[str, torch.Tensor], LoadReport]:
    report = LoadReport(source="", device="")
    return fastload_core.load_state_dict(path, report=report), report


def test_pickled_state_dict_is_converted_once(tmp_path: Path) -> None:
    state = {"w": torch.randn(4, 4), "b": torch.arange(3)}
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    first, first_report = load_with_report(path)
    converted = list((Path(os.environ["FASTLOAD_CACHE_DIR"]) / "converted").glob("*.safetensors"))
    assert len(converted) == 1
    assert first_report.strategy == "cpu-mmap+converted" and "convert-legacy" in first_report.stages
    mtime = converted[0].stat().st_mtime_ns
    second, _ = load_with_report(path)
    assert converted[0].stat().st_mtime_ns == mtime  # reused, not rewritten
    for name in state:
        assert torch.equal(first[name], state[name]) and torch.equal(second[name], state[name])
    assert fastload_core.read_metadata(converted[0]) == {
        "fastload_source": "pytorch_model.bin",
        "fastload_format": "torch-pickle",
    }


def test_changed_source_is_converted_again(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(2)}, path)
    fastload_core.load_state_dict(path)
    torch.save({"w": torch.ones(3)}, path)
    os.utime(path, ns=(1, 1))
    assert torch.equal(fastload_core.load_state_dict(path)["w"], torch.ones(3))


def test_nested_state_dict_and_shared_storage(tmp_path: Path) -> None:
    """Training checkpoints nest the weights; tied tensors share storage, which safetensors refuses."""
    shared = torch.randn(6)
    state = {"embed": shared, "head": shared, "half": shared[:3], "t": torch.randn(3, 2).t()}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    loaded = fastload_core.load_state_dict(path)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


def test_directory_with_only_a_pickle(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    assert torch.equal(fastload_core.load_state_dict(tmp_path)["w"], torch.ones(2))


class Payload:
    """Anything a pickle would construct (and could run code from) on load. (Not ``print``: Ray, run earlier
    in this process, may have replaced ``builtins.print`` with its own, which pickles under another name.)"""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, ("print('this must never run')",))


class SystemPayload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo this must never run",))


@pytest.mark.parametrize(("payload", "named"), [(Payload(), "import eval"), (SystemPayload(), "import posix.system")])
def test_code_in_a_checkpoint_is_never_executed(tmp_path: Path, capfd: pytest.CaptureFixture[str], payload: object,
                                                named: str) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": payload}, path)
    with pytest.raises(CheckpointError, match="weights_only=True") as caught:
        fastload_core.load_state_dict(path)
    message = str(caught.value)
    assert "refused to unpickle" in message and named in message  # says why
    assert "False" not in message and "trusted source" not in message  # never advises turning the safety off
    assert "this must never run" not in capfd.readouterr().out


def test_legacy_non_zip_pickle_is_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "old.bin"
    with open(path, "wb") as file:
        pickle.dump(Payload(), file)
    with pytest.raises(CheckpointError):
        fastload_core.load_state_dict(path)


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        fastload_core.load_state_dict(path)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match=r"not a readable torch\.save checkpoint"):
        fastload_core.load_state_dict(path)


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"\x08\x07")
    with pytest.raises(UnsupportedFormatError, match="torch-pickle"):
        fastload_core.load_state_dict(path)


def test_a_link_planted_at_a_converted_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(4)}, path)
    fastload_core.load_state_dict(path)
    (converted,) = (Path(os.environ["FASTLOAD_CACHE_DIR"]) / "converted").glob("*.safetensors")
    forged = tmp_path / "forged.safetensors"
    save_file({"w": torch.full((4,), 666.0)}, forged)
    converted.unlink()
    converted.symlink_to(forged)
    with pytest.raises(CheckpointError, match="symbolic link"):
        fastload_core.load_state_dict(path)


CONVERT_CODE = """
import sys, torch
from pathlib import Path
from fastload_core.loader.formats import write_safetensors
write_safetensors({"w": torch.zeros(96 * 1024 * 1024 // 4)}, Path(sys.argv[1]), {})
"""


def _kill_while_writing(target: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", CONVERT_CODE, str(target)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(Path.cwd())))
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:  # kill it once safetensors' own temporary file has bytes in it
            if any(p.stat().st_size > 0 for p in target.parent.glob(".fastload-staging-*/.tmp*")):
                break
            assert child.poll() is None, child.communicate()[1]
            time.sleep(0.005)
        else:
            raise AssertionError("the writer never started writing")
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()


def _age(folder: Path) -> None:
    for staging in folder.glob(".fastload-staging-*"):
        os.utime(staging, (time.time() - 3600, time.time() - 3600))


@pytest.mark.slow
def test_a_killed_conversion_leaves_nothing_a_later_run_does_not_remove(tmp_path: Path) -> None:
    target = tmp_path / "out" / "model.safetensors"
    target.parent.mkdir()
    _kill_while_writing(target)
    assert list(target.parent.glob(".fastload-staging-*/.tmp*")), "the kill left no temporary file to clean"
    assert not target.exists()
    _age(target.parent)
    save_file({"w": torch.ones(2)}, tmp_path / "x.safetensors")  # unrelated files are left alone
    from fastload_core.loader.formats import write_safetensors

    write_safetensors({"w": torch.ones(2)}, target, {})  # the next write into the folder sweeps it
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.safetensors"]


@pytest.mark.slow
def test_cache_gc_removes_what_a_killed_implicit_conversion_left(tmp_path: Path) -> None:
    folder = Path(os.environ["FASTLOAD_CACHE_DIR"]) / "converted"
    folder.mkdir(parents=True)
    _kill_while_writing(folder / "0123.safetensors")
    busy = folder / ".fastload-staging-busy"  # a live writer's directory (locked) is never removed
    busy.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
                               "time.sleep(60)", str(busy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        _age(folder)
        done = subprocess.run([sys.executable, "-m", "fastload_core", "cache", "gc"], capture_output=True,
                              text=True, check=False, env=dict(os.environ, PYTHONPATH=str(Path.cwd())))
        assert done.returncode == 0, done.stderr
        assert "temps: 1" in done.stdout
        assert [p.name for p in folder.iterdir()] == [busy.name]
    finally:
        holder.kill()
        holder.communicate()
