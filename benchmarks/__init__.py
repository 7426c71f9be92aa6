"""Benchmark suite: `python -m benchmarks`."""
