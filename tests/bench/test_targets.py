"""The target table: each kind of comparison judged on made-up medians (no processes run)."""

from __future__ import annotations

from fastload_core.bench.results import Run, ScenarioResult, Summary
from fastload_core.bench.scenarios import SCENARIOS
from fastload_core.bench.targets import verdicts


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
