"""The example's model. TorchServe's archive convention: model.py defines exactly one class, an
``nn.Module`` whose constructor takes no arguments (the handler builds it, on the meta device)."""

import torch
from torch import nn


class TinyClassifier(nn.Module):
    """16 features in, 4 class scores out: small enough for a test, shaped like a real classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)
