"""The same service with no model: the framework's own start-up, which no loader can win back."""

from __future__ import annotations

import os

import bentoml
from demo_model import OUTPUTS


@bentoml.service(workers=int(os.environ.get("DEMO_WORKERS", "2")), traffic={"timeout": 300})
class Empty:
    @bentoml.api
    def predict(self, x: list[float]) -> list[float]:
        return [0.0] * OUTPUTS
