from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastload_core.storage.errors import BadURIError, UnsafeKeyError
from fastload_core.storage.uri import confine, parse_uri, redact, safe_relpath


def test_parses_s3_objects_prefixes_files_and_paths(tmp_path: Path) -> None:
    obj = parse_uri("s3://models/llama/model.safetensors")
    assert (obj.scheme, obj.netloc, obj.path) == ("s3", "models", "llama/model.safetensors")
    assert not obj.is_prefix
    prefix = parse_uri("s3://models/llama/")
    assert prefix.is_prefix and str(prefix) == "s3://models/llama/"
    assert parse_uri("file:///mnt/models/m1/").path == "/mnt/models/m1"
    bare = parse_uri(tmp_path / "m.safetensors")
    assert bare.bare and bare.path == str(tmp_path / "m.safetensors")
    assert obj.slug != prefix.slug and obj.slug.startswith("s3-model.safetensors-")


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("s3://", "bucket"),
        ("s3:///key", "bucket"),
        ("s3://no/../escape", "'..'"),
        ("s3://b!/key", "not a valid bucket"),
        ("s3://bkt//key", "starts with '/'"),
        ("file://otherhost/mnt/m", "no host"),
        ("file:///mnt/../etc/passwd", "'..'"),
        ("s3://bkt/a\nb", "control"),
        ("://nothing", "scheme://"),
    ],
)
def test_bad_uris_are_rejected_naming_the_problem(uri: str, problem: str) -> None:
    with pytest.raises(BadURIError) as caught:
        parse_uri(uri)
    assert problem in str(caught.value)


def test_credentials_in_uris_are_refused_and_never_echoed() -> None:
    with pytest.raises(BadURIError) as caught:
        parse_uri("s3://AKIAEXAMPLE:hunter2secret@bucket/m1/")
    assert "hunter2secret" not in str(caught.value) and "AKIAEXAMPLE" not in str(caught.value)
    assert redact("https://user:pw@host/x") == "https://***@host/x"


@pytest.mark.parametrize(
    "name",
    ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a\\b", "a\x00b", "a\x1fb", "C:evil", "x" * 300, ""],
)
def test_unsafe_relative_names_are_rejected(name: str) -> None:
    with pytest.raises(UnsafeKeyError):
        safe_relpath(name)


def test_safe_names_pass_through_unchanged() -> None:
    for name in ("model.safetensors", "tokenizer/tokenizer.json", "a b/c-d_e.f", "ünïcode.json"):
        assert safe_relpath(name) == name


def test_confine_refuses_symlinks_that_point_out(tmp_path: Path) -> None:
    root = tmp_path / "tier"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(UnsafeKeyError, match="symlink"):
        confine(root, "link/file")
    assert confine(root, "sub/file") == root / "sub" / "file"
