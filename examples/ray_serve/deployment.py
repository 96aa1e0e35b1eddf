"""A Ray Serve text-embedding service whose replicas load through fastload, with per-user adapters.

    python examples/ray_serve/upload_models.py --endpoint-url http://127.0.0.1:9000   # demo weights
    AWS_ENDPOINT_URL_S3=http://127.0.0.1:9000 serve run examples.ray_serve.deployment:app
    curl -d '{"text": "hello"}' localhost:8000/                                         # base embedding
    curl -H 'serve_multiplexed_model_id: a3' -d '{"text": "hello"}' localhost:8000/     # with adapter a3

Two replicas on a node download the embedder once (into /dev/shm) and map the same copy. A new
``user_config["fastload"]["revision"]`` (``serve deploy`` with only the config changed) swaps the weights
inside the running replicas. Adapters are loaded on demand, at most four per replica, the least recently
used evicted (and its memory freed) when a fifth is asked for.
"""

from __future__ import annotations

from typing import Any

import fastload_ray
import torch
from ray import serve
from ray.serve import Application
from starlette.requests import Request

from examples.ray_serve.models import Adapter, Embedder, tokenize

EMBEDDER_URI = "s3://models/embedder/model.safetensors"
ADAPTERS_URI = "s3://models/adapters/"


@serve.deployment(
    num_replicas=2,
    ray_actor_options={"num_cpus": 0.5},
    user_config={"fastload": {"uri": EMBEDDER_URI, "revision": None}},
)
@fastload_ray.accelerate(Embedder, attr="model")
class EmbeddingService:
    def __init__(self, adapters_uri: str = ADAPTERS_URI) -> None:
        self.adapters_uri = adapters_uri.rstrip("/") + "/"

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            return {"error": 'send a JSON object such as {"text": "hello"}'}
        return await self.embed(body["text"])

    async def embed(self, text: str) -> dict[str, Any]:
        """The handle entry point: ``handle.options(multiplexed_model_id="a3").embed.remote("hello")``."""
        adapter_id = serve.get_multiplexed_model_id()  # the serve_multiplexed_model_id header over HTTP
        adapter = await self.get_adapter(adapter_id) if adapter_id else None
        with torch.inference_mode():
            vector = self.model(tokenize(text))
            if adapter is not None:
                vector = adapter(vector)
        return {"embedding": vector[0].tolist(), "adapter": adapter_id or None}

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_adapter(self, adapter_id: str) -> Adapter:
        # fastload refuses ids that would leave the prefix ("..", "/", control characters) with a BadURIError.
        return await fastload_ray.load_model_async(Adapter, f"{self.adapters_uri}{adapter_id}/")


app = EmbeddingService.bind()


def build_app(args: dict[str, str]) -> Application:
    """``serve run examples.ray_serve.deployment:build_app uri=s3://... adapters=s3://... revision=...``"""
    unknown = sorted(set(args) - {"uri", "revision", "adapters"})
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; build_app takes uri, revision, adapters")
    config = {"fastload": {"uri": args.get("uri", EMBEDDER_URI), "revision": args.get("revision")}}
    return EmbeddingService.options(user_config=config).bind(args.get("adapters", ADAPTERS_URI))
