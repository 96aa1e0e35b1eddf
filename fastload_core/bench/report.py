"""The benchmark's report: one markdown section (machine, command, a table per scenario, the targets)
that replaces its own part of docs/benchmarks.md between markers."""

from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from .pagecache import EvictionLog
from .results import ScenarioResult
from .targets import Verdict, verdicts


def scenario_table(result: ScenarioResult) -> str:
    fastload = result.median(result.scenario.fastload)
    anchor_id = result.anchor_id
    anchor = result.median(anchor_id) if anchor_id else None
    anchor_label = result.summaries[anchor_id].method.label if anchor_id else "n/a"
    lines = [
        "| method | median s | GB/s | time ÷ fastload | time ÷ anchor | rounds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for summary in result.summaries.values():
        label = summary.method.label + (" *(anchor)*" if summary.method.id == anchor_id else "")
        median = summary.median
        if median is None:
            lines.append(f"| {label} | n/a: {_cell(summary.error or 'no result')} | | | | 0/{len(summary.runs)} |")
            continue
        gbps = summary.gbps or 0.0
        vs_fast = f"{median / fastload:.2f}×" if fastload else "n/a"
        vs_anchor = f"{median / anchor:.2f}×" if anchor else "n/a"
        lines.append(f"| {label} | {median:.3f} | {gbps:.2f} | {vs_fast} | {vs_anchor} | "
                     f"{len(summary.ok)}/{len(summary.runs)} |")
    lines.append("")
    lines.append(f"Anchor: {anchor_label}. \"time ÷ X\" above 1 means slower than X.")
    return "\n".join(lines)


def stage_table(result: ScenarioResult) -> str:
    """Median seconds of each stage fastload reported, per method: where a first load's time went (a
    ``thread-s`` stage is summed over reader threads, so it can exceed the wall time). Empty when no
    method reported stages."""
    reporting = [s for s in result.summaries.values() if any(r.stages for r in s.ok)]
    names = list(dict.fromkeys(name for s in reporting for r in s.ok for name in r.stages))
    if not names:
        return ""
    lines = [f"| stages, median s | {' | '.join(names)} |", "|---|" + "---:|" * len(names)]
    for summary in reporting:
        cells = []
        for name in names:
            values = [r.stages[name] for r in summary.ok if name in r.stages]
            cells.append(f"{statistics.median(values):.3f}" if values else "")
        lines.append(f"| {summary.method.label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def verdict_table(items: Iterable[Verdict]) -> str:
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    for item in items:
        verdict = "n/a" if item.passed is None else ("**PASS**" if item.passed else "**FAIL**")
        lines.append(f"| {item.target} | {_cell(item.measured)} | {verdict} |")
    return "\n".join(lines)


def render(
    results: Mapping[str, ScenarioResult],
    machine: dict[str, str],
    command: str,
    checkpoint_line: str,
    eviction: EvictionLog | None,
    notes: Sequence[str] = (),
    dry_run: bool = False,
) -> str:
    out = ["## Load benchmark", ""]
    out.append("Machine: " + "; ".join(f"{k}: {v}" for k, v in machine.items()) + ".")
    out.append("")
    out.append(f"Command: `{command}`")
    out.append("")
    out.append(f"Checkpoint: {checkpoint_line}.")
    out.extend(f"\n{note}" for note in notes)
    out.append("")
    for result in results.values():
        out.append(f"### {result.scenario.title}")
        out.append("")
        out.append(f"File location: `{result.location}`.")
        if result.scenario.cold and eviction is not None:
            out.append(f"Page cache: {eviction.method} before every run; fallback to drop_caches "
                       f"{eviction.fallbacks} time(s) ({eviction.failures} failed); at most "
                       f"{eviction.max_resident_after:.1%} of the file was resident when a run started (mincore).")
        out.append("")
        out.append(scenario_table(result))
        if stages := stage_table(result):
            out.extend(["", stages])
        for note in result.notes:
            out.append(f"\nCheck: {note}.")
        out.append("")
    out.append("### Targets")
    out.append("")
    out.append(verdict_table(verdicts(results, dry_run)))
    out.append("")
    return "\n".join(out)


MARK_START = "<!-- bench:load:start -->"
MARK_END = "<!-- bench:load:end -->"


def update_markdown(path: Path, section: str) -> None:
    """Replace the load section between the markers, keeping the rest of the file as it is."""
    block = f"{MARK_START}\n{section.rstrip()}\n{MARK_END}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(MARK_END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def machine_info(disk_dir: Path, warm_dir: Path) -> dict[str, str]:
    """What a reader needs to reproduce or discount the numbers."""
    from importlib import metadata

    cpu = "unknown CPU"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    versions = []
    for package in ("torch", "safetensors", "runai-model-streamer", "fastsafetensors"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    info = {
        "CPU": f"{cpu}, {os.cpu_count()} cores",
        "RAM": f"{memory:.0f} GiB",
        "kernel": os.uname().release,
        "disk": _mount_of(disk_dir),
        "warm": _mount_of(warm_dir),
        "THP": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "load average at start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "software": ", ".join(versions),
    }
    if torch.cuda.is_available():
        info["GPU"] = torch.cuda.get_device_name(0)
    return info


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "unknown"


def _mount_of(path: Path) -> str:
    """Device and file system under ``path`` (longest matching mount point)."""
    target = str(path.resolve())
    best = ("?", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, point, fstype = line.split()[:3]
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[1]):
                best = (device, point, fstype)
    except OSError:
        pass
    return f"{target} on {best[0]} ({best[2]})"
