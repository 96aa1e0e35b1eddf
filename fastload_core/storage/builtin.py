"""Built-in storage schemes, registered through the same hook a third-party plugin uses.

``s3`` imports boto3 only when an S3 URI is first used, so ``fetch`` of local paths works without the
``s3`` extra installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..hookspecs import hookimpl
from .errors import StorageError


def _s3_origin() -> Any:
    try:
        from .s3 import S3Origin
    except ImportError as exc:
        raise StorageError(f"s3:// URIs need the s3 extra ({exc.name} is missing): "
                           "pip install 'fastload[s3]'") from None
    return S3Origin()


def _file_origin() -> Any:
    from .file import FileOrigin

    return FileOrigin()


@hookimpl
def register_storage_schemes(register: Callable[..., None]) -> None:
    register("s3", _s3_origin)
    register("file", _file_origin)
