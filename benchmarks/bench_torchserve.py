"""TorchServe: the stock way against fastload, from registering a model to its first correct prediction.

One real TorchServe (``torchserve --start --foreground``, own ports and temp dir) and one SeaweedFS
(``weed mini``, the S3 origin) on loopback. Every round registers, with 2 workers and ``synchronous=true``,
then predicts until the answer equals the reference, then unregisters, for each of:

  * **empty**: a model with no weights (TorchServe's own start: worker processes, imports, the handler);
  * **stock**: ``--serialized-file model.pth`` inside the .mar, loaded by ``BaseHandler``
    (``Model()`` with random init, then ``load_state_dict(torch.load(...))``), as TorchServe documents;
  * **fastload cold**: a .mar without weights, ``handler.fastload.uri`` on SeaweedFS, fastload's tiers
    emptied first (download, then both workers map one /dev/shm copy);
  * **fastload warm**: the same archive again, the weights still in /dev/shm from the cold run.

The order of the three loaded methods rotates every round; empty runs first. Figures are medians over
rounds, with the time above the empty start (what loading the weights costs) and its ratio to stock's.
Archive sizes and build times are measured once. Page caches are not dropped (other people share this
machine), so the stock archive and SeaweedFS's files may be in memory: cold means "fastload's tiers are
empty", not "no byte cached anywhere".

Usage: python benchmarks/bench_torchserve.py [--size-gb 2] [--rounds 3] [--out bench-out/torchserve.md]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from fastload_core import load_file  # noqa: E402
from fastload_devservices.seaweed import BUCKET, SeaweedServer  # noqa: E402
from fastload_devservices.torchserve import TorchServe, build_archive  # noqa: E402

WIDTH = 4096
INPUT = [((i % 97) - 48) / 48 for i in range(WIDTH)]  # a fixed request body; no randomness to disagree on
SHOWN = 8  # outputs returned per request (enough to tell a wrong weight from a right one)

MODEL = '''\
"""{layers} bias-free linear layers of {width}x{hidden} and back, float32: {size} bytes of weights."""

import torch
from torch import nn


class Big(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        shapes = [({hidden}, {width}) if i % 2 == 0 else ({width}, {hidden}) for i in range({layers})]
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out, bias=False) for n_out, n_in in shapes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x
'''

EMPTY_MODEL = '''\
import torch
from torch import nn


class Empty(nn.Module):
    """No parameters: what TorchServe costs before any weight is read."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)
'''

HANDLER = '''\
import json

import torch
from {module} import {base}


class Handler({base}):
    def preprocess(self, data):
        rows = []
        for request in data:
            body = request.get("data") if request.get("data") is not None else request.get("body")
            rows.append(json.loads(body) if isinstance(body, (bytes, bytearray)) else body)
        return torch.tensor(rows, dtype=torch.float32, device=self.device)

    def postprocess(self, output):
        return output[:, :{shown}].tolist()
'''


def write_model(directory: Path, size: int) -> tuple[Path, int]:
    """model.py for a stack of 4096x8192 layers adding up to ``size`` bytes (a multiple of one layer)."""
    hidden = 2 * WIDTH
    layer_bytes = WIDTH * hidden * 4
    layers = max(2, round(size / layer_bytes))
    layers += layers % 2  # back to WIDTH at the end
    path = directory / "model.py"
    path.write_text(MODEL.format(layers=layers, width=WIDTH, hidden=hidden, size=layers * layer_bytes))
    return path, layers


def write_weights(directory: Path, layers: int) -> dict[str, torch.Tensor]:
    """Seeded weights scaled so activations neither vanish nor saturate, as safetensors and as a pickle."""
    generator = torch.Generator().manual_seed(0)
    hidden = 2 * WIDTH
    state = {}
    for i in range(layers):
        n_out, n_in = (hidden, WIDTH) if i % 2 == 0 else (WIDTH, hidden)
        state[f"layers.{i}.weight"] = torch.randn(n_out, n_in, generator=generator) / n_in**0.5
    save_file(state, directory / "model.safetensors")
    torch.save(state, directory / "model.pth")
    return state


def reference(weights: Path, layers: int) -> list[float]:
    state = load_file(weights)  # zero-copy views; the bench process holds no second copy
    x = torch.tensor([INPUT])
    with torch.inference_mode():
        for i in range(layers):
            x = torch.tanh(x @ state[f"layers.{i}.weight"].T)
    return x[0, :SHOWN].tolist()


def timed_build(name: str, store: Path, **kwargs: Any) -> tuple[Path, float]:
    started = time.monotonic()
    archive = build_archive(name, store, **kwargs)
    return archive, time.monotonic() - started


def register_to_first_correct(server: TorchServe, name: str, expected: list[float] | None,
                              timeout: float = 900.0) -> float:
    started = time.monotonic()
    status, answer = server.register(f"{name}.mar", workers=2, timeout=timeout)
    if status != 200:
        raise RuntimeError(f"registering {name} failed: {status} {answer}\n{server.model_log()[-4000:]}")
    while time.monotonic() - started < timeout:
        status, got = server.predict(name, INPUT, timeout=timeout)
        if status == 200 and (expected is None or _close(got, expected)):
            return time.monotonic() - started
        time.sleep(0.05)
    raise RuntimeError(f"{name}: no correct prediction within {timeout}s (last: {status} {str(got)[:200]})")


def _close(got: Any, expected: list[float]) -> bool:
    return isinstance(got, list) and len(got) == len(expected) and all(
        abs(a - b) <= 1e-4 + 1e-3 * abs(b) for a, b in zip(got, expected, strict=True))


def unregister(server: TorchServe, name: str) -> None:
    status, answer = server.unregister(name)
    if status != 200:
        raise RuntimeError(f"unregistering {name} failed: {status} {answer}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    args = parser.parse_args()

    load_at_start = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="fastload-bench-torchserve-"))
    shm = Path("/dev/shm") / f"fastload-bench-torchserve-{os.getpid()}"
    cache = root / "fastload-cache"
    seaweed = SeaweedServer(root / "seaweed")
    server: TorchServe | None = None
    try:
        source = root / "source"
        source.mkdir()
        model_py, layers = write_model(source, int(args.size_gb * 2**30))
        print(f"writing {layers} layers of weights ...", flush=True)
        write_weights(source, layers)
        size = (source / "model.safetensors").stat().st_size
        expected = reference(source / "model.safetensors", layers)
        (source / "stock_handler.py").write_text(HANDLER.format(
            module="ts.torch_handler.base_handler", base="BaseHandler", shown=SHOWN))
        (source / "fastload_handler.py").write_text(HANDLER.format(
            module="fastload_torchserve", base="FastloadHandler", shown=SHOWN))
        empty = root / "empty"
        empty.mkdir()
        (empty / "model.py").write_text(EMPTY_MODEL)
        common = "minWorkers: 2\nmaxWorkers: 2\nstartupTimeout: 900\nresponseTimeout: 900\n"
        (source / "stock.yaml").write_text(common)
        (source / "fastload.yaml").write_text(
            common + f"handler:\n  fastload:\n    uri: s3://{BUCKET}/big/\n    prefetch: shm\n")

        seaweed.start()
        env = {"AWS_ENDPOINT_URL_S3": seaweed.endpoint_url, "AWS_ACCESS_KEY_ID": "bench",
               "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
               "FASTLOAD_CACHE_DIR": str(cache), "FASTLOAD_SHM_DIR": str(shm)}
        import boto3

        client = boto3.client("s3", endpoint_url=seaweed.endpoint_url, aws_access_key_id="bench",
                              aws_secret_access_key="bench", region_name="us-east-1")
        print("uploading to SeaweedFS ...", flush=True)
        client.upload_file(str(source / "model.safetensors"), BUCKET, "big/model.safetensors")

        server = TorchServe(root / "torchserve", env=env)
        store = server.model_store
        print("building archives ...", flush=True)
        builds = {
            "empty": timed_build("empty", store, model_file=empty / "model.py", handler=source / "stock_handler.py",
                                 config_file=source / "stock.yaml"),
            "stock": timed_build("stock", store, model_file=model_py, handler=source / "stock_handler.py",
                                 config_file=source / "stock.yaml", serialized_file=source / "model.pth"),
            "fastload": timed_build("fastload", store, model_file=model_py,
                                    handler=source / "fastload_handler.py", config_file=source / "fastload.yaml"),
        }
        for name, (archive, seconds) in builds.items():
            print(f"archive {name}: {archive.stat().st_size:,} bytes, built in {seconds:.2f} s", flush=True)
        server.start()

        methods = ["stock", "fastload cold", "fastload warm"]
        times: dict[str, list[float]] = {method: [] for method in ["empty", *methods]}
        for round_index in range(args.rounds):
            order = methods[round_index % 3:] + methods[:round_index % 3]
            if order.index("fastload warm") < order.index("fastload cold"):  # warm needs cold's /dev/shm copy
                order.remove("fastload warm")
                order.insert(order.index("fastload cold") + 1, "fastload warm")
            for method in ["empty", *order]:
                archive = method.split()[0]
                if method == "fastload cold":
                    shutil.rmtree(shm, ignore_errors=True)
                    shutil.rmtree(cache, ignore_errors=True)
                seen = len(server.model_log())
                seconds = register_to_first_correct(server, archive, None if archive == "empty" else expected)
                unregister(server, archive)
                times[method].append(seconds)
                ready = [line.split("MODEL_LOG - ", 1)[-1] for line in server.model_log()[seen:].splitlines()
                         if "fastload: model" in line or "-> local_disk" in line or "-> shm" in line]
                print(f"round {round_index + 1} {method:<14} {seconds:7.2f} s", *ready, sep="\n    ", flush=True)
        downloaded = re.compile(rf"s3://{BUCKET}/big/ -> local_disk: \d+ bytes in ")  # not the progress lines
        origin_note = len(downloaded.findall(server.model_log()))
        report = render(times, builds, size, layers, args, load_at_start, origin_note)
        print(report)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(report)
    finally:
        if server is not None:
            server.stop()
        seaweed.stop()
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def render(times: dict[str, list[float]], builds: dict[str, tuple[Path, float]], size: int, layers: int,
           args: argparse.Namespace, load_at_start: tuple[float, float, float], downloads: int) -> str:
    median = {method: statistics.median(values) for method, values in times.items()}
    empty = median["empty"]
    above = {method: median[method] - empty for method in median}
    lines = [
        f"TorchServe 0.12, 2 workers, CPU; model {size:,} bytes ({layers} float32 layers); "
        f"{args.rounds} rounds; load average at start {load_at_start[0]:.2f} / {load_at_start[1]:.2f} / "
        f"{load_at_start[2]:.2f}; `python benchmarks/bench_torchserve.py --size-gb {args.size_gb:g} "
        f"--rounds {args.rounds}`",
        "",
        "| archive | .mar bytes | build s |",
        "|---|---:|---:|",
        *(f"| {name} | {archive.stat().st_size:,} | {seconds:.2f} |" for name, (archive, seconds) in builds.items()),
        "",
        "| register → first correct prediction | median s | per round | above empty s | stock ÷ this (above empty) |",
        "|---|---:|---|---:|---:|",
    ]
    for method, values in times.items():
        ratio = "" if method == "empty" or above[method] <= 0 else f"{above['stock'] / above[method]:.2f}×"
        lines.append(f"| {method} | {median[method]:.2f} | {' / '.join(f'{v:.2f}' for v in values)} | "
                     f"{'' if method == 'empty' else f'{above[method]:.2f}'} | {ratio} |")
    lines += ["", f"Downloads from SeaweedFS logged by the workers: {downloads} over {args.rounds} cold "
                  "registrations of 2 workers each (1 per registration = one fetch per node)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
