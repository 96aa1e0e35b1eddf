"""Where a new replica's start goes, cold and warm, through each compile-cache backend.

Every measurement is a fresh Python process with empty fastload, inductor and temp directories, so a
"warm" start has nothing local to lean on: whatever it skips, it skipped because of the cache.

    python benchmarks/bench_compile.py [--rounds 3] [--models block,mlp] [--backends file,redis,s3]
                                       [--paths compile,export] [--device cpu|cuda] [--json out.json]

Each process goes through the stages of a replica start and times them: ``import torch``,
``import fastload_core``, building the model and loading its weights (``load_model`` from a
safetensors file, without compile), then the clock: ``fastload_core.compile(model, cache=...,
example_inputs=...)`` to the first output, which the compile report splits into ``torch.compile()``
(dynamo's imports), key, fetch, unpack, mega-cache load and the first call. The baseline is plain
``torch.compile`` + first call of the same model, in fresh processes of the same run. Targets: warm
ready <= 0.15 x plain, for each model and backend.

``--paths``: ``compile`` is ``fastload_core.compile`` as it is by default (the inductor cache directory
and mega-cache, restored before torch.compile's first call); ``export`` passes ``export=True`` (an
AOTInductor package, loaded by torch's C++ runner without importing dynamo). Each row names the path
that served its warm replica (``served_by``, from the report).

Models: ``block`` is the project's transformer block (``fastload_core.bench.checkpoints.Block``: 64
features, 4 heads, 256-wide MLP; input 2x16x64), ``mlp`` a small MLP (64 -> 256 -> GELU -> 64; input
8x64). Redis: starts its own ``redis-server`` on a free port. S3: uses ``AWS_ENDPOINT_URL_S3`` if set,
otherwise starts moto's server on loopback (needs ``moto[server]``); a backend whose service cannot be
started is reported as skipped with the reason. A round whose cold start is not a miss, whose warm
start is not a hit, or whose warm output differs from the cold one beyond float32 rounding is printed
and flagged in the table, never silently dropped.
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

from fastload_devservices._process import ServerProcess  # noqa: E402
from fastload_devservices.redis import RedisServer  # noqa: E402
from fastload_devservices.s3 import S3Server  # noqa: E402

S = TypeVar("S", bound=ServerProcess)
MODELS = ("block", "mlp")
#: Cold and warm outputs may differ by a reordered float32 sum on a GPU (see
#: tests/compile_cache/test_compiler.py); a wrong restore is off by orders of magnitude more.
TOLERANCE = 1e-5


# --- the replica ---------------------------------------------------------------------------------
def build(model: str) -> Any:
    """The benchmark's models (imported lazily: the child times its imports itself)."""
    from torch import nn

    from fastload_core.bench.checkpoints import Block

    if model == "block":
        return Block(64, 256, heads=4)
    if model == "mlp":
        return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    raise SystemExit(f"unknown model {model!r}; choose from {', '.join(MODELS)}")


def example_shape(model: str) -> tuple[int, ...]:
    return (2, 16, 64) if model == "block" else (8, 64)


def child(cache_url: str | None, model_name: str, weights: str, device: str, export: bool = False) -> None:
    """One replica start: imports, model and weights, then compile + first call; timings as JSON."""
    t0 = time.perf_counter()
    import torch

    t1 = time.perf_counter()
    import fastload_core

    t2 = time.perf_counter()
    model = fastload_core.load_model(functools.partial(build, model_name), weights, device)
    t3 = time.perf_counter()
    stages: dict[str, float] = {"import_torch": t1 - t0, "import_fastload": t2 - t1, "model_and_weights": t3 - t2}
    result: dict[str, Any] = {}
    with torch.inference_mode():
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(*example_shape(model_name), generator=generator).to(device)
        started = time.perf_counter()
        if cache_url is None:
            compiled = torch.compile(model)
            output = compiled(x)
            if device == "cuda":
                torch.cuda.synchronize()
            result["ready_s"] = time.perf_counter() - started
        else:
            compiled = fastload_core.compile(model, cache=cache_url, example_inputs=(x,), export=export)
            output = compiled(x)  # the first output a request gets
            if device == "cuda":
                torch.cuda.synchronize()
            result["ready_s"] = time.perf_counter() - started
            report = fastload_core.report_of(compiled)
            assert report is not None
            stages.update({f"compile.{name}": seconds for name, seconds in report.stages.items()})
            result.update(status=report.status, lookup=report.lookup, store=report.store,
                          entry_bytes=report.entry_bytes, restored_files=report.restored_files,
                          counters=report.torch_counters, served_by=_served_by(report),
                          notes=report.notes)
        result["compiler_imported"] = sorted(m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules)
    result["stages"] = stages
    result["output"] = output.float().cpu().flatten().tolist()
    result["since_start_s"] = time.perf_counter() - t0
    print(json.dumps(result))


def _served_by(report: Any) -> str:
    """Which path produced the warm replica's kernels (the report names it; see docs/compile_cache.md)."""
    if report.status != "hit":
        return f"{report.status} ({report.served_by})"
    if report.served_by == "aoti-package":
        return "AOTInductor package from the cache, C++ runner (no dynamo)"
    return "inductor FX-graph/AOTAutograd entries + built kernels from the cache (torch.compile)"


def run_replica(cache_url: str | None, env: dict[str, str], model: str, weights: Path, device: str,
                export: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as home:
        child_env = {k: v for k, v in env.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_"))}
        child_env.update(FASTLOAD_CACHE_DIR=f"{home}/fastload", TMPDIR=f"{home}/tmp", PYTHONPATH=str(ROOT))
        os.makedirs(f"{home}/tmp")
        started = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--child", cache_url or "-", "--models", model,
                               "--weights", str(weights), "--device", device, *(["--export"] if export else [])],
                              env=child_env, capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"replica failed:\n{done.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        result["process_s"] = wall
        return result


def write_weights(model: str, directory: Path) -> Path:
    """The model's weights as safetensors, written once: every replica loads the same ones."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = directory / f"{model}.safetensors"
    save_file({k: v.contiguous() for k, v in build(model).state_dict().items()}, str(path))
    return path


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
def verdict(cold: dict[str, Any], warm: dict[str, Any]) -> str:
    """"ok" for a miss then a hit with the same output (within float32 rounding); else what differed."""
    problems = []
    if cold.get("status") != "miss":
        problems.append(f"cold was {cold.get('status')} (lookup {cold.get('lookup')})")
    if warm.get("status") != "hit":
        problems.append(f"warm was {warm.get('status')} (lookup {warm.get('lookup')})")
    difference = max_difference(cold["output"], warm["output"])
    if difference > TOLERANCE * max(1.0, max(abs(v) for v in cold["output"])):
        problems.append(f"outputs differ by {difference:.3g}")
    return "; ".join(problems) or ("ok" if difference == 0 else f"ok (outputs within {difference:.1g})")


def max_difference(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return float("inf")
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def bench_backend(name: str, url_template: str, env: dict[str, str], rounds: int, model: str, weights: Path,
                  device: str, export: bool = False) -> dict[str, Any]:
    """Each round gets its own empty namespace (``{i}`` in the template), so its cold start is cold."""
    cold, warm, verdicts = [], [], []
    for index in range(rounds):
        round_url = url_template.format(i=f"{model}{index}")
        cold.append(run_replica(round_url, env, model, weights, device, export))
        warm.append(run_replica(round_url, env, model, weights, device, export))
        verdicts.append(verdict(cold[-1], warm[-1]))
        c, w = cold[-1], warm[-1]
        print(f"  {model}/{name} round {index + 1}: cold {c['ready_s']:.2f}s ({c['status']}), "
              f"warm {w['ready_s']:.2f}s ({w['status']}): {verdicts[-1]}", file=sys.stderr)
    served = sorted({w.get("served_by", "") for w in warm})
    return {"backend": name, "model": model, "url": url_template, "cold": cold, "warm": warm, "verdicts": verdicts,
            "served_by": served}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", help=f"comma-separated, from {', '.join(MODELS)} (default: all on cpu, "
                                         "block on cuda, which keeps benchmarks/gpu_check.sh short)")
    parser.add_argument("--backends", default="file,redis,s3")
    parser.add_argument("--paths", default="compile,export",
                        help="compile (torch.compile entry), export (export=True: AOTInductor package), or both")
    parser.add_argument("--export", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for benchmarks/gpu_check.sh")
    parser.add_argument("--json", type=Path, help="also write raw results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(None if args.child == "-" else args.child, args.models, args.weights, args.device, args.export)
        return 0
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    models = (args.models or ("block" if args.device == "cuda" else ",".join(MODELS))).split(",")
    for model in models:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    paths = args.paths.split(",")
    if not paths or any(path not in ("compile", "export") for path in paths):
        parser.error("--paths takes compile, export or compile,export")

    env = dict(os.environ)
    results: list[dict[str, Any]] = []
    plain: dict[str, list[dict[str, Any]]] = {}
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fl-bench-weights-") as weights_dir:
        for model in models:
            weights = write_weights(model, Path(weights_dir))
            print(f"{model}: baseline, plain torch.compile", file=sys.stderr)
            plain[model] = [run_replica(None, env, model, weights, args.device) for _ in range(args.rounds)]
            for name in args.backends.split(","):
                for path in paths:
                    label = name if path == "compile" else f"{name}, export"
                    print(f"{model}: backend {label}", file=sys.stderr)
                    run = functools.partial(bench_backend, label, rounds=args.rounds, model=model, weights=weights,
                                            device=args.device, export=path == "export")
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
                        skipped.append(f"{model}/{label}: {exc}")
    print(table(plain, results))
    print()
    print(stage_table(plain, results))
    for line in skipped:
        print(f"\nskipped {line}")
    if args.json:
        args.json.write_text(json.dumps({"plain": plain, "backends": results, "skipped": skipped}, indent=1))
    return 0


def _med(values: Any) -> float:
    return statistics.median(list(values))


def table(plain: dict[str, list[dict[str, Any]]], results: list[dict[str, Any]]) -> str:
    """Medians. "ready" is the compile() call to the first output; the targets are warm / plain."""
    lines = [
        "| model | backend | plain torch.compile ready (s) | fastload cold ready (s) | warm ready (s) | "
        "**warm / plain** | warm / cold | warm process wall (s) | plain process wall (s) | entry | outcome | "
        "warm served by |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        model, cold, warm = result["model"], result["cold"], result["warm"]
        plain_ready = _med(r["ready_s"] for r in plain[model])
        cold_ready, warm_ready = _med(r["ready_s"] for r in cold), _med(r["ready_s"] for r in warm)
        cells = [
            model, result["backend"], f"{plain_ready:.2f}", f"{cold_ready:.2f}", f"{warm_ready:.2f}",
            f"**{warm_ready / plain_ready:.3f}**", f"{warm_ready / cold_ready:.3f}",
            f"{_med(r['process_s'] for r in warm):.2f}", f"{_med(r['process_s'] for r in plain[model]):.2f}",
            f"{_med(r['entry_bytes'] for r in cold) / 1024:.0f} KiB",
            "; ".join(sorted(set(result["verdicts"]))), "; ".join(result["served_by"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_STAGES = ("import_torch", "import_fastload", "model_and_weights", "compile.torch_compile", "compile.key",
           "compile.fetch", "compile.unpack", "compile.load_mega", "compile.export", "compile.aoti_compile",
           "compile.load_package", "compile.first_call")


def stage_table(plain: dict[str, list[dict[str, Any]]], results: list[dict[str, Any]]) -> str:
    """Median seconds per stage; "other" is the ready time that no compile stage accounts for
    (the store after a cold compile: pack + upload; the report's own bookkeeping)."""
    header = ["model", "start", *(s.replace("compile.", "") for s in _STAGES), "other in ready", "ready"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(model: str, label: str, runs: list[dict[str, Any]]) -> None:
        cells = [model, label]
        for stage in _STAGES:
            values = [r["stages"].get(stage) for r in runs]
            cells.append(f"{_med(v for v in values if v is not None):.2f}" if any(v is not None for v in values)
                         else "–")
        ready = _med(r["ready_s"] for r in runs)
        accounted = _med(sum(v for k, v in r["stages"].items() if k.startswith("compile.")) for r in runs)
        cells += [f"{max(0.0, ready - accounted):.2f}" if accounted else "–", f"{ready:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")

    for model, runs in plain.items():
        row(model, "plain torch.compile", runs)
        for result in results:
            if result["model"] == model:
                row(model, f"{result['backend']} cold", result["cold"])
                row(model, f"{result['backend']} warm", result["warm"])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
