"""BentoML benchmark: seconds from ``bentoml serve`` to the first correct response, stock against fastload.

One run, one SeaweedFS server on loopback (``fastload_devservices/seaweed.py``; moto would flatter any cache),
the demo model of examples/bentoml (``--width 4096 --layers 32``: 2 GiB of float32) put there twice: as
``model.safetensors`` under one prefix (fastload) and ``model.pt`` under another (stock). Every round
serves, with 2 workers each:

  * **empty**: the same service with no model (framework start-up and imports: no loader's to win);
  * **stock cold / warm**: each worker downloads ``model.pt`` with tuned boto3 and
    ``load_state_dict(torch.load(...))``s it; warm is a restart that keeps the downloads;
  * **fastload cold / warm**: examples/bentoml/service.py (``accelerate`` + ``Weights``); cold starts
    with empty tiers, warm is a restart (the model is in /dev/shm).

The order of {empty, stock, fastload} rotates every round (cold always right before its warm).
Recorded per run: first correct response (a prediction equal to the reference computed here), all
workers initialized, bytes the origin sent (SeaweedFS's own counter of bytes its S3 gateway sent for
the bucket), and the workers' summed PSS. Medians over rounds; targets are on the time above the empty service's.

Usage: python benchmarks/bench_bentoml.py [--width 4096 --layers 32] [--rounds 3]
       [--markdown docs/benchmarks.md] [--json bench-out/bentoml.json] [--note TEXT]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastload_devservices._process import free_port  # noqa: E402
from fastload_devservices.bento import BentoServe  # noqa: E402
from fastload_devservices.seaweed import BUCKET, SeaweedServer  # noqa: E402

EXAMPLE = REPO / "examples" / "bentoml"
SERVICES = REPO / "benchmarks" / "bentoml"
PREFIX = "bench-bentoml"  # model.safetensors, what fastload fetches (the whole prefix)
STOCK_PREFIX = "bench-bentoml-stock"  # model.pt, what the stock service downloads
START, END = "<!-- bentoml:start -->", "<!-- bentoml:end -->"
GiB = 2**30


def load_demo_model() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_model", EXAMPLE / "demo_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CountingSeaweed(SeaweedServer):
    """``weed mini`` with its Prometheus port open: its S3 gateway counts the bytes it sends per bucket."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.metrics_port = free_port()
        command = self._command
        self._command = lambda port: [*command(port), f"-metricsPort={self.metrics_port}"]

    def sent_bytes(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith("SeaweedFS_s3_bucket_traffic_sent_bytes_total") and f'bucket="{BUCKET}"' in line:
                return int(float(line.split()[-1]))
        return 0


def object_checksum(weed: SeaweedServer, key: str) -> str:
    """The additional checksum the origin keeps for ``key`` (boto3 uploads with CRC32 by default, and a
    verified fetch uses it instead of MD5 when it is there), as the report should say."""
    import boto3

    client = boto3.client("s3", endpoint_url=weed.endpoint_url, aws_access_key_id="bench",
                          aws_secret_access_key="bench", region_name="us-east-1")
    headers = client.head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")["ResponseMetadata"]["HTTPHeaders"]
    found = [f"{name[len('x-amz-checksum-'):].upper()} {value}" for name, value in headers.items()
             if name.startswith("x-amz-checksum-") and name != "x-amz-checksum-type"]
    kind = headers.get("x-amz-checksum-type", "")
    return f"{', '.join(found)} ({kind.lower() or 'type not given'})" if found else "no additional checksum (MD5 only)"


def workers_pss(server: BentoServe) -> int:
    """Summed PSS (bytes) of the serve process's worker processes."""
    import psutil

    assert server.process is not None
    total = 0
    for child in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if "_bentoml_impl.worker" not in " ".join(child.cmdline()):
                continue
            for line in Path(f"/proc/{child.pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except (psutil.Error, OSError):
            continue
    return total


def fetch_seconds(server: BentoServe) -> dict[str, float]:
    """Seconds fastload spent filling each tier in this run (from the service's /metrics): the download
    into local disk and the promotion into /dev/shm, both in the deployment hook."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = server.get("metrics")
    found: dict[str, float] = {}
    if status != 200:
        return found
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fastload_fetch_seconds_sum":
                found[f"fetch_{sample.labels.get('tier', '')}"] = sample.value
    return found


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, weed: CountingSeaweed, expected: list[float],
                 x: list[float]) -> None:
        self.args = args
        self.work = work
        self.weed = weed
        self.expected = expected
        self.x = x
        self.shm = Path("/dev/shm") / f"fastload-bench-bentoml-{os.getpid()}"
        self.env = {
            "AWS_ENDPOINT_URL_S3": weed.endpoint_url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1", "DEMO_WORKERS": str(args.workers),
            "DEMO_WEIGHTS": f"s3://{BUCKET}/{PREFIX}/", "BENCH_BUCKET": BUCKET, "BENCH_PREFIX": STOCK_PREFIX,
            "BENCH_WIDTH": str(args.width), "BENCH_LAYERS": str(args.layers), "STOCK_DIR": str(work / "stock"),
            "FASTLOAD_SHM_DIR": str(self.shm), "FASTLOAD_CACHE_DIR": str(work / "fastload-cache"),
            "PYTHONPATH": os.pathsep.join([str(EXAMPLE), str(REPO)]),
        }
        self.runs = 0

    def correct(self, answer: Any) -> bool:
        if not isinstance(answer, list) or len(answer) != len(self.expected):
            return False
        return all(abs(a - b) <= 1e-4 + 1e-4 * abs(b) for a, b in zip(answer, self.expected, strict=True))

    def reset(self, scenario: str) -> None:
        if scenario == "stock-cold":
            shutil.rmtree(self.work / "stock", ignore_errors=True)
        elif scenario == "fastload-cold":
            shutil.rmtree(self.shm, ignore_errors=True)
            shutil.rmtree(self.work / "fastload-cache", ignore_errors=True)

    def run(self, scenario: str) -> dict[str, float]:
        self.reset(scenario)
        target, cwd = {
            "empty": ("empty_service:Empty", SERVICES),
            "stock-cold": ("stock_service:Stock", SERVICES), "stock-warm": ("stock_service:Stock", SERVICES),
            "fastload-cold": ("service:Demo", EXAMPLE), "fastload-warm": ("service:Demo", EXAMPLE),
        }[scenario]
        self.runs += 1
        server = BentoServe(target, cwd=cwd, home=self.work / "bentoml-home",
                            log=self.work / "logs" / f"{self.runs:02d}-{scenario}.log", env=self.env)
        sent_before = self.weed.sent_bytes()
        server.start()
        try:
            if scenario == "empty":
                first = server.wait_until(lambda: server.try_post("predict", {"x": self.x}) == [0.0] * 8,
                                          timeout=self.args.timeout)
            else:
                first = server.wait_until(lambda: self.correct(server.try_post("predict", {"x": self.x})),
                                          timeout=self.args.timeout)
            ready = server.wait_until(lambda: server.initialized() >= self.args.workers, timeout=self.args.timeout)
            pss = workers_pss(server)
            sent = self.weed.sent_bytes() - sent_before
            stages = fetch_seconds(server) if scenario.startswith("fastload") else {}
        finally:
            server.stop()
        result = {"first": first, "all_ready": ready, "origin_bytes": sent, "pss": pss, **stages}
        print(f"{scenario:<14} first correct response {first:6.2f} s, all workers {ready:6.2f} s, "
              f"origin {sent / GiB:5.2f} GiB, workers' PSS {pss / GiB:5.2f} GiB", flush=True)
        return result


def machine() -> str:
    import bentoml
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, "
            f"kernel {platform.release()}; torch {torch.__version__}, bentoml {bentoml.__version__}; "
            f"load average at start: {load}")


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace, model_bytes: int,
           machine_line: str, load_end: str, checksum: str) -> str:
    def median(scenario: str, key: str) -> float:
        return statistics.median(r[key] for r in results[scenario])

    empty = median("empty", "first")
    lines = [
        START,
        "## BentoML: `bentoml serve` to the first correct response (`benchmarks/bench_bentoml.py`)",
        "",
        f"Machine: {machine_line}; load average at end: {load_end}.",
        "",
        f"Command: `{' '.join(['python', 'benchmarks/bench_bentoml.py', *sys.argv[1:]])}`",
        "",
        f"Model: the demo MLP of examples/bentoml, width {args.width} × {args.layers} layers = "
        f"{model_bytes / GiB:.2f} GiB float32, on SeaweedFS (`weed mini`) on loopback, uploaded by boto3 with its "
        f"default checksum ({checksum}); {args.workers} workers; {args.rounds} rounds, medians (per-round values in "
        "the JSON).",
    ]
    if args.note:
        lines += ["", args.note]
    lines += [
        "",
        "| scenario | first correct response, s | above empty, s | all workers ready, s | origin bytes "
        "(× model) | workers' PSS, GiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for scenario in ("empty", "stock-cold", "fastload-cold", "stock-warm", "fastload-warm"):
        first = median(scenario, "first")
        origin = median(scenario, "origin_bytes") / model_bytes
        lines.append(f"| {scenario} | {first:.2f} | {first - empty:.2f} | {median(scenario, 'all_ready'):.2f} | "
                     f"{origin:.2f} | {median(scenario, 'pss') / GiB:.2f} |")
    stages = [key for key in ("fetch_shm", "fetch_local_disk") if all(key in r for r in results["fastload-cold"])]
    if stages:
        shown = ", ".join(f"{key[len('fetch_'):]} {median('fastload-cold', key):.2f} s" for key in stages)
        lines += ["", f"Inside fastload's cold start, the fills the serve process made (medians, from its /metrics at "
                      f"the first correct response): {shown} (shm: the download from the origin into /dev/shm, "
                      "verified, on the hook's thread while the workers start; local_disk: the write-through "
                      "from that copy, after it and at a lower CPU priority, when it had finished by then)."]
    lines.append("")
    for kind, target in (("cold", 3.0), ("warm", 5.0)):
        stock = median(f"stock-{kind}", "first") - empty
        fast = median(f"fastload-{kind}", "first") - empty
        ratio = stock / fast if fast > 0 else float("inf")
        verdict = "PASS" if ratio >= target else "FAIL"
        lines.append(f"- **{kind}: {ratio:.1f}× sooner above the empty start (target ≥ {target:.0f}×) — "
                     f"{verdict}** ({stock:.2f} s stock vs {fast:.2f} s fastload).")
    origin = median("fastload-cold", "origin_bytes") / model_bytes
    stock_origin = median("stock-cold", "origin_bytes") / model_bytes
    lines.append(f"- **origin bytes, cold: fastload {origin:.2f}× the model, stock {stock_origin:.2f}×** "
                 f"(target: 1× instead of one download per worker).")
    lines += [
        "",
        "What the figures leave out: origin bytes are SeaweedFS's `s3_bucket_traffic_sent_bytes_total` for the "
        "bucket (object bytes plus a few KiB of listings); PSS is measured once all workers are up; SeaweedFS, the "
        "workers and this script share the machine's cores, so a remote S3 endpoint would change the "
        "cold figures (not the warm ones).",
        END,
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one start may take")
    parser.add_argument("--markdown", help="replace the bentoml section of this file (between its markers)")
    parser.add_argument("--json", help="write every run's figures here")
    parser.add_argument("--note", default="", help="a line for the report (e.g. what else ran)")
    args = parser.parse_args()
    if args.rounds < 1 or args.workers < 1 or args.width < 1 or args.layers < 1:
        parser.error("--rounds, --workers, --width and --layers must be at least 1")
    machine_line = machine()
    print(machine_line, flush=True)
    demo = load_demo_model()
    work = Path(tempfile.mkdtemp(prefix="fastload-bench-bentoml-"))
    weed = CountingSeaweed(work / "weed")
    weed.start(timeout=60)
    bench: Bench | None = None
    try:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1"}
        started = time.monotonic()
        put = subprocess.run(
            [sys.executable, str(EXAMPLE / "put_model.py"), f"s3://{BUCKET}/{PREFIX}/", "--width", str(args.width),
             "--layers", str(args.layers), "--pickle-to", f"s3://{BUCKET}/{STOCK_PREFIX}/",
             "--endpoint-url", weed.endpoint_url],
            capture_output=True, text=True, env=env, check=False,
        )
        if put.returncode != 0:
            raise SystemExit(f"put_model.py failed: {put.stderr}")
        model_bytes = int(put.stdout.split()[-1])
        checksum = object_checksum(weed, f"{PREFIX}/model.safetensors")
        print(f"model.safetensors carries {checksum}", flush=True)
        print(f"model: {model_bytes / GiB:.2f} GiB written and uploaded in {time.monotonic() - started:.0f} s",
              flush=True)
        import torch

        x = demo.example_input(args.width)
        with torch.inference_mode():
            expected = demo.make(args.width, args.layers)(torch.tensor(x)).tolist()
        bench = Bench(args, work, weed, expected, x)
        units = [["empty"], ["stock-cold", "stock-warm"], ["fastload-cold", "fastload-warm"]]
        results: dict[str, list[dict[str, float]]] = {s: [] for unit in units for s in unit}
        for round_index in range(args.rounds):
            print(f"round {round_index + 1}/{args.rounds}", flush=True)
            order = units[round_index % len(units):] + units[:round_index % len(units)]
            for unit in order:
                for scenario in unit:
                    results[scenario].append(bench.run(scenario))
        load_end = " ".join(f"{x:.1f}" for x in os.getloadavg())
        if args.json:  # first, so the figures survive whatever happens to the report
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"model_bytes": model_bytes, "machine": machine_line,
                                                   "checksum": checksum,
                                                   "load_end": load_end, "results": results}, indent=1))
        text = report(results, args, model_bytes, machine_line, load_end, checksum)
        print(text)
        if args.markdown:
            path = Path(args.markdown)
            current = path.read_text()
            if START in current and END in current:
                before, rest = current.split(START, 1)
                current = before + text.rstrip("\n") + rest.split(END, 1)[1]
            else:
                current = current.rstrip("\n") + "\n\n" + text
            path.write_text(current)
    finally:
        weed.stop()
        if bench is not None:
            shutil.rmtree(bench.shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
