"""What a benchmark run produced: each run, the median per method, and a scenario's summaries."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .methods import Method
from .scenarios import Scenario


@dataclass
class Run:
    scenario: str
    method: str
    round: int
    seconds: float | None = None
    bytes: int = 0
    tensors: int = 0
    checksum: int | None = None
    setup_seconds: float | None = None
    process_seconds: float = 0.0
    resident_before: float | None = None
    peak_rss_bytes: int | None = None
    anon_huge_bytes: int | None = None
    stages: dict[str, float] = field(default_factory=dict)
    load_seconds: float | None = None  # the loader's call alone
    touch_seconds: float | None = None  # the checksum pass (inside ``seconds`` unless the scenario is a GPU one)
    error: str | None = None


@dataclass
class Summary:
    """Median of the successful rounds of one method in one scenario."""

    method: Method
    runs: list[Run]
    expected_bytes: int

    @property
    def ok(self) -> list[Run]:
        return [r for r in self.runs if r.error is None and r.seconds is not None]

    @property
    def median(self) -> float | None:
        return statistics.median(r.seconds for r in self.ok if r.seconds is not None) if self.ok else None

    @property
    def bytes(self) -> int:
        return self.ok[0].bytes if self.ok else 0

    @property
    def gbps(self) -> float | None:
        median = self.median
        return self.bytes / median / 1e9 if median else None

    @property
    def error(self) -> str | None:
        failed = [r.error for r in self.runs if r.error]
        return failed[0] if failed and not self.ok else None


@dataclass
class ScenarioResult:
    scenario: Scenario
    summaries: dict[str, Summary]
    location: str
    notes: list[str] = field(default_factory=list)
    cut_short: bool = False  # SIGTERM stopped it before every round ran

    def median(self, method_id: str) -> float | None:
        summary = self.summaries.get(method_id)
        return summary.median if summary else None

    def gbps(self, method_id: str) -> float | None:
        summary = self.summaries.get(method_id)
        return summary.gbps if summary else None

    @property
    def anchor_id(self) -> str | None:
        if self.scenario.anchor is not None:
            return self.scenario.anchor if self.median(self.scenario.anchor) else None
        candidates = [(s.median, mid) for mid, s in self.summaries.items()
                      if not s.method.limit and "fastload" not in s.method.name and s.median]
        return min(candidates)[1] if candidates else None
