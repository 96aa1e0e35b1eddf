"""boto3 sessions that share botocore's loaded data, so a process pays for reading it once.

Building a client from a fresh ``boto3.session.Session()`` reads and parses the S3 service model, its
endpoint rules and the partition data again: 0.1-0.25 s of CPU each time on a busy 2-core VM, where a
client built from a session that already loaded them takes about 0.015 s (docs/benchmarks.md, "`fastload
serve` and peer fetching"). A cold node fetching from a peer builds two clients (the origin's, to resolve
the version, then the peer's), so it paid that twice on its critical path.

Each client still gets its own session, so credentials, region and endpoint configuration are resolved per
client exactly as before (tests and workers that change ``AWS_*`` variables get what they asked for); only
botocore's loader, which holds read-only data from botocore's own package (and ``AWS_DATA_PATH``), is shared.
"""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_loaders: dict[str, Any] = {}  # by AWS_DATA_PATH: the loader's search path comes from it


def new_session() -> Any:
    """A new ``boto3.session.Session`` whose botocore session reuses this process's loader."""
    import boto3
    import botocore.session

    core = botocore.session.get_session()
    data_path = str(core.get_config_variable("data_path") or "")
    with _lock:
        loader = _loaders.get(data_path)
        if loader is None:
            _loaders[data_path] = core.get_component("data_loader")
        else:
            core.register_component("data_loader", loader)
    return boto3.session.Session(botocore_session=core)


__all__ = ["new_session"]
