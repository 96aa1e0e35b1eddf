"""The benchmark's scenarios: where the file lives, which methods run, what the ratios are taken against.

Limits run as methods in the same rounds: a target such as "85% of the disk" means nothing against a
number from another day.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .methods import CPU_METHODS, GPU_EXTRA_METHODS, GPU_METHODS, GPU_VARIANTS, LIMITS, MODEL_METHODS, Method


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    methods: tuple[Method, ...]
    fastload: str  # method id the "÷ fastload" column divides by
    anchor: str | None  # method id of the anchor; None = the best non-fastload, non-limit method
    cold: bool = False
    needs_cuda: bool = False


SCENARIOS: dict[str, Scenario] = {
    "warm": Scenario(
        "warm", "Warm: checkpoint in /dev/shm (page cache), CPU", (*CPU_METHODS, LIMITS["hugepage-read"]),
        fastload="cpu/fastload", anchor="cpu/safetensors",
    ),
    "cold": Scenario(
        "cold", "Cold: local disk, page cache evicted before every run, CPU", (*CPU_METHODS, LIMITS["odirect"]),
        fastload="cpu/fastload", anchor=None, cold=True,
    ),
    "model": Scenario(
        "model", "Model ready: build the module and load its weights (warm file), CPU", MODEL_METHODS,
        fastload="model/fastload", anchor="model/torch.load",
    ),
    "gpu": Scenario(
        "gpu", "GPU: warm file (/dev/shm) to the device",
        (*GPU_METHODS, *GPU_EXTRA_METHODS, *GPU_VARIANTS, LIMITS["pread-pinned"], LIMITS["h2d-pinned"]),
        fastload="cuda/fastload", anchor="cuda/fastsafetensors", needs_cuda=True,
    ),
    "gpu-cold": Scenario(
        "gpu-cold", "GPU cold: local disk to the device, page cache dropped before every run",
        (*GPU_METHODS, *GPU_VARIANTS, LIMITS["odirect"]),
        fastload="cuda/fastload", anchor=None, cold=True, needs_cuda=True,
    ),
}
METHOD_NAMES = sorted({m.name for s in SCENARIOS.values() for m in s.methods if not m.limit})


def selected_methods(scenario: Scenario, names: Sequence[str] | None) -> list[Method]:
    """Limits always run (the targets need them); other methods as ``--methods`` selects."""
    return [m for m in scenario.methods if m.limit or names is None or m.name in names]
