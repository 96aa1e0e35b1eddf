"""Cold vs warm start of a compiled transformer block on CPU, through each compile-cache backend.

Every measurement is a fresh Python process with empty fastload, inductor and temp directories, so a
"warm" start has nothing local to lean on: whatever it skips, it skipped because of the cache.

    python benchmarks/bench_compile.py [--rounds 3] [--backends file,redis,s3] [--device cpu|cuda]
                                       [--json out.json]

Redis: starts its own ``redis-server`` on a free port. S3: uses ``AWS_ENDPOINT_URL_S3`` if set,
otherwise starts moto's server on loopback (needs ``moto[server]``); a backend whose service cannot
be started is skipped with the reason printed. Prints a markdown table of medians.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.services._process import ServerProcess  # noqa: E402
from tests.services.redis import RedisServer  # noqa: E402
from tests.services.s3 import S3Server  # noqa: E402

S = TypeVar("S", bound=ServerProcess)


# --- the replica ---------------------------------------------------------------------------------
def child(cache_url: str | None, device: str) -> None:
    """One replica start: build the block, compile with a warm-up call, print timings as JSON."""
    started = time.perf_counter()
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, dim: int = 64, heads: int = 4) -> None:
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
            q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    torch.manual_seed(0)
    model, x = Block().eval().to(device), torch.randn(2, 16, 64, device=device)
    imported = time.perf_counter()
    result: dict[str, Any] = {"import_s": imported - started}
    with torch.inference_mode():
        if cache_url is None:
            compiled = torch.compile(model)
            compiled(x)
            result["ready_s"] = time.perf_counter() - imported
        else:
            import fastload_core.compile_cache as compile_cache

            compiled = compile_cache.compile(model, cache=cache_url, example_inputs=(x,))
            result["ready_s"] = time.perf_counter() - imported
            report = compile_cache.report_of(compiled)
            assert report is not None
            result.update(status=report.status, stages=report.stages, entry_bytes=report.entry_bytes,
                          restored_files=report.restored_files, counters=report.torch_counters)
        result["checksum"] = float(compiled(x).sum())
    print(json.dumps(result))


def run_replica(cache_url: str | None, env: dict[str, str], device: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as home:
        child_env = {k: v for k, v in env.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_"))}
        child_env.update(FASTLOAD_CACHE_DIR=f"{home}/fastload", TMPDIR=f"{home}/tmp", PYTHONPATH=str(ROOT))
        os.makedirs(f"{home}/tmp")
        started = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--child", cache_url or "-", "--device", device],
                              env=child_env,
                              capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"replica failed:\n{done.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        result["process_s"] = wall
        return result


# --- services (the test suite's own server starters) ---------------------------------------------
@contextmanager
def running(server: S) -> Iterator[S]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def s3_service(env: dict[str, str]) -> Iterator[str]:
    """A bucket on ``AWS_ENDPOINT_URL_S3`` if set, else on a moto server started for the run."""
    import boto3

    with contextlib.ExitStack() as stack:
        if "AWS_ENDPOINT_URL_S3" not in os.environ:
            server = stack.enter_context(running(S3Server()))
            env.update(AWS_ENDPOINT_URL_S3=server.endpoint_url, AWS_ACCESS_KEY_ID="bench",
                       AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        merged = {**os.environ, **env}
        bucket = f"fastload-bench-{os.getpid()}"
        boto3.client(
            "s3",
            endpoint_url=merged.get("AWS_ENDPOINT_URL_S3"),
            region_name=merged.get("AWS_DEFAULT_REGION"),
            aws_access_key_id=merged.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=merged.get("AWS_SECRET_ACCESS_KEY"),
        ).create_bucket(Bucket=bucket)
        yield f"s3://{bucket}/compile"


# --- the benchmark -------------------------------------------------------------------------------
def bench_backend(name: str, url_template: str, env: dict[str, str], rounds: int, device: str
                  ) -> dict[str, Any]:
    """Each round gets its own empty namespace (``{i}`` in the template), so its cold start is cold."""
    cold, warm = [], []
    for index in range(rounds):
        round_url = url_template.format(i=index)
        cold.append(run_replica(round_url, env, device))
        warm.append(run_replica(round_url, env, device))
        c, w = cold[-1], warm[-1]
        print(f"  {name} round {index + 1}: cold {c['ready_s']:.2f}s ({c['status']}), "
              f"warm {w['ready_s']:.2f}s ({w['status']})", file=sys.stderr)
        if c["status"] != "miss" or w["status"] != "hit" or c["checksum"] != w["checksum"]:
            raise RuntimeError(f"{name}: unexpected cold/warm outcome: {c} / {w}")
    return {"backend": name, "url": url_template, "cold": cold, "warm": warm}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", default="file,redis,s3")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for benchmarks/gpu_check.sh")
    parser.add_argument("--json", type=Path, help="also write raw results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(None if args.child == "-" else args.child, args.device)
        return 0

    env = dict(os.environ)
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    print("baseline: plain torch.compile", file=sys.stderr)
    plain = [run_replica(None, env, args.device) for _ in range(args.rounds)]
    for name in args.backends.split(","):
        print(f"backend: {name}", file=sys.stderr)
        run = functools.partial(bench_backend, name, rounds=args.rounds, device=args.device)
        try:
            if name == "file":
                with tempfile.TemporaryDirectory(prefix="fl-bench-store-") as store:
                    results.append(run(Path(store).as_uri() + "/round{i}", env))
            elif name == "redis":
                with running(RedisServer()) as redis:
                    results.append(run(redis.url + "?prefix=round{i}:", env))
            elif name == "s3":
                s3_env: dict[str, str] = {}
                with s3_service(s3_env) as url:
                    results.append(run(url + "/round{i}", {**env, **s3_env}))
            else:
                skipped.append(f"{name}: unknown backend")
        except (RuntimeError, ImportError, OSError) as exc:
            skipped.append(f"{name}: {exc}")
    print(table(plain, results))
    for line in skipped:
        print(f"\nskipped {line}")
    if args.json:
        args.json.write_text(json.dumps({"plain": plain, "backends": results, "skipped": skipped}, indent=1))
    return 0


def _first_call(result: dict[str, Any]) -> float:
    """The cache's part: fetch, unpack, load the mega-cache, and the first compiled call itself."""
    return sum(result["stages"].get(stage, 0.0) for stage in ("fetch", "unpack", "load_mega", "first_call"))


def table(plain: list[dict[str, Any]], results: list[dict[str, Any]]) -> str:
    """Medians. "ready" is compile() start to a warmed-up model, including the ~1.5 s torch.compile
    spends importing dynamo and inductor, which no cache can skip; "first call" is the cache's part."""
    med = statistics.median
    lines = [
        "| backend | cold ready (s) | warm ready (s) | warm/cold | cold first call (s) | "
        "warm fetch+restore+first call (s) | warm/cold | warm process wall (s) | entry |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| torch.compile alone | {med(r['ready_s'] for r in plain):.2f} | – | – | – | – | – | "
        f"{med(r['process_s'] for r in plain):.2f} (cold) | – |",
    ]
    for result in results:
        cold, warm = result["cold"], result["warm"]
        cold_ready, warm_ready = med(r["ready_s"] for r in cold), med(r["ready_s"] for r in warm)
        cold_first, warm_first = med(_first_call(r) for r in cold), med(_first_call(r) for r in warm)
        wall, size = med(r["process_s"] for r in warm), med(r["entry_bytes"] for r in cold) / 1024
        cells = [
            result["backend"],
            f"{cold_ready:.2f}", f"{warm_ready:.2f}", f"{100 * warm_ready / cold_ready:.0f}%",
            f"{cold_first:.2f}", f"{warm_first:.2f}", f"{100 * warm_first / cold_first:.0f}%",
            f"{wall:.2f}", f"{size:.0f} KiB",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
