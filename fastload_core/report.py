"""What a load cost: the figure users paste into an incident or a benchmark."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoadReport:
    """Bytes, seconds per stage and the path taken by one load (of a file, or of all shards)."""

    source: str
    device: str
    strategy: str = ""  # e.g. "cpu-mmap", "cpu-copy", "cuda-pipeline", plus "+converted" for legacy files
    files: int = 0
    tensors: int = 0
    nbytes: int = 0
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage, summed over files
    seconds: float = 0.0  # wall time of the whole load
    tier: str = ""  # the storage tier the bytes came from ("shm", "local_disk", ...); "" outside every tier

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def add_stage(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds

    def summary(self) -> str:
        stages = ", ".join(f"{name} {secs:.3f}s" for name, secs in self.stages.items())
        return (
            f"fastload: loaded {self.source} ({self.tensors} tensors in {self.files} file(s), "
            f"{self.nbytes / 1e9:.2f} GB) to {self.device} in {self.seconds:.3f}s, "
            f"{self.gbps:.2f} GB/s via {self.strategy}{f' from tier {self.tier}' if self.tier else ''} "
            f"[{stages}]"
        )
