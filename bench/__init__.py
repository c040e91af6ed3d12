"""Benchmarks of issue 6: `python -m bench` (see bench/run.py and docs/benchmarks.md)."""
