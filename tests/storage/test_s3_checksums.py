"""S3's additional checksums (CRC32, CRC32C, CRC64NVME; full-object and composite): the arithmetic, and what
the S3 origin verifies a download with when the object carries one, against moto and SeaweedFS.

What each server does (probed with boto3 1.44, 16 MiB and 5 MiB parts): SeaweedFS 4.48 returns the checksum
on HEAD/GET with ``ChecksumMode=ENABLED`` (CRC32/CRC32C of multipart uploads composite, with ``-N`` and
``ChecksumType: COMPOSITE``; CRC64NVME full-object; a single PUT's full-object value without a type), none on
ranged GETs or ``partNumber`` requests, and no ``ChecksumAlgorithm`` in listings. moto 5 returns the value on
HEAD without the ``-N`` suffix or the type (the full GET has both), lists ``ChecksumAlgorithm``, and stores a
wrong composite CRC32C (the CRC32 one): such an ambiguous checksum is not used, the ETag's MD5 is.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import random
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig

from fastload_core.storage import fetch
from fastload_core.storage.checksum import (
    CRC,
    CRC_WIDTHS,
    CRCHasher,
    ETagHasher,
    composite,
    crc_combine,
    crc_function,
    hasher_for,
)
from fastload_core.storage.errors import IntegrityError
from fastload_core.storage.meta import EntryMeta, RemoteFile
from fastload_core.storage.s3 import _Plan
from fastload_devservices.faultproxy import FaultProxy
from tests.storage.conftest import BUCKET, leftovers

MiB = 1024 * 1024
ALGORITHMS = ["crc32", "crc32c", "crc64nvme"]
# CRC-32/ISO-HDLC, CRC-32/ISCSI and CRC-64/NVME of b"123456789" (the CRC catalogue's check values)
CHECK_VALUES = {"crc32": 0xCBF43926, "crc32c": 0xE3069283, "crc64nvme": 0xAE8B14860A799888}


def b64(value: int, algorithm: str) -> str:
    return base64.b64encode(value.to_bytes(CRC_WIDTHS[algorithm], "big")).decode()


# --- the arithmetic -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_crcs_are_the_standard_ones(algorithm: str) -> None:
    assert crc_function(algorithm)(b"123456789", 0) == CHECK_VALUES[algorithm]
    data = os.urandom(100_003)
    if algorithm == "crc32":
        assert crc_function(algorithm)(memoryview(data), 0) == zlib.crc32(data)


def test_crc32_is_the_accelerated_one_and_falls_back_to_zlibs(monkeypatch: pytest.MonkeyPatch) -> None:
    """ISA-L's CRC32 (0.02 CPU s per GiB here, zlib's 0.35) where the s3 extra installed it; zlib's, the same
    values, where it did not."""
    import builtins

    from fastload_core.storage import checksum

    isal_zlib = pytest.importorskip("isal.isal_zlib")
    checksum._crc32.cache_clear()
    assert crc_function("crc32") is isal_zlib.crc32
    real_import = builtins.__import__

    def no_isal(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("isal"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    checksum._crc32.cache_clear()
    try:
        with monkeypatch.context() as patch:  # only this patch is undone after it, not the autouse fixtures'
            patch.setattr(builtins, "__import__", no_isal)
            assert crc_function("crc32") is zlib.crc32
    finally:
        checksum._crc32.cache_clear()
    data = memoryview(os.urandom(3 * MiB + 5))
    assert crc_function("crc32") is isal_zlib.crc32
    assert isal_zlib.crc32(data, 7) == zlib.crc32(data, 7)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_combine_gives_the_crc_of_the_concatenation(algorithm: str) -> None:
    fn = crc_function(algorithm)
    rng = random.Random(algorithm)
    for first, second in [(0, 0), (0, 5), (7, 0), (1, 1), (4096, 1 << 16), (1 << 20, 3), (12_345, 67_891)]:
        a, b = rng.randbytes(first), rng.randbytes(second)
        assert crc_combine(algorithm, fn(a, 0), fn(b, 0), len(b)) == fn(a + b, 0)
    # a file's CRC joined from the CRCs of uneven ranges, in order, as ``S3Origin._verify`` does
    data = rng.randbytes(3 * MiB + 17)
    cuts = [0, 1, 256 * 1024, MiB + 5, 3 * MiB, len(data)]
    joined = 0
    for start, end in itertools.pairwise(cuts):
        joined = crc_combine(algorithm, joined, fn(data[start:end], 0), end - start)
    assert joined == fn(data, 0)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_hasher_computes_full_object_and_composite_checksums(algorithm: str) -> None:
    fn = crc_function(algorithm)
    data = os.urandom(3 * 65_536 + 999)
    parts = [data[i:i + 65_536] for i in range(0, len(data), 65_536)]
    width = CRC_WIDTHS[algorithm]
    expected = fn(b"".join(fn(part, 0).to_bytes(width, "big") for part in parts), 0)
    for expect, part_size, want in [(CRC(algorithm, 0), None, f"{algorithm}:{b64(fn(data, 0), algorithm)}"),
                                    (CRC(algorithm, 0, 4), 65_536, f"{algorithm}:{b64(expected, algorithm)}-4")]:
        hasher = CRCHasher(expect, part_size)
        for start in range(0, len(data), 40_000):  # chunks that straddle the parts
            hasher.update(memoryview(data)[start:start + 40_000])
        assert hasher.hexdigest() == want
        again = hasher_for(want, part_size)  # what a copy or a full check of the recorded checksum uses
        again.update(data)
        assert again.hexdigest() == want
    assert str(composite(algorithm, [fn(part, 0) for part in parts])) == f"{algorithm}:{b64(expected, algorithm)}-4"
    with pytest.raises(ValueError, match="part size"):
        CRCHasher(CRC(algorithm, 0, 4), None)


def test_recorded_checksums_pick_their_hasher() -> None:
    assert isinstance(hasher_for("d41d8cd98f00b204e9800998ecf8427e", None), ETagHasher)
    assert isinstance(hasher_for("d41d8cd98f00b204e9800998ecf8427e-2", 5 * MiB), ETagHasher)
    assert isinstance(hasher_for("crc64nvme:AAAAAAAAAAA=", None), CRCHasher)
    crc = CRC("crc32c", 0x12345678, 3)
    assert CRC.parse(str(crc)) == crc and CRC.parse("crc32:!!") is None and CRC.parse(None) is None


@pytest.mark.parametrize(("response", "etag", "expected"), [
    ({"ChecksumCRC64NVME": "pb/LjESo3OM=", "ChecksumType": "FULL_OBJECT"}, "a" * 32 + "-3",
     CRC("crc64nvme", 0xA5BFCB8C44A8DCE3)),
    ({"ChecksumCRC32": "PBoI3w==-3", "ChecksumType": "COMPOSITE"}, "a" * 32 + "-3", CRC("crc32", 0x3C1A08DF, 3)),
    ({"ChecksumCRC32C": "PBoI3w==-3"}, "a" * 32 + "-3", CRC("crc32c", 0x3C1A08DF, 3)),  # type from the suffix
    ({"ChecksumCRC32C": "PBoI3w==", "ChecksumType": "COMPOSITE"}, "a" * 32 + "-3", CRC("crc32c", 0x3C1A08DF, 3)),
    ({"ChecksumCRC32": "xzp8ng=="}, "a" * 32, CRC("crc32", 0xC73A7C9E)),  # a single PUT: full object
    ({"ChecksumCRC64NVME": "pb/LjESo3OM="}, "a" * 32 + "-3", CRC("crc64nvme", 0xA5BFCB8C44A8DCE3)),  # no composite
    ({"ChecksumCRC32": "PBoI3w=="}, "a" * 32 + "-3", None),  # moto's HEAD: composite or full? not used
    ({"ChecksumCRC32": "PBoI3w==-3", "ChecksumType": "FULL_OBJECT"}, "a" * 32 + "-3", None),  # contradicts itself
    ({"ChecksumSHA256": "o5t02ru9Gd59P6RuuaM+z/8cznkJiS/YiDLHLyLBSnM="}, "a" * 32, None),  # not a CRC
    ({"ChecksumCRC32": "not base64"}, "a" * 32, None),
    ({"ChecksumCRC32": "AAAAAAAAAAA="}, "a" * 32, None),  # 8 bytes for a 4-byte CRC
    ({}, "a" * 32, None),
])
def test_checksums_in_s3_replies(response: dict[str, str], etag: str, expected: CRC | None) -> None:
    assert CRC.from_s3(response, etag) == expected


def test_a_journal_from_md5_verification_is_not_reused_for_a_crc(tmp_path: Path) -> None:
    item = RemoteFile("w", 10, "w", "a" * 32)
    plan = _Plan(item, tmp_path / "w", [(0, 10)], "crc", None, crc=CRC("crc32c", 5))
    assert not plan.resume(0, "a" * 32) and not plan.resume(0, "crc32:1f") and not plan.resume(0, None)
    assert plan.resume(0, "crc32c:1f") and plan.part_crcs == {0: 0x1F}
    md5_plan = _Plan(item, tmp_path / "w", [(0, 10)], "parts", 10)
    assert not md5_plan.resume(0, "crc32c:1f") and md5_plan.resume(0, "b" * 32)


# --- against moto -------------------------------------------------------------------------------------------
def local_meta(path: Path) -> EntryMeta:
    return EntryMeta.read(path.parent.parent)


def upload(client: Any, tmp_path: Path, key: str, data: bytes, algorithm: str, *, part_size: int) -> None:
    source = tmp_path / f"upload-{hashlib.md5(key.encode()).hexdigest()}"
    source.write_bytes(data)
    config = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size)
    client.upload_file(str(source), BUCKET, key, ExtraArgs={"ChecksumAlgorithm": algorithm.upper()}, Config=config)


@pytest.mark.s3
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_single_put_verifies_with_its_crc_and_catches_corruption(s3: Any, proxy: FaultProxy,
                                                                   algorithm: str) -> None:
    data = os.urandom(3 * MiB + 17)
    s3.put_object(Bucket=BUCKET, Key=f"{algorithm}/w.bin", Body=data, ChecksumAlgorithm=algorithm.upper())
    path = fetch(f"s3://{BUCKET}/{algorithm}/w.bin")
    assert path.read_bytes() == data and proxy.ranged_gets == 13
    (item,) = local_meta(path).files
    assert item.checksum == f"{algorithm}:{b64(crc_function(algorithm)(data, 0), algorithm)}"
    assert item.part_size is None and item.digests

    s3.put_object(Bucket=BUCKET, Key=f"{algorithm}/bad.bin", Body=data, ChecksumAlgorithm=algorithm.upper())
    proxy.faults = ["corrupt"]
    with pytest.raises(IntegrityError, match=f"checksum {algorithm}:"):
        fetch(f"s3://{BUCKET}/{algorithm}/bad.bin")
    assert leftovers(path.parents[2]) == []


@pytest.mark.s3
def test_a_full_object_crc_leaves_the_ranges_free_of_the_upload_parts(s3: Any, proxy: FaultProxy,
                                                                      tmp_path: Path) -> None:
    """CRC64NVME multipart uploads carry a full-object checksum: the download's 256 KiB ranges need not follow
    the 5 MiB parts (an MD5 ETag would force 5 MiB ranges), and it is joined from the ranges' CRCs."""
    data = os.urandom(11 * MiB + 3)
    upload(s3, tmp_path, "full/w.bin", data, "crc64nvme", part_size=5 * MiB)
    path = fetch(f"s3://{BUCKET}/full/w.bin")
    assert path.read_bytes() == data
    assert proxy.ranged_gets == -(-len(data) // (256 * 1024))
    (item,) = local_meta(path).files
    assert item.etag is not None and item.etag.endswith("-3")
    assert item.checksum == f"crc64nvme:{b64(crc_function('crc64nvme')(data, 0), 'crc64nvme')}"
    assert item.part_size is None

    upload(s3, tmp_path, "full/bad.bin", data, "crc64nvme", part_size=5 * MiB)
    proxy.faults = ["500", "corrupt", "short"]
    with pytest.raises(IntegrityError, match="checksum crc64nvme:"):
        fetch(f"s3://{BUCKET}/full/bad.bin")
    assert fetch(f"s3://{BUCKET}/full/bad.bin").read_bytes() == data  # the next try is clean


@pytest.mark.s3
def test_files_of_a_listed_prefix_are_verified_with_their_crcs(s3: Any, proxy: FaultProxy) -> None:
    """A listing gives no checksum values; each file's is asked for with a HEAD."""
    files = {"a.bin": (os.urandom(MiB + 1), "crc32c"), "b/c.bin": (os.urandom(700_000), "crc64nvme"),
             "empty.txt": (b"", "crc32")}
    for name, (data, algorithm) in files.items():
        s3.put_object(Bucket=BUCKET, Key=f"listed/{name}", Body=data, ChecksumAlgorithm=algorithm.upper())
    root = fetch(f"s3://{BUCKET}/listed/")
    by_name = {f.name: f for f in EntryMeta.read(root.parent).files}
    for name, (data, algorithm) in files.items():
        assert (root / name).read_bytes() == data
        assert by_name[name].checksum == f"{algorithm}:{b64(crc_function(algorithm)(data, 0), algorithm)}"


# --- against SeaweedFS (composite checksums, which moto gets wrong) -----------------------------------------
@pytest.fixture(scope="module")
def seaweed() -> Iterator[Any]:
    from fastload_devservices.seaweed import SeaweedServer

    try:
        server = SeaweedServer()
    except RuntimeError as exc:  # the weed binary is not installed
        pytest.skip(str(exc))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def weed_proxy(seaweed: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, FaultProxy]]:
    """A client talking to SeaweedFS directly, and the fault proxy in front of it that fastload uses."""
    import boto3
    from botocore.config import Config

    fault_proxy = FaultProxy(seaweed.port)
    for name, value in {"AWS_ENDPOINT_URL_S3": fault_proxy.endpoint_url, "AWS_ACCESS_KEY_ID": "any",
                        "AWS_SECRET_ACCESS_KEY": "any", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3", endpoint_url=seaweed.endpoint_url, config=Config(s3={"addressing_style": "path"}))
    yield client, fault_proxy
    fault_proxy.close()


@pytest.mark.s3
@pytest.mark.parametrize(("algorithm", "parts"), [("crc32", 3), ("crc32c", 3), ("crc64nvme", None)])
def test_multipart_uploads_on_seaweedfs_verify_with_their_checksums(weed_proxy: tuple[Any, FaultProxy],
                                                                    tmp_path: Path, algorithm: str,
                                                                    parts: int | None) -> None:
    """CRC32 and CRC32C multipart uploads carry composite checksums (ranges follow the parts, each worker
    CRCs its own), CRC64NVME a full-object one; a corrupted byte fails either."""
    client, fault_proxy = weed_proxy
    data = os.urandom(11 * MiB + 7)
    upload(client, tmp_path, f"{algorithm}/w.bin", data, algorithm, part_size=5 * MiB)
    path = fetch(f"s3://{BUCKET}/{algorithm}/w.bin")
    assert path.read_bytes() == data
    fn = crc_function(algorithm)
    (item,) = local_meta(path).files
    if parts:
        chunks = [data[i:i + 5 * MiB] for i in range(0, len(data), 5 * MiB)]
        assert item.checksum == str(composite(algorithm, [fn(chunk, 0) for chunk in chunks]))
        assert item.checksum.endswith(f"-{parts}")
        assert item.part_size == 5 * MiB and fault_proxy.ranged_gets == parts
    else:
        assert item.checksum == f"{algorithm}:{b64(fn(data, 0), algorithm)}" and item.part_size is None
        assert fault_proxy.ranged_gets == -(-len(data) // (256 * 1024))

    upload(client, tmp_path, f"{algorithm}/bad.bin", data, algorithm, part_size=5 * MiB)
    fault_proxy.faults = ["corrupt"]
    with pytest.raises(IntegrityError, match=f"checksum {algorithm}:"):
        fetch(f"s3://{BUCKET}/{algorithm}/bad.bin")
