"""The targets the benchmark judges, as a table: each row a kind of comparison within one run.

Every target is a ratio of figures measured in the same rounds (a method against another method, a
limit, or the best of the anchors), never against a number from another day. A target whose figures
are missing says why instead of passing or failing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .checkpoints import GIB
from .results import ScenarioResult
from .scenarios import SCENARIOS

Measured = tuple[str, bool | None]  # what the verdict cell says, and whether the target holds


@dataclass
class Verdict:
    target: str
    measured: str
    passed: bool | None  # None: could not be measured here


@dataclass(frozen=True)
class Target:
    """One row: ``text`` judged on ``scenario``'s result. ``why`` is the reason given when the figures
    are absent; None gives the GPU wording (no run here / a method failed)."""

    text: str
    scenario: str
    why: str | None = None

    def measure(self, result: ScenarioResult) -> Measured | None:
        raise NotImplementedError

    def judge(self, results: Mapping[str, ScenarioResult], dry_run: bool) -> Verdict:
        result = results.get(self.scenario)
        if dry_run and result is not None and SCENARIOS[self.scenario].needs_cuda:
            return Verdict(self.text, "n/a: dry run on the CPU: GPU verdicts do not apply", None)
        measured = self.measure(result) if result is not None else None
        if measured is None:
            return Verdict(self.text, f"n/a: {self._why_missing(result)}", None)
        return Verdict(self.text, *measured)

    def _why_missing(self, result: ScenarioResult | None) -> str:
        if self.why is not None:
            return self.why
        if result is None:
            return f"no `{self.scenario}` scenario in this run (it needs CUDA; benchmarks/gpu_check.sh runs it)"
        return "a method failed"


@dataclass(frozen=True)
class TimeRatio(Target):
    """``median(slower) / median(faster)`` against ``bound`` (``at_most``: the ratio must not exceed it)."""

    slower: str = ""
    faster: str = ""
    bound: float = 1.0
    at_most: bool = False
    show: Callable[[float, float, float], str] = lambda value, slow, fast: f"{value:.2f}×"

    def measure(self, result: ScenarioResult) -> Measured | None:
        slow, fast = result.median(self.slower), result.median(self.faster)
        if not (slow and fast):
            return None
        value = slow / fast
        return self.show(value, slow, fast), value <= self.bound if self.at_most else value >= self.bound


@dataclass(frozen=True)
class ShareOfLimit(Target):
    """``method``'s GB/s as a share of the smallest of ``limits`` (all of which must have run)."""

    method: str = ""
    limits: tuple[str, ...] = ()
    share: float = 1.0
    names: tuple[str, ...] = ()  # how to name each limit in the cell, when there are several

    def measure(self, result: ScenarioResult) -> Measured | None:
        fast = result.gbps(self.method)
        limits = [result.gbps(limit) for limit in self.limits]
        if not fast or not all(limits):
            return None
        limit, which = min((value, index) for index, value in enumerate(limits) if value)
        named = f", {self.names[which]}" if self.names else ""
        return f"{fast / limit:.0%} ({fast:.2f} of {limit:.2f} GB/s{named})", fast / limit >= self.share


@dataclass(frozen=True)
class AheadOfBestAnchor(Target):
    """``method`` at least ``factor`` times faster than the scenario's anchor (the best non-fastload)."""

    method: str = ""
    factor: float = 1.0

    def measure(self, result: ScenarioResult) -> Measured | None:
        anchor = result.anchor_id
        theirs, mine = (result.median(anchor), result.median(self.method)) if anchor else (None, None)
        if not (anchor and theirs and mine):
            return None
        value = theirs / mine
        return f"{value:.2f}× ({result.summaries[anchor].method.label})", value >= self.factor


@dataclass(frozen=True)
class AheadOfAll(Target):
    """``method`` faster than each of ``others`` that ran (n/a when none did)."""

    method: str = ""
    others: tuple[str, ...] = ()

    def measure(self, result: ScenarioResult) -> Measured | None:
        mine = result.median(self.method)
        if mine is None:
            return None
        parts, passed, ran = [], True, False
        for other in self.others:
            theirs = result.median(other)
            if theirs is None:
                parts.append(f"{other.split('/')[1]} n/a")
            else:
                ran = True
                parts.append(f"{other.split('/')[1]} {theirs / mine:.2f}×")
                passed = passed and theirs > mine
        return (", ".join(parts), passed) if ran else (", ".join(parts) + ": no anchor ran", None)


@dataclass(frozen=True)
class Rate(Target):
    """``method`` at ``gbps`` or more, with the scenario's ``limit`` shown beside it."""

    method: str = ""
    gbps: float = 0.0
    limit: str = ""
    limit_name: str = ""

    def measure(self, result: ScenarioResult) -> Measured | None:
        value = result.gbps(self.method)
        if value is None:
            return None
        limit = result.gbps(self.limit)
        extra = f" ({self.limit_name} {limit:.2f} GB/s)" if limit else ""
        return f"{value:.2f} GB/s{extra}", value >= self.gbps


def _faster(value: float, slow: float, fast: float) -> str:
    return f"{value:.1f}× faster"


GPU_ANCHORS = ("cuda/safetensors", "cuda/fastsafetensors", "cuda/runai")
GPU_LIMITS = ("limit/pread-pinned", "limit/h2d-pinned")
GPU_LIMIT_NAMES = ("pinned pread", "pinned host-to-device copy")

TARGETS: tuple[Target, ...] = (
    TimeRatio("warm `load_file` ≤ 1.1× the time of `safetensors.torch.load_file`", "warm",
              slower="cpu/fastload", faster="cpu/safetensors", bound=1.1, at_most=True,
              why="warm scenario or a method missing"),
    TimeRatio("warm `load_file` ≥ 8× faster than `torch.load`", "warm", slower="cpu/torch.load",
              faster="cpu/fastload", bound=8, show=_faster, why="warm scenario or a method missing"),
    TimeRatio("`load_model` ≥ 10× faster than `Model()` + `load_state_dict(torch.load(...))`", "model",
              slower="model/torch.load", faster="model/fastload", bound=10, show=_faster,
              why="model scenario or a method missing"),
    ShareOfLimit("cold `load_file` ≥ 85% of the O_DIRECT read limit", "cold", method="cpu/fastload",
                 limits=("limit/odirect",), share=0.85, why="cold scenario, fastload or the O_DIRECT limit missing"),
    AheadOfBestAnchor("cold `load_file` ≥ 1.2× the best anchor (best non-fastload method)", "cold",
                      method="cpu/fastload", factor=1.2, why="cold scenario or methods missing"),
    Rate("private-memory load from page cache (`copy=True`) ≥ 3 GB/s", "warm", method="cpu/fastload-copy",
         gbps=3.0, limit="limit/hugepage-read", limit_name="huge-page read limit",
         why="warm scenario or fastload-copy missing"),
    # Issue 14, on an H100-class machine.
    TimeRatio("GPU warm: `load_file` at least as fast as fastsafetensors (aim: 1.2×)", "gpu",
              slower="cuda/fastsafetensors", faster="cuda/fastload", bound=1.0,
              show=lambda value, theirs, mine: f"{value:.2f}× ({mine:.3f} s vs {theirs:.3f} s)"),
    ShareOfLimit("GPU warm `load_file` ≥ 60% of the smaller of (parallel pread into pinned, one pinned copy)",
                 "gpu", method="cuda/fastload", limits=GPU_LIMITS, share=0.6, names=GPU_LIMIT_NAMES),
    ShareOfLimit("GPU in-process repeat `load_file` ≥ 80% of the smaller of (parallel pread into pinned, one "
                 "pinned copy)", "gpu", method="cuda/fastload-repeat", limits=GPU_LIMITS, share=0.8,
                 names=GPU_LIMIT_NAMES),
    ShareOfLimit("GPU cold: `load_file` ≥ 90% of the O_DIRECT read limit", "gpu-cold", method="cuda/fastload",
                 limits=("limit/odirect",), share=0.9),
    AheadOfAll("GPU warm: `load_file` faster than safetensors, fastsafetensors and Run:ai", "gpu",
               method="cuda/fastload", others=GPU_ANCHORS),
    AheadOfAll("GPU cold: `load_file` faster than safetensors, fastsafetensors and Run:ai", "gpu-cold",
               method="cuda/fastload", others=GPU_ANCHORS),
)


VERDICT_MIN_BYTES = 1 << 30  # below this, process start and per-call costs, not bandwidth, decide the ratios


def verdicts(results: Mapping[str, ScenarioResult], dry_run: bool = False,
             targets: Sequence[Target] = TARGETS) -> list[Verdict]:
    """Every target judged on ``results`` (GPU targets n/a in a ``dry_run`` on the CPU). Below
    ``VERDICT_MIN_BYTES`` the figures are shown but not judged: a small run checks that things work,
    not speed."""
    out = [target.judge(results, dry_run) for target in targets]
    size = max((s.bytes for r in results.values() for s in r.summaries.values()), default=0)
    if 0 < size < VERDICT_MIN_BYTES:
        why = f"not judged: the targets are for checkpoints of {VERDICT_MIN_BYTES / GIB:g} GiB and more"
        out = [v if v.passed is None else Verdict(v.target, f"{v.measured} ({why})", None) for v in out]
    return out
