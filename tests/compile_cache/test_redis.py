"""Redis-specific behaviour: pointers for large entries, and a Redis that is down or hung."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import redis as redis_client

from fastload_core.compile_cache import CompileCache
from fastload_core.compile_cache.errors import EntryTooLargeError
from fastload_core.compile_cache.keys import key_from_fields
from fastload_core.compile_cache.redis import RedisBackend
from fastload_core.compile_cache.registry import open_backend
from fastload_devservices.redis import RedisServer

pytestmark = pytest.mark.redis

KEY = key_from_fields({"model": "m"})


def _inductor_dir(root: Path, size: int = 4000) -> Path:
    (root / "cz").mkdir(parents=True)
    (root / "cz/kernel.so").write_bytes(os.urandom(size))  # incompressible: the entry stays large
    return root


def test_large_entries_go_to_the_blob_store_with_a_pointer_in_redis(redis_url: str, tmp_path: Path) -> None:
    blobs = (tmp_path / "blobs").as_uri()
    backend = open_backend(f"{redis_url}?max_inline=1000&blob={quote(blobs, safe='')}&prefix=t:")
    data = os.urandom(50_000)
    assert backend.put("v1-big", data)
    raw = redis_client.Redis.from_url(redis_url).get("t:v1-big")
    assert isinstance(raw, bytes) and raw.startswith(b"FLCCPTR1") and len(raw) < 500
    assert (tmp_path / "blobs/v1-big.flcc").read_bytes() == data
    assert backend.get("v1-big") == data
    assert [(e.key, e.size) for e in backend.entries()] == [("v1-big", 50_000)]
    assert backend.delete("v1-big")
    assert not (tmp_path / "blobs/v1-big.flcc").exists()


def test_large_entry_without_a_blob_store_is_skipped_with_a_warning(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(EntryTooLargeError, match="add \\?blob="):
        open_backend(f"{redis_url}?max_inline=1000").put("v1-big", os.urandom(5000))
    cache = CompileCache(f"{redis_url}?max_inline=1000")
    with caplog.at_level(logging.WARNING, logger="fastload"):
        outcome = cache.save(KEY, _inductor_dir(tmp_path / "src"), None)
    assert outcome.status == "too_large"
    assert "exceeds the inline limit of 1000 bytes" in caplog.text
    assert open_backend(redis_url).entries() == []


def test_redis_down_is_a_miss_warned_once(
    redis_server: RedisServer, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"{redis_url}?prefix=down-{os.getpid()}:"  # a URL no earlier test warned about
    cache = CompileCache(url)
    assert cache.save(KEY, _inductor_dir(tmp_path / "src"), None).status == "stored"
    redis_server.stop()
    with caplog.at_level(logging.DEBUG, logger="fastload"):
        started = time.monotonic()
        first = cache.restore(KEY, tmp_path / "a")
        second = cache.restore(KEY, tmp_path / "b")
        saved = cache.save(KEY, tmp_path / "src", None)
        elapsed = time.monotonic() - started
    assert (first.status, second.status, saved.status) == ("unavailable", "unavailable", "unavailable")
    assert elapsed < 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert url in warnings[0].getMessage() and "ConnectionError" in warnings[0].getMessage()


def test_hung_redis_costs_at_most_the_timeout(blackhole_port: int, tmp_path: Path) -> None:
    cache = CompileCache(f"redis://127.0.0.1:{blackhole_port}/0?timeout=0.3&connect_timeout=0.3")
    started = time.monotonic()
    outcome = cache.restore(KEY, tmp_path / "dest")
    assert outcome.status == "unavailable"
    assert "Timeout" in outcome.message
    assert time.monotonic() - started < 2.0


def test_garbage_under_the_key_is_a_corrupt_entry(redis_url: str, tmp_path: Path) -> None:
    cache = CompileCache(redis_url)
    redis_client.Redis.from_url(redis_url).set(f"fastload:compile:{KEY.digest}", b"FLCCPTR1{not json")
    assert cache.restore(KEY, tmp_path / "dest").status == "corrupt"


# --- issue 11.4: a pointer that cannot or must not be followed is a corrupt entry, and is replaced ---


def _valid_entry(tmp_path: Path) -> bytes:
    """A real packed entry for KEY, large enough to go to the blob store behind a pointer."""
    from fastload_core.compile_cache import blob as blobfmt

    return blobfmt.pack(KEY, _inductor_dir(tmp_path / "valid-src", size=8000), None)


def _pointer(url: str, size: int) -> bytes:
    return b"FLCCPTR1" + json.dumps({"url": url, "size": size}).encode()


@pytest.fixture
def outside_store(tmp_path: Path) -> tuple[str, bytes]:
    """Another directory holding a perfectly valid entry for KEY: a pointer there must still not be followed."""
    entry = _valid_entry(tmp_path)
    url = (tmp_path / "outside").as_uri()
    assert open_backend(url).put(KEY.digest, entry)
    return url, entry


@pytest.mark.parametrize(
    "pointer",
    [
        pytest.param(b'FLCCPTR1{"size": 10}', id="no-url"),
        pytest.param(b"FLCCPTR1{not json", id="not-json"),
        pytest.param(b"FLCCPTR1" + b"[" * 100_000, id="nested-deeper-than-python-parses"),
        pytest.param(b'FLCCPTR1["file:///etc", 10]', id="not-an-object"),
        pytest.param(b'FLCCPTR1{"url": "file:///etc", "size": "ten"}', id="bad-size"),
        pytest.param(_pointer("bogus://somewhere", 10), id="unknown-scheme"),
        pytest.param(_pointer("file:///etc", 10), id="outside-directory"),
        pytest.param(_pointer("redis://127.0.0.1:1/0", 10), id="dead-host"),
        pytest.param(_pointer("s3://no-such-bucket/x", 10), id="other-s3"),
    ],
)
def test_an_unusable_pointer_is_corrupt_and_overwritten(
    redis_url: str, tmp_path: Path, pointer: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    blobs = (tmp_path / "blobs").as_uri()
    url = f"{redis_url}?max_inline=1000&blob={quote(blobs, safe='')}&prefix=ptr-{os.getpid()}:"
    client = redis_client.Redis.from_url(redis_url)
    name = f"ptr-{os.getpid()}:{KEY.digest}"
    client.set(name, pointer)
    cache = CompileCache(url)
    with caplog.at_level(logging.WARNING, logger="fastload"):
        started = time.monotonic()
        outcome = cache.restore(KEY, tmp_path / "dest")
    assert outcome.status == "corrupt", outcome.message
    assert time.monotonic() - started < 2  # a dead host named in the pointer is never contacted
    assert "compiling and replacing it" in caplog.text
    # what the replica does after compiling: store with overwrite, which replaces the pointer
    assert cache.save(KEY, _inductor_dir(tmp_path / "src", size=8000), None, overwrite=True).status == "stored"
    replaced = client.get(name)
    assert isinstance(replaced, bytes) and replaced != pointer and replaced.startswith(b"FLCCPTR1")
    assert blobs in replaced.decode()
    assert cache.restore(KEY, tmp_path / "next").status == "restored"
    client.delete(name)


def test_a_pointer_outside_the_blob_store_is_not_followed_even_to_a_valid_entry(
    redis_url: str, tmp_path: Path, outside_store: tuple[str, bytes]
) -> None:
    outside_url, entry = outside_store
    blobs = (tmp_path / "blobs").as_uri()
    url = f"{redis_url}?max_inline=1000&blob={quote(blobs, safe='')}&prefix=out-{os.getpid()}:"
    redis_client.Redis.from_url(redis_url).set(f"out-{os.getpid()}:{KEY.digest}", _pointer(outside_url, len(entry)))
    outcome = CompileCache(url).restore(KEY, tmp_path / "dest")
    assert outcome.status == "corrupt" and "outside the configured blob store" in outcome.message
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").rglob("*.so"))
    # without a blob store configured, no pointer is followed at all
    plain = CompileCache(f"{redis_url}?prefix=out-{os.getpid()}:")
    assert plain.restore(KEY, tmp_path / "dest2").status == "corrupt"


def test_a_dangling_or_resized_pointer_into_our_blob_store_is_corrupt(redis_url: str, tmp_path: Path) -> None:
    blobs = (tmp_path / "blobs").as_uri()
    url = f"{redis_url}?max_inline=1000&blob={quote(blobs, safe='')}&prefix=dang-{os.getpid()}:"
    cache = CompileCache(url)
    assert cache.save(KEY, _inductor_dir(tmp_path / "src", size=8000), None).status == "stored"
    client = redis_client.Redis.from_url(redis_url)
    name = f"dang-{os.getpid()}:{KEY.digest}"
    good = client.get(name)
    assert isinstance(good, bytes)
    size = json.loads(good[len(b"FLCCPTR1"):])["size"]
    client.set(name, _pointer(blobs, size + 1))
    assert cache.restore(KEY, tmp_path / "a").status == "corrupt"
    client.set(name, good)
    (tmp_path / "blobs" / f"{KEY.digest}.flcc").unlink()
    outcome = cache.restore(KEY, tmp_path / "b")
    assert outcome.status == "corrupt" and "has no such blob" in outcome.message
    # a store that lost the race to a dangling pointer would keep it forever; overwrite replaces it
    assert cache.save(KEY, _inductor_dir(tmp_path / "src2", size=8000), None, overwrite=True).status == "stored"
    assert cache.restore(KEY, tmp_path / "c").status == "restored"


def test_listing_and_removing_a_garbage_pointer_touch_nothing_it_names(redis_url: str, tmp_path: Path) -> None:
    from fastload_core.compile_cache import list_entries, remove_entry

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / f"{KEY.digest}.flcc").write_bytes(b"not yours")
    prefix = f"ls-{os.getpid()}:"
    redis_client.Redis.from_url(redis_url).set(f"{prefix}{KEY.digest}", _pointer(victim.as_uri(), 9))
    url = f"{redis_url}?prefix={prefix}"
    [entry] = list_entries(url)
    assert entry.problem is not None and "not following it" in entry.problem
    assert remove_entry(url, KEY.digest) is True
    assert (victim / f"{KEY.digest}.flcc").read_bytes() == b"not yours"


# --- review: a large entry's pointer must describe the blob that is actually stored ---


def test_racing_large_stores_leave_a_pointer_that_matches_the_stored_blob(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replay the race: A uploads its blob; B runs its whole store (its blob loses to A's); then A's pointer
    loses to B's. The pointer that stays must describe A's blob, or every replica reads a corrupt entry."""
    from fastload_core.compile_cache import blob as blobfmt

    blobs = (tmp_path / "blobs").as_uri()
    url = f"{redis_url}?max_inline=1000&blob={quote(blobs, safe='')}&prefix=race-{os.getpid()}:"
    entry_a = blobfmt.pack(KEY, _inductor_dir(tmp_path / "a-src", size=8000), None)
    entry_b = blobfmt.pack(KEY, _inductor_dir(tmp_path / "b-src", size=9000), None)
    assert len(entry_a) != len(entry_b)
    replica_a, replica_b = RedisBackend(url), RedisBackend(url)
    a_blobs = replica_a.blob_backend
    assert a_blobs is not None
    upload = a_blobs.put
    b_stored: list[bool] = []

    def upload_then_let_b_run(key: str, data: bytes, *, overwrite: bool = False) -> bool:
        stored = upload(key, data, overwrite=overwrite)
        b_stored.append(replica_b.put(key, entry_b))
        return stored

    monkeypatch.setattr(a_blobs, "put", upload_then_let_b_run)
    a_stored = replica_a.put(KEY.digest, entry_a)
    assert a_stored != b_stored[0]  # exactly one replica reports the entry as its own
    reader = open_backend(url)
    assert reader.get(KEY.digest) == entry_a
    blobfmt.verify(entry_a, KEY)
    assert CompileCache(url).restore(KEY, tmp_path / "dest").status == "restored"
    redis_client.Redis.from_url(redis_url).delete(f"race-{os.getpid()}:{KEY.digest}")


def test_a_pointer_nested_deeper_than_python_parses_can_be_listed_and_removed(redis_url: str) -> None:
    from fastload_core.compile_cache import list_entries, remove_entry

    prefix = f"deep-{os.getpid()}:"
    client = redis_client.Redis.from_url(redis_url)
    client.set(f"{prefix}{KEY.digest}", b"FLCCPTR1" + b"[" * 100_000)  # json.loads: RecursionError
    url = f"{redis_url}?prefix={prefix}"
    [entry] = list_entries(url)  # `fastload cache ls`
    assert entry.problem is not None and "not JSON" in entry.problem
    assert remove_entry(url, KEY.digest) is True  # `fastload cache rm --compile`
    assert not client.exists(f"{prefix}{KEY.digest}")


# --- review: replicas that spell the one blob store's URL differently share its entries ---


def test_replicas_spelling_the_blob_store_url_differently_share_its_entries(redis_url: str, tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    (tmp_path / "other").mkdir()
    spellings = [blobs.as_uri(), blobs.as_uri() + "/", f"file://localhost{blobs}",
                 (tmp_path / "other" / ".." / "blobs").as_uri()]
    prefix = f"spell-{os.getpid()}:"
    caches = [CompileCache(f"{redis_url}?max_inline=1000&blob={quote(s, safe='')}&prefix={prefix}") for s in spellings]
    assert caches[0].save(KEY, _inductor_dir(tmp_path / "src", size=8000), None).status == "stored"
    for index, cache in enumerate(caches):
        outcome = cache.restore(KEY, tmp_path / f"dest-{index}")
        assert outcome.status == "restored", (spellings[index], outcome.message)
    # and a replica that replaces the entry (after a real corruption) leaves one the first can still read
    assert caches[1].save(KEY, _inductor_dir(tmp_path / "src2", size=8000), None, overwrite=True).status == "stored"
    assert caches[0].restore(KEY, tmp_path / "again").status == "restored"


def test_a_blob_store_is_known_by_what_it_addresses_not_by_its_spelling(tmp_path: Path) -> None:
    from fastload_core.compile_cache.redis import _store_identity

    same_s3 = ["s3://cc/blobs", "s3://cc/blobs/", "s3://cc/blobs?timeout=10", "s3://cc//blobs/?connect_timeout=1"]
    assert len({_store_identity(url) for url in same_s3}) == 1
    assert _store_identity("s3://cc/blobs") != _store_identity("s3://cc/blobs-2")
    assert _store_identity("s3://cc/blobs") != _store_identity("s3://other/blobs")
    blobs = tmp_path / "blobs"
    assert _store_identity(blobs.as_uri()) == _store_identity(f"file://localhost{blobs}/?x=1")
    assert _store_identity(blobs.as_uri()) != _store_identity((tmp_path / "elsewhere").as_uri())
    assert _store_identity(blobs.as_uri()) != _store_identity(f"file://otherhost{blobs}")
    # a pointer's URL comes from Redis: what cannot be parsed is compared as written, never raised
    assert _store_identity("file://[broken/x") == ("as-written", "file://[broken/x")
    assert _store_identity("file:///a\x00b")[0] == "as-written"


@pytest.mark.s3
def test_replicas_with_other_s3_client_parameters_share_its_blobs(
    redis_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    import boto3

    boto3.client("s3").create_bucket(Bucket="compile-cache")
    prefix = f"s3spell-{os.getpid()}:"
    spellings = ["s3://compile-cache/blobs", "s3://compile-cache/blobs/?timeout=10&connect_timeout=3"]
    caches = [CompileCache(f"{redis_url}?max_inline=1000&blob={quote(s, safe='')}&prefix={prefix}") for s in spellings]
    assert caches[0].save(KEY, _inductor_dir(tmp_path / "src", size=8000), None).status == "stored"
    assert caches[1].restore(KEY, tmp_path / "b").status == "restored"
    assert caches[1].save(KEY, _inductor_dir(tmp_path / "src2", size=8000), None, overwrite=True).status == "stored"
    assert caches[0].restore(KEY, tmp_path / "a").status == "restored"
