"""End to end: ``bentoml serve`` of examples/bentoml/ with 2 workers, weights on moto's S3 server.

Bytes the origin served are counted by the fault proxy in front of moto (no faults queued), which is
independent of fastload's own bookkeeping; fastload's Prometheus figures are checked against it.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from fastload_devservices.bento import BentoServe, bentoml_command
from fastload_devservices.faultproxy import FaultProxy
from fastload_devservices.s3 import BUCKET
from tests.integrations.fastload_bentoml.test_adapter import BENTOML_WARNINGS

pytestmark = [pytest.mark.s3, pytest.mark.slow, *BENTOML_WARNINGS]

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "bentoml"
WIDTH, LAYERS = 64, 4
PREFIX = "demo-mlp"


def load_demo_model() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_model", EXAMPLE / "demo_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = load_demo_model()


@pytest.fixture
def origin(s3: Any, s3_server: Any) -> Iterator[FaultProxy]:
    """The demo model on moto (put there by the example's own script), and the counting proxy in front."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLE / "put_model.py"), f"s3://{BUCKET}/{PREFIX}/", "--width", str(WIDTH),
         "--layers", str(LAYERS), "--endpoint-url", s3_server.endpoint_url],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    proxy = FaultProxy(s3_server.port)
    yield proxy
    proxy.close()


@pytest.fixture
def reference() -> tuple[list[float], torch.Tensor]:
    x = demo.example_input(WIDTH)
    with torch.inference_mode():
        return x, demo.make(WIDTH, LAYERS)(torch.tensor(x))


def serve(tmp_path: Path, proxy: FaultProxy, run: str, target: str = "service:Demo", cwd: Path = EXAMPLE,
          home: Path | None = None, **env: str) -> BentoServe:
    return BentoServe(
        target, cwd=cwd, home=home or tmp_path / "bentoml-home", log=tmp_path / f"{run}.log",
        env={"AWS_ENDPOINT_URL_S3": proxy.endpoint_url, "DEMO_WEIGHTS": f"s3://{BUCKET}/{PREFIX}/",
             "DEMO_WORKERS": "2", **env},
    )


def model_size(s3: Any) -> int:
    return int(s3.head_object(Bucket=BUCKET, Key=f"{PREFIX}/{demo.WEIGHTS_NAME}")["ContentLength"])


def both_workers(server: BentoServe) -> dict[int, dict[str, Any]]:
    """Each worker's load report (requests land on whichever worker accepts first, so ask until both did)."""
    reports: dict[int, dict[str, Any]] = {}
    for _ in range(200):
        report = server.post("load_report", {})
        reports[report["worker"]] = report
        if len(reports) == 2:
            return reports
    raise AssertionError(f"only worker(s) {sorted(reports)} answered 200 requests")


def check_predictions(server: BentoServe, reference: tuple[list[float], torch.Tensor]) -> None:
    x, expected = reference
    for _ in range(6):
        got = torch.tensor(server.post("predict", {"x": x}))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def metric_values(server: BentoServe) -> dict[tuple[str, str], float]:
    status, text = server.get("metrics")
    assert status == 200
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("fastload_") and not sample.name.endswith(("_bucket", "_created")):
                assert "pid" not in sample.labels, sample  # one series per node, not one per process
                values[(sample.name, sample.labels.get("tier", ""))] = sample.value
    return values


def mapping_kb(pid: int, path: str) -> tuple[int, int]:
    """(Rss, Pss) in kB of ``path``'s mappings in process ``pid``."""
    rss = pss = 0
    current = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            current = line.endswith(path)
        elif current and line.startswith(("Rss:", "Pss:")):
            kb = int(line.split()[1])
            if line.startswith("Rss:"):
                rss += kb
            else:
                pss += kb
    return rss, pss


def test_two_workers_share_one_download_and_a_restart_reads_the_warm_tier(
    tmp_path: Path, s3: Any, origin: FaultProxy, reference: tuple[list[float], torch.Tensor], shm_root: Path
) -> None:
    size = model_size(s3)
    with serve(tmp_path, origin, "cold") as server:
        server.wait_until(lambda: server.initialized() == 2)
        check_predictions(server, reference)
        reports = both_workers(server)
        assert {r["tier"] for r in reports.values()} == {"shm"}
        assert {r["strategy"] for r in reports.values()} == {"cpu-mmap"}
        (path,) = {r["path"] for r in reports.values()}
        assert Path(path).is_relative_to(shm_root)
        assert origin.get_body_bytes == size  # the whole service downloaded the model once

        # Prometheus figures, whichever worker answers the scrape, add up to the node's: one download
        # (in the serve process), one promotion to shm, one shm hit per worker.
        for _ in range(4):
            values = metric_values(server)
            assert values[("fastload_fetch_bytes_total", "local_disk")] == size
            assert values[("fastload_fetches_total", "shm")] == 1
            assert values[("fastload_tier_hits_total", "shm")] == 2
            assert values[("fastload_fetches_in_progress", "local_disk")] == 0

        # On CPU the workers map one copy of the weights: each maps all of it, and their proportional
        # shares (PSS) add up to one copy.
        file = str(Path(path) / demo.WEIGHTS_NAME)
        sizes = [mapping_kb(r["pid"], file) for r in reports.values()]
        rss = [r for r, _ in sizes]
        assert min(rss) * 1024 >= size
        assert sum(p for _, p in sizes) <= max(rss) + 8  # + rounding of the per-page shares
    assert "Traceback" not in server.output()

    origin.reset_counters()
    with serve(tmp_path, origin, "warm") as server:
        server.wait_until(lambda: server.initialized() == 2)
        check_predictions(server, reference)
        assert {r["tier"] for r in both_workers(server).values()} == {"shm"}
        assert origin.get_body_bytes == 0
    assert len(re.findall(r"via cpu-mmap from tier shm", server.output())) == 2  # each worker's load report


def test_missing_weights_fail_bentoml_serve_at_start_with_one_clear_error(
    tmp_path: Path, s3: Any, origin: FaultProxy
) -> None:
    server = serve(tmp_path, origin, "missing", DEMO_WEIGHTS=f"s3://{BUCKET}/no-such-model/").start()
    try:
        assert server.wait_exit(timeout=180) != 0
    finally:
        server.stop()
    output = server.output()
    assert f"cannot fetch the weights at s3://{BUCKET}/no-such-model/" in output
    assert output.count("cannot fetch the weights") == 1 and "Traceback" not in output
    assert "initialized" not in output  # failed before any worker started, not at the first request


def test_a_shm_tier_too_small_falls_through_to_disk_with_one_warning(
    tmp_path: Path, s3: Any, origin: FaultProxy, reference: tuple[list[float], torch.Tensor]
) -> None:
    """As in a container with Docker's 64 MiB /dev/shm. BentoML's safetensors preheat is on as well: it
    patches ``safe_open``, which fastload does not call, so the service must serve as without it."""
    with serve(tmp_path, origin, "small-shm", FASTLOAD_SHM_CAPACITY="4KiB", BENTOML_MODEL_PREHEAT="1") as server:
        server.wait_until(lambda: server.initialized() == 2)
        check_predictions(server, reference)
        assert {r["tier"] for r in both_workers(server).values()} == {"local_disk"}
    output = server.output()
    assert output.count("tier 'shm' cannot take") == 1 and "--shm-size" in output


def build_fastload_wheel(into: Path, scratch: Path) -> None:
    """fastload's wheel, as the example's bentofile.yaml asks (built from a copy of the sources, so that no
    build/ directory appears in the checkout)."""
    scratch.mkdir()
    for name in ("pyproject.toml", "README.md", "fastload_core", "integrations"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, scratch / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, scratch / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(into),
         str(scratch)], capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_built_bento_serves(
    tmp_path: Path, s3: Any, origin: FaultProxy, reference: tuple[list[float], torch.Tensor]
) -> None:
    """Built as the example says: with fastload's own wheel inside (the name on PyPI is another project),
    and BentoML's home inside the example directory as its README sets it (which must not end up in the
    bento: BentoML builds in a temporary directory under that home)."""
    example = tmp_path / "example"
    home = example / ".bentoml"
    shutil.copytree(EXAMPLE, example, ignore=shutil.ignore_patterns("__pycache__", "wheels", ".bentoml"))
    build_fastload_wheel(example / "wheels", tmp_path / "fastload-src")
    built = subprocess.run(
        [*bentoml_command(), "build", "--output", "tag"], cwd=example, capture_output=True, text=True,
        timeout=300, check=False, env={**serve(tmp_path, origin, "build").env, "BENTOML_HOME": str(home)},
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (tag,) = re.findall(r"__tag__:(\S+)", built.stdout)
    assert tag.startswith("demo:") and (home / "bentos" / "demo").is_dir()
    bento = home / "bentos" / "demo" / tag.split(":")[1]
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    (wheel,) = [line for line in requirements if "fastload" in line]
    assert wheel.startswith("./wheels/fastload-") and (bento / "src" / wheel).is_file()
    packed = sorted(str(path.relative_to(bento / "src")) for path in (bento / "src").rglob("*") if path.is_file())
    assert packed == ["bentofile.yaml", "demo_model.py", "service.py", wheel.removeprefix("./")], packed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with serve(tmp_path, origin, "bento", target=tag, cwd=elsewhere, home=home) as server:
        server.wait_until(lambda: server.initialized() == 2)
        check_predictions(server, reference)
    assert len(re.findall(r"from tier shm", server.output())) == 2


FRONT = '''
import bentoml
from service import Demo


@bentoml.service
class Front:
    demo = bentoml.depends(Demo)

    @bentoml.api
    def load_report(self) -> dict:
        return self.demo.load_report()

    @bentoml.api
    def predict(self, x: list[float]) -> list[float]:
        return self.demo.predict(x)
'''


def test_an_accelerated_service_used_as_a_dependency_still_downloads_once(
    tmp_path: Path, s3: Any, origin: FaultProxy, reference: tuple[list[float], torch.Tensor], shm_root: Path
) -> None:
    """BentoML builds a dependency's workers (and their environment) before it runs that service's
    on_deployment hook: its workers must still find the hook's download and the version it warmed."""
    service_dir = tmp_path / "front"
    shutil.copytree(EXAMPLE, service_dir)
    (service_dir / "front.py").write_text(FRONT)
    origin.delay = 8.0  # the hook's download is still running when the workers start
    with serve(tmp_path, origin, "front", target="front:Front", cwd=service_dir) as server:
        server.wait_until(lambda: server.initialized() == 3)  # Front's worker and Demo's two
        check_predictions(server, reference)
        # Front's client keeps one connection to Demo, so only one of Demo's workers answers it: the log
        # shows the other's load.
        report = server.post("load_report", {})
        assert report["tier"] == "shm" and Path(report["path"]).is_relative_to(shm_root)
        assert origin.get_body_bytes == model_size(s3)  # the whole service downloaded the model once
    assert len(re.findall(r"via cpu-mmap from tier shm", server.output())) == 2  # both of Demo's workers
    assert "Traceback" not in server.output()
