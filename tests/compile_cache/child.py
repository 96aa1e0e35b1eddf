"""A fresh replica: compile a small transformer block through the compile cache and report as JSON.

Run by the tests as ``python -m tests.compile_cache.child CACHE_URL OUT.json [--lazy] [--device cuda]``.
"""

from __future__ import annotations

import json
import logging
import sys

import torch
import torch.nn.functional as F
from torch import nn

import fastload_core.compile_cache as compile_cache


class TinyBlock(nn.Module):
    """Attention and an MLP, small enough that a cold CPU compile stays in seconds."""

    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main() -> None:
    cache_url, out = sys.argv[1], sys.argv[2]
    options = sys.argv[3:]
    lazy = "--lazy" in options
    device = options[options.index("--device") + 1] if "--device" in options else "cpu"
    warnings = _Collect()
    logging.getLogger("fastload").addHandler(warnings)
    torch.manual_seed(0)
    model = TinyBlock().eval().to(device)
    x = torch.randn(2, 8, 32).to(device)
    with torch.inference_mode():
        if lazy:
            compiled = compile_cache.compile(model, cache=cache_url)
            first = compiled(x)
        else:
            compiled = compile_cache.compile(model, cache=cache_url, example_inputs=(x,))
            first = compiled(x)
        second = compiled(x + 1)
    report = compile_cache.report_of(compiled)
    assert report is not None
    result = {
        "key": report.key,
        "status": report.status,
        "source": report.source,
        "lookup": report.lookup,
        "store": report.store,
        "stored": report.stored,
        "restored_files": report.restored_files,
        "restored_bytes": report.restored_bytes,
        "entry_bytes": report.entry_bytes,
        "mega_artifacts": report.mega_artifacts,
        "torch_counters": report.torch_counters,
        "stages": report.stages,
        "notes": report.notes,
        "warnings": warnings.messages,
        "outputs": [first.flatten().tolist(), second.flatten().tolist()],
        "workdir": report.workdir,
    }
    with open(out, "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main()
