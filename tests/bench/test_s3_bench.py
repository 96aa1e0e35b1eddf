"""The S3 benchmark end to end at a tiny size: real servers, fresh child processes, a parsed report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def test_quick_run_reports_every_method_against_both_servers(tmp_path: Path) -> None:
    methods = ["ceiling", "floor_shm", "fetch_shm", "fetch_shm_md5", "disk_write", "stream"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_s3.py"), "--quick", "--servers", "seaweed,moto",
         "--methods", ",".join(methods), "--disk", str(tmp_path), "--out", str(tmp_path / "s3.md"),
         "--json", str(tmp_path / "s3.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads((tmp_path / "s3.json").read_text())
    assert [run["server"] for run in runs] == ["seaweed", "moto"]
    for run in runs:
        assert not run["notes"], run["notes"]  # nothing failed
        objects = run["objects"]  # boto3's default upload carries CRC32; the MD5 row's object carries none
        assert objects["model/model.safetensors"].startswith("CRC32 "), objects
        assert objects["model-md5/model.safetensors"].startswith("no additional checksum"), objects
        for method in methods:
            (result,) = run["results"][method]
            assert result["seconds"] > 0 and result["wall"] >= result["seconds"] and result["cpu"] > 0
            assert result["cpu_all"] >= result["cpu"]  # fastload's cache copies after the call count too
            if method != "disk_write":  # every network method made the server work
                assert result["server_cpu"] > 0, (run["server"], method)
    report = (tmp_path / "s3.md").read_text()
    assert report.count("| ceiling: 16 threads") == 2 and "× ceiling" in report
