"""The load benchmark: synthetic checkpoints and a harness that times each loader in a fresh process.

Run it as ``fastload bench`` (or ``python benchmarks/bench_load.py``); results go to
docs/benchmarks.md. Nothing here is imported by the loader itself.
"""
