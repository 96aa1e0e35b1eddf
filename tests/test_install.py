"""fastload installs beside the torch (and the framework) a service already runs.

A fake older torch cannot be installed here quickly, so pip's resolver is asked the real question
against a stand-in: a fresh virtual environment holding only the metadata of torch 2.5.1 and of the
other dependencies (what pip reads to decide), and the requirement strings of pyproject.toml. pip
must plan to install nothing (it keeps that torch), and must refuse a torch below the declared floor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from fastload_core._compat import CORE_MINIMUM

ROOT = Path(__file__).resolve().parents[1]
# Versions a BentoML or Ray service of 2024 might hold, each inside fastload's ranges.
INSTALLED = {"safetensors": "0.4.5", "numpy": "1.26.4", "pluggy": "1.5.0", "platformdirs": "4.2.2",
             "filelock": "3.13.1", "tqdm": "4.66.4", "xxhash": "3.4.1"}


def _project() -> dict[str, object]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import pip._vendor.tomli as tomllib  # type: ignore[no-redef]
    project: dict[str, object] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def _requirements() -> list[Requirement]:
    project = _project()
    found = [Requirement(text) for text in project["dependencies"]]  # type: ignore[attr-defined]
    for extra in project["optional-dependencies"].values():  # type: ignore[attr-defined]
        found += [Requirement(text) for text in extra if not text.startswith("fastload[")]
    return found


def test_every_requirement_is_a_range_not_a_pin() -> None:
    pinned = [str(r) for r in _requirements() if any(s.operator in ("==", "===") for s in r.specifier)]
    assert pinned == [], "pin versions in scripts/constraints.txt, not in pyproject.toml"


def test_the_torch_floor_is_what_the_core_needs() -> None:
    [torch_requirement] = [r for r in _requirements() if r.name == "torch"]
    floor = ".".join(map(str, CORE_MINIMUM))
    assert str(torch_requirement.specifier) == f">={floor}"


def _environment_with(tmp_path: Path, torch_version: str) -> Path:
    """A virtual environment (no pip) whose site-packages holds only distribution metadata."""
    root = tmp_path / f"env-torch-{torch_version}"
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    for name, version in {**INSTALLED, "torch": torch_version}.items():
        info = Path(purelib) / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("test\n")
        (info / "RECORD").write_text("")
    return python


def _dry_run(python: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    report = tmp_path / "report.json"
    report.unlink(missing_ok=True)
    requirements = [str(r) for r in (Requirement(t) for t in _project()["dependencies"])]  # type: ignore[attr-defined]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no index, find-links or constraints from this machine's pip.conf
    return subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check", "install",
         "--dry-run", "--no-index", "--report", str(report), "--quiet", *requirements],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )


@pytest.mark.slow
def test_pip_keeps_the_services_torch(tmp_path: Path) -> None:
    python = _environment_with(tmp_path, "2.5.1")
    done = _dry_run(python, tmp_path)
    assert done.returncode == 0, done.stderr
    planned = json.loads((tmp_path / "report.json").read_text())["install"]
    assert planned == [], [item["metadata"]["name"] + " " + item["metadata"]["version"] for item in planned]


@pytest.mark.slow
def test_pip_refuses_a_torch_below_the_floor(tmp_path: Path) -> None:
    """The control: the same question with torch 2.0.1 cannot be satisfied without a download."""
    python = _environment_with(tmp_path, "2.0.1")
    done = _dry_run(python, tmp_path)
    assert done.returncode != 0 and "No matching distribution found for torch>=" in done.stderr
