"""``fastload demo`` end to end on a tiny sample: every row present, printed as it ends, outputs identical,
the sample removed unless ``--keep``, bad sizes refused."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastload_core.cli import main

# step, median seconds, range ("a–b" or "one run"), GB/s, speed-up
ROW = re.compile(
    r"^((?:stock|fastload|torch\.compile): .*?)\s+(\d+\.\d{3})\s+(\d+\.\d{3}–\d+\.\d{3}|one run)\s+(\S+)\s+(\S+)$",
    re.MULTILINE,
)


@pytest.mark.slow
def test_demo_runs_every_step_and_checks_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--size-gb", "0.01", "--dir", str(tmp_path), "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    rows = ROW.findall(out)
    assert [name.split(":")[0] for name, *_ in rows] == ["stock"] + ["fastload"] * 4 + ["torch.compile"] * 2
    assert rows[0][4] == "1.0x" and rows[3][4] == "-"  # the node warm-up is not a model load
    assert all(float(seconds) > 0 for _, seconds, *_ in rows)
    for _, seconds, spread, _, _ in rows[:5]:  # two runs each: the median lies within their range
        low, high = map(float, spread.split("–"))
        assert low <= float(seconds) <= high
    assert rows[5][0].endswith(": miss") and rows[6][0].endswith(": hit")  # the second replica skipped the compile
    assert rows[5][2] == rows[6][2] == "one run" and "torch.compile rows: one run each" in out
    assert "warm the node: a one-time step per node" in out  # the slow-looking row is explained
    assert "outputs identical to the stock path: yes" in out
    assert not list(tmp_path.glob("synthetic-*")) and "removed the sample" in out


def test_demo_keeps_the_sample_only_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["demo", "--size-gb", "0.01", "--dir", str(tmp_path), "--no-compile", "--repeat", "1"]
    assert main([*args, "--keep"]) == 0
    out = capsys.readouterr().out
    assert "writing a sample" in out and "kept the sample" in out and "rm " in out
    assert [name.split(":")[0] for name, *_ in ROW.findall(out)] == ["stock"] + ["fastload"] * 4
    assert all(spread == "one run" for _, _, spread, _, _ in ROW.findall(out))
    assert sorted(p.suffix for p in tmp_path.glob("synthetic-*")) == [".json", ".pt", ".safetensors"]
    assert main(args) == 0  # reuses the kept sample, says so, and this time removes it
    out = capsys.readouterr().out
    assert "reusing the sample" in out and "writing" not in out and "removed the sample" in out
    assert not list(tmp_path.glob("synthetic-*"))


def test_demo_prints_each_step_as_it_ends(tmp_path: Path) -> None:
    """The first row reaches a pipe while later steps still run: no silence, then a whole table."""
    env = {**os.environ, "FASTLOAD_CACHE_DIR": str(tmp_path / "cache")}
    with subprocess.Popen(
        # Enough left to do after the first row (4 steps x 5 loads of 30 MB) that a starved test process still
        # reads that row before the demo ends.
        [sys.executable, "-m", "fastload_core", "demo", "--size-gb", "0.03", "--dir", str(tmp_path),
         "--no-compile", "--repeat", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("stock: "):
                assert process.poll() is None, "the first row came out only when the demo had finished"
                break
        rest = process.stdout.read()
        assert process.wait(timeout=300) == 0
    assert "load_model(file://), served from /dev/shm" in rest


@pytest.mark.parametrize(("flag", "value"), [("--size-gb", "0"), ("--size-gb", "-1"), ("--repeat", "0")])
def test_demo_refuses_a_meaningless_size_in_one_line(flag: str, value: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "fastload_core", "demo", flag, value, "--dir", str(tmp_path)],
                          capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("fastload: error: ") and done.stderr.count("\n") == 1
    assert flag in done.stderr and not list(tmp_path.iterdir())  # nothing written
