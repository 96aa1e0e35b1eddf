"""fastload for BentoML: one decorator gives a service tiered, accelerated loading.

```python
@bentoml.service(workers=2, resources={"gpu": 1})
@fastload_bentoml.accelerate(compile_cache="redis://cache:6379/0")   # below @bentoml.service
class Embedder:
    weights = fastload_bentoml.Weights("s3://models/minilm/")

    def __init__(self) -> None:
        self.model = fastload_core.load_model(build_model, self.weights, device=fastload_bentoml.worker_device())
```

See docs/integrations/bentoml.md.
"""

from __future__ import annotations

from ._adapter import Weights, WeightsUnavailableError, accelerate, weights_of, worker_device

__all__ = ["Weights", "WeightsUnavailableError", "accelerate", "weights_of", "worker_device"]
