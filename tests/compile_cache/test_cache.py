"""CompileCache: restore and save never raise, and say what happened."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from pathlib import Path

import pytest

from fastload_core.compile_cache import CompileCache, default_url
from fastload_core.compile_cache import blob as blobfmt
from fastload_core.compile_cache import cache as cache_module
from fastload_core.compile_cache.base import CompileCacheBackend, StoredEntry
from fastload_core.compile_cache.keys import key_from_fields

KEY = key_from_fields({"torch": "2.13.0+cpu", "model": "m"})


def _inductor_dir(root: Path) -> Path:
    (root / "fxgraph/ab").mkdir(parents=True)
    (root / "fxgraph/ab/entry").write_bytes(b"graph")
    (root / "cz").mkdir()
    (root / "cz/kernel.so").write_bytes(b"\x7fELF kernel")
    return root


def test_default_is_a_directory_under_the_fastload_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("FASTLOAD_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("FASTLOAD_CACHE_DIR", str(tmp_path / "fl"))
    assert CompileCache().url == (tmp_path / "fl/compile/entries").as_uri()
    monkeypatch.setenv("FASTLOAD_COMPILE_CACHE", "redis://cache.internal:6379/2")
    assert default_url() == "redis://cache.internal:6379/2"


def test_save_then_restore_elsewhere_then_local(tmp_path: Path) -> None:
    cache = CompileCache((tmp_path / "store").as_uri())
    assert cache.restore(KEY, tmp_path / "node1").status == "miss"
    saved = cache.save(KEY, _inductor_dir(tmp_path / "node1"), b"mega")
    assert saved.status == "stored" and saved.entry_bytes > 0
    assert cache.save(KEY, tmp_path / "node1", b"mega").status == "exists"

    restored = cache.restore(KEY, tmp_path / "node2")
    assert restored.status == "restored"
    assert restored.restored is not None
    assert (restored.restored.files, restored.restored.mega) == (2, b"mega")
    assert (tmp_path / "node2/cz/kernel.so").read_bytes() == b"\x7fELF kernel"
    # a second replica on node2 finds the files already there and skips the fetch
    assert cache.restore(KEY, tmp_path / "node2").status == "local"


def test_corrupt_entry_is_a_miss_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = CompileCache((tmp_path / "store").as_uri())
    cache.save(KEY, _inductor_dir(tmp_path / "src"), None)
    path = tmp_path / "store" / f"{KEY.digest}.flcc"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="fastload"):
        outcome = cache.restore(KEY, tmp_path / "dest")
    assert outcome.status == "corrupt"
    assert KEY.digest in caplog.text and "sha256 does not match" in caplog.text
    assert not (tmp_path / "dest/cz").exists()
    # the caller recompiles and replaces it
    assert cache.save(KEY, tmp_path / "src", None, overwrite=True).status == "stored"
    assert cache.restore(KEY, tmp_path / "dest2").status == "restored"


def test_entry_from_another_torch_version_is_a_miss(tmp_path: Path) -> None:
    cache = CompileCache((tmp_path / "store").as_uri())
    older = key_from_fields({**KEY.fields, "torch": "2.12.0+cpu"})
    packed = blobfmt.pack(older, _inductor_dir(tmp_path / "src"), None)
    payload = packed[blobfmt.read_header(packed)["_payload_offset"]:]
    # placed under this version's key (a copy gone wrong): still refused
    cache.backend.put(KEY.digest, blobfmt.assemble(
        {"format": blobfmt.FORMAT_VERSION, "key": KEY.digest, "fields": dict(older.fields)}, payload))
    outcome = cache.restore(KEY, tmp_path / "dest")
    assert outcome.status == "mismatch"
    assert "torch: entry '2.12.0+cpu'" in outcome.message
    # and under its own key it is simply never looked up by this version
    cache.backend.put(older.digest, packed)
    assert cache.restore(KEY, tmp_path / "dest").status == "mismatch"
    assert cache.restore(older, tmp_path / "old").status == "restored"


def test_a_node_that_cannot_write_the_files_compiles_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = CompileCache((tmp_path / "store").as_uri())
    cache.save(KEY, _inductor_dir(tmp_path / "src"), None)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(blobfmt, "unpack", disk_full)
    with caplog.at_level(logging.WARNING, logger="fastload"):
        assert cache.restore(KEY, tmp_path / "dest").status == "error"
    assert "No space left on device" in caplog.text


# --- review: with FASTLOAD_COMPILE_CACHE_SECRET set, only entries signed with it are ever unpacked ---


def _store_with_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secret: str | None) -> CompileCache:
    if secret is None:
        monkeypatch.delenv(blobfmt.SECRET_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(blobfmt.SECRET_VARIABLE, secret)
    cache = CompileCache((tmp_path / "store").as_uri())
    assert cache.save(KEY, _inductor_dir(tmp_path / f"src-{secret}"), b"mega", overwrite=True).status == "stored"
    return cache


def test_signed_entries_round_trip_with_the_same_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _store_with_secret(tmp_path, monkeypatch, "s3cret")
    assert blobfmt.read_header((tmp_path / "store" / f"{KEY.digest}.flcc").read_bytes())["signed"] is True
    outcome = cache.restore(KEY, tmp_path / "dest")
    assert outcome.status == "restored" and outcome.restored is not None and outcome.restored.mega == b"mega"


def test_an_entry_restored_unchecked_is_not_used_once_a_secret_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that restored an unsigned entry keeps it on disk for inductor; setting the secret afterwards
    must not leave that stranger's code in use: the entry is fetched and checked again (and refused)."""
    cache = _store_with_secret(tmp_path, monkeypatch, None)
    dest = tmp_path / "dest"
    assert cache.restore(KEY, dest).status == "restored"
    assert cache.restore(KEY, dest).status == "local"
    monkeypatch.setenv(blobfmt.SECRET_VARIABLE, "s3cret")
    assert cache.restore(KEY, dest).status == "corrupt"  # unsigned: refused, and nothing of it left in use
    assert not (dest / "cz").exists()
    built = tmp_path / "built"  # what this node compiled itself stays trusted
    assert cache.save(KEY, _inductor_dir(built), b"mega", overwrite=True).status == "stored"
    assert cache.restore(KEY, built).status == "local"
    assert cache.restore(KEY, dest).status == "restored"  # the entry now signed under the secret
    assert cache.restore(KEY, dest).status == "local"


@pytest.mark.parametrize(
    ("writer", "reader", "status", "problem"),
    [
        pytest.param(None, "s3cret", "corrupt", "unsigned", id="unsigned-entry"),
        pytest.param("other", "s3cret", "corrupt", "signature does not match", id="other-secret"),
        pytest.param("s3cret", None, "mismatch", "cannot be checked", id="reader-without-secret"),
    ],
)
def test_an_entry_the_secret_does_not_vouch_for_is_a_miss_never_unpacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    writer: str | None, reader: str | None, status: str, problem: str,
) -> None:
    cache = _store_with_secret(tmp_path, monkeypatch, writer)
    if reader is None:
        monkeypatch.delenv(blobfmt.SECRET_VARIABLE)
    else:
        monkeypatch.setenv(blobfmt.SECRET_VARIABLE, reader)
    opened: list[object] = []
    monkeypatch.setattr(blobfmt.tarfile, "open", lambda *a, **k: opened.append(a))
    with caplog.at_level(logging.WARNING, logger="fastload"):
        outcome = cache.restore(KEY, tmp_path / "dest")
    assert (outcome.status, opened) == (status, [])
    assert problem in caplog.text
    assert not (tmp_path / "dest/cz").exists()


def test_a_forged_entry_with_a_valid_checksum_is_refused_when_a_secret_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(blobfmt.SECRET_VARIABLE, "s3cret")
    cache = CompileCache((tmp_path / "store").as_uri())
    signed = blobfmt.pack(KEY, _inductor_dir(tmp_path / "src"), b"mega")
    header = blobfmt.read_header(signed)
    payload = signed[header.pop("_payload_offset"):]
    header.pop("_sha256")
    # What a writer without the secret can make: a header that claims a signature, and a correct sha256.
    encoded = json.dumps({**header, "signed": True}, sort_keys=True).encode()
    checksum = hashlib.sha256(encoded + payload).digest()
    forged = struct.pack(">4sHI32s", blobfmt.MAGIC, blobfmt.FORMAT_VERSION, len(encoded), checksum) + encoded + payload
    assert forged != signed
    assert cache.backend.put(KEY.digest, forged)
    monkeypatch.setenv(blobfmt.SECRET_VARIABLE, "s3cret")
    outcome = cache.restore(KEY, tmp_path / "dest")
    assert outcome.status == "corrupt" and "signature does not match" in outcome.message


class _SharedBackend(CompileCacheBackend):
    scheme = "s3"

    def get(self, key: str) -> bytes | None:
        return None

    def put(self, key: str, blob: bytes, *, overwrite: bool = False) -> bool:
        return True

    def delete(self, key: str) -> bool:
        return False

    def entries(self) -> list[StoredEntry]:
        return []


def test_a_shared_cache_without_a_secret_is_warned_about_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cache_module, "_unsigned_shared_warning", threading.Event())
    with caplog.at_level(logging.WARNING, logger="fastload"):
        monkeypatch.setenv(blobfmt.SECRET_VARIABLE, "s3cret")
        CompileCache(backend=_SharedBackend("s3://bucket/compile"))
        assert caplog.records == []
        monkeypatch.delenv(blobfmt.SECRET_VARIABLE)
        CompileCache(backend=_SharedBackend("s3://bucket/compile"))
        CompileCache(backend=_SharedBackend("s3://other/compile"))
    assert len(caplog.records) == 1
    assert blobfmt.SECRET_VARIABLE in caplog.text and "s3://bucket/compile" in caplog.text


# --- review: a password in the cache URL is for connecting, never for logs, reports or errors ---


def test_a_password_in_the_cache_url_reaches_no_log_outcome_or_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from fastload_core.compile_cache.errors import CacheURLError, EntryTooLargeError
    from fastload_core.compile_cache.registry import open_backend

    monkeypatch.setattr(cache_module, "_unsigned_shared_warning", threading.Event())  # its warning shows the URL
    url = f"redis://:hunter2@127.0.0.1:1/0?connect_timeout=0.2&prefix=leak-{os.getpid()}:"  # nothing listens
    with caplog.at_level(logging.DEBUG, logger="fastload"):
        cache = CompileCache(url)
        restored = cache.restore(KEY, tmp_path / "dest")
        saved = cache.save(KEY, _inductor_dir(tmp_path / "src"), None)
    assert (restored.status, saved.status) == ("unavailable", "unavailable")
    assert "redis://***@127.0.0.1:1/0" in caplog.text  # still says which cache
    shown = [caplog.text, restored.message, saved.message, cache.url, repr(cache), repr(cache.backend)]
    assert not [text for text in shown if "hunter2" in text]
    with pytest.raises(EntryTooLargeError) as too_large:
        open_backend(f"{url}&max_inline=10").put(KEY.digest, bytes(100))
    with pytest.raises(CacheURLError) as malformed:
        open_backend("redis://:hunter2@/0")  # no host
    for error in (too_large.value, malformed.value):
        assert "hunter2" not in str(error) and "hunter2" not in error.url and "***@" in str(error)


# --- review: whatever a stored entry makes the unpacker raise, restore says corrupt and compile goes on ---


def test_an_entry_whose_fields_are_not_an_object_is_corrupt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = CompileCache((tmp_path / "store").as_uri())
    header = {"format": blobfmt.FORMAT_VERSION, "key": KEY.digest, "fields": ["model"]}
    cache.backend.put(KEY.digest, blobfmt.assemble(header, b""))  # checksum-valid, but not what pack() writes
    with caplog.at_level(logging.WARNING, logger="fastload"):
        outcome = cache.restore(KEY, tmp_path / "dest")
    assert outcome.status == "corrupt" and "header fields are a JSON list" in outcome.message
    assert "compiling and replacing it" in caplog.text


def test_anything_unpacking_raises_is_a_corrupt_entry_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = CompileCache((tmp_path / "store").as_uri())
    assert cache.save(KEY, _inductor_dir(tmp_path / "src"), None).status == "stored"

    def unexpected(*args: object, **kwargs: object) -> None:
        raise KeyError("payload_size")  # e.g. a header shaped in a way the unpacker never met

    monkeypatch.setattr(blobfmt, "unpack", unexpected)
    with caplog.at_level(logging.WARNING, logger="fastload"):
        outcome = cache.restore(KEY, tmp_path / "dest")
    assert outcome.status == "corrupt" and "KeyError" in outcome.message and outcome.entry_bytes > 0
    assert "compiling and replacing it" in caplog.text
