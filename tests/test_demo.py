"""``fastload demo`` end to end on a tiny sample: every row present and the outputs identical."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastload_core.cli import main


def test_demo_runs_every_step_and_checks_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--size-gb", "0.01", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^(stock|fastload): .*?\s+(\d+\.\d{3})\s+(\d+\.\d\d)\s+(\S+)$", out, re.MULTILINE)
    assert [row[0] for row in rows] == ["stock"] + ["fastload"] * 4
    assert rows[0][3] == "1.0x" and rows[3][3] == "-"  # the node warm-up is not a model load
    assert all(float(seconds) > 0 for _, seconds, _, _ in rows)
    assert "outputs identical to the stock path: yes" in out
    assert sorted(p.suffix for p in tmp_path.glob("synthetic-*")) == [".json", ".pt", ".safetensors"]
