"""fastload for Ray Serve: deployments whose replicas load weights through fastload.

```python
from ray import serve
import fastload_ray

@serve.deployment(num_replicas=2, user_config={"fastload": {"uri": "s3://models/minilm/", "revision": None}})
@fastload_ray.accelerate(build_model, attr="model")
class Embedder:
    async def __call__(self, request):
        return self.model(...)                      # loaded before the first request

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_adapter(self, model_id: str):
        return await fastload_ray.load_model_async(build_adapter, f"s3://adapters/{model_id}/")
```

The adapter only maps Ray's life cycle onto the core's verbs (``fastload_core.serving``,
``fastload_core.load_model``); see docs/integrations/ray_serve.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from fastload_core.model import load_model_async as _core_load_model_async
from fastload_core.report import LoadReport
from fastload_core.serving import WeightsUnavailableError
from fastload_core.storage import redact

from ._accelerate import UserConfigError, accelerate, replica_device
from ._memory import EvictionRelease

M = TypeVar("M", bound=nn.Module)


async def load_model_async(
    model: type[M] | Callable[[], M] | M,
    source: str | os.PathLike[str],
    device: str | int | torch.device | None = None,
    *,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    lazy: bool = False,
    copy: bool = False,
    report: LoadReport | None = None,
    compile: bool | Mapping[str, Any] = False,
    compile_cache: str | Any | None = None,
    example_inputs: Any = None,
) -> M:
    """``fastload_core.load_model_async`` for ``@serve.multiplexed`` loaders, with two Ray defaults:
    ``device=None`` is the replica's device (its GPU when it has one), and the model gets the ``__del__``
    that Ray's multiplexer awaits when it evicts a model, so an evicted model's memory is freed right away
    even where Ray's frozen garbage collector would keep a reference cycle alive.
    """
    module = await _core_load_model_async(
        model, source, replica_device() if device is None else device, dtype=dtype, strict=strict, lazy=lazy,
        copy=copy, report=report, compile=compile, compile_cache=compile_cache, example_inputs=example_inputs,
    )
    # An instance attribute: Ray looks it up with hasattr and awaits it; Python's own finalisation only
    # ever calls a class's __del__, so nothing else is changed about the module.
    object.__setattr__(module, "__del__", EvictionRelease(module, f"evicted model {redact(os.fspath(source))}").release)
    return module


__all__ = ["UserConfigError", "WeightsUnavailableError", "accelerate", "load_model_async", "replica_device"]
