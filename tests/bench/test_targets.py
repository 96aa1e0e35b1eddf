"""The target table: each kind of comparison judged on made-up medians (no processes run)."""

from __future__ import annotations

import pytest

from fastload_core.bench.results import Run, ScenarioResult, Summary
from fastload_core.bench.scenarios import SCENARIOS
from fastload_core.bench.targets import VERDICT_MIN_BYTES, verdicts


def _result(scenario: str, medians: dict[str, float], nbytes: int = 4 << 30) -> ScenarioResult:
    methods = {m.id: m for m in SCENARIOS[scenario].methods}
    summaries = {}
    for method_id, method in methods.items():
        run = Run(scenario, method_id, 0)
        if method_id in medians:
            run.seconds, run.bytes = medians[method_id], nbytes
        else:
            run.error = "not run"
        summaries[method_id] = Summary(method, [run], nbytes)
    return ScenarioResult(SCENARIOS[scenario], summaries, "/nowhere")


def test_gpu_verdicts_follow_the_issue_targets() -> None:
    """4 GiB: pread limit 32 GB/s and one pinned copy 55 GB/s, so the warm bar is 60% of 32 GB/s."""
    gib = 4 << 30
    warm = {"cuda/safetensors": 1.09, "cuda/fastsafetensors": 0.23, "cuda/runai": 0.81, "cuda/fastload": 0.20,
            "cuda/fastload-repeat": gib / 27e9, "limit/pread-pinned": gib / 32e9, "limit/h2d-pinned": gib / 55e9}
    cold = {"cuda/safetensors": 2.85, "cuda/fastsafetensors": 2.40, "cuda/runai": 2.6, "cuda/fastload": 2.30,
            "limit/odirect": 2.20}
    table = {v.target: v for v in verdicts({"gpu": _result("gpu", warm), "gpu-cold": _result("gpu-cold", cold)})}
    gpu = {target: v for target, v in table.items() if target.startswith("GPU")}
    assert len(gpu) == 6 and all(v.passed for v in gpu.values()), gpu
    share = next(v for t, v in gpu.items() if t.startswith("GPU warm `load_file` ≥ 60%"))
    assert share.measured.startswith("67% (21.47 of 32.00 GB/s") and "pinned pread" in share.measured  # smaller

    slow = dict(warm, **{"cuda/fastload": 0.30, "cuda/fastload-repeat": gib / 20e9})
    odirect_bound = dict(cold, **{"cuda/fastload": 2.5})  # 88% of the O_DIRECT limit, behind fastsafetensors
    table = {v.target: v for v in verdicts({"gpu": _result("gpu", slow), "gpu-cold": _result("gpu-cold",
                                                                                              odirect_bound)})}
    failed = {t for t, v in table.items() if t.startswith("GPU") and v.passed is False}
    assert len(failed) == 6, table

    missing = {v.target: v for v in verdicts({"gpu": _result("gpu", {"cuda/fastload": 0.2})})}
    assert all(v.passed is None for t, v in missing.items() if t.startswith("GPU"))
    cold_share = missing["GPU cold: `load_file` ≥ 90% of the O_DIRECT read limit"]
    assert "no `gpu-cold` scenario in this run" in cold_share.measured


@pytest.mark.parametrize(("nbytes", "judged"), [(VERDICT_MIN_BYTES, True), (VERDICT_MIN_BYTES // 50, False)])
def test_verdicts_are_judged_only_at_a_meaningful_size(nbytes: int, judged: bool) -> None:
    """Below 1 GiB process start and per-call costs decide the ratios: no bold PASS/FAIL there."""
    scenario = SCENARIOS["warm"]
    seconds = {"cpu/safetensors": 1.0, "cpu/fastload": 1.5, "cpu/torch.load": 3.0}  # 1.5× and 2×: both fail
    summaries = {
        method.id: Summary(method, [Run("warm", method.id, 0, seconds=seconds[method.id], bytes=nbytes)], nbytes)
        for method in scenario.methods if method.id in seconds
    }
    found = {v.target: v for v in verdicts({"warm": ScenarioResult(scenario, summaries, "/dev/shm")})}
    ratio = found["warm `load_file` ≤ 1.1× the time of `safetensors.torch.load_file`"]
    faster = found["warm `load_file` ≥ 8× faster than `torch.load`"]
    assert ratio.measured.startswith("1.50×") and faster.measured.startswith("2.0× faster")
    if judged:
        assert ratio.passed is False and faster.passed is False
    else:
        assert ratio.passed is None and faster.passed is None and "not judged" in ratio.measured


def test_stage_table_gives_each_methods_median_stages() -> None:
    """A GPU lease is short: the report must say where a first load's time went, not just its total."""
    from fastload_core.bench.report import stage_table

    result = _result("gpu", {"cuda/fastload": 0.3, "cuda/safetensors": 1.0})
    runs = result.summaries["cuda/fastload"].runs
    runs.append(Run("gpu", "cuda/fastload", 1, seconds=0.5, bytes=4 << 30))
    runs[0].stages = {"pin (thread-s)": 0.2, "read": 0.25}
    runs[1].stages = {"pin (thread-s)": 0.4, "read": 0.45}
    table = stage_table(result).splitlines()
    assert table[0] == "| stages, median s | pin (thread-s) | read |"
    assert table[2] == "| fastload load_file(device=cuda) | 0.300 | 0.350 |"
    assert len(table) == 3  # safetensors reports no stages: no row
    assert stage_table(_result("gpu", {"cuda/safetensors": 1.0})) == ""
