"""The command line: real files in, real files out, clear errors with exit status 2."""

from __future__ import annotations

import argparse
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastload_core.cli import build_parser, main
from fastload_devservices.s3 import BUCKET


def test_convert_writes_an_equal_safetensors_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = {"w": torch.randn(3, 3), "step": torch.tensor(7)}
    torch.save(state, tmp_path / "model.pt")
    assert main(["convert", str(tmp_path / "model.pt"), str(tmp_path / "out" / "model.safetensors")]) == 0
    converted = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(converted[k], v) for k, v in state.items()) and set(converted) == set(state)
    assert "2 tensors" in capsys.readouterr().out


def test_inspect_lists_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_file({"layer.weight": torch.zeros(2, 3, dtype=torch.bfloat16)}, tmp_path / "m.safetensors", {"k": "v"})
    assert main(["inspect", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "layer.weight" in out and "BF16" in out and "[2, 3]" in out and "metadata k = v" in out


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 20)
    result = subprocess.run(
        [sys.executable, "-m", "fastload_core", "inspect", str(tmp_path / "junk.safetensors")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("fastload: error: ") and "exceeds" in result.stderr
    assert "Traceback" not in result.stderr


# --- every subcommand, run as the real command: missing paths, directories, services that are down ----------


def _closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _fastload(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None,
              timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastload_core", *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout, check=False)


def _assert_one_error_line(done: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()  # progress lines (bench, demo) may come first
    errors = [line for line in lines if line.startswith("fastload: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], done.stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A pickle, a safetensors file, an empty directory, a non-empty one and a plain file, side by side."""
    torch.save({"w": torch.ones(4)}, tmp_path / "tiny.pt")
    save_file({"w": torch.ones(4)}, tmp_path / "tiny.safetensors")
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model.safetensors").write_bytes((tmp_path / "tiny.safetensors").read_bytes())
    (tmp_path / "a-file").write_text("not a directory")
    return tmp_path


BAD_PATHS = [
    # (case, argv with {ws} for the workspace, phrase the one error line must hold)
    ("inspect missing", ["inspect", "{ws}/missing.safetensors"], "does not exist"),
    ("inspect directory", ["inspect", "{ws}/full"], "is a directory"),
    ("inspect a pickle", ["inspect", "{ws}/tiny.pt"], "fastload convert"),
    ("convert missing", ["convert", "{ws}/missing.pt", "{ws}/out.safetensors"], "does not exist"),
    ("convert directory", ["convert", "{ws}/full", "{ws}/out.safetensors"], "is a directory"),
    ("convert onto itself", ["convert", "{ws}/tiny.pt", "{ws}/tiny.pt"], "input file"),
    ("convert under a file", ["convert", "{ws}/tiny.pt", "{ws}/a-file/out.safetensors"], "a-file"),
    ("fetch missing", ["fetch", "{ws}/missing"], "no such file or directory"),
    ("fetch empty directory", ["fetch", "{ws}/empty"], "directory is empty"),
    ("fetch file:// missing", ["fetch", "file://{ws}/missing"], "no such file or directory"),
    ("fetch file:// empty directory", ["fetch", "file://{ws}/empty"], "directory is empty"),
    ("warm missing", ["warm", "{ws}/full", "{ws}/missing"], "no such file or directory"),
    ("warm empty directory", ["warm", "file://{ws}/empty"], "directory is empty"),
    ("bench into a file", ["bench", "--size-gb", "0.001", "--rounds", "1", "--dir", "{ws}/a-file"],
     "a-file: exists and is not a directory"),
    ("demo into a file", ["demo", "--size-gb", "0.001", "--no-compile", "--dir", "{ws}/a-file"],
     "a-file: exists and is not a directory"),
    ("demo size 0", ["demo", "--size-gb", "0", "--dir", "{ws}/demo"], "--size-gb"),
]


@pytest.mark.parametrize(("argv", "phrase"), [case[1:] for case in BAD_PATHS], ids=[case[0] for case in BAD_PATHS])
def test_a_bad_path_is_one_line_and_exit_2(workspace: Path, argv: list[str], phrase: str) -> None:
    _assert_one_error_line(_fastload(*(arg.format(ws=workspace) for arg in argv)), phrase)


def test_a_compile_cache_that_is_down_is_one_line(workspace: Path) -> None:
    down = f"redis://127.0.0.1:{_closed_port()}/0"
    _assert_one_error_line(_fastload("cache", "ls", "--compile-cache", down), "cannot list the compile cache", down)
    _assert_one_error_line(_fastload("cache", "rm", "--compile", "k", "--compile-cache", down),
                           "cannot remove from the compile cache", down)
    doctor = _fastload("doctor", "--cache", down)  # doctor reports a failed check; it is not an error
    assert doctor.returncode == 1 and "Traceback" not in doctor.stdout + doctor.stderr
    [line] = [line for line in doctor.stdout.splitlines() if line.startswith("FAIL")]
    assert line.count(down) == 1 and "ConnectionError" in line
    on_a_file = _fastload("doctor", "--cache", (workspace / "a-file").as_uri())  # a path that is not a directory
    assert on_a_file.returncode == 1 and "Traceback" not in on_a_file.stdout + on_a_file.stderr
    assert [line for line in on_a_file.stdout.splitlines() if line.startswith("FAIL compile cache file://")]


def test_s3_that_is_down_is_one_line(workspace: Path) -> None:
    env = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{_closed_port()}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1", "FASTLOAD_S3_MAX_ATTEMPTS": "1"}
    _assert_one_error_line(_fastload("fetch", "s3://models/m1/model.safetensors", env=env), "cannot reach")
    _assert_one_error_line(_fastload("warm", "s3://models/m1/", env=env), "cannot reach")


def test_cache_rm_says_nothing_matched_with_exit_1_for_models_and_compile_keys(workspace: Path) -> None:
    models = _fastload("cache", "rm", "nothing-like-this")
    compiled = _fastload("cache", "rm", "--compile", "no-such-key", "--compile-cache", (workspace / "cc").as_uri())
    assert (models.returncode, compiled.returncode) == (1, 1)
    assert "nothing cached matches" in models.stdout and "no compile entry" in compiled.stdout
    assert models.stderr == compiled.stderr == ""


def test_commands_without_paths_run_clean(workspace: Path) -> None:
    listing = _fastload("plugins")
    assert listing.returncode == 0 and "fastload.storage  (builtin)" in listing.stdout and not listing.stderr
    shown = _fastload("cache", "ls", "--compile-cache", (workspace / "cc").as_uri())
    assert shown.returncode == 0 and "compile cache" in shown.stdout and not shown.stderr
    cleaned = _fastload("cache", "gc")
    assert cleaned.returncode == 0 and "evicted: 0" in cleaned.stdout


def test_fetch_of_a_plain_directory_prints_it(workspace: Path) -> None:
    done = _fastload("fetch", str(workspace / "full"))
    assert done.returncode == 0 and done.stdout.strip() == str(workspace / "full")


@pytest.mark.s3
def test_fastload_logs_at_info_and_other_libraries_at_warning(s3: Any, workspace: Path) -> None:
    """fastload reports the fetch (its logger at INFO); botocore's INFO line about where it found the
    credentials (environment variables here) stays out, unless -v asks for everything."""
    s3.put_object(Bucket=BUCKET, Key="m1/model.safetensors", Body=(workspace / "tiny.safetensors").read_bytes())
    done = _fastload("fetch", f"s3://{BUCKET}/m1/model.safetensors")
    assert done.returncode == 0, done.stderr
    assert "-> local_disk" in done.stderr and "Found credentials" not in done.stderr
    verbose = _fastload("-v", "fetch", f"s3://{BUCKET}/m1/model.safetensors")
    assert verbose.returncode == 0 and "Found credentials in environment variables" in verbose.stderr


def test_every_option_and_argument_has_help() -> None:
    def undocumented(parser: argparse.ArgumentParser, path: str) -> Iterator[str]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from undocumented(sub, f"{path} {name}")
            elif action.help is None:
                yield f"{path} {'/'.join(action.option_strings) or action.dest}"

    assert list(undocumented(build_parser(), "fastload")) == []


def test_top_level_help_is_plain_text() -> None:
    done = _fastload("--help")
    assert done.returncode == 0 and "``" not in done.stdout and "Exit status: 0" in done.stdout


@pytest.mark.parametrize(("source_mode", "expected"), [(0o644, 0o644), (0o640, 0o640), (0o600, 0o600)])
def test_converted_file_is_readable_by_whoever_reads_the_source(
    workspace: Path, source_mode: int, expected: int
) -> None:
    os.chmod(workspace / "tiny.pt", source_mode)
    os.chmod(workspace / "tiny.safetensors", source_mode)
    (workspace / "out").mkdir()  # an existing directory: the output goes into it under the source's name
    for source in ("tiny.pt", "tiny.safetensors"):  # converted, and copied as it is already safetensors
        done = subprocess.run(
            [sys.executable, "-c", "import os, sys; os.umask(0o022); from fastload_core.cli import main; "
             "sys.exit(main(sys.argv[1:]))", "convert", str(workspace / source), str(workspace / "out")],
            capture_output=True, text=True, timeout=180, check=False,
        )
        assert done.returncode == 0, done.stderr
        written = workspace / "out" / f"{Path(source).stem}.safetensors"
        assert stat.S_IMODE(written.stat().st_mode) == expected, (source, oct(written.stat().st_mode))
        assert torch.equal(load_file(written)["w"], torch.ones(4))
        written.unlink()
