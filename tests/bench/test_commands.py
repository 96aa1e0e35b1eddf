"""``fastload bench`` on the command line: a first bench without the ``bench`` extra says how to get it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest


def test_missing_third_party_loaders_come_with_a_hint(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fastload_core", "bench", "--size-gb", str(8 / 1024), "--rounds", "1",
         "--scenarios", "warm", "--methods", "runai,fastload", "--dir", str(tmp_path / "disk"),
         "--warm-dir", str(tmp_path / "warm"), "--quiet"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    hint = "come with the bench extra: `bash scripts/setup.sh bench`"
    if importlib.util.find_spec("runai_model_streamer") is None:
        assert "Run:ai Model Streamer: n/a because not installed" in done.stdout and hint in done.stdout
    else:  # installed: it ran, and there is nothing to explain
        assert hint not in done.stdout
    assert "**PASS**" not in done.stdout and "**FAIL**" not in done.stdout  # 8 MiB: verdicts not judged


@pytest.mark.parametrize("bad", [["--size-gb", "0"], ["--size-gb", "nan"], ["--size-gb", "inf"],
                                 ["--timeout", "0"], ["--timeout", "-5"], ["--timeout", "nan"]])
def test_bad_sizes_and_timeouts_are_refused_with_exit_2_before_anything_is_written(tmp_path: Path,
                                                                                  bad: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "fastload_core", "bench", *bad, "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and bad[0] in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.startswith("fastload bench: ") and list(tmp_path.iterdir()) == []
