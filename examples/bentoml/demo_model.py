"""The demo model: a stack of square linear layers, sized by two numbers kept in the checkpoint's header.

Small enough for tests at ``--width 64 --layers 4`` (about 70 KB), 2 GiB at ``--width 4096 --layers 32``
for the benchmark. Every weight takes part in a prediction, so a correct answer means a complete load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS_NAME = "model.safetensors"
PICKLE_NAME = "model.pt"  # the same weights for the stock path (torch.save of the state dict)
OUTPUTS = 8


class DemoMLP(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.head = nn.Linear(width, OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


def make(width: int, layers: int, seed: int = 0) -> DemoMLP:
    """The reference model: the same ``seed`` gives the same weights in any process."""
    torch.manual_seed(seed)
    return DemoMLP(width, layers).eval()


def config_of(metadata: dict[str, str] | None) -> dict[str, int]:
    """``width`` and ``layers`` from a checkpoint's ``__metadata__`` (written by ``put_model.py``)."""
    if not metadata or "width" not in metadata or "layers" not in metadata:
        raise ValueError(f"not a demo checkpoint: its header metadata {metadata!r} lacks width and layers; "
                         "write it with examples/bentoml/put_model.py")
    return {"width": int(metadata["width"]), "layers": int(metadata["layers"])}


def weights_file(path: Path) -> Path:
    """The safetensors file of a fetched model: the path itself for a single object, else inside it."""
    return path / WEIGHTS_NAME if path.is_dir() else path


def example_input(width: int, seed: int = 1) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(width, generator=generator).tolist()
