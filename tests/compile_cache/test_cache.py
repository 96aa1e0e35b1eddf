"""CompileCache: restore and save never raise, and say what happened."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fastload_core.compile_cache import CompileCache, default_url
from fastload_core.compile_cache import blob as blobfmt
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
