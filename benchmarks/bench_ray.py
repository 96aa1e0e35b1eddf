"""Ray Serve start-up and multiplexing benchmark: fastload_ray against the stock way, on SeaweedFS.

Measures, in one run, on one local Ray cluster, against one SeaweedFS S3 endpoint on loopback:
  * seconds from ``serve.run`` to the first correct HTTP response, 2 replicas of a model of --size:
      - empty: the same deployment with no model (replica processes, torch's import, Serve's own start-up);
      - stock: in ``__init__``, a tuned boto3 ``download_file`` of a ``torch.save`` file, ``Model()``,
        ``torch.load(weights_only=True, mmap=True)``, ``load_state_dict``;
      - fastload: ``@fastload_ray.accelerate(Model)`` on the same weights as safetensors;
    cold (fastload's tiers empty) and warm (a second ``serve.run`` right after, on the same node);
  * multiplexed loads of --adapters small models (--adapter-size each) on one replica, in two passes:
    first touch (from S3) and warm tier (evicted from the replica, still in fastload's local tier),
    timed inside the loader (around ``load_model_async``) and over HTTP (the request's round trip),
    plus HTTP requests that hit a model already in the replica, for the HTTP overhead.

Each round runs the start-up methods in a shuffled order; medians over --rounds. The correct response
is checked against outputs the driver computed from the same weights. Replicas are fresh processes
(Ray starts a new worker per replica), so their imports are included; the Ray cluster and the Serve
controller stay up between runs, as on a node that already runs Serve.

Usage: python benchmarks/bench_ray.py [--size 2GiB] [--rounds 3] [--adapters 100] [--adapter-size 10MB]
           [--out bench-out/ray.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fastload_core.storage.settings import parse_size  # noqa: E402

BUCKET = "models"
WIDTH = 8192  # the big model's layers: WIDTH x WIDTH fp32, 256 MiB each
MiB = 2**20


class Big(nn.Module):
    def __init__(self, layers: int = 8, width: int = WIDTH) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class Small(nn.Module):
    def __init__(self, width: int = 1600) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def probe(width: int) -> torch.Tensor:
    return torch.ones(1, width) / math.sqrt(width)


def answer(model: nn.Module, width: int) -> list[float]:
    with torch.inference_mode():
        return [float(v) for v in model(probe(width))[0, :8]]


def build_deployments(layers: int, env: dict[str, str], small_width: int) -> dict[str, Any]:
    """The three start-up deployments and the multiplexed one (defined here so that Ray pickles them by
    value into the replicas: the benchmark is a script, not an importable module)."""
    import fastload_ray
    from ray import serve

    options = {"num_cpus": 0.5, "runtime_env": {"env_vars": env}}

    def build() -> Big:
        return Big(layers)

    @serve.deployment(num_replicas=2, ray_actor_options=options)
    class Empty:
        def __init__(self) -> None:
            self.ready = torch.zeros(1)  # the same process as the others (torch imported), without a model

        async def __call__(self, request: Any) -> dict[str, Any]:
            return {"answer": None}

    @serve.deployment(num_replicas=2, ray_actor_options=options)
    class Stock:
        def __init__(self) -> None:
            import boto3
            from boto3.s3.transfer import TransferConfig

            tuned = TransferConfig(max_concurrency=16, multipart_chunksize=16 * MiB, multipart_threshold=16 * MiB)
            directory = tempfile.mkdtemp(prefix="stock-", dir=env["BENCH_STOCK_DIR"])
            path = os.path.join(directory, "model.pt")
            boto3.client("s3").download_file(BUCKET, "big/model.pt", path, Config=tuned)
            self.model = build()
            self.model.load_state_dict(torch.load(path, weights_only=True, mmap=True))
            self.model.eval()
            shutil.rmtree(directory)

        async def __call__(self, request: Any) -> dict[str, Any]:
            return {"answer": answer(self.model, WIDTH)}

    @serve.deployment(num_replicas=2, ray_actor_options=options)
    @fastload_ray.accelerate(build, uri=f"s3://{BUCKET}/big/model.safetensors")
    class Fastload:
        async def __call__(self, request: Any) -> dict[str, Any]:
            return {"answer": answer(self.model, WIDTH)}

    def small() -> Small:
        return Small(small_width)

    @serve.deployment(num_replicas=1, ray_actor_options=options)
    class Multiplexed:
        def __init__(self) -> None:
            self.loads: list[tuple[str, float]] = []

        async def __call__(self, request: Any) -> dict[str, Any]:
            model = await self.get_model(serve.get_multiplexed_model_id())
            with torch.inference_mode():
                return {"answer": float(model(torch.ones(1, small_width))[0, 0])}

        @serve.multiplexed(max_num_models_per_replica=4)
        async def get_model(self, model_id: str) -> Small:
            started = time.perf_counter()
            model = await fastload_ray.load_model_async(small, f"s3://{BUCKET}/small/{model_id}/")
            self.loads.append((model_id, time.perf_counter() - started))
            return model

        def take_loads(self) -> list[tuple[str, float]]:
            loads, self.loads = self.loads, []
            return loads

    return {"empty": Empty, "stock": Stock, "fastload": Fastload, "multiplexed": Multiplexed}


def post(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(url, data=b"{}", headers=headers or {})
    with urllib.request.urlopen(request, timeout=600) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2GiB", help="the start-up model's size (multiples of 256 MiB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--adapter-size", default="10MB", help="each multiplexed model's size")
    parser.add_argument("--out", default=str(REPO / "bench-out" / "ray.md"))
    args = parser.parse_args()
    size = parse_size(args.size, variable="--size")
    adapter_size = parse_size(args.adapter_size, variable="--adapter-size")
    if not isinstance(size, int) or size < 256 * MiB or not isinstance(adapter_size, int) or adapter_size < 4096:
        parser.error("--size must be at least 256MiB and --adapter-size at least 4KiB (byte sizes, not percentages)")
    if args.rounds < 1 or args.adapters < 5:
        parser.error("--rounds must be at least 1 and --adapters at least 5 (more than a replica holds)")
    layers = size // (WIDTH * WIDTH * 4)
    small_width = int(math.sqrt(adapter_size / 4))

    import boto3
    from boto3.s3.transfer import TransferConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import ray
        from ray import serve

    from benchmarks.bench_bentoml import CountingSeaweed, object_checksum  # SeaweedFS with its bytes-sent counter
    from fastload_devservices._process import free_port

    work = Path(tempfile.mkdtemp(prefix="fl-bench-ray-", dir="/tmp"))
    shm = Path("/dev/shm") / f"fl-bench-ray-{os.getpid()}"
    server = CountingSeaweed(work / "weed")
    load_at_start = os.getloadavg()
    server.start()
    env = {
        "AWS_ENDPOINT_URL_S3": server.endpoint_url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1", "FASTLOAD_CACHE_DIR": str(work / "cache"), "FASTLOAD_SHM_DIR": str(shm),
        "BENCH_STOCK_DIR": str(work), "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled",
    }
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_") or k == "RAY_AUTH_MODE"})
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    lines: list[str] = []
    try:
        from botocore.config import Config

        # SeaweedFS sometimes stalls a request for a minute on a busy machine (volume growth): retry it.
        client = boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 8},
                                                  read_timeout=120))
        tuned = TransferConfig(max_concurrency=16, multipart_chunksize=16 * MiB, multipart_threshold=16 * MiB)
        torch.manual_seed(0)
        model = Big(layers)
        expected = answer(model, WIDTH)
        from safetensors.torch import save, save_file

        save_file(model.state_dict(), str(work / "model.safetensors"))
        torch.save(model.state_dict(), work / "model.pt")
        del model
        for name in ("model.safetensors", "model.pt"):  # boto3's defaults: with its CRC32 checksum
            client.upload_file(str(work / name), BUCKET, f"big/{name}", Config=tuned)
            (work / name).unlink()
        checksum = object_checksum(server, "big/model.safetensors")
        small_expected = {}
        for index in range(args.adapters):
            torch.manual_seed(10_000 + index)
            adapter = Small(small_width)
            with torch.inference_mode():
                small_expected[f"m{index}"] = float(adapter(torch.ones(1, small_width))[0, 0])
            body = save({name: t.contiguous() for name, t in adapter.state_dict().items()})
            client.put_object(Bucket=BUCKET, Key=f"small/m{index}/model.safetensors", Body=body)
        print(f"uploaded: {layers} x {WIDTH}x{WIDTH} fp32 = {size / 2**30:.2f} GiB (safetensors and torch.save), "
              f"{args.adapters} x {adapter_size / 1e6:.1f} MB; load average at start {load_at_start}; "
              f"model.safetensors carries {checksum}", flush=True)

        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(work / "ray"), log_to_driver=False,
                 object_store_memory=128 * MiB)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        deployments = build_deployments(layers, env, small_width)

        sent: dict[str, list[float]] = {}

        def start(method: str, kind: str) -> float:
            before = server.sent_bytes()
            started = time.monotonic()
            serve.run(deployments[method].bind(), name=method, route_prefix=f"/{method}")
            got = post(f"{url}/{method}")["answer"]
            seconds = time.monotonic() - started
            if method != "empty" and not torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-5):
                raise SystemExit(f"{method}: wrong answer {got[:3]} (expected {expected[:3]})")
            serve.delete(method)
            sent.setdefault(f"{method} {kind}" if method != "empty" else "empty", []).append(
                (server.sent_bytes() - before) / size)
            return seconds

        def clear_tiers() -> None:
            shutil.rmtree(shm, ignore_errors=True)
            shutil.rmtree(work / "cache", ignore_errors=True)

        times: dict[str, list[float]] = {}
        for number in range(1, args.rounds + 1):
            order = ["empty", "stock", "fastload"]
            random.shuffle(order)
            for method in order:
                if method == "fastload":
                    clear_tiers()
                kinds = ["cold", "warm"] if method != "empty" else ["cold"]
                for kind in kinds:
                    seconds = start(method, kind)
                    times.setdefault(f"{method} {kind}" if method != "empty" else "empty", []).append(seconds)
                    print(f"round {number}: {method:<8} {kind:<4} {seconds:6.2f} s", flush=True)

        # --- multiplexed ---------------------------------------------------------------------------
        clear_tiers()
        handle = serve.run(deployments["multiplexed"].bind(), name="multiplexed", route_prefix="/multiplexed")
        ids = [f"m{index}" for index in range(args.adapters)]
        passes: dict[str, dict[str, list[float]]] = {}
        for label in ("first touch", "warm tier"):
            http: list[float] = []
            for model_id in ids:
                started = time.monotonic()
                got = post(f"{url}/multiplexed", {"serve_multiplexed_model_id": model_id})["answer"]
                http.append(time.monotonic() - started)
                if abs(got - small_expected[model_id]) > 1e-4:
                    raise SystemExit(f"multiplexed {model_id}: wrong answer {got}")
            loader = [seconds for _, seconds in handle.take_loads.remote().result()]
            if len(loader) != len(ids):
                raise SystemExit(f"{label}: {len(loader)} loads for {len(ids)} requests (expected one each)")
            passes[label] = {"loader": loader, "http": http}
        hits: list[float] = []
        for _ in range(min(args.adapters, 50)):
            started = time.monotonic()
            post(f"{url}/multiplexed", {"serve_multiplexed_model_id": ids[-1]})
            hits.append(time.monotonic() - started)
        serve.delete("multiplexed")
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        server.stop()
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    load_at_end = os.getloadavg()
    median = {name: statistics.median(values) for name, values in times.items()}
    base = median["empty"]
    lines.append(f"Command: `python benchmarks/bench_ray.py --size {args.size} --rounds {args.rounds} "
                 f"--adapters {args.adapters} --adapter-size {args.adapter_size}`; load average at start "
                 f"{load_at_start[0]:.2f} / {load_at_start[1]:.2f} / {load_at_start[2]:.2f}, at the end "
                 f"{load_at_end[0]:.2f} / {load_at_end[1]:.2f} / {load_at_end[2]:.2f}. The model was uploaded with "
                 f"boto3's default checksum: {checksum}.")
    lines.append("")
    lines.append(f"Start-up, 2 replicas of a {size / 2**30:.2f} GiB model: seconds from `serve.run` to the first "
                 f"correct HTTP response (median of {args.rounds}; above empty = minus the empty deployment's "
                 "median; origin bytes per round, from SeaweedFS's own bytes-sent counter, in model sizes)")
    lines.append("")
    lines.append("| method | median s | rounds s | above empty s | stock / fastload (above empty) | origin bytes |")
    lines.append("|---|---:|---|---:|---:|---:|")
    for name in ("empty", "stock cold", "fastload cold", "stock warm", "fastload warm"):
        above = median[name] - base
        kind = name.split()[-1]
        ratio = ""
        if name.startswith("fastload"):
            stock_above = median[f"stock {kind}"] - base
            ratio = f"{stock_above / above:.1f}x" if above > 0.1 else f"n/a: within 0.1 s of empty ({above:+.2f})"
        rounds = ", ".join(f"{v:.1f}" for v in times[name])
        origin = "/".join(f"{v:.2f}x" for v in sent[name])
        lines.append(f"| {name} | {median[name]:.2f} | {rounds} | {above:.2f} | {ratio} | {origin} |")
    lines.append("")
    lines.append(f"Multiplexed: {args.adapters} models of {adapter_size / 1e6:.1f} MB on CPU, one replica holding 4; "
                 "milliseconds")
    lines.append("")
    lines.append("| pass | loader p50 | loader p95 | HTTP p50 | HTTP p95 |")
    lines.append("|---|---:|---:|---:|---:|")
    for label, values in passes.items():
        lines.append(f"| {label} | {percentile(values['loader'], 0.5) * 1e3:.1f} | "
                     f"{percentile(values['loader'], 0.95) * 1e3:.1f} | {percentile(values['http'], 0.5) * 1e3:.1f} | "
                     f"{percentile(values['http'], 0.95) * 1e3:.1f} |")
    lines.append(f"| loaded already (HTTP only) | | | {percentile(hits, 0.5) * 1e3:.1f} | "
                 f"{percentile(hits, 0.95) * 1e3:.1f} |")
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
