"""The methods table: every method its own loader, and the page touch that ends every run."""

from __future__ import annotations

from pathlib import Path

import torch

from fastload_core.bench.checkpoints import ensure_checkpoint
from fastload_core.bench.methods import Context, touch
from fastload_core.bench.scenarios import SCENARIOS


def test_touch_reads_every_page_and_checksums_bytes() -> None:
    tensor = torch.zeros(3 * 4096 + 10, dtype=torch.uint8)
    tensor[::4096] = 1
    tensor[-1] = 5
    nbytes, count, checksum = touch({"a": tensor, "empty": torch.empty(0)})
    assert (nbytes, count, checksum) == (tensor.numel(), 1, 4 + 5)


def test_every_scenario_method_is_a_registered_loader(tmp_path: Path) -> None:
    """Each method carries its own loader (no dispatch on its name): what the worker runs for an id is
    the method object the scenario lists, and a limit's loader reads the whole file."""
    from fastload_core.bench.methods import METHODS

    for scenario in SCENARIOS.values():
        for method in scenario.methods:
            assert METHODS[method.id] is method
    checkpoint = ensure_checkpoint(tmp_path, 1 << 20, pickle=False)
    context = Context(str(checkpoint.safetensors), checkpoint.config)
    loaded = METHODS["limit/hugepage-read"].prepare(context)()
    assert touch(loaded)[0] == checkpoint.safetensors.stat().st_size
    assert context.stages == {}
    fastload = METHODS["cpu/fastload"].prepare(context)()
    assert touch(fastload)[0] == checkpoint.nbytes and "read" in context.stages  # fastload reports its stages
