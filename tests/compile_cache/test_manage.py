"""What ``fastload cache`` and ``fastload doctor`` get from the compile cache."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fastload_core.compile_cache import CompileCache, check_backend, list_entries, remove_entry
from fastload_core.compile_cache.commands import add_commands
from fastload_core.compile_cache.keys import key_from_fields


def _entry(cache: CompileCache, root: Path, **fields: str) -> str:
    key = key_from_fields({"model": "app.Block", "torch": "2.13.0+cpu", "device": "cpu", "cpu_isa": "AVX2",
                           "threads": "4", **fields})
    (root / "cz").mkdir(parents=True, exist_ok=True)
    (root / "cz/kernel.so").write_bytes(b"kernel" * 100)
    assert cache.save(key, root, None).status == "stored"
    return key.digest


def test_list_describes_entries_and_flags_unreadable_ones(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    cache = CompileCache(url)
    key = _entry(cache, tmp_path / "a")
    cache.backend.put("v1-garbage", b"not an entry at all")
    entries = {e.key: e for e in list_entries(url)}
    assert entries[key].describe() == "app.Block | torch 2.13.0+cpu | cpu AVX2 x4"
    assert entries[key].stored_at is not None and entries[key].size > 0
    assert entries["v1-garbage"].problem is not None and "bad magic" in entries["v1-garbage"].problem
    assert remove_entry(url, key) is True
    assert remove_entry(url, key) is False
    assert [e.key for e in list_entries(url)] == ["v1-garbage"]


@pytest.mark.redis
def test_list_through_redis_reads_only_headers(redis_url: str, tmp_path: Path) -> None:
    key = _entry(CompileCache(redis_url), tmp_path / "a", model="app.Other")
    [entry] = list_entries(redis_url)
    assert entry.key == key and entry.fields["model"] == "app.Other"


def test_check_backend(tmp_path: Path, blackhole_port: int) -> None:
    ok, message = check_backend((tmp_path / "store").as_uri())
    assert ok, message
    assert "writable" in message and "round trip" in message
    ok, message = check_backend(f"redis://127.0.0.1:{blackhole_port}/0?timeout=0.2&connect_timeout=0.2")
    assert not ok and "Timeout" in message
    ok, message = check_backend("gopher://x")
    assert not ok and "supported schemes" in message


def test_doctor_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    good = (tmp_path / "store").as_uri()
    args = parser.parse_args(["doctor", "--cache", good])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"ok   compile cache {good}" in out and "ok   toolchain: torch" in out
    args = parser.parse_args(["doctor", "--cache", good, "--cache", "gopher://nowhere"])
    assert args.func(args) == 1
    assert "FAIL compile cache gopher://nowhere" in capsys.readouterr().out


# --- review: one entry that cannot be read is that entry's problem, never the whole listing's ---


@pytest.mark.s3
def test_an_empty_object_in_s3_is_listed_as_unreadable(s3_endpoint: str, tmp_path: Path) -> None:
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="compile-cache")
    url = "s3://compile-cache/team"
    key = _entry(CompileCache(url), tmp_path / "a")
    client.put_object(Bucket="compile-cache", Key="team/v1-empty.flcc", Body=b"")  # S3: 416 InvalidRange
    entries = {e.key: e for e in list_entries(url)}
    assert entries[key].problem is None and entries[key].fields["model"] == "app.Block"
    assert entries["v1-empty"].problem is not None and "only 0 bytes" in entries["v1-empty"].problem
    assert entries["v1-empty"].size == 0


def test_an_entry_the_backend_fails_to_read_does_not_hide_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastload_core.compile_cache.directory import DirectoryBackend

    url = (tmp_path / "store").as_uri()
    key = _entry(CompileCache(url), tmp_path / "a")
    CompileCache(url).backend.put("v1-unreadable", b"whatever")
    real_get_prefix = DirectoryBackend.get_prefix

    def flaky(self: DirectoryBackend, name: str, nbytes: int) -> bytes | None:
        if name == "v1-unreadable":
            raise PermissionError(13, "Permission denied")
        return real_get_prefix(self, name, nbytes)

    monkeypatch.setattr(DirectoryBackend, "get_prefix", flaky)
    entries = {e.key: e for e in list_entries(url)}
    assert entries[key].problem is None
    assert entries["v1-unreadable"].problem == "could not read it (PermissionError: [Errno 13] Permission denied)"


def test_what_cache_ls_and_gc_print_carries_no_password(tmp_path: Path) -> None:
    from fastload_core.compile_cache.manage import collect_garbage

    url = "redis://:hunter2@127.0.0.1:1/0?connect_timeout=0.2"  # redis keeps no temp files: nothing is contacted
    garbage = collect_garbage(url)
    assert "hunter2" not in garbage.describe() and garbage.url == "redis://***@127.0.0.1:1/0?connect_timeout=0.2"
