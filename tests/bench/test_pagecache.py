"""Page-cache control for the cold scenarios: eviction verified by mincore, and a run that stays cached
is skipped, saying why."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastload_core.bench.checkpoints import ensure_checkpoint
from fastload_core.bench.pagecache import EvictionLog, evict, resident_fraction
from fastload_core.bench.runner import BenchConfig, run_scenario
from fastload_core.bench.scenarios import SCENARIOS


def test_resident_fraction_sees_eviction(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"x" * (1 << 20))
    path.read_bytes()
    assert resident_fraction(path) == 1.0
    log = EvictionLog()
    assert evict(path, log) <= 0.01 and log.max_resident_after <= 0.01


def test_a_cold_run_that_cannot_be_evicted_is_skipped_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastload_core.bench import runner

    checkpoint = ensure_checkpoint(tmp_path, 1 << 20, pickle=False)
    monkeypatch.setattr(runner, "evict", lambda path, log: 0.4)
    monkeypatch.setattr(runner, "run_method", lambda *a: pytest.fail("a run that is not cold must not run"))
    bench = BenchConfig(1 << 20, 2, ["gpu-cold"], ["fastload"], tmp_path, tmp_path, device="cpu")
    result = run_scenario(bench, SCENARIOS["gpu-cold"], checkpoint, EvictionLog())
    summary = result.summaries["cuda/fastload"]
    assert summary.median is None and len(summary.runs) == 2
    assert summary.error is not None and summary.error.startswith("not cold: 40% of the file stayed")
    assert "needs root" in summary.error
    assert not checkpoint.pickle.exists()  # pickle=False: a GPU-only run writes no pickle
