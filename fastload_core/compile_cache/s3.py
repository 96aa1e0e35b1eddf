"""``s3://bucket/prefix``: entries as S3 objects, through boto3's standard configuration.

Endpoint and credentials come from the usual AWS environment (``AWS_ENDPOINT_URL_S3``, profiles,
instance roles), so MinIO, Ceph RGW and real S3 all work unchanged. A racing store uses a conditional
put (``If-None-Match: *``): the first replica's object stays. Where a server ignores the condition the
result is last-writer-wins between entries that each passed verification, which is still one valid
entry. Timeouts are short and retries few because a replica would rather compile than wait.
"""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import urlsplit

from .base import CompileCacheBackend, StoredEntry, float_param
from .errors import CacheURLError, CompileCacheError, UnsafeCacheKeyError

_SUFFIX = ".flcc"
# What S3 answers a conditional put that lost to an existing object (or to a concurrent one).
_LOST_RACE = ("PreconditionFailed", "ConditionalRequestConflict")


class S3Backend(CompileCacheBackend):
    scheme = "s3"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        parts = urlsplit(url)
        if not parts.netloc:
            raise CacheURLError(url, "expected s3://bucket/prefix")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        try:
            import boto3  # noqa: F401  (checked here, used by _client)
            from botocore.config import Config
        except ImportError:
            raise CompileCacheError(
                f"{url}: the s3 backend needs boto3: pip install 'fastload[s3]'"
            ) from None
        self._config = Config(
            connect_timeout=float_param(url, "connect_timeout", 2.0),
            read_timeout=float_param(url, "timeout", 30.0),
            retries={"max_attempts": 2, "mode": "standard"},
        )

    @functools.cached_property
    def _client(self) -> Any:
        """Made on first use: making it resolves credentials (a profile, a credential_process it runs),
        which checking a URL where an adapter reads its configuration must not do."""
        import boto3

        return boto3.client("s3", config=self._config)

    def _object(self, key: str) -> str:
        if not key or "/" in key:
            raise UnsafeCacheKeyError(key, "it is empty or holds a '/'")
        return f"{self.prefix}/{key}{_SUFFIX}" if self.prefix else f"{key}{_SUFFIX}"

    def _get(self, key: str, **extra: str) -> bytes | None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._object(key), **extra)
        except self._client.exceptions.NoSuchKey:
            return None
        body: bytes = response["Body"].read()
        return body

    def get(self, key: str) -> bytes | None:
        return self._get(key)

    def get_prefix(self, key: str, nbytes: int) -> bytes | None:
        try:
            return self._get(key, Range=f"bytes=0-{nbytes - 1}")
        except self._client.exceptions.ClientError as exc:
            # S3 answers a range of an empty object with 416 InvalidRange: the object is there, with no bytes
            # (the header reader reports it as a corrupt entry).
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""
            raise

    def put(self, key: str, blob: bytes, *, overwrite: bool = False) -> bool:
        extra = {} if overwrite else {"IfNoneMatch": "*"}
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._object(key), Body=blob, **extra)
        except self._client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _LOST_RACE:
                return False
            raise
        return True

    def delete(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._object(key))
        except self._client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        self._client.delete_object(Bucket=self.bucket, Key=self._object(key))
        return True

    def entries(self) -> list[StoredEntry]:
        found = []
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else ""):
            for item in page.get("Contents", []):
                name = item["Key"].rsplit("/", 1)[-1]
                if name.endswith(_SUFFIX):
                    found.append(StoredEntry(key=name[: -len(_SUFFIX)], size=int(item["Size"]),
                                             stored_at=item["LastModified"].timestamp()))
        return found

    def check(self) -> str:
        self._client.head_bucket(Bucket=self.bucket)
        return f"bucket {self.bucket} reachable, {len(self.entries())} entries under {self.prefix or '/'}"

    def close(self) -> None:
        if "_client" in self.__dict__:
            self._client.close()
