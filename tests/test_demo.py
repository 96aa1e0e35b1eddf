"""``fastload demo`` end to end on a tiny sample: every row present and the outputs identical."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastload_core.cli import main

ROW = re.compile(r"^((?:stock|fastload|torch\.compile): .*?)\s+(\d+\.\d{3})\s+(\S+)\s+(\S+)$", re.MULTILINE)


@pytest.mark.slow
def test_demo_runs_every_step_and_checks_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--size-gb", "0.01", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = ROW.findall(out)
    assert [name.split(":")[0] for name, *_ in rows] == ["stock"] + ["fastload"] * 4 + ["torch.compile"] * 2
    assert rows[0][3] == "1.0x" and rows[3][3] == "-"  # the node warm-up is not a model load
    assert all(float(seconds) > 0 for _, seconds, _, _ in rows)
    assert rows[5][0].endswith(": miss") and rows[6][0].endswith(": hit")  # the second replica skipped the compile
    assert "outputs identical to the stock path: yes" in out
    assert sorted(p.suffix for p in tmp_path.glob("synthetic-*")) == [".json", ".pt", ".safetensors"]


def test_demo_without_compile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--size-gb", "0.01", "--dir", str(tmp_path), "--no-compile"]) == 0
    assert [name.split(":")[0] for name, *_ in ROW.findall(capsys.readouterr().out)] == ["stock"] + ["fastload"] * 4
