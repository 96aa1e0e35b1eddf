"""The example's handler: request parsing and the response shape; loading is FastloadHandler's.

TorchServe wants exactly one class defined in this module (an imported one does not count).
"""

import json
from typing import Any

import torch
from fastload_torchserve import FastloadHandler


class Handler(FastloadHandler):
    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        """One request, one row: a JSON list of 16 numbers (TorchServe decodes application/json bodies)."""
        rows = []
        for request in data:
            body = request.get("data") if request.get("data") is not None else request.get("body")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            rows.append(body)
        return torch.tensor(rows, dtype=torch.float32, device=self.device)

    def postprocess(self, output: torch.Tensor) -> list[list[float]]:
        """One response per request: its 4 class scores."""
        return output.tolist()
