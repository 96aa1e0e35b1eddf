"""The stock service the BentoML benchmark measures fastload against: what a user writes without it.

Each worker downloads the pickled state dict with boto3 (a tuned ``TransferConfig``: 16 parts of
16 MiB in flight), builds the model and ``load_state_dict(torch.load(...))``s it in ``__init__``. A
restart keeps a worker's download, as BentoML's model store would keep an imported model, so the warm
case pays only the load. Imports ``demo_model`` from examples/bentoml (``PYTHONPATH``).
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml
import boto3
import torch
from boto3.s3.transfer import TransferConfig
from demo_model import PICKLE_NAME, DemoMLP

BUCKET = os.environ.get("BENCH_BUCKET", "models")
PREFIX = os.environ.get("BENCH_PREFIX", "bench-bentoml-stock")


@bentoml.service(workers=int(os.environ.get("DEMO_WORKERS", "2")), traffic={"timeout": 300})
class Stock:
    def __init__(self) -> None:
        index = bentoml.server_context.worker_index or 1
        target = Path(os.environ["STOCK_DIR"]) / f"worker-{index}" / PICKLE_NAME
        client = boto3.client("s3")
        key = f"{PREFIX}/{PICKLE_NAME}"
        size = client.head_object(Bucket=BUCKET, Key=key)["ContentLength"]
        if not (target.exists() and target.stat().st_size == size):
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".part")
            config = TransferConfig(multipart_chunksize=16 * 2**20, max_concurrency=16)
            client.download_file(BUCKET, key, str(partial), Config=config)
            partial.replace(target)
        self.model = DemoMLP(int(os.environ["BENCH_WIDTH"]), int(os.environ["BENCH_LAYERS"]))
        self.model.load_state_dict(torch.load(target, map_location="cpu", weights_only=True))
        self.model.eval()

    @bentoml.api
    def predict(self, x: list[float]) -> list[float]:
        with torch.inference_mode():
            return self.model(torch.tensor(x)).tolist()
