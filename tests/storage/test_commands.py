from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastload_core.storage import parse_uri, pin
from fastload_core.storage.commands import add_commands
from fastload_core.storage.errors import StorageError


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastload")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_fetch_ls_rm_gc(tmp_path: Path, shm_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "w.bin").write_bytes(os.urandom(50_000))
    uri = f"file://{model}"
    assert run(["fetch", uri, "--tier", "shm"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.is_relative_to(shm_root) and (path / "w.bin").stat().st_size == 50_000

    assert run(["cache", "ls"]) == 0
    listing = capsys.readouterr().out
    assert listing.count(uri) == 2 and "shm" in listing and "local_disk" in listing

    with pin(uri, tier="shm"):
        assert run(["cache", "rm", uri, "--tier", "shm"]) == 1  # in use: kept
        assert "in use" in capsys.readouterr().out
        assert path.exists()
    assert run(["cache", "rm", uri]) == 0
    assert capsys.readouterr().out.count("removed") == 2
    assert not path.exists()

    stale = shm_root / "s3-x-0123456789abcdef" / ".partial-abc-deadnode"
    stale.mkdir(parents=True)
    assert run(["cache", "gc"]) == 0
    assert "partials: 0" in capsys.readouterr().out  # another node's partial is not ours to judge
    assert stale.exists()

    assert run(["warm", uri]) == 0
    assert "warmed 1 model(s)" in capsys.readouterr().out


def test_rm_refuses_traversal_keys(capsys: pytest.CaptureFixture[str]) -> None:
    from fastload_core.storage.errors import UnsafeKeyError

    with pytest.raises(UnsafeKeyError):
        run(["cache", "rm", "../../etc"])


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastload_core", *args], capture_output=True, text=True,
                          check=False, timeout=120, env=dict(os.environ, **(env or {})))


def test_cli_refuses_a_planted_link_and_a_bad_verify_mode(tmp_path: Path) -> None:
    model = tmp_path / "w.bin"
    model.write_bytes(b"x" * 100)
    uri = f"file://{model}"
    slug_dir = Path(os.environ["FASTLOAD_CACHE_DIR"]) / "storage" / parse_uri(uri).slug
    slug_dir.parent.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    slug_dir.symlink_to(outside)
    done = _cli(["fetch", uri])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "symbolic link" in done.stderr and str(slug_dir) in done.stderr and list(outside.iterdir()) == []
    slug_dir.unlink()
    done = _cli(["fetch", uri], {"FASTLOAD_VERIFY": "maybe"})
    assert done.returncode == 2 and "Traceback" not in done.stderr and "FASTLOAD_VERIFY='maybe'" in done.stderr
    done = _cli(["fetch", uri], {"FASTLOAD_VERIFY": "full"})
    assert done.returncode == 0 and Path(done.stdout.strip()).read_bytes() == b"x" * 100


@pytest.mark.parametrize("variable", ["FASTLOAD_FETCH_TIMEOUT", "FASTLOAD_LEASE_TTL", "FASTLOAD_REDIS_TIMEOUT"])
@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_a_timeout_that_is_not_a_positive_number_is_refused(variable: str, value: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # -1 reached filelock as "wait forever", 0 made a Redis lease that never expires
    from fastload_core.storage.settings import StorageSettings

    monkeypatch.setenv(variable, value)
    with pytest.raises(StorageError, match=f"{variable}='{value}': expected a number of seconds"):
        StorageSettings.from_env()


def test_the_cli_says_which_timeout_is_wrong(tmp_path: Path) -> None:
    model = tmp_path / "w.bin"
    model.write_bytes(b"x" * 100)
    done = _cli(["fetch", f"file://{model}"], {"FASTLOAD_FETCH_TIMEOUT": "-1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "FASTLOAD_FETCH_TIMEOUT='-1': expected a number of seconds above zero" in done.stderr


def test_cli_fetch_of_a_revision_no_tier_holds_fails_instead_of_taking_the_current_version(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "w.bin").write_bytes(b"x" * 100)
    done = _cli(["fetch", f"file://{model}", "--revision", "0123456789abcdef0123"])
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stdout == ""
    assert "no tier holds version 0123456789abcdef0123" in done.stderr
