"""A BentoML service whose weights come from S3 (or a path) through fastload.

    DEMO_WEIGHTS=s3://models/demo-mlp/ bentoml serve service:Demo

``accelerate`` checks the weights at the origin before BentoML starts the workers and downloads them into
/dev/shm once while the workers start; each worker waits for that download, then maps the copy (on CPU the
workers share one copy) onto its own device.
"""

from __future__ import annotations

import logging
import os

import bentoml
import fastload_bentoml
import torch
from demo_model import DemoMLP, config_of, weights_file

import fastload_core

log = logging.getLogger("bentoml")  # BentoML shows this logger's INFO lines, prefixed with the worker

WEIGHTS = os.environ.get("DEMO_WEIGHTS", "s3://models/demo-mlp/")


@bentoml.service(workers=int(os.environ.get("DEMO_WORKERS", "2")), traffic={"timeout": 300})
@fastload_bentoml.accelerate(prefetch=os.environ.get("DEMO_PREFETCH", "shm") or None)
class Demo:
    weights = fastload_bentoml.Weights(WEIGHTS, revision=os.environ.get("DEMO_REVISION") or None)

    def __init__(self) -> None:
        self.device = fastload_bentoml.worker_device()
        config = config_of(fastload_core.read_metadata(weights_file(self.weights)))
        self.report = fastload_core.LoadReport(source="", device="")
        self.model = fastload_core.load_model(
            lambda: DemoMLP(**config), self.weights, device=self.device, report=self.report
        )
        log.info(self.report.summary())

    @bentoml.api
    def predict(self, x: list[float]) -> list[float]:
        with torch.inference_mode():
            return self.model(torch.tensor(x, device=self.device)).tolist()

    @bentoml.api
    def load_report(self) -> dict[str, object]:
        """How this worker loaded its weights (the tier it read them from, the seconds it took)."""
        return {
            "worker": bentoml.server_context.worker_index,
            "pid": os.getpid(),
            "device": str(self.device),
            "path": str(self.weights),
            "tier": self.report.tier,
            "strategy": self.report.strategy,
            "seconds": self.report.seconds,
            "nbytes": self.report.nbytes,
        }
