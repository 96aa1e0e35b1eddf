"""A fresh replica: compile a small transformer block through the compile cache and report as JSON.

Run by the tests as ``python -m tests.compile_cache.child CACHE_URL OUT.json [--lazy] [--device cuda]
[--deterministic] [--more-shape] [--export]``. The block is the project's one transformer block
(``fastload_core.bench.checkpoints.Block``), at 32 features, 2 heads and a 64-wide MLP so that a cold
CPU compile stays in seconds.

``--deterministic`` compiles with inductor's deterministic mode (no timing-based choice among
reduction configurations); ``--export`` serves from an AOTInductor package (``compiler_imported``
lists which of dynamo and inductor the process had imported after two calls); ``--more-shape`` also
primes a second batch size through ``more_example_inputs`` and then serves it. ``eager`` in the
output is the uncompiled model's result on the same inputs, so a test can tell "restored kernels
compute the same function" from "bit-identical".
"""

from __future__ import annotations

import json
import logging
import sys

import torch

import fastload_core.compile_cache as compile_cache
from fastload_core.bench.checkpoints import Block


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main() -> None:
    cache_url, out = sys.argv[1], sys.argv[2]
    options = sys.argv[3:]
    lazy = "--lazy" in options
    device = options[options.index("--device") + 1] if "--device" in options else "cpu"
    compile_kwargs: dict[str, object] = {}
    if "--deterministic" in options:
        compile_kwargs["options"] = {"deterministic": True}
    if "--export" in options:
        compile_kwargs["export"] = True
    warnings = _Collect()
    logging.getLogger("fastload").addHandler(warnings)
    # As in-process tests (conftest): the once-per-process "shared cache without a secret" warning is taken
    # as given, so "warnings" holds only what the compile itself warned about.
    from fastload_core.compile_cache import cache

    cache._unsigned_shared_warning.set()
    torch.manual_seed(0)
    model = Block(32, 64, heads=2).eval().to(device)
    with torch.inference_mode():  # examples and requests made where they are served (see the README)
        x = torch.randn(2, 8, 32).to(device)
        wide = torch.randn(5, 8, 32).to(device)
        more = [(wide,)] if "--more-shape" in options else []
        eager = [model(x), model(x + 1), model(wide)]
        if lazy:
            compiled = compile_cache.compile(model, cache=cache_url, more_example_inputs=more, **compile_kwargs)
            first = compiled(x)
        else:
            compiled = compile_cache.compile(model, cache=cache_url, example_inputs=(x,),
                                             more_example_inputs=more, **compile_kwargs)
            first = compiled(x)
        second = compiled(x + 1)
        compiler_imported = sorted({name for name in sys.modules if name in ("torch._dynamo", "torch._inductor")})
        from torch._dynamo.utils import counters

        frames_before = int(counters["frames"]["ok"])
        third = compiled(wide) if more else eager[2]
        recompiled_for_more = int(counters["frames"]["ok"]) - frames_before
    report = compile_cache.report_of(compiled)
    assert report is not None
    result = {
        "key": report.key,
        "status": report.status,
        "source": report.source,
        "lookup": report.lookup,
        "store": report.store,
        "stored": report.stored,
        "restored_files": report.restored_files,
        "restored_bytes": report.restored_bytes,
        "entry_bytes": report.entry_bytes,
        "mega_artifacts": report.mega_artifacts,
        "torch_counters": report.torch_counters,
        "stages": report.stages,
        "notes": report.notes,
        "warnings": warnings.messages,
        "outputs": [first.flatten().tolist(), second.flatten().tolist(), third.flatten().tolist()],
        "eager": [t.flatten().tolist() for t in eager],
        "recompiled_for_more": recompiled_for_more,
        "workdir": report.workdir,
        "served_by": report.served_by,
        "compiler_imported": compiler_imported,
    }
    with open(out, "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main()
