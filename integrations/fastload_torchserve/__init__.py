"""fastload for TorchServe 0.11–0.12: a handler whose ``initialize`` loads through fastload.

```python
# handler.py (TorchServe wants exactly one class defined in the handler module)
from fastload_torchserve import FastloadHandler

class Handler(FastloadHandler):
    def preprocess(self, data): ...
    def postprocess(self, output): ...
```

Settings live in the archive's model-config.yaml under ``handler.fastload`` (``uri``, ``revision``,
``prefetch``, ``compile_cache``); see docs/integrations/torchserve.md. Optional: install with
``pip install fastload[torchserve]``; nothing in ``fastload_core`` imports this package.
"""

from __future__ import annotations

from .config import HandlerConfig, HandlerConfigError
from .handler import ArchiveError, FastloadHandler, model_class_from_archive, worker_device

__all__ = [
    "ArchiveError",
    "FastloadHandler",
    "HandlerConfig",
    "HandlerConfigError",
    "model_class_from_archive",
    "worker_device",
]
