"""The example's models: a small text embedder and per-user adapters, and a tokenizer that needs no files."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

VOCAB = 4096
WIDTH = 64


class Embedder(nn.Module):
    """Mean of token embeddings, projected and normalised: small, but loaded like any model."""

    def __init__(self, vocab: int = VOCAB, width: int = WIDTH) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab, width, mode="mean")
        self.proj = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.proj(self.embed(tokens)), dim=-1)


class Adapter(nn.Module):
    """A per-user residual map applied to the base embedding (a stand-in for a LoRA adapter)."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.delta = nn.Linear(width, width)

    def forward(self, vector: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(vector + self.delta(vector), dim=-1)


def tokenize(text: str) -> torch.Tensor:
    """Words to ids by hashing: no vocabulary file to ship for a demo."""
    words = text.lower().split() or [""]
    ids = [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "little") % VOCAB for w in words]
    return torch.tensor([ids])
